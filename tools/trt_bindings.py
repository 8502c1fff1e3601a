#!/usr/bin/env python3
"""TensorRT's real Python bindings on a CPU machine: fetch, make importable, generate exact stubs, type-check.

TensorRT's libraries are not on the registries these machines reach, but its bindings wheels are
(`tensorrt-bindings` 8.6.1, `tensorrt-cu12-bindings` 10.x / 11.x, ~1.2 MB each). Their `tensorrt.so` needs
`libnvinfer.so.N`, `libnvinfer_plugin.so.N`, `libnvonnxparser.so.N` (and `libnvparsers.so.8` on 8.6) but
imports only a handful of functions from them (factories such as `createInferBuilder_INTERNAL`); the rest
of the API is reached through C++ virtual interfaces. So stand-in libraries that define those functions
(returning NULL / 0), built here with gcc, let `import tensorrt_bindings` succeed: every class, enum,
signature and docstring is the real one; anything that would need the real libraries (a Builder, a
Runtime) raises `TypeError: ... factory function returned nullptr` instead.

    python tools/trt_bindings.py prepare [KEY ...]   # fetch + stand-ins + import check + stubs (cached)
    python tools/trt_bindings.py env KEY              # JSON: the environment a subprocess needs for KEY
    python tools/trt_bindings.py mypy [KEY ...]       # mypy on the TensorRT package against KEY's stubs

KEY is one of VERSIONS' keys (`8.6`, `10`, `11`); none means all. Everything lands in `.trt-bindings/`
(git-ignored; TRT_BINDINGS_CACHE overrides it), one folder per Python tag and wheel; a second `prepare`
is a no-op (a stamp records the wheel, the Python and this script's hash). `prepare` exits 1 naming
what failed (no network, no gcc, an import error); the tests then skip, printing that reason.
Run it with the interpreter that will import the bindings (the wheels are per CPython version);
`prepare` needs `pybind11-stubgen` there for the stubs (the dev extra has it).
"""

from __future__ import annotations

import argparse
import ast
import ctypes
import dataclasses
import hashlib
import json
import keyword
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Binding:
    key: str
    dist: str
    version: str
    family: str
    """Which mypy run it serves: the newest of each family is type-checked."""


#: The TensorRT versions quantpipe claims, as bindings wheels: the newest of each major line.
VERSIONS: dict[str, Binding] = {
    "8.6": Binding("8.6", "tensorrt-bindings", "8.6.1", "8"),
    "10": Binding("10", "tensorrt-cu12-bindings", "10.16.1.11", "10"),
    "11": Binding("11", "tensorrt-cu12-bindings", "11.4.0.106", "11"),
}

#: The TensorRT modules type-checked once per version family (the README's and .ci/run's list), file by file:
#: pyproject's mypy `exclude` keeps the TensorRT package out of a plain `mypy quantpipe`, and applies only to the
#: files mypy finds in a folder it is given.
MYPY_TARGETS = [*sorted(str(p.relative_to(ROOT)) for p in (ROOT / "quantpipe/backends/tensorrt").glob("*.py")),
                "quantpipe/cuda.py"]

PY_TAG = f"cp{sys.version_info.major}{sys.version_info.minor}"
CACHE = Path(os.environ.get("TRT_BINDINGS_CACHE", ROOT / ".trt-bindings"))
SCRIPT_HASH = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


class PrepareError(Exception):
    """One version could not be prepared; the message says why (and is what a skipped test prints)."""


def folder(b: Binding) -> Path:
    return CACHE / PY_TAG / f"{b.dist}-{b.version}"


def env_for(b: Binding) -> dict[str, str]:
    """The variables a subprocess needs to `import tensorrt` as version `b` (added to os.environ)."""
    d = folder(b)
    pythonpath = [str(d / "shim"), str(d / "site")]
    ld = [str(d / "lib")]
    return {
        "PYTHONPATH": os.pathsep.join(pythonpath + [p for p in [os.environ.get("PYTHONPATH", "")] if p]),
        "LD_LIBRARY_PATH": os.pathsep.join(ld + [p for p in [os.environ.get("LD_LIBRARY_PATH", "")] if p]),
        "TRT_BINDINGS_STUBS": str(d / "stubs"),
    }


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise PrepareError(f"{what}: {type(err).__name__}: {err}") from err
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        raise PrepareError(f"{what} failed (exit {proc.returncode}): {tail}")
    return proc.stdout


