"""Property tests of the TensorRT cache reader: any file is a TrtCache or a QuantpipeError, and what quantpipe
writes reads back exactly (names, float32 scales, header). `derandomize=True`: the same cases on every run."""

from __future__ import annotations

import math
import struct
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from quantpipe.calibration.cache import (
    CACHE_ALGORITHMS,
    TrtCache,
    amax_to_scale,
    decode_trt_version,
    read_trt_cache,
    write_trt_cache,
)
from quantpipe.errors import QuantpipeError
from tests.properties import examples

# Tensor names as ONNX graphs may hold them: any valid Unicode but line breaks quantpipe cannot write.
NAMES = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r"), min_size=1, max_size=12)
HEX = st.text("0123456789abcdefABCDEF", min_size=1, max_size=8)
HEADERS = st.one_of(
    st.builds(lambda v, a: f"TRT-{v}-{a}", st.integers(0, 10**12), st.sampled_from(sorted(set(CACHE_ALGORITHMS.values())))),
    st.text(max_size=30),
)
LINES = st.one_of(
    st.builds(lambda n, sep, h: f"{n}:{sep}{h}", NAMES, st.sampled_from([" ", "", "  ", "\t"]), HEX),
    st.text(max_size=30),
)


def _read(path: Path) -> TrtCache | None:
    try:
        cache = read_trt_cache(path)
    except QuantpipeError as err:
        assert str(err).strip()
        return None
    assert isinstance(cache, TrtCache)
    assert all(math.isfinite(s) and s >= 0 for s in cache.scales.values())  # a usable scale, or refused
    decode_trt_version(cache.trt_version.replace(".", "") or "0")
    return cache


@examples(1500)
@given(header=HEADERS, lines=st.lists(LINES, max_size=6), newline=st.sampled_from(["\n", "\r\n"]))
def test_any_text_reads_or_is_a_quantpipe_error(header: str, lines: list[str], newline: str, tmp_path: Path) -> None:
    path = tmp_path / "x.cache"
    path.write_bytes(newline.join([header, *lines]).encode("utf-8", "surrogatepass"))
    _read(path)


@examples(500)
@given(data=st.binary(max_size=64))
def test_any_bytes_read_or_are_a_quantpipe_error(data: bytes, tmp_path: Path) -> None:
    path = tmp_path / "x.cache"
    path.write_bytes(data)
    _read(path)


@examples(1000)
@given(amax=st.dictionaries(NAMES, st.floats(allow_nan=False), min_size=1, max_size=6),
       method=st.sampled_from(sorted(CACHE_ALGORITHMS)))
def test_written_caches_read_back_exactly(amax: dict[str, float], method: str, tmp_path: Path) -> None:
    path = tmp_path / "x.cache"
    try:
        write_trt_cache(path, amax, method=method, trt_version="10.13.0")
    except QuantpipeError as err:  # an amax no float32 scale can hold
        assert "float32" in str(err)
        return
    cache = read_trt_cache(path)
    assert cache.algorithm == CACHE_ALGORITHMS[method] and cache.trt_version == "10.13.0"
    assert list(cache.scales) == list(amax)
    assert cache.scales == {k: amax_to_scale(v) for k, v in amax.items()}
    for s in cache.scales.values():
        assert math.isfinite(s) and s > 0 and struct.unpack(">f", struct.pack(">f", s))[0] == s
