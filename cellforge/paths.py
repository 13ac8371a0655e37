"""Locations that cellforge reads from and writes to, resolved from the environment."""

from __future__ import annotations

import os
from pathlib import Path

#: Root of the source tree (holds ``benchmarks/`` and ``agent_specs/``).
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """Folder for downloaded data sets (``CELLFORGE_CACHE``, default ``~/.cache/cellforge``)."""
    return Path(os.environ.get("CELLFORGE_CACHE", Path.home() / ".cache" / "cellforge")).expanduser()


#: Offline mirror folders looked in when ``CELLFORGE_DATA_MIRROR`` is not set (those that exist):
#: ``data/`` inside the checkout, then ``shared/data`` beside it (the layout of the shipped mirror).
DEFAULT_MIRRORS = (PROJECT_ROOT / "data", PROJECT_ROOT.parent / "shared" / "data")


def mirror_dirs() -> list[Path]:
    """Offline mirror folders: ``CELLFORGE_DATA_MIRROR`` (``os.pathsep``-separated) when set,
    else those of :data:`DEFAULT_MIRRORS` that exist."""
    raw = os.environ.get("CELLFORGE_DATA_MIRROR")
    if raw is not None:
        return [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]
    return [p for p in DEFAULT_MIRRORS if p.is_dir()]


def mirror_source() -> str:
    """Where :func:`mirror_dirs` came from, for ``cellforge doctor`` and error messages."""
    if os.environ.get("CELLFORGE_DATA_MIRROR") is not None:
        return "CELLFORGE_DATA_MIRROR"
    return f"default ({' or '.join(str(p) for p in DEFAULT_MIRRORS)}, where they exist)"


def runs_dir() -> Path:
    """Parent folder of run directories (``CELLFORGE_RUNS``, default ``./runs``)."""
    return Path(os.environ.get("CELLFORGE_RUNS", "runs"))


def agent_specs_dir() -> Path:
    """Folder of agent role files (``CELLFORGE_AGENT_SPECS``, default ``agent_specs/``)."""
    return Path(os.environ.get("CELLFORGE_AGENT_SPECS", PROJECT_ROOT / "agent_specs"))


def dataset_cards_dir() -> Path:
    """Folder of dataset cards (``benchmarks/datasets``)."""
    return PROJECT_ROOT / "benchmarks" / "datasets"


def host_threads() -> int:
    """Worker threads for host-side work such as DE tests: ``CELLFORGE_THREADS``, else up to 8 cores."""
    value = os.environ.get("CELLFORGE_THREADS")
    if value:
        return max(1, int(value))
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)))


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere), for benchmark records.

    Timings from two machines are not a before and after: every benchmark that reports seconds
    records this beside the CPU count.
    """
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