def _fetch(b: Binding, site: Path) -> None:
    """`pip install --no-deps --target`: the wheel only (its dependency, the -libs package, cannot work here)."""
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    spec = f"{b.dist}=={b.version}"
    local = sorted(wheels.glob(f"{b.dist.replace('-', '_')}-{b.version}-{PY_TAG}-*.whl"))
    if not local:
        _run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
              "--only-binary=:all:", "-d", str(wheels), spec], f"downloading {spec} for {PY_TAG}")
        local = sorted(wheels.glob(f"{b.dist.replace('-', '_')}-{b.version}-{PY_TAG}-*.whl"))
    if not local:
        raise PrepareError(f"{spec}: pip downloaded no {PY_TAG} wheel (is there one for this Python?)")
    _run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
          "--no-index", "--target", str(site), str(local[-1])], f"unpacking {local[-1].name}")


def _needed_symbols(so: Path) -> tuple[list[str], dict[str, list[str]]]:
    """(the libnv* sonames `so` needs, {soname: functions it must define}) read with readelf / nm.

    A symbol is TensorRT's when it is undefined, unversioned, not weak, and not found in this process
    (which holds libc, libdl, libstdc++ and the Python C API).
    """
    dyn = _run(["readelf", "-d", str(so)], f"readelf -d {so.name}")
    sonames = [n for n in re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dyn) if n.startswith("libnv")]
    undefined = _run(["nm", "-D", "--undefined-only", str(so)], f"nm -D {so.name}")
    here = ctypes.CDLL(None)
    names = [m.group(1) for m in re.finditer(r"^\s+U (\S+)$", undefined, re.M) if "@" not in m.group(1)]
    trt_names = [n for n in names if not hasattr(here, n)]
    by_lib: dict[str, list[str]] = {s: [] for s in sonames}

    def lib_for(name: str) -> str:
        if "OnnxParser" in name:
            want = "libnvonnxparser"
        elif name == "initLibNvInferPlugins":
            want = "libnvinfer_plugin"
        elif "nvuffparser" in name or "nvcaffeparser" in name:
            want = "libnvparsers"
        else:
            want = "libnvinfer."
        for s in sonames:
            if s.startswith(want):
                return s
        return next(s for s in sonames if s.startswith("libnvinfer."))

    for name in trt_names:
        by_lib[lib_for(name)].append(name)
    return sonames, by_lib


def _build_standins(so: Path, lib: Path) -> dict[str, list[str]]:
    """One tiny shared library per soname, each defining its functions as `return 0` (NULL / false / 0)."""
    if shutil.which("gcc") is None:
        raise PrepareError("gcc is not on PATH: it builds the stand-in TensorRT libraries")
    sonames, by_lib = _needed_symbols(so)
    if not sonames:
        raise PrepareError(f"{so} needs no libnv* library: the bindings layout changed; look at this script")
    lib.mkdir(parents=True, exist_ok=True)
    for soname in sonames:
        src = lib / f"{soname}.c"
        body = [f"/* stand-in for {soname}: only what the bindings import; every function returns 0 / NULL */"]
        body += [f"void *{name}(void) {{ return 0; }}" for name in by_lib[soname]]
        src.write_text("\n".join(body) + "\n")
        _run(["gcc", "-shared", "-fPIC", "-O0", f"-Wl,-soname,{soname}", "-o", str(lib / soname), str(src)],
             f"gcc {src.name}")
    return by_lib


SHIM = '''"""`tensorrt` as the real bindings module (the `tensorrt` meta-package does the same: it re-exports them)."""
import sys

import tensorrt_bindings

sys.modules[__name__] = tensorrt_bindings
'''


def _subprocess_env(b: Binding) -> dict[str, str]:
    env = dict(os.environ)
    env.update(env_for(b))
    return env


