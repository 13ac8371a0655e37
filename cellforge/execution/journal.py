"""Patch-and-retry: every code attempt is a node of a journal saved in the run directory.

Each attempt records its code, command, exit code, log tail, duration, classified failure and
the patch that followed. Only code errors and bad outputs go to the debugger agent;
timeouts and out-of-memory retry with a smaller configuration; infrastructure failures stop.
After a clean run, :func:`refine_until_settled` tries configuration changes until the
validation metric settles and keeps the best attempt.
"""

from __future__ import annotations

import hashlib
import json
import re
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from cellforge.errors import ConfigError, PredictionError, SandboxError
from cellforge.execution.codegen import get_config, render, set_config
from runtime.hostio import remove_tree


class FailureKind(StrEnum):
    """Closed set of attempt outcomes other than success."""

    CODE_ERROR = "code_error"
    TIMEOUT = "timeout"
    OOM = "out_of_memory"
    BAD_OUTPUT = "bad_output"
    DISK_LIMIT = "disk_limit"
    INFRA = "infrastructure"
    PATCH_ERROR = "patch_error"


#: Output events of an attempt kept in the journal.
EVENTS_KEPT = 50

#: Failures that go to the debugger agent for a patch (a patch that did not apply goes back too).
PATCHABLE = {FailureKind.CODE_ERROR, FailureKind.BAD_OUTPUT, FailureKind.PATCH_ERROR}
#: Failures a library script answers by shrinking its CONFIG; a script of a model's own goes to the debugger.
RESOURCE = {FailureKind.TIMEOUT, FailureKind.OOM}

_OOM = re.compile(r"MemoryError|Cannot allocate memory|can't allocate memory|out of memory|std::bad_alloc", re.I)


class Attempt(BaseModel):
    """One run of one version of the script."""

    index: int
    parent: int | None = None
    stage: str = Field(description="draft (first code), debug (after a patch), resize (after timeout/OOM) or refine.")
    script_sha256: str
    command: list[str]
    exit_code: int | None = None
    duration_s: float | None = None
    peak_rss_mib: float | None = Field(default=None, description="Largest resident memory of the script's processes, MiB (local sandbox; see runtime.base.RunResult).")
    log_tail: str = ""
    failure: FailureKind | None = None
    failure_detail: str = ""
    patch: dict[str, Any] | None = None
    val_metrics: dict[str, Any] = Field(
        default_factory=dict,
        description="The host's validation numbers for this attempt (cellforge.execution.judge): the only ones used to choose.",
    )
    reported_metrics: dict[str, Any] = Field(
        default_factory=dict, description="What the script wrote about itself in outputs/val_metrics.json (display only)."
    )
    disagreement: str | None = Field(default=None, description="Set when the script's own validation error differs from the host's.")
    backend: str = ""
    isolation: str = ""
    events: list[dict[str, Any]] = Field(
        default_factory=list, description="The last output events the runtime streamed while the attempt ran (redacted): {t, text}."
    )


class EnsembleRecord(BaseModel):
    """Attempts whose test predictions were averaged, chosen on held-out validation predictions."""

    weights: dict[int, float] = Field(description="Attempt index -> weight (sums to 1).")
    val_metrics: dict[str, float] = Field(description="Validation scores of the average (same conditions as the attempts').")
    best_single_val_metrics: dict[str, float] = Field(description="The same scores for the best single attempt.")
    method: str = "greedy forward selection with replacement (Caruana et al. 2004) on out-of-fold validation predictions"


class Journal(BaseModel):
    """All attempts of an execution stage, in order."""

    attempts: list[Attempt] = Field(default_factory=list)
    succeeded: bool = False
    stop_reason: str = ""
    best_attempt: int | None = Field(default=None, description="Attempt whose outputs are kept (best validation metric).")
    refine_stop_reason: str = ""
    ensemble: EnsembleRecord | None = Field(
        default=None, description="Attempts averaged into the kept predictions, when averaging beat the best attempt on validation."
    )
    comparisons: list[dict[str, Any]] = Field(
        default_factory=list,
        description="When a model's own script ran clean: the host's paired verdicts against the plan's reference and library model.",
    )
    refit: dict[str, Any] = Field(
        default_factory=dict, description="The selected model trained again on training + validation cells: used, attempts, why."
    )
    lineage: dict[str, Any] = Field(
        default_factory=dict, description="What wrote the scored predictions: written_by (words), attempts (the chain) and steps."
    )
    skipped: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Refinement proposals not run because they could not change the validation predictions: {config_updates, reason}.",
    )

    def save(self, path: Path) -> None:
        """Write as JSON (rewritten after every attempt, atomically: a kill leaves the old journal or the new one)."""
        from cellforge.safeio import atomic_write_text

        atomic_write_text(path, self.model_dump_json(indent=2))


def classify(exit_code: int, timed_out: bool, log_tail: str, *, limit_hit: str | None = None) -> FailureKind | None:  # noqa: FBT001
    """Failure class of a finished command (``None`` for a clean exit).

    ``limit_hit='disk'`` (the sandbox stopped a command whose work folder passed its size
    limit) is a :attr:`FailureKind.DISK_LIMIT`; ``'memory'`` (its resident memory passed the
    limit) a :attr:`FailureKind.OOM`.
    """
    if timed_out:
        return FailureKind.TIMEOUT
    if limit_hit == "disk":
        return FailureKind.DISK_LIMIT
    if limit_hit == "memory":  # the sandbox's resident-memory watch (GPU sandboxes, see runtime.gpu)
        return FailureKind.OOM
    if exit_code == 0:
        return None
    if exit_code in (137, -9) or _OOM.search(log_tail):  # noqa: PLR2004 - SIGKILL, usually the OOM killer
        return FailureKind.OOM
    return FailureKind.CODE_ERROR


def error_output(attempt: Attempt, *, max_chars: int = 60_000) -> str:
    """The end of what the runtime streamed during ``attempt`` (its events), else its log tail."""
    text = "".join(e.get("text", "") for e in attempt.events)
    return (text or attempt.log_tail)[-max_chars:]


def apply_patch(script: str, patch: dict[str, Any]) -> str:
    """Apply a debugger :class:`~cellforge.design.plan.Patch`: a whole script, a unified diff, exact edits, then CONFIG updates.

    Raises
    ------
    ValueError
        The new script breaks the static contract, the diff does not apply, or an edit's
        ``find`` text does not occur in the script.
    """
    from cellforge.execution.contract import check_script
    from cellforge.execution.diffs import apply_unified_diff

    if patch.get("script"):
        script = check_script(patch["script"])
    elif patch.get("diff"):
        script = check_script(apply_unified_diff(script, patch["diff"]))
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


def _reported(outputs: Path) -> dict[str, Any]:
    """The script's own ``val_metrics.json`` (display only, bounded: :func:`~cellforge.execution.contract.parse_val_metrics`); empty when unusable."""
    from cellforge.execution.contract import read_val_metrics

    try:
        return read_val_metrics(outputs)
    except PredictionError:
        return {}


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


