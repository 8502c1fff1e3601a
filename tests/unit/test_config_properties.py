"""Property tests of the config loader: any document is a PipelineConfig or a ConfigError (exit 2), never a crash.

Examples are derived from the bundled pipeline.yaml with random edits (a value replaced by any YAML value, a key
removed, an unknown key added), from arbitrary YAML documents, and from arbitrary file bytes. `derandomize=True`:
the same cases on every CI run.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from quantpipe.config import PipelineConfig, load_config, parse_config
from quantpipe.errors import EXIT_BAD_INPUT, ConfigError
from tests.properties import examples

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE: dict[str, Any] = yaml.safe_load((ROOT / "pipeline.yaml").read_text())

SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=12) | st.sampled_from(["", "-1", "best", "entropy", "ort-int8", "top1", "x\x00y", "~"]))
KEYS = st.text(max_size=10) | st.integers(-3, 3) | st.booleans() | st.none()
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
                      max_leaves=8)


@st.composite
def edited_example(draw: st.DrawFn) -> Any:
    """The example config with 1-3 random edits somewhere in its tree."""
    doc = copy.deepcopy(EXAMPLE)
    for _ in range(draw(st.integers(1, 3))):
        node: Any = doc
        while True:
            keys = list(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []
            if not keys:
                break
            key = draw(st.sampled_from(keys))
            child = node[key]
            if isinstance(child, dict | list) and child and draw(st.booleans()):
                node = child
                continue
            action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
            if action == "replace":
                node[key] = draw(VALUES)
            elif action == "delete":
                del node[key]
            elif isinstance(node, dict):
                node[draw(KEYS)] = draw(VALUES)
            else:
                node.append(draw(VALUES))
            break
    return doc


def _check(fn: Any, *args: Any, **kwargs: Any) -> PipelineConfig | None:
    try:
        cfg = fn(*args, **kwargs)
    except ConfigError as err:
        assert err.exit_code == EXIT_BAD_INPUT
        assert str(err).strip() and "Traceback" not in str(err)
        return None
    assert isinstance(cfg, PipelineConfig)
    return cfg


@examples(2500)
@given(doc=edited_example())
def test_edited_example_parses_or_is_a_config_error(doc: Any, tmp_path: Path) -> None:
    cfg = _check(parse_config, doc, base_dir=tmp_path)
    if cfg is not None:
        assert cfg.model.path.is_absolute() and cfg.data.evaluation.path.is_absolute()
        cfg.variant_names()
        cfg.section_fingerprint("calibration")


@examples(1000)
@given(doc=VALUES)
def test_any_document_parses_or_is_a_config_error(doc: Any, tmp_path: Path) -> None:
    _check(parse_config, doc, base_dir=tmp_path)


YAML_CHARS = st.sampled_from(list("abcdelmopt_-:,.#&*!|>'\"%@`?[]{}0123456789 \t\n\\") + ["\x00", "\ufeff", "é", "\x85"])


@examples(700)
@given(data=st.one_of(
    st.text(YAML_CHARS, max_size=60).map(str.encode),
    st.binary(max_size=40),
    edited_example().map(lambda d: yaml.safe_dump(d, allow_unicode=True).encode()),
), check_files=st.booleans())
def test_any_file_loads_or_is_a_config_error(data: bytes, check_files: bool, tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_bytes(data)
    _check(load_config, path, check_files=check_files)


def test_the_example_is_valid_for_the_strategies() -> None:
    assert isinstance(parse_config(EXAMPLE, base_dir=ROOT), PipelineConfig)


@pytest.mark.parametrize("value", ["", "  ", "calib\x00.npz"])
def test_empty_or_nul_paths_are_config_errors(value: str, tmp_path: Path) -> None:
    # Found by the property test: a NUL byte crashed Path.resolve() with ValueError (a traceback, exit 4).
    doc = copy.deepcopy(EXAMPLE)
    doc["data"]["calibration"]["path"] = value
    with pytest.raises(ConfigError, match=r"data\.calibration\.path: a path must be non-empty and cannot contain a NUL"):
        parse_config(doc, base_dir=tmp_path)
