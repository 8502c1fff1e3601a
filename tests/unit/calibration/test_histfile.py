"""histograms.npz: the column layout round-trips every histogram exactly; format-1 files still read."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from quantpipe.calibration import compute_all, method_tables
from quantpipe.calibration.histfile import FORMAT_VERSION, histograms_npz, load_histograms, save_histograms
from quantpipe.calibration.histogram import StreamingHistogram
from quantpipe.errors import CalibrationError
from quantpipe.report.rundir import load_histograms as report_histograms

RNG = np.random.default_rng(5)


def _hist(values: np.ndarray, num_bins: int = 2048) -> StreamingHistogram:
    h = StreamingHistogram(num_bins)
    h.update(values.astype(np.float32))
    return h


def _mixed() -> dict[str, StreamingHistogram]:
    """Histograms whose fine counts need each of uint8, uint16, uint32 and int64, and the edge cases."""
    zeros_heavy = StreamingHistogram.from_state(2048, np.r_[np.int64(2**40), np.ones(65535, dtype=np.int64)], 3,
                                                7.99, 2**40 + 65535)
    return {
        "normal": _hist(RNG.standard_normal(20_000)),
        "relu": _hist(np.maximum(RNG.standard_normal(300_000), 0)),  # bin 0 holds ~150k zeros: uint32
        "few": _hist(RNG.uniform(-3, 3, 50)),  # uint8
        "some zeros": _hist(np.r_[np.zeros(1000), RNG.standard_normal(100)]),  # uint16
        "tiny": _hist(RNG.standard_normal(1000) * 1e-40),  # subnormal float32: negative range exponent
        "int64": zeros_heavy,
        "no values": StreamingHistogram(),
        "only zeros": _hist(np.zeros(77)),
        "other bins": _hist(RNG.standard_normal(500), num_bins=128),
    }


def _write_format1(path: Path, hists: dict[str, StreamingHistogram], kinds: dict[str, str]) -> None:
    """The layout quantpipe wrote before format_version 2 (an independent writer of it)."""
    arrays: dict[str, np.ndarray] = {}
    path.parent.mkdir(parents=True, exist_ok=True)
    for name, h in hists.items():
        b = h.binned()
        arrays |= {f"{name}/counts": b.counts, f"{name}/bin_width": np.float64(b.bin_width),
                   f"{name}/absmax": np.float64(h.absmax), f"{name}/num_values": np.int64(h.num_values),
                   f"{name}/num_bins": np.int64(h.num_bins), f"{name}/kind": np.asarray(kinds[name])}
        if h.range_exp is not None:
            arrays[f"{name}/range_exp"] = np.int64(h.range_exp)
        nz = np.flatnonzero(h.counts)
        fine = h.counts[: int(nz[-1]) + 1 if nz.size else 1]
        arrays[f"{name}/fine_counts"] = fine.astype(np.uint32 if fine.max() < 2**32 else np.int64)
        arrays[f"{name}/fine_bins"] = np.int64(h.fine_bins)
    np.savez_compressed(path, **arrays)


def _assert_same(got: dict[str, StreamingHistogram], want: dict[str, StreamingHistogram]) -> None:
    assert list(got) == list(want)  # the saved order
    for name, h in want.items():
        g = got[name]
        assert g == h, name  # counts, range, absmax, num_values, bins
        assert g.counts.dtype == np.int64 and g.range_exp == h.range_exp and g.absmax == h.absmax
        assert np.array_equal(g.binned().counts, h.binned().counts)


def test_round_trip_is_exact(tmp_path: Path) -> None:
    hists = _mixed()
    kinds = {n: "weight" if n == "normal" else "activation" for n in hists}
    path = save_histograms(tmp_path / "histograms.npz", hists, kinds)
    got, got_kinds = load_histograms(path)
    _assert_same(got, hists)
    assert got_kinds == kinds
    with np.load(path) as z:  # a plain .npz: a handful of members, whatever the tensor count
        assert int(z["format_version"]) == FORMAT_VERSION and len(z.files) == 18
        assert list(z["names"]) == list(hists)
        assert {int(s) for s in z["fine_itemsize"]} == {1, 2, 4, 8}
        used = dict(zip(z["names"], z["fine_used"], strict=True))
    assert used["no values"] == 0 and used["only zeros"] == 1 and used["int64"] == 65536


def test_the_report_reads_the_binned_histograms(tmp_path: Path) -> None:
    hists = _mixed()
    kinds = {n: "weight" if n == "normal" else "activation" for n in hists}
    save_histograms(tmp_path / "calibration" / "histograms.npz", hists, kinds)
    got, reason = report_histograms(tmp_path)
    assert reason is None and list(got) == [n for n in hists if n != "normal"]  # weights are left out
    for name, t in got.items():
        b = hists[name].binned()
        assert np.array_equal(t.counts, b.counts) and np.array_equal(t.edges, b.edges)


def test_a_format1_file_reads_the_same(tmp_path: Path) -> None:
    hists = _mixed()
    kinds = dict.fromkeys(hists, "activation")
    _write_format1(tmp_path / "calibration" / "histograms.npz", hists, kinds)
    old, old_kinds = load_histograms(tmp_path / "calibration" / "histograms.npz")
    _assert_same(old, hists)
    assert old_kinds == kinds
    # A workspace calibrated before format 2: its reuse (`calibration.use: auto` / `best`) reads the file as it is.
    assert method_tables(tmp_path / "calibration", ["entropy", "minmax"], [], percentile=99.9) == compute_all(
        hists, ["entropy", "minmax"], percentile=99.9)
    report_old, _ = report_histograms(tmp_path)
    save_histograms(tmp_path / "calibration" / "histograms.npz", hists, kinds)
    report_new, _ = report_histograms(tmp_path)
    assert list(report_old) == list(report_new)
    assert all(np.array_equal(report_old[n].edges, report_new[n].edges) for n in report_old)


def test_no_histograms(tmp_path: Path) -> None:
    path = save_histograms(tmp_path / "calibration" / "histograms.npz", {}, {})
    assert load_histograms(path) == ({}, {})
    hists, reason = report_histograms(tmp_path)
    assert hists == {} and reason is not None and "no usable histograms" in reason


@pytest.mark.parametrize("name", ["a/b", "x/counts", "fine_counts_1", "names", "名前 ü", "", "sp ace:0", "line\nbreak",
                                  "t.npy", "\ud800", "\0middle"])
def test_odd_names(tmp_path: Path, name: str) -> None:
    hists = {name: _hist(RNG.standard_normal(100)), "plain": _hist(RNG.standard_normal(10))}
    got, kinds = load_histograms(save_histograms(tmp_path / "h.npz", hists, {name: "input"}))
    _assert_same(got, hists)
    assert kinds == {name: "input", "plain": "activation"}


def test_a_name_ending_with_nul_is_refused() -> None:
    with pytest.raises(CalibrationError, match="NUL"):
        histograms_npz({"t\0": StreamingHistogram()}, {})


def test_a_state_not_made_by_update_round_trips(tmp_path: Path) -> None:
    # Counts beyond absmax's fine bin (only `from_state` can make them): the writer scans instead of trusting absmax.
    counts = np.zeros(65536, dtype=np.int64)
    counts[[0, 9, 60_000]] = [3, 1, 2]
    h = StreamingHistogram.from_state(2048, counts, 0, 0.25, 6)
    got, _ = load_histograms(save_histograms(tmp_path / "h.npz", {"t": h}, {}))
    _assert_same(got, {"t": h})


def test_a_newer_or_damaged_file_is_an_error(tmp_path: Path) -> None:
    data = histograms_npz({"t": _hist(RNG.standard_normal(10))}, {})
    newer = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(newer, "w") as dst:
        for item in src.namelist():
            payload = src.read(item)
            if item == "format_version.npy":
                buf = io.BytesIO()
                np.save(buf, np.int64(FORMAT_VERSION + 1))
                payload = buf.getvalue()
            dst.writestr(item, payload)
    (tmp_path / "newer.npz").write_bytes(newer.getvalue())
    with pytest.raises(CalibrationError, match=f"format_version {FORMAT_VERSION + 1}"):
        load_histograms(tmp_path / "newer.npz")
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CalibrationError, match="cannot be read"):
        load_histograms(tmp_path / "cut.npz")
    with pytest.raises(CalibrationError, match="cannot be read"):
        load_histograms(tmp_path / "missing.npz")