class Executor:
    """Runs numbered attempts of scripts in one sandbox and records them in a journal."""

    def __init__(
        self,
        *,
        sandbox: Any,
        attempts_dir: Path,
        journal_path: Path,
        check_outputs: Any,
        timeout_s: float,
        memory_mb: int | None,
        on_start: Any = None,
        journal: Journal | None = None,
    ) -> None:
        self.sandbox, self.attempts_dir, self.journal_path = sandbox, attempts_dir, journal_path
        self.check_outputs, self.timeout_s, self.memory_mb, self.on_start = check_outputs, timeout_s, memory_mb, on_start
        self.journal = journal or Journal()

    def run(self, script: str, *, stage: str, parent: int | None, patch: dict[str, Any] | None) -> Attempt:
        """One attempt: write the script, run it, classify the outcome, keep a clean run's outputs.

        Raises
        ------
        SandboxError
            Infrastructure failure: the sandbox could not run the command at all.
        """
        index = len(self.journal.attempts)
        folder = self.attempts_dir / f"attempt-{index:03d}"
        if folder.exists():
            remove_tree(folder)  # left by an interrupted run: this attempt starts clean
        folder.mkdir(parents=True)
        (folder / "train.py").write_text(script)
        self.sandbox.remove("outputs")  # a run must write its own outputs, not inherit the last one's
        self.sandbox.write_text("train.py", script)
        command = [self.sandbox.python, "train.py"]
        log_name = f"attempt-{index:03d}.log"
        attempt = Attempt(index=index, parent=parent, stage=stage, script_sha256=sha(script), command=command, patch=patch)
        on_event = self.on_start(attempt) if self.on_start else None
        try:
            result = self.sandbox.run(command, timeout_s=self.timeout_s, memory_mb=self.memory_mb, log_name=log_name, on_event=on_event)
        except Exception as exc:
            attempt.failure, attempt.failure_detail = FailureKind.INFRA, str(exc)
            self.journal.attempts.append(attempt)
            self.journal.stop_reason = f"infrastructure failure: {exc}"
            self.journal.save(self.journal_path)
            msg = f"sandbox failure in attempt {index}: {exc}"
            raise SandboxError(msg) from exc
        attempt.exit_code, attempt.duration_s, attempt.log_tail = result.exit_code, result.duration_s, result.log_tail
        attempt.peak_rss_mib = result.peak_rss_mib
        attempt.events = [e.model_dump() for e in result.events[-EVENTS_KEPT:]]
        attempt.backend, attempt.isolation = result.backend, result.isolation
        (folder / "log_tail.txt").write_text(result.log_tail)
        attempt.failure = classify(result.exit_code, result.timed_out, result.log_tail, limit_hit=result.limit_hit)
        if attempt.failure is None:
            try:
                attempt.val_metrics = self.check_outputs(self._collect(folder / "outputs"))
            except PredictionError as exc:
                attempt.failure, attempt.failure_detail = FailureKind.BAD_OUTPUT, str(exc)
        if attempt.failure is not None and (folder / "outputs").exists():
            remove_tree(folder / "outputs")  # only clean runs keep outputs
        if attempt.failure is None:
            attempt.reported_metrics = _reported(folder / "outputs")
            from cellforge.execution.judge import disagreement

            attempt.disagreement = disagreement(attempt.reported_metrics, attempt.val_metrics)
        self.journal.attempts.append(attempt)
        self.journal.save(self.journal_path)
        return attempt

    def unapplied(self, script: str, *, parent: int, patch: dict[str, Any], error: str) -> Attempt:
        """Record a patch that could not be applied as an attempt of its own (nothing runs): its error goes back to the debugger."""
        index = len(self.journal.attempts)
        folder = self.attempts_dir / f"attempt-{index:03d}"
        if folder.exists():
            remove_tree(folder)
        folder.mkdir(parents=True)
        (folder / "train.py").write_text(script)
        attempt = Attempt(
            index=index, parent=parent, stage="debug", script_sha256=sha(script), command=[], patch=patch,
            failure=FailureKind.PATCH_ERROR, failure_detail=error,
        )
        self.journal.attempts.append(attempt)
        self.journal.save(self.journal_path)
        return attempt

    def _collect(self, dest: Path) -> Path:
        """Copy the sandbox's ``outputs/`` to the host folder ``dest`` (no link followed, sizes bounded).

        Raises
        ------
        PredictionError
            No outputs folder, or it is a link, holds special files only, or is too big.
        """
        from cellforge.execution.contract import collect_outputs

        skipped = collect_outputs(self.sandbox, dest, memory_mb=self.memory_mb)
        if skipped:
            # names made in the sandbox: written as Python's ascii() spells them (no control character reaches a reader)
            (dest / "SKIPPED.txt").write_text("not copied (links or special files):\n" + "\n".join(ascii(str(n))[1:-1][:300] for n in skipped[:1000]) + "\n")
        return dest

    def restore(self, index: int) -> None:
        """Put attempt ``index``'s script and saved outputs back into the sandbox (``train.py``, ``outputs/``)."""
        folder = self.attempts_dir / f"attempt-{index:03d}"
        self.sandbox.remove("outputs")
        for path in sorted((folder / "outputs").rglob("*")):
            if path.is_file() and path.name != "SKIPPED.txt":
                self.sandbox.write_text(str(Path("outputs") / path.relative_to(folder / "outputs")), path.read_bytes())
        self.sandbox.write_text("train.py", (folder / "train.py").read_text())


def is_library_script(script: str) -> bool:
    """True when ``script`` is a template of the library rendered with its own CONFIG (no hand edit)."""
    from cellforge.execution.codegen import templates

    config = get_config(script)
    template = config.get("template")
    if template not in templates():
        return False
    try:
        return render(str(template), {k: v for k, v in config.items() if k != "template"}) == script
    except Exception:  # noqa: BLE001 - a CONFIG the template cannot render is not the library's
        return False


Step = Literal["done", "debug", "resize", "redraft", "stop"]


#: A fix that cannot be applied (or was already run), proposed this many times, ends patch-and-retry (a 1.5B debugger
#: repeated one four times, 30-120 s a call).
MAX_SAME_UNAPPLIED = 2
#: Fresh drafts the coder is asked for in one run once the debugger stalls. A weak model gains more from new samples than
#: from repairing a draft it cannot fix (Olausson et al. 2024, "Is self-repair a silver bullet for code generation?",
#: ICLR); measured here: Qwen2.5-Coder-1.5B answered the same IndexError with the same wrong fix three rounds running.
MAX_REDRAFTS = 2
#: Debugger fixes since a draft that ran into an exception already seen since that draft, after which the debugger has stalled.
MAX_REPEATED_ERRORS = 2
#: New drafts a model may write after the host judged its clean code no better than the plan's reference.
MAX_REVISIONS = 2
#: Debugger fixes of a revision that failed (its own small patch-and-retry loop).
REVISION_FIXES = 2


def next_step(
    attempt: Attempt, *, library: bool, attempts_used: int, max_attempts: int, has_debugger: bool, stalled: bool = False, can_redraft: bool = False,
) -> tuple[Step, str]:
    """What follows ``attempt`` in patch-and-retry: a small, pure decision on the host's outcome.

    ``done`` after a clean run; ``stop`` when the attempt budget is used (the debugger is never
    called after the last attempt) or the failure is infrastructure; ``resize`` for a timeout or
    out-of-memory run of a library script (fewer epochs, smaller batches); ``redraft`` (a fresh
    draft from the coder) when the debugger has ``stalled`` on a script a model wrote and
    ``can_redraft``; ``debug`` for code errors, bad outputs, patches that did not apply, and
    timeouts or out-of-memory runs of a script a model wrote (the debugger is told the class
    and the limits).
    """
    if attempt.failure is None:
        return "done", f"attempt {attempt.index} succeeded"
    if attempts_used >= max_attempts:
        return "stop", f"attempt budget of {max_attempts} used up"
    if attempt.failure not in PATCHABLE | RESOURCE:
        return "stop", f"{attempt.failure.value} in attempt {attempt.index}"
    if attempt.failure in RESOURCE and library:
        return "resize", ""
    if stalled:
        if can_redraft and not library:
            return "redraft", f"the debugger stalled after attempt {attempt.index}"
        return "stop", f"the debugger stalled after attempt {attempt.index} and no fresh draft is left"
    if not has_debugger:
        return "stop", f"{attempt.failure.value} in attempt {attempt.index} and no debugger"
    return "debug", ""


