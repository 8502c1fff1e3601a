"""Every module imports with none of the heavy optional dependencies installed (STYLE rule 1)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
import textwrap

import quantpipe

BLOCKED = ["tensorrt", "tensorrt_bindings", "pycuda", "cuda", "cupy", "modelopt", "torch", "ray"]


def _all_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(quantpipe.__path__, "quantpipe."))


def test_every_module_imports_without_heavy_dependencies() -> None:
    modules = _all_modules()
    assert "quantpipe.cli" in modules and "quantpipe.pipeline" in modules
    trt_modules = {f"quantpipe.backends.tensorrt.{m}" for m in ("version", "plan", "metadata", "calibrator", "build", "runner")}
    assert trt_modules | {"quantpipe.cuda", "quantpipe.backends.tensorrt"} <= set(modules)
    code = textwrap.dedent(
        f"""
        import importlib, importlib.abc, sys
        BLOCKED = {BLOCKED!r}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked for the test: {{name}}")
                return None
        sys.meta_path.insert(0, Block())
        for name in {modules!r}:
            if name == "quantpipe.__main__":
                continue
            importlib.import_module(name)
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not leaked, leaked
        print("imported", len({modules!r}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "imported" in proc.stdout


def test_package_import_is_light() -> None:
    code = "import sys, quantpipe; heavy = [m for m in ('onnxruntime', 'pandas', 'matplotlib', 'onnx') if m in sys.modules]; print(heavy)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_tensorrt_version_and_package_import_alone() -> None:
    """`quantpipe.deps` imports `backends.tensorrt.version`: it (and the package it sits in) must pull in no
    other quantpipe module, or deps -> TensorRT backend -> cuda -> deps would be a cycle again."""
    code = (
        "import sys, importlib; importlib.import_module(sys.argv[1]); "
        "print(sorted(m for m in sys.modules if m.startswith('quantpipe')))"
    )
    base = ["quantpipe", "quantpipe.backends", "quantpipe.backends.tensorrt"]
    for module, expect in (
        ("quantpipe.backends.tensorrt", base),
        ("quantpipe.backends.tensorrt.version", [*base, "quantpipe.backends.tensorrt.version", "quantpipe.errors"]),
    ):
        proc = subprocess.run([sys.executable, "-c", code, module], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == repr(expect), module