def _stubs(b: Binding, d: Path) -> None:
    """Exact stubs from the imported bindings (pybind11-stubgen), and `tensorrt` re-exporting them for mypy."""
    out = d / "stubs"
    shutil.rmtree(out, ignore_errors=True)
    _run([sys.executable, "-m", "pybind11_stubgen", "--ignore-all-errors", "-o", str(out), "tensorrt_bindings"],
         f"pybind11-stubgen tensorrt_bindings ({b.version}; is pybind11-stubgen installed?)", env=_subprocess_env(b))
    pkg = out / "tensorrt_bindings"
    if not (pkg / "tensorrt.pyi").is_file():
        raise PrepareError(f"pybind11-stubgen wrote no tensorrt_bindings/tensorrt.pyi for {b.version}")
    for pyi in sorted(out.rglob("*.pyi")):
        _make_parseable(pyi)
    # `import tensorrt` is the bindings package at run time (the shim; the `tensorrt` meta-package re-exports it).
    (out / "tensorrt").mkdir(exist_ok=True)
    (out / "tensorrt" / "__init__.pyi").write_text(
        f"# generated by tools/trt_bindings.py: `tensorrt` is `tensorrt_bindings` ({b.dist}=={b.version})\n"
        "from tensorrt_bindings import *\nfrom tensorrt_bindings import __version__ as __version__\n"
    )


_DEF_RE = re.compile(r"^(\s*def \w+\()(.*)(\)\s*->.*:)\s*$")


def _split_params(params: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in params:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [*parts, cur] if cur.strip() else parts


def fix_signature(line: str) -> str:
    """Make one generated `def` line valid Python, keeping what the bindings' signature says.

    pybind11 signatures may name a parameter with a Python keyword (`in` in the plugin interfaces) and
    put a parameter without a default after defaulted ones (`add_scale_nd(..., power=None, channel_axis)`).
    The keyword gets a trailing underscore; the later parameters get `= ...` (they are still required in C++,
    a difference only a caller that omits them would notice).
    """
    m = _DEF_RE.match(line)
    if m is None:
        return line
    fixed, seen_default = [], False
    for raw in _split_params(m.group(2)):
        p = raw.strip()
        name = re.split(r"[:=]", p, maxsplit=1)[0].strip()
        if keyword.iskeyword(name):
            p = name + "_" + p[len(name):]
        if p.startswith("*"):
            seen_default = False
        elif "=" in p:
            seen_default = True
        elif seen_default and p not in ("/",):
            p += " = ..."
        fixed.append(p)
    return m.group(1) + ", ".join(fixed) + m.group(3)


def _make_parseable(pyi: Path) -> int:
    """Apply `fix_signature` to every line; raise PrepareError if the file still does not parse. Returns lines fixed."""
    lines = pyi.read_text().splitlines()
    out = [fix_signature(line) for line in lines]
    changed = sum(a != b for a, b in zip(lines, out, strict=True))
    text = "\n".join(out) + "\n"
    try:
        ast.parse(text, filename=str(pyi))
    except SyntaxError as err:
        raise PrepareError(f"generated stub {pyi} does not parse after the signature fixes: {err}") from err
    pyi.write_text(text)
    return changed


def prepare(b: Binding) -> dict[str, object]:
    """Fetch, stand in, import-check and stub version `b` (cached); return its ready.json. Raises PrepareError."""
    d = folder(b)
    stamp = d / "ready.json"
    want = {"dist": b.dist, "version": b.version, "python": PY_TAG, "script": SCRIPT_HASH}
    if stamp.is_file():
        ready = json.loads(stamp.read_text())
        if all(ready.get(k) == v for k, v in want.items()):
            return dict(ready)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    _fetch(b, d / "site")
    so = d / "site" / "tensorrt_bindings" / "tensorrt.so"
    if not so.is_file():
        raise PrepareError(f"{b.dist}=={b.version} has no tensorrt_bindings/tensorrt.so")
    standins = _build_standins(so, d / "lib")
    (d / "shim").mkdir()
    (d / "shim" / "tensorrt.py").write_text(SHIM)
    probe = "import tensorrt, tensorrt_bindings; assert tensorrt is tensorrt_bindings; print(tensorrt.__version__)"
    reported = _run([sys.executable, "-c", probe], f"import tensorrt {b.version}", env=_subprocess_env(b)).strip()
    if reported != b.version and not b.version.startswith(reported):
        raise PrepareError(f"{b.dist}=={b.version} reports version {reported!r}")
    _stubs(b, d)
    ready = {**want, "reported": reported, "standins": standins}
    stamp.write_text(json.dumps(ready, indent=1) + "\n")
    return ready


#: The dispatch flags (fields of TrtApi and BuildPlan) that guard version-specific TensorRT calls.
DISPATCH_FLAGS = ("weak_typing", "has_calibrators", "strongly_typed_only", "explicit_batch_flag",
                  "strongly_typed", "fp16_flag", "int8_flag", "calibrator")


def dispatch_cases(version: str) -> list[dict[str, bool]]:
    """Every combination of dispatch flags quantpipe's own dispatch gives on TensorRT `version`:
    `api_for_version(version)` with `plan_build` for each precision and INT8 mode it accepts there."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from quantpipe.backends.tensorrt.plan import plan_build
    from quantpipe.backends.tensorrt.version import api_for_version
    from quantpipe.errors import BuildError

    api = api_for_version(version)
    cases = []
    for precision in ("fp32", "fp16", "int8"):
        for mode in ("auto", "qdq", "calibrator"):
            try:
                plan = plan_build(precision, api, mode)  # type: ignore[arg-type]
            except BuildError:
                continue
            case = {f: bool(getattr(api, f)) for f in ("weak_typing", "has_calibrators", "strongly_typed_only")}
            case.update({f: bool(getattr(plan, f)) for f in ("explicit_batch_flag", "strongly_typed", "fp16_flag",
                                                             "int8_flag", "calibrator")})
            cases.append(case)
    return cases


def mypy_conditions(b: Binding) -> list[str]:
    """`--always-false` names for mypy on `b`'s stubs: the dispatch flags that are never true on that version.

    Derived from quantpipe's own dispatch (`dispatch_cases`), so the code paths mypy skips for a family are
    exactly those the dispatch never takes there (mypy treats `if plan.fp16_flag:` as unreachable when
    `fp16_flag` is always false). The same cases decide which `trt.X` names the conformance test requires.
    """
    cases = dispatch_cases(b.version)
    return sorted(f for f in DISPATCH_FLAGS if not any(c[f] for c in cases))


def mypy_command(b: Binding, targets: list[str]) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of mypy checking `targets` against `b`'s generated stubs, with `b`'s always-false flags."""
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "--no-incremental"]
    for name in mypy_conditions(b):
        cmd += ["--always-false", name]
    return cmd + targets, dict(os.environ, MYPYPATH=str(folder(b) / "stubs"))