def error_signature(attempt: Attempt) -> str:
    """The exception line of a failed run (the last line of its condensed error output), digits masked; "" without one."""
    from cellforge.execution.debugging import condense_error

    if attempt.failure is None or attempt.failure is FailureKind.PATCH_ERROR:
        return ""
    lines = [line.strip() for line in condense_error(attempt.failure_detail or error_output(attempt)).splitlines() if line.strip()]
    return re.sub(r"\d+", "#", lines[-1])[:300] if lines else ""


def repeated_errors(journal: Journal, attempt: Attempt) -> int:
    """How many debugger fixes since the last draft, up to ``attempt``, ran into an exception already seen since that draft.

    A fix that leaves the exception as it was, or brings back one an earlier fix had moved past
    (a 1.5B debugger alternated between an ImportError and an AttributeError about the same call),
    is not moving the script.
    """
    upto = [a for a in journal.attempts if a.index <= attempt.index]
    start = max((i for i, a in enumerate(upto) if a.stage in ("draft", "redraft", "revise")), default=0)
    seen: set[str] = set()
    count = 0
    for a in upto[start:]:
        signature = error_signature(a)
        if not signature:
            continue
        if a.stage == "debug" and signature in seen:
            count += 1
        seen.add(signature)
    return count


def _last_run_error(journal: Journal, attempt: Attempt) -> str:
    """The error output of the last attempt that ran (a patch error's run is the one before it)."""
    ran = next((a for a in reversed(journal.attempts) if a.failure not in (None, FailureKind.PATCH_ERROR)), attempt)
    return ran.failure_detail or error_output(ran)


def debug_history(journal: Journal, *, max_entries: int = 6, max_chars: int = 300) -> list[dict[str, Any]]:
    """This run's attempts as the debugger reads them: each earlier fix and what it led to (bounded)."""
    out = []
    for a in journal.attempts[-max_entries:]:
        patch = a.patch or {}
        change = "a fresh draft from the coder" if a.stage == "redraft" else ""
        if patch.get("edits"):
            e = patch["edits"][0]
            change = f"replaced {e.get('find', '')[:max_chars]!r} with {e.get('replace', '')[:max_chars]!r}"
        elif patch.get("diff"):
            change = "diff: " + patch["diff"][:max_chars]
        elif patch.get("function"):
            change = "rewrote predict_deltas: " + " ".join(patch["function"].split())[:max_chars]
        elif patch.get("script"):
            change = "rewrote the whole script"
        elif patch.get("config_updates"):
            change = f"CONFIG updates {patch['config_updates']}"
        from cellforge.execution.debugging import condense_error

        detail = condense_error(a.failure_detail or error_output(a)).strip().splitlines()
        out.append({
            "attempt": a.index, "stage": a.stage, "change": change, "diagnosis": str(patch.get("diagnosis", ""))[:max_chars],
            "outcome": "ok" if a.failure is None else a.failure.value, "error": detail[-1][:max_chars] if detail and a.failure else "",
        })  # fmt: skip
    return out


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
    redraft: Any = None,
    max_redrafts: int = MAX_REDRAFTS,
    journal: Journal | None = None,
    first_stage: str = "draft",
    first_patch: dict[str, Any] | None = None,
) -> tuple[Journal, str]:
    """Run ``script`` in ``sandbox`` until it succeeds or the attempt budget ends.

    One loop over attempts; after each, :func:`next_step` decides (run done, debug, resize,
    stop) on the host's outcome. The runtime's output events of each attempt are recorded in
    the journal; a failure that goes to the debugger carries its class, its error output and
    this run's history (:func:`debug_history`). A patch that does not apply is an attempt of
    its own (class ``patch_error``, nothing runs) whose error goes back to the debugger within
    the budget. The debugger has stalled when its fixes keep running into exceptions already seen
    (:func:`repeated_errors`, :data:`MAX_REPEATED_ERRORS` times), when it proposed the same unappliable or already-run fix
    :data:`MAX_SAME_UNAPPLIED` times, when its fixes left the script unchanged as often, or when it gave up: a model's script is then drawn again by
    ``redraft`` (at most ``max_redrafts`` times), and without one the loop ends. A debugger or
    coder whose model fails (:class:`~cellforge.errors.LLMError`) ends the loop cleanly, with
    everything recorded.

    Parameters
    ----------
    script
        Text of ``train.py``.
    sandbox
        A :class:`runtime.base.Sandbox` whose work folder holds the inputs.
    check_outputs
        Callable ``(outputs_dir) -> dict`` given a host-side copy of the sandbox's ``outputs/``
        (made without following links, size-bounded); raises :class:`PredictionError` when
        the outputs break the contract, returns the host's validation numbers otherwise.
    debugger
        Callable ``(request) -> patch dict`` (or None: failures stop the loop); ``request``
        holds ``script``, ``error`` (the contract checker's message, the patch error, or the
        tail of the streamed output), ``failure`` (a :class:`FailureKind`), ``history`` and
        ``limits`` (``timeout_s``, ``memory_mb``).
    on_start
        Callable ``(attempt) -> on_event`` called before each attempt; ``on_event`` (or
        ``None``) receives the runtime's :class:`runtime.base.CommandEvent` objects live.
    redraft
        Callable ``(request) -> script`` (or None): a fresh draft from the coder, given
        ``failure``, ``error`` (the stalled run's) and ``history``; its attempt has stage
        ``redraft`` and no parent.
    journal, first_stage, first_patch
        Go on in an existing journal (``max_attempts`` then counts its attempts too), the first
        attempt recorded with this stage and patch (a revision after the host's verdict).

    Returns
    -------
    The journal and the text of the last script run (the successful one when it succeeded).

    Raises
    ------
    SandboxError
        Infrastructure failure: the sandbox could not run the command at all.
    """
    from cellforge.errors import LLMError

    executor = Executor(
        sandbox=sandbox, attempts_dir=attempts_dir, journal_path=journal_path, check_outputs=check_outputs,
        timeout_s=timeout_s, memory_mb=memory_mb, on_start=on_start, journal=journal,
    )
    journal = executor.journal
    attempt = executor.run(script, stage=first_stage, parent=None, patch=first_patch)
    tried_fixes: dict[str, int] = {}  # a fix already run, and the attempt that ran it
    unapplied: dict[str, int] = {}  # a fix that could not be applied, and how often it was proposed
    stalled, redrafts, unchanged = "", 0, 0  # why the debugger is not moving the script (empty while it is)
    while True:
        if repeated_errors(journal, attempt) >= MAX_REPEATED_ERRORS:
            stalled = stalled or f"{MAX_REPEATED_ERRORS} fixes ran into an exception already seen since the draft (last: {error_signature(attempt)[:120]})"
        step, why = next_step(
            attempt, library=is_library_script(script), attempts_used=len(journal.attempts), max_attempts=max_attempts,
            has_debugger=debugger is not None, stalled=bool(stalled), can_redraft=redraft is not None and redrafts < max_redrafts,
        )
        if step == "done":
            journal.succeeded, journal.stop_reason = True, why
            break
        if step == "stop":
            journal.stop_reason = f"{why}: {stalled}" if stalled else why
            break
        if step == "redraft":
            request = {"failure": attempt.failure, "error": _last_run_error(journal, attempt), "history": debug_history(journal), "stalled": stalled}
            try:
                drawn = redraft(request)
            except LLMError as exc:
                journal.stop_reason = f"the coder's model failed when asked for a fresh draft after attempt {attempt.index}: {exc}"
                break
            redrafts += 1
            script, stalled, tried_fixes, unapplied, unchanged = drawn, "", {}, {}, 0
            attempt = executor.run(script, stage="redraft", parent=None, patch={"diagnosis": f"a fresh draft from the coder: the debugger stalled ({why})"})
            continue
        if step == "resize":
            resized = resize(script, attempt.failure)
            if resized is not None:
                script, updates = resized
                attempt = executor.run(script, stage="resize", parent=attempt.index, patch={"diagnosis": attempt.failure.value, "config_updates": updates})
                continue
            if debugger is None:
                journal.stop_reason = f"{attempt.failure.value} in attempt {attempt.index} and nothing left to shrink"
                break
        folder = attempts_dir / f"attempt-{attempt.index:03d}"
        error = attempt.failure_detail or error_output(attempt)
        if attempt.failure is FailureKind.PATCH_ERROR:  # the run's own error is still what needs fixing
            ran = next((a for a in reversed(journal.attempts) if a.failure is not FailureKind.PATCH_ERROR), None)
            if ran is not None and ran.failure is not None:
                error = f"{error}\n\nThe error of the last run (attempt {ran.index}, {ran.failure.value}):\n{ran.failure_detail or error_output(ran)}"
        request = {
            "script": script, "error": error, "failure": attempt.failure,
            "history": debug_history(journal), "limits": {"timeout_s": timeout_s, "memory_mb": memory_mb},
        }  # fmt: skip
        try:
            patch = debugger(request)
        except LLMError as exc:
            journal.stop_reason = f"the debugger's model failed after attempt {attempt.index}: {exc}"
            break
        (folder / "patch.json").write_text(json.dumps(patch, indent=2))
        if patch.get("give_up") or not any(patch.get(k) for k in ("script", "diff", "edits", "config_updates")):
            stalled = f"the debugger gave up after attempt {attempt.index}: {patch.get('diagnosis', '')}"
            continue
        fix = json.dumps({k: patch.get(k) for k in ("script", "diff", "edits", "config_updates")}, sort_keys=True)
        try:
            new_script = apply_patch(script, patch)
        except (ValueError, ConfigError) as exc:
            attempt = executor.unapplied(script, parent=attempt.index, patch=patch, error=f"the patch could not be applied: {exc}")
            unapplied[fix] = unapplied.get(fix, 0) + 1
            if unapplied[fix] >= MAX_SAME_UNAPPLIED:  # told twice, the model answers the same: more calls would too
                stalled = f"the debugger proposed the same fix that cannot be applied {unapplied[fix]} times (last: attempt {attempt.index})"
            continue
        if new_script == script:
            attempt = executor.unapplied(script, parent=attempt.index, patch=patch, error="the patch left the script unchanged")
            unchanged += 1
            if unchanged >= MAX_SAME_UNAPPLIED:  # the 1.5B debugger sent its failing line back 4 times of 5 (measured)
                stalled = f"the debugger's fixes left the script unchanged {unchanged} times (last: attempt {attempt.index})"
            continue
        if fix in tried_fixes:
            attempt = executor.unapplied(
                script, parent=attempt.index, patch=patch,
                error=f"this exact fix was already tried (attempt {tried_fixes[fix]}) and the script still failed: propose a different one",
            )
            unapplied[fix] = unapplied.get(fix, 0) + 1
            if unapplied[fix] >= MAX_SAME_UNAPPLIED:
                stalled = f"the debugger proposed a fix already tried (attempt {tried_fixes[fix]}) {unapplied[fix]} more times (last: attempt {attempt.index})"
            continue
        tried_fixes[fix] = len(journal.attempts)
        script = new_script
        attempt = executor.run(script, stage="debug", parent=attempt.index, patch=patch)
    journal.save(journal_path)
    return journal, script


