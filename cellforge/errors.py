"""Exception hierarchy of cellforge.

Every error a user can cause names the offending input and, where there is a
closed set of valid choices, lists them.
"""

from __future__ import annotations


class CellforgeError(Exception):
    """Base class of every error raised on purpose by cellforge."""


class ConfigError(CellforgeError):
    """A setting, flag or environment variable is invalid."""


class DatasetError(CellforgeError):
    """A data set cannot be found, downloaded, verified or understood."""


class UnknownDatasetError(DatasetError):
    """A data set name is not in the registry."""


class ChecksumError(DatasetError):
    """A downloaded or mirrored file does not have the registered md5."""


class PredictionError(CellforgeError):
    """A predictions file does not match what the evaluation expects."""


class LLMError(CellforgeError):
    """An LLM call failed in a way that stops the run."""


class LLMAuthError(LLMError):
    """The backend refused the credentials or does not know the model: fix a variable, do not retry."""


class LLMReplayError(LLMError):
    """Replay mode met a call that is not in the recording."""


class LLMBudgetError(LLMError):
    """The run reached its LLM budget (``CELLFORGE_LLM_BUDGET_USD`` or ``CELLFORGE_LLM_MAX_TOKENS``)."""


class SandboxError(CellforgeError):
    """The sandbox itself (not the code run in it) failed: an infrastructure error."""


class StageError(CellforgeError):
    """A pipeline stage failed; the message says where its logs are."""


def pydantic_problems(exc: Exception, *, shown: int = 5) -> str:
    """A pydantic ``ValidationError`` as one line: ``field: problem (got value)``, ``; ``-joined.

    Used where a file or option fails a pydantic model, so that the user reads which field is
    wrong instead of a traceback.
    """
    errors = exc.errors() if hasattr(exc, "errors") else []
    parts = []
    for err in errors[:shown]:
        where = ".".join(str(x) for x in err.get("loc", ())) or "(whole file)"
        got = err.get("input")
        got_text = f" (got {got!r:.60})" if got is not None and not isinstance(got, dict | list) else ""
        parts.append(f"{where}: {err.get('msg', 'invalid')}{got_text}")
    if len(errors) > shown:
        parts.append(f"{len(errors) - shown} more")
    return "; ".join(parts) or str(exc)


class DiskFullError(CellforgeError):
    """A write failed because the disk (or the quota) is full; ``path`` names the file."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path
