"""What every section of pipeline.yaml shares: the strict, frozen base model and the "did you mean" hint."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = ["StrictModel", "did_you_mean"]


class StrictModel(BaseModel):
    """A section of pipeline.yaml: unknown keys are errors, values are frozen once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def did_you_mean(word: str, options: Sequence[str] | dict[str, Any]) -> str:
    """' (did you mean 'x'?)' for the closest option, or ''."""
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""