class RefineSettings(BaseModel):
    """When refinement stops: the validation metric settles, or the round budget ends."""

    max_rounds: int = Field(3, ge=0, description="Refinement rounds after the first clean run (0 disables).")
    patience: int = Field(2, ge=1, description="Stop after this many rounds in a row without enough improvement.")
    tolerance: float = Field(0.01, ge=0.0, description="Relative improvement of the metric that counts as progress.")
    metric: str = Field("val_mse_top20", description="Validation metric of record (from outputs/val_metrics.json).")
    lower_is_better: bool = True
    guard_metric: str | None = Field(
        "val_pearson_delta_top20",
        description="Second validation metric (higher is better) a change must not lower by more than the tolerance.",
    )
    ensemble_steps: int = Field(
        10, ge=0, description="Most additions of greedy ensemble selection over the clean attempts (0: keep the best attempt alone)."
    )
    max_selections: int = Field(
        8, ge=0, description="Most model-selection proposals (another template or reference) beyond the tuning rounds: a hard cap."
    )
    history_entries: int = Field(12, ge=1, description="Most attempts of the metrics history the refiner reads.")
    rule: Literal["one_se", "tolerance"] = Field(
        "one_se",
        description=(
            "When a change or an average replaces the best attempt: 'one_se', when the mean of its per-condition "
            "differences from the best (validation MSE on the top-20 genes, the same conditions) plus one standard error "
            "of that paired mean is below 0 (the host's judged validation deltas, cellforge.execution.judge; "
            "attempts without that file fall back to 'tolerance'); 'tolerance', when the metric improves by more "
            "than the relative tolerance. Either way the guard metric must hold."
        ),
    )


def _score(attempt: Attempt, settings: RefineSettings) -> float | None:
    value = attempt.val_metrics.get(settings.metric)
    if attempt.failure is not None or not isinstance(value, int | float):
        return None
    return float(value) if settings.lower_is_better else -float(value)


#: CONFIG keys whose change is model selection rather than tuning.
MODEL_KEYS = {"template", "baseline"}
#: CONFIG keys that shape only the learned residual (its network and its training), never the
#: cross-validation folds (``cv_folds``, ``seed``, ``train_on``) or the reference predictors
#: (``baseline``, ``member_ridge``, ``context_*``).
RESIDUAL_ONLY_KEYS = {
    "learning_rate", "weight_decay", "hidden_dim", "latent_dim", "dropout", "max_epochs", "patience", "batch_size",
    "de_weight", "n_neighbours", "n_components", "dose_encoder", "clip_inputs", "standardise_inputs", "epochs_without_val",
}


def residual_untrained_everywhere(attempt: Attempt) -> bool:
    """True when the attempt's residual was left untrained in every cross-validation fold.

    The templates' ``fit_conditions`` does not train the residual of a fold with fewer than two
    seen conditions (``residual_fold_best_epochs`` reads ``untrained`` for each fold): its
    out-of-fold predictions are then exactly the reference predictor's.
    """
    folds = attempt.val_metrics.get("residual_fold_best_epochs")
    return isinstance(folds, str) and bool(folds.strip()) and all(f.strip() == "untrained" for f in folds.split(","))


