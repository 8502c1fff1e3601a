"""One calibration batch's tensors into their histograms, on a small thread pool: the hot loop of `collect`'s data
pass. A tensor holding +-Inf (an additive attention mask written with -inf) is set aside, a NaN stops the pass."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterable, Mapping
from typing import Any

from quantpipe.calibration.histogram import InfiniteValues, SignedHistogram, StreamingHistogram, device_extremes
from quantpipe.errors import CalibrationError

__all__ = ["Binner"]


class Binner:
    """Histograms one batch's tensors on a small thread pool (numpy releases the GIL in the hot ops).

    Each tensor is updated by exactly one thread per batch and batches are processed in order, so the
    result is the same as a single thread's (histogram counts do not depend on the order anyway).
    """

    def __init__(self, hists: Mapping[str, StreamingHistogram | SignedHistogram], threads: int,
                 infinite: set[str]) -> None:
        self.hists = hists
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads) if threads > 1 else None
        self.threads = threads
        self.infinite = infinite
        """Tensors that held +-Inf (and no NaN) in some batch: no longer binned."""

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def _run(self, items: list[tuple[int, str, Any, tuple[float, float] | None]]) -> list[tuple[int, str, ValueError]]:
        """Update each item's histogram; return the (position, name, error) of those holding NaN or Inf."""
        bad = []
        for pos, name, arr, extremes in items:
            try:
                self.hists[name].update(arr, extremes)
            except ValueError as err:
                bad.append((pos, name, err))
        return bad

    def add(self, arrays: Iterable[tuple[str, Any]], start: int) -> None:
        """Histogram one batch's arrays (given in graph order). A tensor holding +-Inf and no NaN (an additive
        attention mask written with -inf) is recorded in `infinite` and binned no more; NaN stops the pass."""
        named = [(pos, n, a) for pos, (n, a) in enumerate(arrays) if n in self.hists and n not in self.infinite]
        # Arrays on the GPU: every tensor's range read back in one copy, not one synchronisation per tensor.
        extremes = device_extremes([a for _, _, a in named])
        items = [(pos, n, a, e) for (pos, n, a), e in zip(named, extremes, strict=True)]
        if self.pool is None or len(items) < 2:
            bad = self._run(items)
        else:
            # Longest-first greedy split by size keeps the threads equally busy.
            shares: list[list[tuple[int, str, Any, tuple[float, float] | None]]] = [[] for _ in range(self.threads)]
            load = [0] * self.threads
            for item in sorted(items, key=lambda it: -int(getattr(it[2], "size", 0))):
                i = load.index(min(load))
                shares[i].append(item)
                load[i] += int(getattr(item[2], "size", 0))
            futures = [self.pool.submit(self._run, share) for share in shares if share]
            bad = [b for f in futures for b in f.result()]
        for _, name, err in bad:
            if isinstance(err, InfiniteValues):
                self.infinite.add(name)
        bad = [b for b in bad if not isinstance(b[2], InfiniteValues)]
        if bad:
            # Name the first tensor in graph order: where the NaN/Inf appears, not everything downstream.
            _, name, _ = min(bad)
            others = sorted(b[1] for b in bad if b[1] != name)
            raise CalibrationError(
                f"tensor '{name}' holds NaN for the batch starting at sample {start}"
                + (f"; {len(others)} later tensor(s) of the batch too" if others else "")
                + ". Check that sample's data, or whether the FP32 model overflows on it (Inf - Inf, 0 * Inf); "
                "calibration needs numbers."
            )
