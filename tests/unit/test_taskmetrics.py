"""Task metrics on tiny hand-checked arrays: CTC decode, CER, thresholded-map IoU, component boxes, hooks."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from quantpipe import metrics as M
from quantpipe.errors import ConfigError, EvaluationError
from quantpipe.taskmetrics import TaskSpec, run_hooks, task_metrics, task_score


def _onehot(seq: list[int], classes: int = 5) -> np.ndarray:
    """[T, C] logits whose argmax per timestep is `seq`."""
    x = np.zeros((len(seq), classes), dtype=np.float32)
    x[np.arange(len(seq)), seq] = 1.0
    return x


def test_greedy_decode_collapses_repeats_and_drops_blank() -> None:
    # a a _ a b b _ _ c  ->  a a b c   (the blank splits the repeated a)
    x = _onehot([1, 1, 0, 1, 2, 2, 0, 0, 3])[None]
    assert M.ctc_greedy_decode(x) == [(1, 1, 2, 3)]
    # another blank index, and the [N, C, T] layout
    assert M.ctc_greedy_decode(x, blank=1) == [(0, 2, 0, 3)]
    assert M.ctc_greedy_decode(np.swapaxes(x, 1, 2), layout="NCT") == [(1, 1, 2, 3)]


def test_edit_distance_and_cer() -> None:
    assert M.edit_distance((1, 2, 3), (1, 3)) == 1
    assert M.edit_distance((), (4, 5)) == 2
    assert M.edit_distance((1, 2, 3), (3, 2, 1)) == 2  # kitten-style: two substitutions
    # 1 edit in the first line (4 chars), 0 in the second (2 chars): 1 / 6
    assert M.character_error_rate([(1, 2, 3), (5, 5)], [(1, 2, 3, 4), (5, 5)]) == pytest.approx(1 / 6)
    assert M.exact_match_rate([(1, 2, 3), (5, 5)], [(1, 2, 3, 4), (5, 5)]) == 0.5


def test_ctc_task_metrics_against_reference_and_padded_labels() -> None:
    ref = np.stack([_onehot([1, 0, 2, 2]), _onehot([3, 3, 0, 4])])  # decodes (1, 2), (3, 4)
    out = np.stack([_onehot([1, 0, 2, 2]), _onehot([3, 0, 3, 4])])  # decodes (1, 2), (3, 3, 4)
    labels = np.array([[1, 2, -1], [3, 4, -1]])
    res = task_metrics(out, ref, labels, ["line_agreement", "cer", "line_accuracy", "label_cer"], TaskSpec(task="ctc"))
    assert res == {"line_agreement": 0.5, "cer": pytest.approx(1 / 4), "line_accuracy": 0.5, "label_cer": pytest.approx(1 / 4)}


def test_ctc_on_a_classifier_output_is_a_clear_error() -> None:
    with pytest.raises(EvaluationError, match="CTC decoding needs 3 axes"):
        task_metrics(np.zeros((2, 5)), np.zeros((2, 5)), None, ["line_agreement"], TaskSpec(task="ctc"))
    with pytest.raises(EvaluationError, match="blank is 9"):
        task_metrics(np.zeros((2, 3, 5)), np.zeros((2, 3, 5)), None, ["line_agreement"], TaskSpec(task="ctc", blank=9))


def test_mask_iou_of_thresholded_maps_and_logits() -> None:
    ref = np.array([[[0.9, 0.9], [0.1, 0.1]], [[0.0, 0.0], [0.0, 0.0]]])
    out = np.array([[[0.9, 0.2], [0.8, 0.1]], [[0.0, 0.0], [0.0, 0.0]]])
    # sample 0: intersection 1, union 3; sample 1: both empty -> 1
    assert M.mask_iou(M.foreground(out), M.foreground(ref)) == pytest.approx((1 / 3 + 1) / 2)
    logits = np.array([[-2.0, 0.1, 3.0]])
    assert M.foreground(logits, logits=True).tolist() == [[False, True, True]]  # sigmoid > 0.5 <=> logit > 0
    assert M.foreground(logits, threshold=0.9, logits=True).tolist() == [[False, False, True]]  # logit(0.9) = 2.197


def test_component_boxes_eight_connected() -> None:
    m = np.zeros((6, 6), dtype=bool)
    m[0, 0] = m[1, 1] = True  # diagonal neighbours: one component
    m[0, 5] = True
    m[4:6, 3:6] = True
    m[3, 2] = True  # touches (4, 3) diagonally
    assert sorted(M.component_boxes(m)) == [(0, 0, 1, 1), (0, 5, 0, 5), (3, 2, 5, 5)]
    u = np.zeros((3, 5), dtype=bool)
    u[0, 0] = u[0, 4] = True
    u[1, 0] = u[1, 4] = True
    u[2, :] = True  # a U shape: the two arms join only in the last row
    assert M.component_boxes(u) == [(0, 0, 2, 4)]


def test_box_agreement_matches_at_iou_half() -> None:
    ref = np.zeros((1, 8, 8), dtype=bool)
    ref[0, 0:4, 0:4] = True  # 16 px
    ref[0, 6:8, 6:8] = True
    out = np.zeros_like(ref)
    out[0, 0:4, 0:3] = True  # IoU 12/16 with the first box: matched
    # the second box is missing: 1 match, 1 + 2 boxes -> F1 = 2/3
    assert M.box_agreement(out, ref) == pytest.approx(2 / 3)
    assert M.box_agreement(np.zeros_like(ref), np.zeros_like(ref)) == 1.0
    spec = TaskSpec(task="dense")
    assert task_score("map_iou", out.astype(np.float32), ref.astype(np.float32), spec) == pytest.approx(12 / 20)


def test_task_score_refuses_a_metric_of_another_task() -> None:
    with pytest.raises(ConfigError, match="needs evaluate.task: ctc"):
        task_score("line_agreement", np.zeros((1, 2, 3)), np.zeros((1, 2, 3)), TaskSpec())


@pytest.fixture
def hook_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "myhooks_qp.py").write_text(
        "import numpy as np\n"
        "def mean_gap(out, ref, labels):\n"
        "    return {'mean_gap': float(np.mean(np.abs(out - (out if ref is None else ref))))}\n"
        "def broken(out, ref, labels):\n"
        "    raise RuntimeError('no boxes here')\n"
        "def not_a_dict(out, ref, labels):\n"
        "    return 0.5\n"
        "def shadows(out, ref, labels):\n"
        "    return {'cosine': 1.0}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "myhooks_qp"
    sys.modules.pop("myhooks_qp", None)


def test_hooks_return_named_numbers(hook_module: str) -> None:
    out, ref = np.ones((2, 3)), np.zeros((2, 3))
    assert run_hooks([f"{hook_module}:mean_gap"], out, ref, None) == {"mean_gap": 1.0}


@pytest.mark.parametrize(("func", "exc", "pattern"), [
    ("broken", EvaluationError, r"hook 'myhooks_qp:broken' raised RuntimeError: no boxes here"),
    ("not_a_dict", EvaluationError, r"returned float; it must return a dict"),
    ("shadows", EvaluationError, r"'cosine', which is already a quantpipe metric"),
    ("absent", ConfigError, r"myhooks_qp has no function absent"),
])
def test_hook_errors_name_the_hook(hook_module: str, func: str, exc: type, pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        run_hooks([f"{hook_module}:{func}"], np.ones((2, 3)), np.zeros((2, 3)), None)


def test_unimportable_hook_module() -> None:
    with pytest.raises(ConfigError, match="module no_such_pkg_qp.metrics cannot be imported"):
        run_hooks(["no_such_pkg_qp.metrics:f"], np.ones((1, 1)), None, None)


def test_segmentation_reads_one_class_per_pixel_not_one_map_per_class() -> None:
    # A 21-class logit map (DeepLabV3, found probing): `dense` thresholded each class's logits as a map of its own.
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 21, 8, 8)).astype(np.float32)
    out = ref.copy()
    ref_cls = ref.argmax(axis=1)
    # Flip 8 pixels of sample 0 to another class; every logit of the other sample unchanged.
    rows, cols = np.arange(8), np.arange(8)
    moved = (ref_cls[0, rows, cols] + 1) % 21
    out[0, moved, rows, cols] = ref[0].max(axis=0)[rows, cols] + 1.0
    spec = TaskSpec(task="segmentation")
    got = task_metrics(out, ref, None, ("pixel_agreement", "miou"), spec)
    assert got["pixel_agreement"] == pytest.approx(1 - 8 / 128)
    mine, theirs = out.argmax(axis=1), ref_cls
    ious = [np.sum((mine == c) & (theirs == c)) / np.sum((mine == c) | (theirs == c))
            for c in range(21) if np.any((mine == c) | (theirs == c))]
    assert got["miou"] == pytest.approx(np.mean(ious)) and got["miou"] < 1.0
    assert task_metrics(ref, ref, None, ("pixel_agreement", "miou"), spec) == {"pixel_agreement": 1.0, "miou": 1.0}
    # Channels last, and a model that ends in ArgMax (an int64 class map) read as the classes themselves.
    last = TaskSpec(task="segmentation", class_axis=-1)
    assert task_metrics(np.moveaxis(out, 1, -1), np.moveaxis(ref, 1, -1), None, ("pixel_agreement",), last) == \
        {"pixel_agreement": got["pixel_agreement"]}
    assert task_metrics(mine, theirs, None, ("miou",), spec) == {"miou": got["miou"]}
    assert task_score("pixel_agreement", out, ref, spec) == got["pixel_agreement"]
    with pytest.raises(ConfigError, match="needs evaluate.task: segmentation"):
        task_score("miou", out, ref, TaskSpec(task="dense"))


def test_segmentation_on_a_one_map_output_is_a_clear_error() -> None:
    with pytest.raises(EvaluationError, match="no class axis 1 of 2 or more classes.*evaluate.task: dense"):
        TaskSpec(task="segmentation").classes(np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(EvaluationError, match="class axis"):
        TaskSpec(task="segmentation").classes(np.zeros((2, 10), np.float32))


def test_mean_iou_pools_one_confusion_over_all_samples() -> None:
    pred = np.array([[0, 0, 1, 1], [2, 2, 2, 2]])
    ref = np.array([[0, 1, 1, 1], [2, 2, 2, 0]])
    # class 0: 1 both / 3 either; class 1: 2 / 3; class 2: 3 / 4
    assert M.mean_iou(pred, ref) == pytest.approx((1 / 3 + 2 / 3 + 3 / 4) / 3)
    assert M.pixel_agreement(pred, ref) == pytest.approx(6 / 8)


def test_box_agreement_leaves_specks_out():
    # A DBNet map's stray pixel counted as a box (found probing: 0.9862 where all 107 text boxes matched; one stray
    # pixel alone scored 0.8).
    ref = np.zeros((1, 20, 20), bool)
    ref[0, 2:8, 2:12] = True
    ref[0, 12:18, 4:16] = True
    out = ref.copy()
    out[0, 19, 19] = True  # a one-pixel speck
    assert M.box_agreement(out, ref) == pytest.approx(2 * 2 / 5)
    assert M.box_agreement(out, ref, min_side=3) == 1.0
    spec = TaskSpec(task="dense", min_box_side=3)
    assert task_score("box_agreement", out.astype(np.float32), ref.astype(np.float32), spec) == 1.0


def test_a_channels_last_map_is_read_as_one_map_per_sample() -> None:
    # A selfie segmenter's [N, 256, 256, 1] was read as 256 maps of 256 x 1: box agreement 1.0 where the maps' boxes
    # agree 0.43, and a false "no component" warning (found probing).
    rng = np.random.default_rng(0)
    ref = np.zeros((3, 16, 16, 1))
    ref[:, 4:12, 4:12] = 0.9
    out = ref.copy()
    out[0, 4:12, 4:9] = 0.1  # the first sample's blob shrinks to 8 x 3: its box no longer matches
    out += 0.01 * rng.random(out.shape)
    dense = TaskSpec(task="dense")
    assert dense.mask(ref).shape == (3, 1, 16, 16)
    got = task_metrics(out, ref, None, ("box_agreement", "map_iou"), dense)
    want = M.box_agreement(out[..., 0] > 0.5, ref[..., 0] > 0.5, 0.5, dense.min_box_side)
    assert got["box_agreement"] == pytest.approx(want) and want == pytest.approx(2 * 2 / 6)
    assert got["map_iou"] == pytest.approx(M.mask_iou(out[..., 0] > 0.5, ref[..., 0] > 0.5))
    # said explicitly, either way; channels first keeps [N, C, H, W] as it is
    assert TaskSpec(task="dense", channels="last").mask(np.zeros((2, 8, 8, 3))).shape == (2, 3, 8, 8)
    assert TaskSpec(task="dense", channels="first").mask(ref).shape == ref.shape
    assert TaskSpec(task="dense").mask(np.zeros((2, 1, 8, 1))).shape == (2, 1, 8, 1)  # one map, [N, 1, H, W]


def test_map_iou_min_says_the_sample_whose_map_was_lost() -> None:
    # A selfie segmenter's INT8 map lost a person (18.5 % of the picture) on one sample of 120; a mean over 120 moves
    # by 1/120 at most for it (found probing).
    ref = np.zeros((4, 1, 8, 8))
    ref[:, :, 2:6, 2:6] = 0.9
    out = ref.copy()
    out[2] = 0.0  # the third sample's map is gone
    got = task_metrics(out, ref, None, ("map_iou", "map_iou_min"), TaskSpec(task="dense"))
    assert got == {"map_iou": pytest.approx(0.75), "map_iou_min": 0.0}
    assert task_metrics(ref, ref, None, ("map_iou_min",), TaskSpec(task="dense"))["map_iou_min"] == 1.0