def cannot_change_predictions(best: Attempt, best_config: dict[str, Any], config: dict[str, Any]) -> str | None:
    """Why running ``config`` cannot change the best attempt's validation (or test) predictions; None if it can.

    When every fold left the residual untrained (see :func:`residual_untrained_everywhere`),
    any condition-level template with the same reference predictor, the same folds and only
    residual hyperparameters changed (:data:`RESIDUAL_ONLY_KEYS`) leaves it untrained too: its
    out-of-fold predictions equal the reference's, the paired rule drops the residual (a mean
    difference of 0 is not below 0), and the test predictions are the reference's as well. The
    cell-level template (``CELL_LEVEL = True``) is a different model and is always run.
    """
    from cellforge.execution.codegen import is_cell_level, templates

    library = templates()
    if best.failure is not None or not residual_untrained_everywhere(best):
        return None
    if config.get("template") not in library or best_config.get("template") not in library or is_cell_level(config["template"]):
        return None  # hand-written code, or the cell-level model: run it
    changed = sorted(k for k in set(config) | set(best_config) if config.get(k) != best_config.get(k))
    if not changed or set(changed) - RESIDUAL_ONLY_KEYS - {"template"}:
        return None
    per_fold = best.val_metrics.get("residual_fold_train_conditions", "?")
    return (
        f"the residual was untrained in every cross-validation fold (training conditions per fold: {per_fold}), "
        f"and this change ({', '.join(changed)}) shapes only the residual, so its predictions would equal attempt {best.index}'s"
    )


def _guarded(new: Attempt, old: Attempt, settings: RefineSettings) -> bool:
    """True unless the change lowers the guard metric by more than the tolerance (missing values pass)."""
    return _guard_holds(new.val_metrics, old.val_metrics, settings)


def _guard_holds(new: dict[str, Any], old: dict[str, Any], settings: RefineSettings) -> bool:
    """True unless ``new``'s guard metric (higher is better) is below ``old``'s by more than the tolerance (missing values pass)."""
    if settings.guard_metric is None:
        return True
    a, b = new.get(settings.guard_metric), old.get(settings.guard_metric)
    if not isinstance(a, int | float) or not isinstance(b, int | float):
        return True
    return a >= b - settings.tolerance * abs(b)


def _val_predictions(attempts_dir: Path, attempt: Attempt) -> Any:
    """The attempt's validation deltas as the host judged them (``ValPredictions``), or None if it failed or was not judged.

    Read from the host-written :data:`cellforge.execution.judge.JUDGED` beside the attempt's
    outputs, never from a file the script wrote.
    """
    from cellforge.execution.judge import load_judged

    if attempt.failure is not None:
        return None
    try:
        return load_judged(attempts_dir / f"attempt-{attempt.index:03d}")
    except (ValueError, KeyError, OSError):
        return None


def _progress(new: Attempt, old: Attempt, settings: RefineSettings, attempts_dir: Path) -> bool:
    """Does ``new`` replace the best attempt ``old``? (``settings.rule``, then the guard metric)."""
    return _verdict(new, old, settings, attempts_dir)["better"]


def _verdict(new: Attempt, old: Attempt, settings: RefineSettings, attempts_dir: Path) -> dict[str, Any]:
    """Does ``new`` replace ``old``, and on what figures (host-judged; see :func:`cellforge.execution.ensemble.paired_rule`)."""
    from cellforge.execution.ensemble import paired_rule

    a, b = _score(new, settings), _score(old, settings)
    if a is None or b is None:
        return {"better": False, "why": f"no host-judged {settings.metric} for both attempts"}
    if not _guarded(new, old, settings):
        return {"better": False, "why": f"{settings.guard_metric} fell by more than the tolerance"}
    if settings.rule == "one_se" and settings.metric == "val_mse_top20":
        saved_new, saved_old = _val_predictions(attempts_dir, new), _val_predictions(attempts_dir, old)
        if saved_new is not None and saved_old is not None and saved_new.conditions == saved_old.conditions:
            rule = paired_rule(saved_new.pred, saved_old.pred, saved_new.target)
            return {**rule, "why": "paired one-standard-error rule over " + rule["unit"]}
    return {"better": a < b - settings.tolerance * abs(b), "why": f"relative tolerance {settings.tolerance}"}


def verdict_with_folds(
    new: Attempt, old: Attempt, new_script: str, old_script: str, *, settings: RefineSettings, attempts_dir: Path, out_of_fold: Any = None,
) -> dict[str, Any]:
    """:func:`_verdict` on the validation conditions plus the out-of-fold training conditions of both scripts.

    ``out_of_fold(script)`` gives a script's host-judged out-of-fold predictions
    (:class:`~cellforge.execution.ensemble.ValPredictions`), a string when a fold failed, or None
    without folds. The paired rule and the guard metric then run over the rows of both: more
    conditions, the unit is the condition (a guard on one validation condition's top-20 genes
    vetoed scripts on its own, measured). A fold the new script fails loses it the comparison (it
    broke on training data a little smaller than its own); a fold the comparator fails, or no
    folds, leaves the verdict on the validation conditions alone. The validation-only verdict
    stays in ``validation_only``.
    """
    import numpy as np

    from cellforge.execution.ensemble import paired_rule, top_gene_scores

    base = _verdict(new, old, settings, attempts_dir)
    if out_of_fold is None or settings.rule != "one_se" or settings.metric != "val_mse_top20":
        return base
    saved_new, saved_old = _val_predictions(attempts_dir, new), _val_predictions(attempts_dir, old)
    if saved_new is None or saved_old is None or saved_new.conditions != saved_old.conditions:
        return base
    old_folds = out_of_fold(old_script)
    if old_folds is None or isinstance(old_folds, str):
        return {**base, "folds": f"validation only: {old_folds or 'no folds'} (the comparator)"}
    new_folds = out_of_fold(new_script)
    only = {k: base[k] for k in ("better", "mean_diff", "se", "n", "unit", "why") if k in base}
    if new_folds is None or isinstance(new_folds, str):
        return {"better": False, "why": f"the script's {new_folds or 'folds did not run'}", "validation_only": only}
    if new_folds.conditions != old_folds.conditions:
        return {**base, "folds": "validation only: the two scripts' folds differ"}
    pred_new, pred_old = np.vstack([saved_new.pred, new_folds.pred]), np.vstack([saved_old.pred, old_folds.pred])
    target = np.vstack([saved_new.target, new_folds.target])
    rule = paired_rule(pred_new, pred_old, target)
    where = f"{len(saved_new.conditions)} validation and {len(new_folds.conditions)} out-of-fold training conditions"
    verdict = {**rule, "why": f"paired one-standard-error rule over {rule['unit']} values: {where}", "validation_only": only}
    verdict["conditions"] = {"validation": len(saved_new.conditions), "out_of_fold": len(new_folds.conditions)}
    scores_new, scores_old = top_gene_scores(pred_new, target), top_gene_scores(pred_old, target)
    guard = settings.guard_metric
    if guard in scores_new:
        verdict[guard] = {"new": scores_new[guard], "old": scores_old[guard]}
    if not _guard_holds(scores_new, scores_old, settings):
        verdict.update(better=False, why=f"{guard} fell by more than the tolerance over {where} ({scores_new[guard]:.4f} against {scores_old[guard]:.4f})")
    return verdict


