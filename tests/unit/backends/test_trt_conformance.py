"""quantpipe's TensorRT code against TensorRT's real Python bindings (8.6, 10.x, 11.x; tools/trt_bindings.py).

No GPU and no TensorRT libraries here: stand-in libraries let the real bindings import, so every class,
enum member, base class and signature below is TensorRT's own. What needs the libraries (building or
running an engine) stays in tests/gpu.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.trt_real import ROOT, RealTrt, tool, trt_names

BACKEND = ROOT / "quantpipe" / "backends" / "tensorrt"

#: The TensorRT names each dispatch flag makes build.py / calibrator.py use when it is true.
NAMES_BY_FLAG = {
    "fp16_flag": ["BuilderFlag.FP16"],
    "int8_flag": ["BuilderFlag.INT8"],
    "explicit_batch_flag": ["NetworkDefinitionCreationFlag.EXPLICIT_BATCH"],
    "strongly_typed": ["NetworkDefinitionCreationFlag.STRONGLY_TYPED"],
    "calibrator": ["IInt8EntropyCalibrator2", "IInt8MinMaxCalibrator", "IInt8Calibrator",
                   "IBuilderConfig.int8_calibrator", "IBuilderConfig.set_calibration_profile"],
}

MISSING_NAMES = """
import importlib, sys
trt = importlib.import_module("tensorrt")
def missing(chain):
    obj = trt
    for part in chain.split("."):
        if not hasattr(obj, part):
            return True
        obj = getattr(obj, part)
    return False
result([c for c in CHAINS if missing(c)])
"""


def _missing(real_trt: RealTrt, chains: list[str]) -> list[str]:
    return real_trt.run(f"CHAINS = {sorted(set(chains))!r}\n" + MISSING_NAMES)


def test_version_dispatch_matches_what_the_real_module_has(real_trt: RealTrt) -> None:
    facts = real_trt.run("""
        import tensorrt as trt
        from quantpipe.backends.tensorrt.version import require_tensorrt, tensorrt_status
        api = require_tensorrt()  # through importlib, as in production
        net_flags = [n for n in dir(trt.NetworkDefinitionCreationFlag) if n.isupper()]
        result({
            "status": list(tensorrt_status()), "version": api.version, "weak_typing": api.weak_typing,
            "has_calibrators": api.has_calibrators, "explicit_batch_flag": api.explicit_batch_flag,
            "fp16": hasattr(trt.BuilderFlag, "FP16"), "int8": hasattr(trt.BuilderFlag, "INT8"),
            "calibrators": hasattr(trt, "IInt8EntropyCalibrator2") and hasattr(trt, "IInt8MinMaxCalibrator"),
            "int8_calibrator": hasattr(trt.IBuilderConfig, "int8_calibrator"), "net_flags": net_flags,
            "dims": list(trt.Dims([1, 3, 224, 224])),  # runner.py and build.py build Dims from lists
        })
    """)
    assert facts["status"] == [True, real_trt.version, None]
    assert facts["dims"] == [1, 3, 224, 224]
    # The API level quantpipe decides from the version string is what the module really offers.
    assert facts["weak_typing"] == facts["fp16"] == facts["int8"]
    assert facts["has_calibrators"] == facts["calibrators"] == facts["int8_calibrator"]
    if facts["explicit_batch_flag"]:
        assert "EXPLICIT_BATCH" in facts["net_flags"]
    if real_trt.major >= 11:
        assert "STRONGLY_TYPED" in facts["net_flags"] and "EXPLICIT_BATCH" not in facts["net_flags"]


def test_every_build_plan_uses_only_names_the_version_has(real_trt: RealTrt) -> None:
    cases = tool().dispatch_cases(real_trt.version)
    assert cases, f"plan_build accepts nothing on {real_trt.version}"
    wanted = [name for case in cases for flag, names in NAMES_BY_FLAG.items() if case[flag] for name in names]
    assert _missing(real_trt, wanted) == []


def test_every_trt_name_the_backend_uses_exists_where_its_code_path_runs(real_trt: RealTrt) -> None:
    flags = frozenset(tool().DISPATCH_FLAGS)
    used = [n for f in sorted(BACKEND.glob("*.py")) for n in trt_names(f.read_text(), f.name, flags)]
    # The walk sees the version-specific names (so an empty result cannot pass by accident).
    assert {("BuilderFlag", "FP16"), ("IInt8EntropyCalibrator2",), ("NetworkDefinitionCreationFlag", "STRONGLY_TYPED")} <= {
        n.chain for n in used
    }
    cases = tool().dispatch_cases(real_trt.version)
    required = [n for n in used if n.runs_on(cases)]
    missing = set(_missing(real_trt, [".".join(n.chain) for n in required]))
    assert [f"{n.where}: trt.{'.'.join(n.chain)}" for n in required if ".".join(n.chain) in missing] == []


CALIBRATOR_ROUND_TRIP = """
import inspect, re, tempfile
from pathlib import Path
import tensorrt as trt
from quantpipe.backends.tensorrt.calibrator import CalibrationFeed, make_calibrator
from quantpipe.calibration import cache as qcache

