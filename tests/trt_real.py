"""TensorRT's real Python bindings for tests: `tools/trt_bindings.py` prepares them, a subprocess imports them.

Each version imports in its own process (`LD_LIBRARY_PATH` at the stand-in libraries, `PYTHONPATH` at the
unpacked wheel), so one test session checks 8.6, 10.x and 11.x side by side. A version that cannot be
prepared (no network, no gcc, no pybind11-stubgen) skips its tests with the reason; CI prepares them first
(`.ci/run`), where a failure stops the run instead.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULT = "@@result@@ "


@cache
def tool() -> ModuleType:
    """tools/trt_bindings.py as a module (the one list of versions, the preparation, the dispatch cases)."""
    spec = importlib.util.spec_from_file_location("quantpipe_tools_trt_bindings", ROOT / "tools" / "trt_bindings.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


@cache
def _prepare(key: str) -> str | None:
    """None when version `key` is ready, else why not (prepared once per session; cached on disk)."""
    t = tool()
    try:
        t.prepare(t.VERSIONS[key])
    except t.PrepareError as err:
        return str(err)
    return None


@dataclasses.dataclass(frozen=True)
class RealTrt:
    """One prepared TensorRT version: `run(code)` executes `code` where `import tensorrt` is that version."""

    key: str
    version: str
    dist: str

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    def run(self, code: str, timeout: float = 120) -> Any:
        """Run `code` in a fresh interpreter; return what it passed to `result(...)` (JSON). Fails the test on an error."""
        t = tool()
        env = dict(os.environ)
        env.update(t.env_for(t.VERSIONS[self.key]))
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env["PYTHONPATH"]])
        prelude = f"import json\ndef result(obj):\n    print({RESULT!r} + json.dumps(obj))\n"
        proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=timeout)
        if proc.returncode != 0:
            pytest.fail(f"TensorRT {self.version} snippet failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", pytrace=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
        return json.loads(lines[-1][len(RESULT):]) if lines else None


def real_trt(key: str) -> RealTrt:
    """The prepared version `key`, or pytest.skip with the reason it could not be prepared."""
    b = tool().VERSIONS[key]
    reason = _prepare(key)
    if reason is not None:
        pytest.skip(f"TensorRT {b.version} bindings ({b.dist}) not available here: {reason}")
    return RealTrt(key=key, version=b.version, dist=b.dist)


# ==================================================================================================
# Which `trt.X.Y` names the backend uses, and on which versions each one runs
# ==================================================================================================

@dataclasses.dataclass(frozen=True)
class TrtName:
    """One `trt.X[.Y...]` reference: where it is, and the dispatch conditions (flag, wanted value) guarding it."""

    chain: tuple[str, ...]
    where: str
    guards: tuple[tuple[str, bool], ...]

    def runs_on(self, cases: list[dict[str, bool]]) -> bool:
        """True when some dispatch case of a version satisfies every guard (the code path runs there)."""
        return any(all(case.get(flag, want) == want for flag, want in self.guards) for case in cases)


def _condition(test: ast.expr, flags: frozenset[str]) -> list[tuple[str, bool]] | None:
    """(flag, value) pairs that must hold for `test` to be true, when it is a conjunction of (negated) flags.

    None when `test` says nothing about the flags (any other expression: the path may run either way).
    """
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        inner = _condition(test.operand, flags)
        return [(f, not v) for f, v in inner] if inner is not None and len(inner) == 1 else None
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):
        parts = [_condition(v, flags) for v in test.values]
        return [p for part in parts if part for p in part] or None
    name = test.attr if isinstance(test, ast.Attribute) else test.id if isinstance(test, ast.Name) else None
    return [(name, True)] if name in flags else None


def _terminates(body: list[ast.stmt]) -> bool:
    return bool(body) and isinstance(body[-1], (ast.Raise, ast.Return, ast.Continue, ast.Break))


def trt_names(source: str, filename: str, flags: frozenset[str]) -> list[TrtName]:
    """Every `trt.X[.Y...]` chain in `source` (annotations excluded: they are never evaluated, the modules use
    `from __future__ import annotations`) with the dispatch guards of the `if` blocks around it, including
    an early exit (`if not api.has_calibrators: raise ...` guards what follows it)."""
    found: list[TrtName] = []

    def chains(node: ast.AST, guards: tuple[tuple[str, bool], ...]) -> None:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Attribute) and not isinstance(getattr(sub, "_qp_parent", None), ast.Attribute):
                parts: list[str] = []
                cur: ast.expr = sub
                while isinstance(cur, ast.Attribute):
                    parts.append(cur.attr)
                    cur = cur.value
                if isinstance(cur, ast.Name) and cur.id == "trt":
                    found.append(TrtName(tuple(reversed(parts)), f"{filename}:{sub.lineno}", guards))

    def mark_parents(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            child._qp_parent = node  # type: ignore[attr-defined]
            mark_parents(child)

    def block(stmts: list[ast.stmt], guards: tuple[tuple[str, bool], ...]) -> None:
        for stmt in stmts:
            stmt_guards = guards
            if isinstance(stmt, ast.If):
                cond = _condition(stmt.test, flags)
                chains(stmt.test, guards)
                block(stmt.body, guards + tuple(cond or ()))
                negated = [(f, not v) for f, v in cond] if cond and len(cond) == 1 else []
                block(stmt.orelse, guards + tuple(negated))
                if _terminates(stmt.body) and not stmt.orelse and negated:
                    guards = guards + tuple(negated)  # what follows runs only when the test was false
                continue
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for d in stmt.decorator_list:
                    chains(d, stmt_guards)
                for default in [*stmt.args.defaults, *stmt.args.kw_defaults]:
                    if default is not None:
                        chains(default, stmt_guards)
                block(stmt.body, stmt_guards)
                continue
            if isinstance(stmt, ast.ClassDef):
                for base in stmt.bases:
                    chains(base, stmt_guards)
                block(stmt.body, stmt_guards)
                continue
            if isinstance(stmt, ast.AnnAssign):
                if stmt.value is not None:
                    chains(stmt.value, stmt_guards)
                continue
            nested = [f for f in ("body", "orelse", "finalbody", "handlers") if isinstance(getattr(stmt, f, None), list)]
            if nested:
                for f in ("test", "iter", "target", "items", "subject"):
                    v = getattr(stmt, f, None)
                    for part in v if isinstance(v, list) else [v] if v is not None else []:
                        chains(part, stmt_guards)
                for f in nested:
                    if f == "handlers":
                        for handler in stmt.handlers:  # type: ignore[attr-defined]
                            block(handler.body, stmt_guards)
                    else:
                        block(getattr(stmt, f), stmt_guards)
                continue
            chains(stmt, stmt_guards)

    tree = ast.parse(source, filename=filename)
    mark_parents(tree)
    if_type_checking = [s for s in tree.body if isinstance(s, ast.If) and isinstance(s.test, ast.Name) and s.test.id == "TYPE_CHECKING"]
    block([s for s in tree.body if s not in if_type_checking], ())
    return found