def verdict_text(verdict: dict[str, Any], new: Attempt, old: Attempt, settings: RefineSettings) -> str:
    """The host's verdict on ``new`` against ``old`` in words, with its figures (what a model is told of its judged code)."""
    a, b = _score(new, settings), _score(old, settings)
    text = f"host validation {settings.metric} {a:.4f} against {b:.4f} for the reference alone" if a is not None and b is not None else ""
    if "mean_diff" in verdict:
        text += f" (mean paired difference {verdict['mean_diff']:+.4f} ± {verdict.get('se', 0.0):.4f} over {verdict.get("n")} paired {verdict.get("unit")} values)"
    return f"{text}; {verdict.get('why', '')}".strip("; ")


def refine_until_settled(
    journal: Journal,
    script: str,
    *,
    sandbox: Any,
    attempts_dir: Path,
    journal_path: Path,
    check_outputs: Any,
    refiner: Any,
    settings: RefineSettings,
    timeout_s: float = 900,
    memory_mb: int | None = 8192,
    on_start: Any = None,
    reference_script: str | None = None,
    library_script: str | None = None,
    defaults: dict[str, Any] | None = None,
    revise: Any = None,
    max_revisions: int = MAX_REVISIONS,
    debugger: Any = None,
    out_of_fold: Any = None,
) -> tuple[Journal, str]:
    """Refinement rounds after a clean run, until the host-judged validation metric settles.

    When the clean script is not the library's (a model wrote or patched it), it faces the rule
    a template applies to its learned residual: ``reference_script`` (the plan's reference
    predictor alone) runs (stage ``reference``), and the script stays the incumbent only if it
    beats the reference by the paired rule on the host's numbers for the same validation
    conditions. When it does not, ``revise(request) -> script`` (the model that wrote it; None:
    no revision) is told the verdict with its figures and the code it judged, and its new draft
    (stage ``revise``, at most ``max_revisions`` asks; one that fails goes to ``debugger`` for at
    most :data:`REVISION_FIXES` fixes, as in :func:`run_attempts`; code already judged is not run
    again) faces
    the same reference. Then ``library_script`` (the plan's library model) runs as a candidate (stage
    ``library``) and replaces the incumbent only by the same rule: library and model on equal
    terms. ``journal.comparisons`` keeps each verdict with its figures. With ``out_of_fold(script)``
    (:meth:`cellforge.execution.folds.OutOfFold.judged`) the script and the reference are judged on
    more conditions: the rule pairs the validation conditions and the training conditions'
    out-of-fold predictions of both (:func:`verdict_with_folds`).

    Each round asks ``refiner(config, history, settings) -> {"diagnosis", "config_updates",
    "stop"}`` (or a ``diff``/``script`` of the best script) and runs the change (stage
    ``refine``). A ``template`` update is model selection: the script is rendered from that
    template of the library with ``defaults`` (the plan's) plus the proposal's changes, whatever
    the incumbent is. A round counts as progress when it beats the best attempt beyond the noise
    of the validation conditions (``settings.rule``, :func:`cellforge.execution.ensemble.paired_rule`),
    keeping ``guard_metric`` within the tolerance. Refinement stops after ``patience`` rounds in a
    row without progress, when the refiner proposes nothing new or fails, after ``max_rounds``
    tuning rounds, or after ``max_rounds + max_selections`` proposals in all (a refiner that keeps
    proposing model selection stops there). The best attempt is kept: its outputs are restored
    into the sandbox; then, when averaging clean attempts beats it on the host's validation
    numbers, the average's predictions replace its own (``journal.ensemble``).

    Returns
    -------
    The journal (``best_attempt`` and ``refine_stop_reason`` set) and the best script.

    Raises
    ------
    SandboxError
        Infrastructure failure.
    """
    from cellforge.errors import LLMError

    executor = Executor(
        sandbox=sandbox, attempts_dir=attempts_dir, journal_path=journal_path, check_outputs=check_outputs,
        timeout_s=timeout_s, memory_mb=memory_mb, on_start=on_start, journal=journal,
    )
    defaults = dict(defaults or {})
    best = journal.attempts[-1]
    best_script = script
    if reference_script is not None and reference_script != script:
        # the model's own script against the plan's reference predictor: the rule a template applies to its residual
        model_attempt = best
        ref = executor.run(reference_script, stage="reference", parent=None, patch={"diagnosis": "the plan's reference predictor alone, the script's comparator"})
        if ref.failure is None:
            verdict = verdict_with_folds(model_attempt, ref, script, reference_script, settings=settings, attempts_dir=attempts_dir, out_of_fold=out_of_fold)
        else:
            verdict = {"better": True, "why": f"the reference failed ({ref.failure.value})"}
        journal.comparisons.append({"challenger": model_attempt.index, "incumbent": ref.index, "kind": "script vs the plan's reference", **verdict})
        journal.save(journal_path)
        judged, drafts = script, {sha(script)}
        for turn in range(max_revisions if revise is not None and ref.failure is None else 0):
            if verdict["better"]:
                break
            try:
                revised = revise({"script": judged, "verdict": verdict_text(verdict, model_attempt, ref, settings), "turn": turn})
            except (LLMError, ValueError) as exc:
                journal.skipped.append({"config_updates": {}, "reason": f"no revision: the model failed: {str(exc)[:300]}"})
                break
            if sha(revised) in drafts:  # not run again; the next turn is sampled (a 1.5B coder copied its code back at temperature 0)
                journal.skipped.append({"config_updates": {}, "reason": f"revision {turn + 1}: the model sent back code already judged; not run"})
                continue
            drafts.add(sha(revised))
            why = f"a new draft after the host's verdict on attempt {model_attempt.index}"
            succeeded, stop_reason = journal.succeeded, journal.stop_reason
            journal, revised = run_attempts(
                revised, sandbox=sandbox, attempts_dir=attempts_dir, journal_path=journal_path, check_outputs=check_outputs,
                debugger=debugger, max_attempts=len(journal.attempts) + 1 + REVISION_FIXES, timeout_s=timeout_s, memory_mb=memory_mb,
                on_start=on_start, journal=journal, first_stage="revise", first_patch={"diagnosis": why},
            )  # fmt: skip
            journal.succeeded, journal.stop_reason = succeeded, stop_reason
            drafts.add(sha(revised))
            attempt = journal.attempts[-1]
            if attempt.failure is not None:
                continue
            model_attempt, judged, script = attempt, revised, revised
            verdict = verdict_with_folds(attempt, ref, revised, reference_script, settings=settings, attempts_dir=attempts_dir, out_of_fold=out_of_fold)
            journal.comparisons.append({"challenger": attempt.index, "incumbent": ref.index, "kind": "revised script vs the plan's reference", **verdict})
        if verdict["better"]:
            best, best_script = model_attempt, script
        else:
            best, best_script = ref, reference_script
    if library_script is not None and library_script not in (script, best_script):
        # the plan's library model, on the same host-named conditions: it replaces the incumbent only by the same rule
        lib = executor.run(library_script, stage="library", parent=None, patch={"diagnosis": "the plan's library model, a candidate against the incumbent"})
        verdict = _verdict(lib, best, settings, attempts_dir) if lib.failure is None else {"better": False, "why": f"the library model failed ({lib.failure.value})"}
        journal.comparisons.append({"challenger": lib.index, "incumbent": best.index, "kind": "the plan's library model vs the incumbent", **verdict})
        if verdict["better"]:
            best, best_script = lib, library_script
    if _score(best, settings) is None:
        executor.restore(best.index)
        journal.best_attempt = best.index
        journal.refine_stop_reason = f"no refinement: the host has no {settings.metric!r} (no validation conditions)"
        journal.save(journal_path)
        return journal, best_script
    tried = [get_config(a_script) for a_script in {script, best_script}]
    tried_code = {sha(script), sha(best_script)}
    stale = rounds = proposals = 0
    cap = settings.max_rounds + settings.max_selections
    skipped_history: list[dict[str, Any]] = []
    reason = f"refinement budget of {settings.max_rounds} rounds used"
    while rounds < settings.max_rounds:
        if proposals >= cap:
            reason = f"hard cap of {cap} refinement proposals reached ({settings.max_rounds} rounds + {settings.max_selections} model selections)"
            break
        proposals += 1
        history = [
            {"attempt": a.index, "stage": a.stage, "config": get_config((attempts_dir / f"attempt-{a.index:03d}" / "train.py").read_text()),
             "val_metrics": _bounded_metrics(a.val_metrics), "failure": a.failure.value if a.failure else None}
            for a in journal.attempts[-settings.history_entries:]
        ] + skipped_history[-settings.history_entries:]  # a proposal not run counts as tried, with its known outcome
        try:
            proposal = refiner(get_config(best_script), history, settings, best_script)
        except LLMError as exc:
            reason = f"the refiner's model failed: {exc}"
            break
        updates = proposal.get("config_updates") or {}
        if not proposal.get("stop") and (proposal.get("diff") or proposal.get("script")):
            # a change of the model's code, judged by the same rule as any other change
            try:
                candidate = apply_patch(best_script, {"diff": proposal.get("diff", ""), "script": proposal.get("script", "")})
            except (ValueError, ConfigError) as exc:
                reason = f"the refiner's code change could not be applied: {exc}"
                break
            if candidate == best_script or sha(candidate) in tried_code:
                reason = f"the refiner proposed no new change: {proposal.get('diagnosis', '')}"
                break
            tried_code.add(sha(candidate))
            attempt = executor.run(candidate, stage="refine", parent=best.index, patch={"diagnosis": proposal.get("diagnosis", ""), "code_change": True})
            progress = _progress(attempt, best, settings, attempts_dir)
            if progress:
                best, best_script = attempt, candidate
            rounds += 1
            stale = 0 if progress else stale + 1
            if stale >= settings.patience:
                reason = f"{settings.metric} settled: no improvement above {settings.tolerance:.1%} in {stale} rounds"
                break
            continue
        best_config = get_config(best_script)
        switch = updates.get("template") not in (None, best_config.get("template"))
        # a library candidate (a "template" update) renders from the plan's defaults plus its own changes
        # when it switches models or the incumbent is not the library's; otherwise the incumbent's CONFIG changes
        from_library = "template" in updates and updates["template"] in _library()
        fresh = from_library and bool(defaults) and (switch or not is_library_script(best_script))
        config = {**(defaults if fresh else best_config), **updates}
        if proposal.get("stop") or not updates or config in tried:
            reason = f"the refiner proposed no new change: {proposal.get('diagnosis', '')}"
            break
        tried.append(config)
        # Model selection (another template or reference predictor of the plan's candidates) is
        # not a tuning round: it counts towards neither the round budget nor the patience, only
        # towards the hard cap. An update that repeats the current model is tuning.
        selection = any(updates[k] != best_config.get(k) for k in MODEL_KEYS & updates.keys())
        why_not = cannot_change_predictions(best, best_config, config)
        if why_not is not None:  # an early exit: the attempt's outcome is known without running it
            journal.skipped.append({"config_updates": updates, "reason": f"not run: {why_not}"})
            skipped_history.append({"attempt": None, "stage": "skipped", "config": config, "val_metrics": _bounded_metrics(best.val_metrics), "failure": None})
            journal.save(journal_path)
            if selection:
                continue
            rounds += 1
            stale += 1
            if stale >= settings.patience:
                reason = f"tuning cannot change the predictions: {why_not}"
                break
            continue
        if from_library and (switch or fresh):
            candidate = render(config["template"], {k: v for k, v in config.items() if k != "template"})
        else:
            try:
                candidate = set_config(best_script, config)
            except ConfigError as exc:
                reason = f"the refiner's CONFIG update cannot apply to the best script: {exc}"
                break
        attempt = executor.run(candidate, stage="refine", parent=best.index, patch={"diagnosis": proposal.get("diagnosis", ""), "config_updates": updates})
        progress = _progress(attempt, best, settings, attempts_dir)
        if progress:  # a change replaces the best only when it beats it beyond the noise (settings.rule)
            best, best_script = attempt, candidate
        if selection:
            continue
        rounds += 1
        stale = 0 if progress else stale + 1
        if stale >= settings.patience:
            reason = f"{settings.metric} settled: no improvement above {settings.tolerance:.1%} in {stale} rounds"
            break
    executor.restore(best.index)
    journal.best_attempt, journal.refine_stop_reason = best.index, reason
    try:
        journal.ensemble = _ensemble(journal, best, attempts_dir, settings, sandbox.work_dir / "outputs", check_outputs)
    except PredictionError:
        executor.restore(best.index)  # an average that breaks the contract is dropped; the best attempt stays
        journal.ensemble = None
    journal.save(journal_path)
    return journal, best_script


