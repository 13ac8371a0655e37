"""Patch-and-retry: every code attempt is a node of a journal saved in the run directory.

Each attempt records its code, command, exit code, log tail, duration, classified failure and
the patch that followed. Only code errors and bad outputs go to the debugger agent;
timeouts and out-of-memory retry with a smaller configuration; infrastructure failures stop.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from cellforge.errors import PredictionError, SandboxError
from cellforge.execution.codegen import get_config, set_config


class FailureKind(StrEnum):
    """Closed set of attempt outcomes other than success."""

    CODE_ERROR = "code_error"
    TIMEOUT = "timeout"
    OOM = "out_of_memory"
    BAD_OUTPUT = "bad_output"
    INFRA = "infrastructure"


#: Failures that go to the debugger agent for a patch.
PATCHABLE = {FailureKind.CODE_ERROR, FailureKind.BAD_OUTPUT}

_OOM = re.compile(r"MemoryError|Cannot allocate memory|can't allocate memory|out of memory|std::bad_alloc", re.I)


class Attempt(BaseModel):
    """One run of one version of the script."""

    index: int
    parent: int | None = None
    stage: str = Field(description="draft (first code), debug (after a patch) or resize (after timeout/OOM).")
    script_sha256: str
    command: list[str]
    exit_code: int | None = None
    duration_s: float | None = None
    log_tail: str = ""
    failure: FailureKind | None = None
    failure_detail: str = ""
    patch: dict[str, Any] | None = None
    val_metrics: dict[str, Any] = Field(default_factory=dict)
    backend: str = ""
    isolation: str = ""


class Journal(BaseModel):
    """All attempts of an execution stage, in order."""

    attempts: list[Attempt] = Field(default_factory=list)
    succeeded: bool = False
    stop_reason: str = ""

    def save(self, path: Path) -> None:
        """Write as JSON (rewritten after every attempt)."""
        path.write_text(self.model_dump_json(indent=2))


def classify(exit_code: int, timed_out: bool, log_tail: str) -> FailureKind | None:  # noqa: FBT001
    """Failure class of a finished command (``None`` for a clean exit)."""
    if timed_out:
        return FailureKind.TIMEOUT
    if exit_code == 0:
        return None
    if exit_code in (137, -9) or _OOM.search(log_tail):  # noqa: PLR2004 - SIGKILL, usually the OOM killer
        return FailureKind.OOM
    return FailureKind.CODE_ERROR


def apply_patch(script: str, patch: dict[str, Any]) -> str:
    """Apply a debugger :class:`~cellforge.design.plan.Patch` (edits, then CONFIG updates).

    Raises
    ------
    ValueError
        An edit's ``find`` text does not occur in the script.
    """
    for edit in patch.get("edits", []):
        if edit["find"] not in script:
            msg = f"patch edit target not found in script: {edit['find'][:80]!r}"
            raise ValueError(msg)
        script = script.replace(edit["find"], edit["replace"], 1)
    if patch.get("config_updates"):
        config = get_config(script)
        config.update(patch["config_updates"])
        script = set_config(script, config)
    return script


def resize(script: str, failure: FailureKind) -> tuple[str, dict[str, Any]] | None:
    """Smaller configuration after a timeout (fewer epochs) or OOM (smaller batch and width)."""
    config = get_config(script)
    updates: dict[str, Any] = {}
    if failure is FailureKind.TIMEOUT and config.get("max_epochs", 1) > 1:
        updates["max_epochs"] = max(1, int(config["max_epochs"]) // 4)
    if failure is FailureKind.OOM:
        for key in ("batch_size", "hidden_dim"):
            if config.get(key, 1) > 1:
                updates[key] = max(1, int(config[key]) // 2)
    if not updates:
        return None
    config.update(updates)
    return set_config(script, config), updates


def sha(text: str) -> str:
    """sha256 of a script."""
    return hashlib.sha256(text.encode()).hexdigest()


def run_attempts(
    script: str,
    *,
    sandbox: Any,
    attempts_dir: Path,
    journal_path: Path,
    check_outputs: Any,
    debugger: Any,
    max_attempts: int = 4,
    timeout_s: float = 900,
    memory_mb: int | None = 8192,
    on_start: Any = None,
) -> tuple[Journal, str]:
    """Run ``script`` in ``sandbox`` until it succeeds or the attempt budget ends.

    Parameters
    ----------
    script
        Text of ``train.py``.
    sandbox
        A :class:`runtime.base.Sandbox` whose work folder holds the inputs.
    check_outputs
        Callable raising :class:`PredictionError` when the outputs break the contract;
        returns the validation metrics dict otherwise.
    debugger
        Callable ``(script, log_tail, failure) -> patch dict``.

    Returns
    -------
    The journal and the text of the last script run (the successful one when it succeeded).

    Raises
    ------
    SandboxError
        Infrastructure failure: the sandbox could not run the command at all.
    """
    journal = Journal()
    parent: int | None = None
    stage = "draft"
    patch_used: dict[str, Any] | None = None
    for index in range(max_attempts):
        folder = attempts_dir / f"attempt-{index:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train.py").write_text(script)
        (sandbox.work_dir / "train.py").write_text(script)
        command = [sys.executable, "train.py"]
        attempt = Attempt(index=index, parent=parent, stage=stage, script_sha256=sha(script), command=command, patch=patch_used)
        if on_start:
            on_start(attempt, sandbox.work_dir / "logs" / f"attempt-{index:03d}.log")
        try:
            result = sandbox.run(command, timeout_s=timeout_s, memory_mb=memory_mb, log_name=f"attempt-{index:03d}.log")
        except Exception as exc:
            attempt.failure, attempt.failure_detail = FailureKind.INFRA, str(exc)
            journal.attempts.append(attempt)
            journal.stop_reason = f"infrastructure failure: {exc}"
            journal.save(journal_path)
            msg = f"sandbox failure in attempt {index}: {exc}"
            raise SandboxError(msg) from exc
        attempt.exit_code, attempt.duration_s, attempt.log_tail = result.exit_code, result.duration_s, result.log_tail
        attempt.backend, attempt.isolation = result.backend, result.isolation
        (folder / "log_tail.txt").write_text(result.log_tail)
        attempt.failure = classify(result.exit_code, result.timed_out, result.log_tail)
        if attempt.failure is None:
            try:
                attempt.val_metrics = check_outputs()
            except PredictionError as exc:
                attempt.failure, attempt.failure_detail = FailureKind.BAD_OUTPUT, str(exc)
        journal.attempts.append(attempt)
        journal.save(journal_path)
        if attempt.failure is None:
            journal.succeeded, journal.stop_reason = True, f"attempt {index} succeeded"
            journal.save(journal_path)
            return journal, script
        parent = index
        if attempt.failure in PATCHABLE:
            detail = attempt.failure_detail or result.log_tail
            patch = debugger(script, detail, attempt.failure)
            (folder / "patch.json").write_text(json.dumps(patch, indent=2))
            if patch.get("give_up") or not (patch.get("edits") or patch.get("config_updates")):
                journal.stop_reason = f"debugger gave up after attempt {index}: {patch.get('diagnosis', '')}"
                break
            try:
                script = apply_patch(script, patch)
            except ValueError as exc:
                journal.stop_reason = f"patch after attempt {index} could not be applied: {exc}"
                break
            stage, patch_used = "debug", patch
        else:
            resized = resize(script, attempt.failure)
            if resized is None:
                journal.stop_reason = f"{attempt.failure.value} in attempt {index} and nothing left to shrink"
                break
            script, updates = resized
            stage, patch_used = "resize", {"diagnosis": attempt.failure.value, "config_updates": updates}
    else:
        journal.stop_reason = f"attempt budget of {max_attempts} used up"
    journal.save(journal_path)
    return journal, script
