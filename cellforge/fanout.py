"""Fan-out of independent runs (benchmark folds, data sets): Ray tasks where Ray is installed, else one after another.

``CELLFORGE_FANOUT`` picks the backend: ``ray`` (a local Ray instance started for the call, or
the cluster at ``RAY_ADDRESS``), ``sequential`` (in this process, in order, as before Ray), or
unset / ``auto``: Ray when the optional extra is installed (``uv sync --extra ray``), else
sequential. Each run is a call of a module-level function on one item; results come back in
the items' order whatever the order they finish in, so a fanned-out benchmark writes the same
numbers as a sequential one (each run has its own seed; nothing is shared between runs).
``on_result`` is called in the order runs finish, for progress lines and partial reports.

A single run goes to Ray only when ``RAY_ADDRESS`` names a cluster (a local Ray would only add
its start-up); a local Ray started by :func:`fan_out` is shut down when the call returns. Fan-outs
nest: a run that fans out again (a benchmark's debate pilots inside a fanned-out benchmark) runs
its own items one after another, since the outer fan-out already fills the cores.

Ray tasks declare their resources (:class:`Resources`: CPUs, memory, GPUs); Ray starts no more
runs at once than the cluster holds. On a cluster every node needs the same checkout and
virtual environment at the same path (``ray start`` from it); the ``CELLFORGE_*`` environment
variables of this process are passed to the runs (other variables, API keys included, are not:
set them on the nodes).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from cellforge.errors import ConfigError

T = TypeVar("T")
R = TypeVar("R")

BACKENDS = ("auto", "ray", "sequential")


@dataclass(frozen=True)
class Resources:
    """What one run asks of a Ray node (logical resources: Ray's scheduling, not enforced limits).

    Attributes
    ----------
    cpus
        CPU cores (the main job's sandbox runs ``threads`` = 2 threads, mostly one busy).
    memory_mb
        Memory, MiB (the main job on a shipped subset peaks under 2 GiB).
    gpus
        GPUs (0: the run is scheduled on any node).
    """

    cpus: float = 1.0
    memory_mb: int = 4096
    gpus: float = 0.0

    def ray_options(self) -> dict[str, Any]:
        """The ``ray.remote`` options of these resources."""
        return {"num_cpus": self.cpus, "memory": int(self.memory_mb) * 1024**2, "num_gpus": self.gpus}


def backend() -> str:
    """The backend ``CELLFORGE_FANOUT`` asks for, resolved: ``ray`` or ``sequential``.

    Raises
    ------
    ConfigError
        An unknown value, or ``ray`` without Ray installed.
    """
    value = os.environ.get("CELLFORGE_FANOUT", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        msg = f"CELLFORGE_FANOUT={value!r}; valid: {', '.join(BACKENDS)}"
        raise ConfigError(msg)
    has_ray = importlib.util.find_spec("ray") is not None
    if value == "ray" and not has_ray:
        msg = "CELLFORGE_FANOUT=ray but Ray is not installed; install the optional extra: uv sync --extra ray (or make install-ray)"
        raise ConfigError(msg)
    if value == "auto":
        return "ray" if has_ray else "sequential"
    return value


def describe() -> str:
    """One line for logs and reports: where the runs go."""
    chosen = backend()
    if chosen == "sequential":
        return "sequential (one run after another in this process)"
    address = os.environ.get("RAY_ADDRESS", "").strip()
    return f"Ray cluster at {address}" if address else f"local Ray ({os.cpu_count()} CPUs)"


def die_with_parent() -> None:
    """``preexec_fn`` of a run's child process: SIGTERM to it when its parent dies, even by SIGKILL (Linux).

    A Ray task cancelled with ``force=True`` (Ctrl-C in the driver) is a killed worker process;
    the ``cellforge benchmark`` it started then stops its sandbox instead of running on.
    """
    import contextlib
    import ctypes
    import signal

    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _start_ray() -> Any:
    import ray

    if not ray.is_initialized():
        env = {k: v for k, v in os.environ.items() if k.startswith("CELLFORGE_")}
        env["CELLFORGE_FANOUT"] = "sequential"  # runs inside a run: the outer fan-out already fills the cores
        ray.init(
            address=os.environ.get("RAY_ADDRESS", "").strip() or None,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": env} if env else None,
        )
    return ray


def fan_out(
    fn: Callable[[T], R],
    items: Sequence[T],
    *,
    resources: Resources | None = None,
    on_result: Callable[[int, R], None] | None = None,
) -> list[R]:
    """``[fn(item) for item in items]``, run as Ray tasks or one after another (:func:`backend`).

    Parameters
    ----------
    fn
        A module-level function (Ray ships it to the worker processes); it must not rely on
        state of this process other than its argument and the environment.
    items
        One argument per run (picklable).
    resources
        What each run declares to Ray (default :class:`Resources`).
    on_result
        Called with (item index, result) as each run finishes, in finishing order.

    Returns
    -------
    The results, in the order of ``items``.

    Raises
    ------
    Exception
        The first failing run's exception (Ray re-raises it as a ``RayTaskError`` subclass of the
        same type); runs not yet finished are cancelled.
    """
    resources = resources or Resources()
    cluster = bool(os.environ.get("RAY_ADDRESS", "").strip())
    if backend() == "sequential" or not items or (len(items) == 1 and not cluster):
        results = []
        for i, item in enumerate(items):
            results.append(fn(item))
            if on_result is not None:
                on_result(i, results[-1])
        return results
    import ray as _ray

    started_here = not _ray.is_initialized() and not cluster
    ray = _start_ray()
    module = sys.modules.get(fn.__module__)
    if module is not None and fn.__module__ != "__main__" and not fn.__module__.startswith(("cellforge.", "runtime.")):
        # a benchmark script or test module the workers cannot import by name: ship its code with the function
        ray.cloudpickle.register_pickle_by_value(module)
    remote = ray.remote(**resources.ray_options())(fn)
    refs = [remote.remote(item) for item in items]
    index = {ref: i for i, ref in enumerate(refs)}
    out: dict[int, R] = {}
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            i = index[done[0]]
            out[i] = ray.get(done[0])
            if on_result is not None:
                on_result(i, out[i])
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        if started_here:
            ray.shutdown()
    return [out[i] for i in range(len(items))]
