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
