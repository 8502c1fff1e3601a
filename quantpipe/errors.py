"""One exception tree for quantpipe; each class carries the process exit code it maps to.

Messages are written for the user: what failed, what was seen, what was expected, how to fix it.
Raise with the cause (`raise DataError(...) from err`); the CLI prints the message without a
traceback and exits with `exit_code`.
"""

from __future__ import annotations

__all__ = [
    "EXIT_OK",
    "EXIT_GATE_FAILED",
    "EXIT_BAD_INPUT",
    "EXIT_MISSING_DEPENDENCY",
    "EXIT_STAGE_FAILED",
    "EXIT_INTERRUPTED",
    "QuantpipeError",
    "ConfigError",
    "DataError",
    "ModelError",
    "StaleArtifactError",
    "CalibrationError",
    "BuildError",
    "EvaluationError",
    "MissingDependencyError",
    "GateFailed",
    "OutputError",
    "WriteError",
    "WorkerError",
    "os_error_message",
]

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_MISSING_DEPENDENCY = 3
EXIT_STAGE_FAILED = 4
EXIT_INTERRUPTED = 130


class QuantpipeError(Exception):
    """Base of every error quantpipe raises on purpose."""

    exit_code: int = EXIT_STAGE_FAILED


class ConfigError(QuantpipeError):
    """pipeline.yaml (or a command-line option) is malformed or inconsistent."""

    exit_code = EXIT_BAD_INPUT


class DataError(QuantpipeError):
    """Calibration or evaluation data is missing, malformed or does not fit the model."""

    exit_code = EXIT_BAD_INPUT


class ModelError(QuantpipeError):
    """The ONNX model is missing, invalid, or not an FP32 model."""

    exit_code = EXIT_BAD_INPUT


class StaleArtifactError(QuantpipeError):
    """A cache or engine was made from other inputs than the current ones (never silently reused)."""

    exit_code = EXIT_BAD_INPUT


class CalibrationError(QuantpipeError):
    """Calibration could not produce scales."""

    exit_code = EXIT_STAGE_FAILED


class BuildError(QuantpipeError):
    """A variant (quantized model, engine) could not be built."""

    exit_code = EXIT_STAGE_FAILED


class EvaluationError(QuantpipeError):
    """A variant could not be evaluated."""

    exit_code = EXIT_STAGE_FAILED


class MissingDependencyError(QuantpipeError):
    """A required optional dependency (TensorRT, a GPU, onnxruntime-gpu ...) is not available."""

    exit_code = EXIT_MISSING_DEPENDENCY


class GateFailed(QuantpipeError):
    """At least one release-gate rule failed."""

    exit_code = EXIT_GATE_FAILED


class OutputError(QuantpipeError):
    """An output location cannot be used, found before any work starts: report.dir not writable, too little
    free space, the run folder already exists (exit 2: fix the setup, nothing was computed)."""

    exit_code = EXIT_BAD_INPUT


class WriteError(QuantpipeError):
    """Writing an artifact or a report file failed while the pipeline ran (disk full, permissions changed)."""

    exit_code = EXIT_STAGE_FAILED


class WorkerError(QuantpipeError):
    """Work sent to worker processes (execution.workers > 1, or a Ray cluster) could not be completed: a worker
    died more often than retries allow, or the cluster failed. No number is reported from a partial shard set."""

    exit_code = EXIT_STAGE_FAILED


def os_error_message(err: OSError, doing: str = "writing") -> str:
    """One paragraph for an OSError met while `doing`: the path, the OS reason, how to go on."""
    paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p)
    where = f" {paths}" if paths else ""
    reason = err.strerror or str(err) or type(err).__name__
    return (
        f"{doing}{where} failed: {reason}. Free some space or fix the folder's permissions, then run again: "
        f"finished stages are reused and no half-written run is kept. Add --debug for the traceback."
    )