class Batcher:  # quantpipe.cuda.DeviceBatcher's surface: device pointers per input name, then exhausted
    batch_size, num_batches = 4, 0
    def next_batch(self, names):
        self.num_batches += 1
        return [4096 * (i + 1) for i, _ in enumerate(names)] if self.num_batches == 1 else None
    def close(self):
        pass

def positional(sig_line):  # pybind11's first docstring line: "name(self: T, a: A, ...) -> R"
    params = sig_line[sig_line.index("(") + 1:sig_line.rindex(") ->")]
    return len([p for p in re.split(r",\\s*(?![^\\[]*\\])", params) if p.strip()]) - 1, sig_line.rsplit("-> ", 1)[1]

out = {}
tmp = Path(tempfile.mkdtemp())
amax = {"x": 1.27, "conv_out": 6.35}
for method, base, algo in [("entropy", trt.IInt8EntropyCalibrator2, trt.CalibrationAlgoType.ENTROPY_CALIBRATION_2),
                           ("minmax", trt.IInt8MinMaxCalibrator, trt.CalibrationAlgoType.MINMAX_CALIBRATION)]:
    src = tmp / f"{method}.cache"
    qcache.write_trt_cache(src, amax, method=method, trt_version="8.6.1")  # another version's header
    cal = make_calibrator(CalibrationFeed(method=method, tensorrt_version=trt.__version__, batcher=Batcher(), cache_path=src))
    r = {"subclass": isinstance(cal, base) and isinstance(cal, trt.IInt8Calibrator), "algorithm": cal.get_algorithm() == algo}
    r["signatures"] = {}
    for name in ("get_batch_size", "get_batch", "read_calibration_cache", "write_calibration_cache"):
        real_n, real_ret = positional(getattr(base, name).__doc__.strip().splitlines()[0])
        ours = [p for p in inspect.signature(getattr(type(cal), name)).parameters.values()][1:]
        r["signatures"][name] = [real_n, len(ours), real_ret]
    r["batch_size"] = cal.get_batch_size()
    # The binding's own method runs TensorRT's C++ virtual, whose pybind11 trampoline must find our override.
    r["batch_size_via_binding"] = base.get_batch_size(cal)
    r["batches"] = [cal.get_batch(["x", "mask"]), cal.get_batch(("x", "mask"))]
    served = cal.read_calibration_cache()
    r["served_header"] = bytes(memoryview(served)).decode().splitlines()[0]
    # TensorRT hands its own cache to write_calibration_cache as a buffer; quantpipe re-writes it in its format.
    dst = tmp / f"{method}-new.cache"
    fresh = make_calibrator(CalibrationFeed(method=method, tensorrt_version=trt.__version__, cache_path=dst))
    r["fresh_read"] = fresh.read_calibration_cache()
    fresh.write_calibration_cache(memoryview(served))
    back = qcache.read_trt_cache(dst)
    r["round_trip"] = [back.header, {k: round(v, 6) for k, v in back.amax.items()}]
    r["expected_header"] = f"TRT-{qcache.encode_trt_version(trt.__version__)}-{qcache.CACHE_ALGORITHMS[method]}"
    out[method] = r
