"""A fixed-size filesystem under a sandbox's work folder: the kernel bounds its disk and its inodes.

The work folder's size limit (``Limits.disk_mb``) used to be a poll of the folder's tree
(:class:`runtime.base.DiskWatch`): a file deleted while still open, or a million empty files,
is not in any tree the poll can walk. Where cellforge runs as root with ``mke2fs`` and loop
devices (a Debian machine with e2fsprogs, CI), :class:`WorkFilesystem` makes an ext4 image of
exactly ``disk_mb`` MiB with ``inodes`` inodes, filled with the work folder's current
contents (``mke2fs -d``), and mounts it over the folder (``loop,nosuid,nodev``) for the
sandbox's lifetime. A write past the limit then fails inside the sandbox with ``ENOSPC``, in
whatever form the data takes (open deleted files included), and the host's disk never holds
more than the image. The poll stays, as reporting only.

On close the image is unmounted and deleted: the folder shows again what it held when the
sandbox opened (the inputs); everything the sandbox wrote was read back by then
(:func:`cellforge.execution.contract.collect_outputs`). Elsewhere (not root, no ``mke2fs``)
:func:`unavailable` says why and the poll keeps its old role.

``CELLFORGE_SANDBOX_DISKFS=0`` turns the filesystem off.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Bytes free (to the sandbox user) below which the filesystem counts as full.
FULL_BYTES = 1 << 20
#: Blocks kept for root, MiB: the host still writes the command's log after the sandbox filled its share.
RESERVE_MB = 8


def unavailable() -> str | None:
    """Why a work folder cannot get its own filesystem here, or None when it can."""
    if os.environ.get("CELLFORGE_SANDBOX_DISKFS", "1").strip() == "0":
        return "CELLFORGE_SANDBOX_DISKFS=0"
    if os.geteuid() != 0:
        return "not root (mounting a filesystem needs root)"
    missing = [tool for tool in ("mke2fs", "mount", "umount") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found (Debian package e2fsprogs / mount)"
    if not Path("/dev/loop-control").exists():
        return "no loop devices (/dev/loop-control)"
    return None


def release_stale(work_dir: Path) -> bool:
    """Unmount what a killed cellforge left mounted over ``work_dir``; True if something was."""
    work_dir = Path(work_dir)
    if not os.path.ismount(work_dir):
        return False
    subprocess.run(["umount", str(work_dir)], check=False, capture_output=True)  # noqa: S603, S607
    if os.path.ismount(work_dir):
        subprocess.run(["umount", "-l", str(work_dir)], check=False, capture_output=True)  # noqa: S603, S607
    _image(work_dir).unlink(missing_ok=True)
    return True


def _image(work_dir: Path) -> Path:
    return work_dir.parent / f".{work_dir.name}.fs"


class WorkFilesystem:
    """An ext4 image of ``size_mb`` MiB and ``inodes`` inodes mounted over ``work_dir``.

    Parameters
    ----------
    work_dir
        The sandbox's work folder (its contents are copied into the new filesystem).
    size_mb
        Size of the filesystem, MiB (``Limits.disk_mb``): inputs, outputs and everything the
        command writes, open deleted files included.
    inodes
        Files, folders and links it can hold (``Limits.inodes``).
    owner
        ``(uid, gid)`` of the filesystem's root folder (the sandbox user), or None for root.

    Raises
    ------
    OSError
        The image could not be made or mounted (the message has the tool's output); the
        caller falls back to polling.
    """

    def __init__(self, work_dir: Path, *, size_mb: int, inodes: int, owner: tuple[int, int] | None) -> None:
        self.work_dir = Path(work_dir)
        self.size_mb, self.inodes = size_mb, inodes
        self.image = _image(self.work_dir)
        release_stale(self.work_dir)
        with open(self.image, "wb") as fh:  # sparse: blocks are taken on the host's disk as the sandbox writes
            fh.truncate(size_mb * 2**20)
        uid, gid = owner or (0, 0)
        self._tool(
            "mke2fs", "-q", "-F", "-t", "ext4", "-m", f"{min(50.0, max(0.01, 100 * RESERVE_MB / size_mb)):.2f}", "-N", str(inodes), "-O", "^has_journal",
            "-E", f"root_owner={uid}:{gid},lazy_itable_init=1", "-d", str(self.work_dir), str(self.image),
        )  # fmt: skip
        self._tool("mount", "-o", "loop,nosuid,nodev,noatime,discard", str(self.image), str(self.work_dir))
        #: Inodes the filesystem really has (mke2fs rounds ``inodes`` up to whole inode tables).
        self.total_inodes = os.statvfs(self.work_dir).f_files
        # a sandbox never closed (an exception, a test) still unmounts when collected or when the interpreter exits;
        # only a killed process leaves its mount, released by the next sandbox in the folder (release_stale)
        self._finalizer = weakref.finalize(self, _unmount, self.work_dir, self.image, os.stat(self.work_dir).st_dev)

    def _tool(self, *args: str) -> None:
        done = subprocess.run(list(args), capture_output=True, text=True, check=False)  # noqa: S603
        if done.returncode != 0:
            self.image.unlink(missing_ok=True)
            msg = f"{args[0]} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[:300]}"
            raise OSError(msg)

    def usage(self) -> dict[str, int]:
        """``free_bytes`` and ``free_inodes`` of the mounted filesystem (the kernel's counts)."""
        st = os.statvfs(self.work_dir)
        return {"free_bytes": st.f_bavail * st.f_frsize, "free_inodes": st.f_favail}

    def full(self) -> str | None:
        """What ran out (``"space"`` or ``"inodes"``), or None."""
        free = self.usage()
        if free["free_bytes"] < FULL_BYTES:
            return "space"
        if free["free_inodes"] == 0:
            return "inodes"
        return None

    def close(self) -> None:
        """Unmount and delete the image; the folder shows its contents from before the mount again."""
        self._finalizer()


def _unmount(work_dir: Path, image: Path, device: int) -> None:
    """Unmount this filesystem (``device``) only: a later sandbox may have mounted its own over the folder since."""
    try:
        ours = os.stat(work_dir).st_dev == device
    except OSError:
        ours = False
    if ours:
        release_stale(work_dir)
    image.unlink(missing_ok=True)


def open_workfs(work_dir: Path, limits: Any, owner: tuple[int, int] | None) -> WorkFilesystem | None:
    """The work folder's own filesystem of ``limits.disk_mb`` MiB and ``limits.inodes`` inodes, or None (then logged why)."""
    why = unavailable()
    if why is None:
        try:
            return WorkFilesystem(work_dir, size_mb=limits.disk_mb, inodes=limits.inodes, owner=owner)
        except OSError as exc:  # inputs larger than the limit, no free loop device, ...
            why = str(exc)
    logger.info("the work folder's size is polled, not bounded by the kernel: %s", why)
    return None


def disk_watch(work_dir: Path, limits: Any, workfs: WorkFilesystem | None, *, on_exceed: Callable[[], None]) -> Any:
    """The disk poll of one command: the limit's enforcer without a filesystem of its own, a reporter with one.

    With :class:`WorkFilesystem` the poll reads the kernel's count (the filesystem's used bytes,
    open deleted files included) and stops nothing: the kernel refuses the write.
    """
    from runtime.base import DiskWatch

    if workfs is None:
        return DiskWatch(work_dir, limit_mb=limits.disk_mb, on_exceed=on_exceed)

    def used() -> int:
        st = os.statvfs(work_dir)
        return (st.f_blocks - st.f_bavail) * st.f_frsize

    return DiskWatch(work_dir, limit_mb=2**40, on_exceed=lambda: None, measure=used)


def workfs_full(workfs: WorkFilesystem | None, watch: Any, log_tail: str) -> str | None:
    """The limit message when the command filled its filesystem (space or inodes), else None."""
    if workfs is None:
        return None
    capacity = os.statvfs(workfs.work_dir)
    total = capacity.f_blocks * capacity.f_frsize
    what = workfs.full() or ("space" if watch.peak >= total - FULL_BYTES else None)
    if what is None and "No space left on device" in log_tail:
        what = "space"
    if what is None:
        return None
    bound = f"{workfs.size_mb} MiB (open deleted files included)" if what == "space" else f"{workfs.total_inodes} files and folders"
    return f"stopped: the work folder's filesystem is full ({what}): its limit of {bound}, counted by the kernel"


__all__ = ["FULL_BYTES", "WorkFilesystem", "disk_watch", "open_workfs", "release_stale", "unavailable", "workfs_full"]
