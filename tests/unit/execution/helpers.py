"""Module-level work functions for the executor tests (a spawned worker or a Ray worker imports them by name)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from quantpipe.errors import DataError

log = logging.getLogger("quantpipe.tests.execution")


def square(x: int) -> int:
    return x * x


def slow_first(item: int | tuple[int, str]) -> int:
    """Item 0 finishes last, so results arrive out of order. Given (x, folder), item 0 first waits until items 1-4
    have each left a file in `folder` (a loaded machine can start a worker later than a fixed sleep)."""
    import time

    x, folder = item if isinstance(item, tuple) else (item, None)
    if folder is not None and x != 0:
        Path(folder, str(x)).touch()
    if x == 0:
        deadline = time.monotonic() + 60
        while folder is not None and len(os.listdir(folder)) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)
    return x


def bad_data(x: int) -> int:
    if x == 2:
        raise DataError(f"sample {x} is broken")
    return x


def logs(x: int) -> int:
    log.warning("hello from item %d", x)
    return os.getpid()


def die_once(marker: str) -> str:
    """Kill this worker process the first time (a crash in native code, the OOM killer), succeed when retried."""
    path = Path(marker)
    if not path.exists():
        path.write_text("died")
        os._exit(17)
    return "survived"


def die_always(_: str) -> str:
    os._exit(17)


def my_gpu(_: int) -> tuple[int, str | None, str | None]:
    """(pid, CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS) of the worker that ran the item."""
    return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("OMP_NUM_THREADS")


def stash_seen(handle: object) -> tuple[int, bool, object]:
    """(pid, whether this worker held the stashed value before, the value) for the stash tests."""
    from quantpipe.execution.stash import cached_digests, unstash

    before = getattr(handle, "digest", "") in cached_digests()
    return os.getpid(), before, unstash(handle)  # type: ignore[arg-type]


def digits_entropy(out: Path) -> tuple:
    """(calibration Dataset, evaluation Dataset, entropy amax) of the bundled example, calibrated into `out`."""
    from quantpipe.calibration import calibrate, select_amax
    from quantpipe.data import open_dataset
    from quantpipe.model import load_model_spec
    from tests.conftest import EXAMPLE_CALIB, EXAMPLE_EVAL, EXAMPLE_MODEL

    spec, _ = load_model_spec(EXAMPLE_MODEL)
    calib = open_dataset(EXAMPLE_CALIB, spec.inputs)
    evald = open_dataset(EXAMPLE_EVAL, spec.inputs, labels_key="label", role="evaluation")
    amax = select_amax(out, "entropy", calibrate(EXAMPLE_MODEL, calib, methods=["entropy"], out_dir=out))
    return calib, evald, amax


def fail_or_linger(item: tuple[int, str]) -> int:
    """Item 0 fails at once; the others write their pid into `folder` and sleep a minute."""
    import time

    x, folder = item
    if x == 0:
        time.sleep(0.5)
        raise DataError("sample 0 is broken")
    Path(folder, f"{x}.pid").write_text(str(os.getpid()), encoding="utf-8")
    time.sleep(60)
    return x