result(out)
"""


def test_calibrators_subclass_the_real_bases_and_follow_their_signatures(real_trt: RealTrt) -> None:
    if real_trt.major >= 11:
        pytest.skip(f"TensorRT {real_trt.version} has no IInt8 calibrators (removed in 11.0); see the next test")
    for method, r in real_trt.run(CALIBRATOR_ROUND_TRIP).items():
        assert r["subclass"] and r["algorithm"], method
        # Same number of positional parameters as the real method (pybind11 calls the override positionally).
        for name, (real_n, ours_n, real_ret) in r["signatures"].items():
            assert ours_n == real_n, f"{method} {name}: ours takes {ours_n} arguments, TensorRT passes {real_n} ({real_ret})"
        assert r["batch_size"] == r["batch_size_via_binding"] == 4
        # get_batch returns what the binding casts to std::vector<size_t>: ints, then [] when the data is exhausted.
        assert r["batches"] == [[4096, 8192], []]
        assert r["served_header"] == r["expected_header"]  # quantpipe's scales, under the installed version's header
        assert r["fresh_read"] is None  # no cache yet: TensorRT calibrates
        assert r["round_trip"] == [r["expected_header"], {"x": 1.27, "conv_out": 6.35}]


def test_make_calibrator_refuses_where_the_calibrators_are_gone(real_trt: RealTrt) -> None:
    if real_trt.major < 11:
        pytest.skip(f"TensorRT {real_trt.version} still has the IInt8 calibrators (covered by the test above)")
    msg = real_trt.run("""
        from quantpipe.backends.tensorrt.calibrator import CalibrationFeed, make_calibrator
        from quantpipe.errors import BuildError
        try:
            make_calibrator(CalibrationFeed(method="entropy", tensorrt_version="11"))
        except BuildError as err:
            result(str(err))
    """)
    assert msg is not None and "removed in 11.0" in msg


# ==================================================================================================
# The checks bite: misuse fails them
# ==================================================================================================

MISUSE = '''
def build(plan, config):
    if plan.fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)      # fine: fp16_flag is never true on 11
    if plan.strongly_typed:
        config.set_flag(trt.BuilderFlag.INT8)      # misuse: the 11 path using a flag 11 removed
    if not plan.calibrator:
        return
    config.int8_calibrator = trt.IInt8EntropyCalibrator2()   # fine: after an early exit that 11 always takes
'''


def test_the_name_check_catches_a_removed_flag_on_the_11_path() -> None:
    real = tool().VERSIONS["11"]
    from tests.trt_real import real_trt as real_trt_for

    rt = real_trt_for("11")
    used = trt_names(MISUSE, "misuse.py", frozenset(tool().DISPATCH_FLAGS))
    required = [n for n in used if n.runs_on(tool().dispatch_cases(real.version))]
    missing = set(_missing(rt, [".".join(n.chain) for n in required]))
    assert [f"{n.where}: trt.{'.'.join(n.chain)}" for n in required if ".".join(n.chain) in missing] == [
        "misuse.py:6: trt.BuilderFlag.INT8"
    ]


def test_the_name_check_reads_guards_and_early_exits() -> None:
    used = {".".join(n.chain): n.guards for n in trt_names(MISUSE, "m.py", frozenset(tool().DISPATCH_FLAGS))}
    assert used == {
        "BuilderFlag.FP16": (("fp16_flag", True),),
        "BuilderFlag.INT8": (("strongly_typed", True),),
        "IInt8EntropyCalibrator2": (("calibrator", True),),
    }


def test_bindings_folder_is_ignored_by_git() -> None:
    # Without the trailing slash: a git worktree's symlink to the main checkout's folder is ignored too (with it,
    # `git add -A` committed the link, and a merge back replaced the folder with a link to itself).
    assert "/.trt-bindings" in (ROOT / ".gitignore").read_text().splitlines()


def test_a_stub_signature_with_a_keyword_parameter_is_made_parseable() -> None:
    fix = tool().fix_signature
    assert fix("    def f(self, in: list[int], out: int) -> int:") == "    def f(self, in_: list[int], out: int) -> int:"
    assert fix("    def g(self, a: int = None, b: int) -> None:") == "    def g(self, a: int = None, b: int = ...) -> None:"
    assert Path(tool().__file__).name == "trt_bindings.py"
