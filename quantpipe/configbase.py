"""What every section of pipeline.yaml shares: the strict, frozen base model, the "did you mean" hint and the
one-message form of pydantic's validation errors."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["StrictModel", "did_you_mean", "format_validation_errors"]


class StrictModel(BaseModel):
    """A section of pipeline.yaml: unknown keys are errors, values are frozen once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def did_you_mean(word: str, options: Sequence[str] | dict[str, Any]) -> str:
    """' (did you mean 'x'?)' for the closest option, or ''."""
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _model_at(root: type[BaseModel], path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model under `root` that holds the key at `path` (for "did you mean" hints)."""
    model: Any = root
    for part in path[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        model = _first_model(ann)
        if model is None:
            return None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _first_model(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        found = _first_model(arg)
        if found is not None:
            return found
    return None


_BRANCH_TAG = re.compile(r"^(literal|function-(after|before|wrap|plain)|dict|list|union|tagged-union)\[.*\]$")


def _is_branch_tag(part: Any) -> bool:
    """A location element pydantic adds for a union / validator branch, not a key of pipeline.yaml."""
    return isinstance(part, str) and bool(_BRANCH_TAG.match(part))


def format_validation_errors(err: ValidationError, source: str, root: type[BaseModel]) -> str:
    """pydantic's errors as one message: each key as written in the YAML, with a "did you mean" for unknown keys."""
    lines = []
    for e in err.errors():
        # Drop pydantic's own branch tags (`literal['auto','off']`, `function-after[...]`); an unknown key is
        # the last element and is the user's, whatever it is called.
        raw = tuple(e["loc"])
        keep_last = e["type"] == "extra_forbidden"
        loc = tuple(p for i, p in enumerate(raw) if (keep_last and i == len(raw) - 1) or not _is_branch_tag(p))
        where = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[") or "(top level)"
        if e["type"] == "extra_forbidden":
            key = str(loc[-1])
            model = _model_at(root, loc)
            hint = did_you_mean(key, list(model.model_fields)) if model else ""
            allowed = f" Allowed keys here: {', '.join(k for k in model.model_fields if k != 'source')}." if model else ""
            lines.append(f"  {where}: unknown key '{key}'{hint}.{allowed}")
        elif e["type"] == "missing":
            lines.append(f"  {where}: required key is missing.")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
            lines.append(f"  {where}: {msg}{shown}.")
    return f"{source} is not a valid pipeline configuration:\n" + "\n".join(lines) + "\nSee the pipeline.yaml reference in README.md."
