"""GPUs in sandboxes: the host's NVIDIA devices, and whether a sandbox gets them.

``CELLFORGE_SANDBOX_GPU``: ``auto`` (default: a sandbox gets the GPUs when the host has
``/dev/nvidia<N>`` devices), ``on`` (required: an error without them) or ``off`` (never; the
command sees no GPU: ``CUDA_VISIBLE_DEVICES=""``).

With a GPU, the local sandbox binds the device nodes into its private ``/dev`` (the driver's
libraries are under ``/usr``, already bound read-only) and passes the host's
``CUDA_VISIBLE_DEVICES`` when set (unset: every GPU); memory is bounded by the resident size of
the sandbox's processes, polled, instead of an address-space limit (``RLIMIT_AS``), which
breaks CUDA: the driver reserves tens of GiB of virtual addresses it never touches. Docker
sandboxes get ``--gpus all``. The training scripts record the device they trained on
(``val_metrics.json`` → ``device``, in ``metrics.json`` → ``sandbox``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

CHOICES = ("auto", "on", "off")
#: Control nodes a CUDA process opens besides its GPUs' own ``/dev/nvidia<N>``.
CONTROL_NODES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")
_NUMBERED = re.compile(r"^nvidia\d+$")


def nvidia_devices(dev: Path = Path("/dev")) -> list[str]:
    """The host's NVIDIA device nodes (``/dev/nvidia0``, ..., then the control nodes); empty without a GPU."""
    try:
        names = sorted(p.name for p in dev.iterdir())
    except OSError:
        return []
    gpus = [n for n in names if _NUMBERED.match(n)]
    if not gpus:
        return []
    return [str(dev / n) for n in sorted(gpus, key=lambda n: int(n[6:]))] + [str(dev / n) for n in CONTROL_NODES if n in names]


def use_gpu(host: Mapping[str, str] | None = None, dev: Path = Path("/dev")) -> bool:
    """Whether sandboxes get the GPUs (``CELLFORGE_SANDBOX_GPU`` and the host's devices).

    Raises
    ------
    ValueError
        An unknown value (the message lists the valid ones), or ``on`` on a host without GPUs.
    """
    host = os.environ if host is None else host
    value = host.get("CELLFORGE_SANDBOX_GPU", "auto").strip().lower() or "auto"
    if value not in CHOICES:
        msg = f"CELLFORGE_SANDBOX_GPU={value!r}; valid: {', '.join(CHOICES)}"
        raise ValueError(msg)
    found = bool(nvidia_devices(dev))
    if value == "on" and not found:
        msg = f"CELLFORGE_SANDBOX_GPU=on, but this host has no NVIDIA device ({dev}/nvidia<N>)"
        raise ValueError(msg)
    return found and value != "off"


def tree_memory(pids: list[int]) -> int:
    """Memory of a process tree for its peak, bytes: the larger of the summed ``VmRSS`` and the largest ``VmHWM``.

    ``VmHWM`` is a process's own resident high-water mark (per address space, reset by
    ``exec``), so a short allocation between two polls still counts while the process lives;
    unlike ``ru_maxrss`` it is not raised by having been forked from a large parent.
    """
    status = [_status(pid) for pid in set(pids)]  # a process found twice (descendant and marked) counts once
    return max(sum(s.get("VmRSS", 0) for s in status), max((s.get("VmHWM", 0) for s in status), default=0))


def _status(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of ``pid`` in bytes (empty when it is gone)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line[:5]] = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return {}
    return out
