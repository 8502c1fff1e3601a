"""The run's warnings, kept for its report: what the log said at WARNING level while the run measured (load,
calibration, build, evaluation), so a report read in CI says it too (an empty dense map that made box_agreement
1.0 for every variant was said in the log alone, and summary.md showed 1.0000 as the headline: found probing)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

__all__ = ["MAX_WARNINGS", "warnings_said"]

MAX_WARNINGS = 20
"""The most warnings a report lists (the first ones; a count says how many more the log holds)."""


class _Keep(logging.Handler):
    def __init__(self, said: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.said = said

    def emit(self, record: logging.LogRecord) -> None:
        text = " ".join(record.getMessage().split())
        if text not in self.said:  # said once, as the log says most of them
            self.said.append(text)


@contextlib.contextmanager
def warnings_said() -> Iterator[list[str]]:
    """A list that fills with the distinct WARNING messages of quantpipe's loggers (workers' ones included: they
    reach the lead's loggers) while the block runs."""
    said: list[str] = []
    handler = _Keep(said)
    root = logging.getLogger("quantpipe")
    root.addHandler(handler)
    try:
        yield said
    finally:
        root.removeHandler(handler)
