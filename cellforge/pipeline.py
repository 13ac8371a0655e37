"""The main job as a chain of stages that talk only through files in ``runs/<id>/``.

Stages: data -> profile -> design -> codegen -> execute -> evaluate -> report. Each writes
its artifacts, then ``stages/<name>.json`` (its wall time); a resumed run skips every stage
whose marker exists and redoes only the one that was interrupted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from cellforge.errors import ConfigError, DatasetError, StageError
from cellforge.run import STAGES, Run, RunConfig, environment

__all__ = ["STAGES", "Run", "RunConfig", "environment", "run_pipeline"]


def run_pipeline(run: Run, *, echo: Callable[[str], None] = print, until: str | None = None) -> Path:
    """Run every unfinished stage in order; return the run directory.

    Parameters
    ----------
    run
        The run directory and its configuration.
    echo
        Where progress lines go.
    until
        Stop after this stage (one of :data:`STAGES`), e.g. ``"codegen"`` to read the plan and the
        code before any training; ``--resume`` goes on from there.

    Raises
    ------
    ConfigError
        ``until`` is not a stage name.
    StageError
        A stage failed; earlier stages' artifacts stay, and ``--resume`` retries from it.
    """
    from cellforge import stages
    from cellforge.llm.client import SESSION

    if until is not None and until not in STAGES:
        msg = f"--until {until!r}; valid: {', '.join(STAGES)}"
        raise ConfigError(msg)
    last = STAGES.index(until) if until is not None else len(STAGES) - 1
    for name in STAGES[: last + 1]:
        if run.done(name):
            echo(f"[skip] {name} (finished earlier)")
            continue
        echo(f"[stage] {name}")
        start = time.monotonic()
        try:
            getattr(stages, f"stage_{name}")(run, echo=echo)
            # the session that finished the stage: its LLM calls are the ones counted (see usage_summary)
            marker = {
                "stage": name, "wall_s": round(time.monotonic() - start, 3), "finished": datetime.now(UTC).isoformat(), "session": SESSION,
                **peak_memory(),
            }
            run.write_json(f"stages/{name}.json", marker)
        except StageError:
            raise
        except (ConfigError, DatasetError) as exc:
            if name != STAGES[0]:
                raise StageError(failure_message(name, exc, run.dir)) from exc
            # The inputs do not fit together (task, split, data): resuming cannot help, and a
            # directory holding only run.json is not worth keeping.
            _discard_if_empty(run)
            raise type(exc)(f"{exc} (nothing was run; no run directory kept)") from exc
        except Exception as exc:
            raise StageError(failure_message(name, exc, run.dir)) from exc
    if until is not None and last < len(STAGES) - 1:
        echo(f"stopped after {until} (--until); go on with `cellforge benchmark --resume {run.dir}`")
    return run.dir


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process so far, MiB (``peak_rss_mib``).

    Linux ``VmHWM`` (the address space's high-water mark): unlike ``ru_maxrss`` it does not count
    the process this one was started from (``ru_maxrss`` survives ``exec``, so a run started from
    a large notebook or generator process would report that process's size). It only grows: a
    stage's own peak is its value where it exceeds the earlier stages'. The training scripts'
    peaks are the attempts' ``peak_rss_mib`` (measured by the sandbox).
    """
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return {"peak_rss_mib": round(int(line.split()[1]) / 1024, 1)}
    except (OSError, ValueError):
        pass
    return {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def _discard_if_empty(run: Run) -> None:
    """Remove a run directory that holds nothing but its ``run.json`` (and empty folders)."""
    import shutil

    if not [p for p in run.dir.rglob("*") if p.is_file() and p.name != "run.json"]:
        shutil.rmtree(run.dir, ignore_errors=True)


def failure_message(stage: str, exc: BaseException, run_dir: Path) -> str:
    """What a failed stage says: the error (a full disk named as such, with the path), and how to resume."""
    from cellforge.errors import DiskFullError
    from cellforge.safeio import is_disk_full

    resume = f"Artifacts so far are in {run_dir}; resume with `cellforge benchmark --resume {run_dir}`"
    if isinstance(exc, DiskFullError):
        return f"stage {stage!r} failed: {exc}. {resume}"
    if is_disk_full(exc):
        where = getattr(exc, "filename", None) or f"a file under {run_dir}"
        return f"stage {stage!r} failed: disk full: could not write {where} ({_first_line(exc)}); free some space. {resume}"
    return f"stage {stage!r} failed: {exc}. {resume}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