def fall_back_to_library(
    journal: Journal,
    library_script: str,
    *,
    sandbox: Any,
    attempts_dir: Path,
    journal_path: Path,
    check_outputs: Any,
    timeout_s: float = 900,
    memory_mb: int | None = 8192,
    on_start: Any = None,
) -> bool:
    """When a model's own code never ran clean: run the plan's library model, so the run still ends with a scored model.

    The attempt is stage ``library`` (the lineage says the library's model was scored, and
    ``journal.stop_reason`` keeps why the model's code failed). Returns whether it ran clean.

    Raises
    ------
    SandboxError
        Infrastructure failure.
    """
    executor = Executor(
        sandbox=sandbox, attempts_dir=attempts_dir, journal_path=journal_path, check_outputs=check_outputs,
        timeout_s=timeout_s, memory_mb=memory_mb, on_start=on_start, journal=journal,
    )
    why = journal.stop_reason
    attempt = executor.run(library_script, stage="library", parent=None, patch={"diagnosis": f"the model's code never ran clean ({why}): the plan's library model"})
    if attempt.failure is None:
        journal.succeeded = True
        journal.stop_reason = f"the model's code never ran clean ({why}); the plan's library model ran instead (attempt {attempt.index})"
    journal.save(journal_path)
    return attempt.failure is None