def run_mypy(b: Binding) -> int:
    cmd, env = mypy_command(b, MYPY_TARGETS)
    print(f"== mypy against TensorRT {b.version} stubs ({b.dist}); always false: {', '.join(mypy_conditions(b)) or '-'}", flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def _select(keys: list[str]) -> list[Binding]:
    unknown = [k for k in keys if k not in VERSIONS]
    if unknown:
        sys.exit(f"trt_bindings.py: unknown version key(s) {unknown}; known: {sorted(VERSIONS)}")
    return [VERSIONS[k] for k in keys] if keys else list(VERSIONS.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["prepare", "env", "mypy"])
    ap.add_argument("keys", nargs="*", help=f"version keys ({', '.join(VERSIONS)}); default: all")
    args = ap.parse_args(argv)
    chosen = _select(args.keys)
    if args.command == "env":
        if len(chosen) != 1:
            sys.exit("trt_bindings.py env: name exactly one version key")
        print(json.dumps(env_for(chosen[0])))
        return 0
    failed = 0
    for b in chosen:
        try:
            ready = prepare(b)
        except PrepareError as err:
            print(f"trt_bindings.py: TensorRT {b.version} ({b.dist}) not prepared: {err}", file=sys.stderr)
            failed += 1
            continue
        if args.command == "prepare":
            print(f"trt_bindings.py: {b.dist}=={b.version} ready in {folder(b).relative_to(CACHE.parent) if CACHE.parent in folder(b).parents else folder(b)} (reports {ready['reported']})")
        else:
            failed += run_mypy(b) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
