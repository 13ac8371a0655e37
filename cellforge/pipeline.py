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

from cellforge.errors import StageError
from cellforge.run import STAGES, Run, RunConfig, environment

__all__ = ["STAGES", "Run", "RunConfig", "environment", "run_pipeline"]


def run_pipeline(run: Run, *, echo: Callable[[str], None] = print) -> Path:
    """Run every unfinished stage in order; return the run directory.

    Raises
    ------
    StageError
        A stage failed; earlier stages' artifacts stay, and ``--resume`` retries from it.
    """
    from cellforge import stages

    for name in STAGES:
        if run.done(name):
            echo(f"[skip] {name} (finished earlier)")
            continue
        echo(f"[stage] {name}")
        start = time.monotonic()
        try:
            getattr(stages, f"stage_{name}")(run, echo=echo)
        except StageError:
            raise
        except Exception as exc:
            msg = f"stage {name!r} failed: {exc}. Artifacts so far are in {run.dir}; resume with `cellforge benchmark --resume {run.dir}`"
            raise StageError(msg) from exc
        run.write_json(f"stages/{name}.json", {"stage": name, "wall_s": round(time.monotonic() - start, 3), "finished": datetime.now(UTC).isoformat()})
    return run.dir