def refit_selected(
    journal: Journal,
    *,
    sandbox: Any,
    attempts_dir: Path,
    journal_path: Path,
    check_outputs: Any,
    timeout_s: float = 900,
    memory_mb: int | None = 8192,
    on_start: Any = None,
) -> Path | None:
    """Train the selected model again on the training and validation cells; the path of its test predictions, or None.

    Selection is over once the host has judged every attempt on the validation cells, so the
    kept attempt's script (each averaged attempt's, with the same weights) runs once more in
    ``sandbox``, whose inputs hold the training and validation cells and whose ``task.json``
    names only the test conditions: the scored model then learns from every condition the split
    lets it see, as the templates' own test predictions did before the host kept the validation
    cells. A refit that fails leaves the selection run's predictions in place (``journal.refit``
    says why). Nothing here is chosen on the refit's numbers.

    Raises
    ------
    SandboxError
        Infrastructure failure.
    """
    from cellforge.execution.ensemble import average_predictions
    from cellforge.safeio import write_h5ad

    if journal.best_attempt is None:
        return None
    weights = journal.ensemble.weights if journal.ensemble is not None else {journal.best_attempt: 1.0}
    executor = Executor(
        sandbox=sandbox, attempts_dir=attempts_dir, journal_path=journal_path, check_outputs=check_outputs,
        timeout_s=timeout_s, memory_mb=memory_mb, on_start=on_start, journal=journal,
    )
    paths: dict[int, Path] = {}
    for i in weights:
        script = (attempts_dir / f"attempt-{i:03d}" / "train.py").read_text()
        attempt = executor.run(script, stage="refit", parent=i, patch={"diagnosis": "the selected model trained again on training + validation cells"})
        if attempt.failure is not None:
            journal.refit = {"used": False, "attempts": [a.index for a in journal.attempts if a.stage == "refit"], "why": f"attempt {attempt.index} failed ({attempt.failure.value}): the selection run's predictions stay"}
            journal.save(journal_path)
            return None
        paths[i] = attempts_dir / f"attempt-{attempt.index:03d}" / "outputs" / "predictions.h5ad"
    out = attempts_dir / "refit_predictions.h5ad"  # a host folder: the sandbox may have left a link under any name in its own
    if len(paths) == 1:
        out.write_bytes(next(iter(paths.values())).read_bytes())
    else:
        write_h5ad(average_predictions(paths, weights), out)
    journal.refit = {"used": True, "attempts": [a.index for a in journal.attempts if a.stage == "refit"], "why": "trained again on training + validation cells after selection"}
    journal.save(journal_path)
    return out


def lineage(journal: Journal, *, draft: str, template: str = "", reference: str = "") -> dict[str, Any]:
    """What wrote the scored predictions, from the kept attempt's chain of parents (or each averaged attempt's).

    Parameters
    ----------
    draft
        Who wrote the first script: ``coder`` (a script of its own), ``coder function`` (the
        worked example around the coder's model function) or ``template``.
    template
        The plan's template (of a ``template`` draft, a ``library`` attempt).
    reference
        The plan's reference predictor (of a ``reference`` attempt).

    Returns
    -------
    dict
        ``written_by`` (e.g. "coder script, patched by the debugger"), ``attempts`` (the chain,
        first to kept), ``model_written`` (True when a model's own code, or a debugger's or
        refiner's patch of it, made the scored predictions) and ``steps``.
    """
    by_index = {a.index: a for a in journal.attempts}

    def chain(index: int) -> list[Attempt]:
        out, seen = [], set()
        node = by_index.get(index)
        while node is not None and node.index not in seen:
            out.append(node)
            seen.add(node.index)
            node = by_index.get(node.parent) if node.parent is not None else None
        return out[::-1]

    def words(index: int) -> tuple[str, list[int], bool, list[str]]:
        steps: list[str] = []
        own = False
        for a in chain(index):
            patch = a.patch or {}
            updates = patch.get("config_updates") or {}
            if a.stage in ("draft", "redraft", "revise"):
                own = draft in ("coder", "coder function")
                if draft == "coder function":  # the worked example with the coder's predict_deltas, on the plan's reference
                    steps = [f"coder function (a correction of the plan's reference predictor {reference or '?'})"]
                else:
                    steps = ["coder script" if own else f"library template {template or '?'}"]
                if a.stage == "redraft":
                    steps = [f"{steps[0]}, drawn again after the debugger stalled"]
                elif a.stage == "revise":
                    steps = [f"{steps[0]}, revised after the host judged its first clean code no better than the reference"]
            elif a.stage == "library":
                role = "the model's code never ran clean" if "never ran clean" in str(patch.get("diagnosis", "")) else "run as a candidate against the script"
                own, steps = False, [f"library template {template or '?'} (the plan's model, {role})"]
            elif a.stage == "reference":
                own, steps = False, [f"the plan's reference predictor {reference or '?'} alone (the script did not beat it)"]
            elif a.stage == "debug":
                steps.append("patched by the debugger")
                own = True
            elif a.stage == "resize":
                steps.append(f"resized by the host ({', '.join(sorted(updates))})")
            elif patch.get("code_change"):
                steps.append("code changed by the refiner")
                own = True
            elif "template" in updates:
                own, steps = False, [f"library template {updates['template']} (the refiner's model selection)"]
            else:
                steps.append(f"CONFIG tuned by the refiner ({', '.join(sorted(updates))})")
        return ", ".join(steps), [a.index for a in chain(index)], own, steps

    if journal.best_attempt is None:
        return {}
    refit = "; trained again on training + validation cells" if journal.refit.get("used") else ""
    if journal.ensemble is not None:
        parts = {i: words(i) for i in journal.ensemble.weights}
        text = "average of " + "; ".join(f"attempt {i} ({w[0]})" for i, w in parts.items()) + refit
        return {"written_by": text, "attempts": sorted(parts), "model_written": any(w[2] for w in parts.values()), "steps": []}
    text, indices, own, steps = words(journal.best_attempt)
    return {"written_by": text + refit, "attempts": indices, "model_written": own, "steps": steps}


def _library() -> list[str]:
    from cellforge.execution.codegen import templates

    return templates()


def _bounded_metrics(metrics: dict[str, Any], *, max_entries: int = 12) -> dict[str, Any]:
    """The host's validation numbers for a prompt: numbers only, at most ``max_entries``."""
    return {k: v for k, v in list(metrics.items())[:max_entries] if isinstance(v, int | float | type(None))}


def _ensemble(
    journal: Journal, best: Attempt, attempts_dir: Path, settings: RefineSettings, outputs: Path, check_outputs: Any
) -> EnsembleRecord | None:
    """Average attempts when that beats the best attempt on validation; write the average into ``outputs``.

    Only attempts with held-out validation predictions on the best attempt's conditions take
    part. The average replaces the kept predictions when its validation MSE (top-20 genes) beats
    the best attempt's by ``settings.rule`` (one standard error, or the tolerance); the guard
    metric may not fall by more than the tolerance (see :func:`cellforge.execution.ensemble.select_ensemble`).
    """
    from cellforge.execution.ensemble import average_predictions, paired_rule, select_ensemble

    if settings.ensemble_steps == 0 or settings.metric != "val_mse_top20":
        return None
    members = {a.index: saved for a in journal.attempts if (saved := _val_predictions(attempts_dir, a)) is not None}
    if best.index not in members or len(members) < 2:  # noqa: PLR2004
        return None
    choice = select_ensemble(members, best.index, max_steps=settings.ensemble_steps, tolerance=settings.tolerance)
    old, new = choice.single["val_mse_top20"], choice.scores["val_mse_top20"]
    target = members[best.index].target
    if settings.rule == "one_se":
        better = bool(paired_rule(choice.pred, members[best.index].pred, target)["better"])
    else:
        better = new < old - settings.tolerance * abs(old)
    if len(choice.weights) < 2 or not better:  # noqa: PLR2004
        return None
    paths = {i: attempts_dir / f"attempt-{i:03d}" / "outputs" / "predictions.h5ad" for i in choice.weights}
    from cellforge.safeio import write_h5ad

    write_h5ad(average_predictions(paths, choice.weights), outputs / "predictions.h5ad")
    record = EnsembleRecord(weights=choice.weights, val_metrics=choice.scores, best_single_val_metrics=choice.single)
    (outputs / "ensemble.json").write_text(record.model_dump_json(indent=2))
    check_outputs(outputs)
    return record
