"""Host-side access to a sandbox's work folder that never trusts what the sandbox made there.

Code in the sandbox can replace any entry of its work folder with a symbolic link, a hard
link, a FIFO or a device node, or make a file huge, between two host operations. Every
function here therefore walks paths one component at a time from a directory descriptor
with ``O_NOFOLLOW`` (so no link is followed at any depth), checks with ``fstat`` that what
it opened is a regular file or a directory, checks sizes before reading, and replaces
entries (unlink, then ``O_CREAT | O_EXCL``) rather than writing through them.

All paths given as ``rel`` are relative to the work folder; absolute paths and ``..`` are
refused.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from runtime.errors import UntrustedFileError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _parts(rel: str | os.PathLike[str]) -> list[str]:
    path = PurePosixPath(os.fspath(rel))
    if path.is_absolute() or any(p == ".." for p in path.parts):
        msg = f"{rel!s}: paths into the work folder must be relative and stay inside it"
        raise UntrustedFileError(msg)
    return [p for p in path.parts if p not in ("", ".")]


@contextlib.contextmanager
def _open_dir(root: Path, parts: list[str], *, create: bool = False, owner: tuple[int, int] | None = None) -> Iterator[int]:
    """Descriptor of ``root/parts...`` reached without following any link (created on request)."""
    fd = os.open(root, _DIR_FLAGS)
    try:
        for part in parts:
            try:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(part, 0o755, dir_fd=fd)
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                if owner is not None:
                    os.fchown(nxt, *owner)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    msg = f"{root}/{'/'.join(parts)}: {part!r} is not a plain directory (a link or a special file made in the sandbox)"
                    raise UntrustedFileError(msg) from exc
                raise
            os.close(fd)
            fd = nxt
        yield fd
    finally:
        os.close(fd)


def read_bytes(root: Path, rel: str | os.PathLike[str], *, max_bytes: int) -> bytes:
    """Contents of the regular file ``root/rel``, refusing links, special files and big files.

    Raises
    ------
    FileNotFoundError
        No such entry.
    UntrustedFileError
        A link or a non-regular file anywhere on the path, or a file over ``max_bytes``.
    """
    parts = _parts(rel)
    if not parts:
        raise UntrustedFileError(f"{root}: not a file")
    with _open_dir(root, parts[:-1]) as dfd:
        return read_at(dfd, parts[-1], max_bytes=max_bytes, shown=f"{root}/{rel}")


def read_tail(root: Path, rel: str | os.PathLike[str], *, max_bytes: int = 64 * 1024) -> bytes:
    """The last ``max_bytes`` of the regular file ``root/rel`` (empty when missing or not a plain file)."""
    parts = _parts(rel)
    try:
        with _open_dir(root, parts[:-1]) as dfd:
            fd = os.open(parts[-1], _READ_FLAGS, dir_fd=dfd)
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    return b""
                os.lseek(fd, max(0, info.st_size - max_bytes), os.SEEK_SET)
                return os.read(fd, max_bytes)
            finally:
                os.close(fd)
    except (OSError, UntrustedFileError):
        return b""


def write_bytes(root: Path, rel: str | os.PathLike[str], data: bytes, *, owner: tuple[int, int] | None = None) -> None:
    """Write ``data`` to ``root/rel`` as a new file: whatever entry was there is unlinked first.

    Parent folders are created (owned by ``owner`` when given); no link is followed.

    Raises
    ------
    UntrustedFileError
        A parent is a link or special file, or the target is a directory.
    """
    write_chunks(root, rel, [data], owner=owner)


def write_chunks(root: Path, rel: str | os.PathLike[str], chunks: Iterable[bytes], *, owner: tuple[int, int] | None = None) -> None:
    """As :func:`write_bytes`, with the contents given as an iterable of byte strings (streamed)."""
    parts = _parts(rel)
    with _open_dir(root, parts[:-1], create=True, owner=owner) as dfd:
        with contextlib.suppress(FileNotFoundError):
            info = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISDIR(info.st_mode):
                raise UntrustedFileError(f"{root}/{rel}: is a directory; refusing to replace it")
            os.unlink(parts[-1], dir_fd=dfd)
        fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dfd)
        try:
            for data in chunks:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
        finally:
            os.close(fd)


@contextlib.contextmanager
def open_read(root: Path, rel: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """The regular file ``root/rel`` opened for reading, reached without following any link.

    Raises
    ------
    FileNotFoundError
        No such entry.
    UntrustedFileError
        A link or a non-regular file anywhere on the path.
    """
    parts = _parts(rel)
    if not parts:
        raise UntrustedFileError(f"{root}: not a file")
    with _open_dir(root, parts[:-1]) as dfd:
        try:
            fd = os.open(parts[-1], _READ_FLAGS, dir_fd=dfd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UntrustedFileError(f"{root}/{rel}: is a symbolic link; not followed") from exc
            raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UntrustedFileError(f"{root}/{rel}: not a regular file")
    os.set_blocking(fd, True)
    with open(fd, "rb") as handle:
        yield handle


def list_tree(root: Path) -> dict[str, tuple[str, int]]:
    """Every entry under ``root``: relative POSIX path -> (kind, size); links are listed, never followed.

    ``kind`` is ``'d'`` (folder), ``'f'`` (regular file) or ``'o'`` (a link or a special file);
    ``size`` is the size in bytes of a regular file, else 0.
    """
    out: dict[str, tuple[str, int]] = {}
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            entries = list(os.scandir(os.path.join(root, rel) if rel else root))
        except OSError:
            continue
        for entry in entries:
            name = f"{rel}/{entry.name}" if rel else entry.name
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(info.st_mode):
                out[name] = ("d", 0)
                stack.append(name)
            elif stat.S_ISREG(info.st_mode):
                out[name] = ("f", info.st_size)
            else:
                out[name] = ("o", 0)
    return out


def make_dir(root: Path, rel: str | os.PathLike[str], *, owner: tuple[int, int] | None = None) -> None:
    """Create ``root/rel`` (and parents) as plain directories; an existing link there is an error."""
    with _open_dir(root, _parts(rel), create=True, owner=owner):
        pass


def remove(root: Path, rel: str | os.PathLike[str]) -> None:
    """Remove the entry ``root/rel`` (a file, a link itself, or a whole folder) without following links."""
    parts = _parts(rel)
    with _open_dir(root, parts[:-1]) as dfd:
        try:
            info = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(info.st_mode):
            _rmtree_at(dfd, parts[-1])
        else:
            os.unlink(parts[-1], dir_fd=dfd)


def _rmtree_at(parent_fd: int, name: str) -> None:
    """Remove the folder ``name`` of ``parent_fd`` and all under it: iterative, one descriptor held, any depth.

    A tree made in the sandbox may be thousands of levels deep: recursion would raise
    ``RecursionError`` (and a descriptor per level would run out), so the walk goes down one
    folder at a time and back up through ``..``, keeping only the names it went through.
    """
    fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    names: list[str] = []
    try:
        while True:
            sub = None
            for entry in os.listdir(fd):
                info = os.stat(entry, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(info.st_mode):
                    sub = sub or entry
                else:
                    os.unlink(entry, dir_fd=fd)
            if sub is not None:
                nxt = os.open(sub, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd, _ = nxt, names.append(sub)
                continue
            if not names:
                break
            up = os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = up
            os.rmdir(names.pop(), dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent_fd)


def remove_tree(path: Path) -> None:
    """Remove the host folder ``path`` however deep the sandbox made it (no link followed; missing is fine)."""
    path = Path(path)
    try:
        fd = os.open(path.parent, _DIR_FLAGS)
    except FileNotFoundError:
        return
    try:
        info = os.stat(path.name, dir_fd=fd, follow_symlinks=False)
        if stat.S_ISDIR(info.st_mode):
            _rmtree_at(fd, path.name)
        else:
            os.unlink(path.name, dir_fd=fd)
    except FileNotFoundError:
        return
    finally:
        os.close(fd)


#: Deepest folder nesting copied out of a sandbox (``outputs/a/b/...``); deeper is refused, not followed.
MAX_TREE_DEPTH = 32


def copy_tree_out(
    root: Path, rel: str | os.PathLike[str], dest: Path, *, max_bytes: int, max_files: int = 10_000, max_depth: int = MAX_TREE_DEPTH
) -> list[str]:
    """Copy the folder ``root/rel`` to the host folder ``dest``: regular files and folders only.

    Links, FIFOs, sockets and devices are skipped and named in the returned list; the host
    copy never follows a link made in the sandbox. The walk is iterative and bounded: entries
    (files and folders together) count against ``max_files``, folders nest at most
    ``max_depth`` levels.

    Raises
    ------
    FileNotFoundError
        ``root/rel`` does not exist.
    UntrustedFileError
        ``root/rel`` is not a plain folder, the files pass ``max_bytes`` in all, the entries
        ``max_files``, or the folders nest deeper than ``max_depth``.
    """
    skipped: list[str] = []
    budget = {"bytes": max_bytes, "files": max_files}
    base = _parts(rel)
    stack: list[list[str]] = [[]]
    while stack:
        sub = stack.pop()
        target = Path(dest).joinpath(*sub)
        shown = "/".join([str(rel), *sub])
        target.mkdir(parents=True, exist_ok=True)
        with _open_dir(root, base + sub) as dfd:
            for entry in sorted(os.listdir(dfd)):
                budget["files"] -= 1
                if budget["files"] < 0:
                    msg = f"{root}/{rel}: more than {max_files} entries; not copied"
                    raise UntrustedFileError(msg)
                info = os.stat(entry, dir_fd=dfd, follow_symlinks=False)
                if stat.S_ISDIR(info.st_mode):
                    if len(sub) + 1 > max_depth:
                        msg = f"{shown}/{entry}: folders nested deeper than {max_depth} levels; not copied"
                        raise UntrustedFileError(msg)
                    stack.append([*sub, entry])
                elif stat.S_ISREG(info.st_mode):
                    budget["bytes"] -= info.st_size
                    if budget["bytes"] < 0:
                        msg = f"{root}/{rel}: more than {max_bytes} bytes; not copied"
                        raise UntrustedFileError(msg)
                    copy_at(dfd, entry, target / entry, max_bytes=info.st_size, shown=f"{shown}/{entry}")
                else:
                    skipped.append(f"{shown}/{entry} ({stat.filemode(info.st_mode)})")
    return skipped


#: Bytes a file may claim beyond what it holds on disk (file-system slack) before it counts as sparse.
SPARSE_SLACK = 1024 * 1024


def refuse_sparse(info: os.stat_result, shown: str) -> None:
    """Refuse a file whose size is far beyond what it holds on disk (a sparse file: holes read as zeros).

    A sandbox can make a 4 GiB file that takes no disk space and so passes the work folder's
    disk limit; read on the host, it would be 4 GiB of memory. Its real content is not a
    prediction anyone wrote.

    Raises
    ------
    UntrustedFileError
        ``st_size`` exceeds the allocated blocks by more than :data:`SPARSE_SLACK`.
    """
    allocated = info.st_blocks * 512
    if info.st_size > allocated + SPARSE_SLACK:
        msg = f"{shown}: a sparse file ({info.st_size} bytes in size, {allocated} on disk); not read"
        raise UntrustedFileError(msg)


def _chunks_at(dfd: int, name: str, *, max_bytes: int, shown: str) -> Iterator[bytes]:
    """The regular file ``name`` of the open folder ``dfd``, in 1 MiB chunks: no link, no sparse file, at most ``max_bytes``."""
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=dfd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UntrustedFileError(f"{shown}: is a symbolic link made in the sandbox; not followed") from exc
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UntrustedFileError(f"{shown}: not a regular file (mode {stat.filemode(info.st_mode)})")
        if info.st_size > max_bytes:
            raise UntrustedFileError(f"{shown}: {info.st_size} bytes, over the limit of {max_bytes}")
        refuse_sparse(info, shown)
        total = 0
        while chunk := os.read(fd, 1 << 20):
            total += len(chunk)
            if total > max_bytes:
                raise UntrustedFileError(f"{shown}: grew past {max_bytes} bytes while read")
            yield chunk
    finally:
        os.close(fd)


def read_at(dfd: int, name: str, *, max_bytes: int, shown: str) -> bytes:
    """Contents of the regular file ``name`` in the open folder ``dfd`` (no links, no sparse file, at most ``max_bytes``)."""
    return b"".join(_chunks_at(dfd, name, max_bytes=max_bytes, shown=shown))


def copy_at(dfd: int, name: str, dest: Path, *, max_bytes: int, shown: str) -> None:
    """Stream the regular file ``name`` of the open folder ``dfd`` to the host file ``dest`` (as :func:`read_at`, never whole in memory)."""
    with open(dest, "wb") as out:
        for chunk in _chunks_at(dfd, name, max_bytes=max_bytes, shown=shown):
            out.write(chunk)


def tree_size(root: Path) -> int:
    """Bytes allocated on disk by everything under ``root`` (links not followed; each inode once)."""
    total, seen = 0, set()
    stack = [str(root)]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            total += info.st_blocks * 512
            if stat.S_ISDIR(info.st_mode):
                stack.append(entry.path)
    return total


def chown_tree(root: Path, owner: tuple[int, int]) -> None:
    """Give ``root`` and everything under it to ``owner`` (links themselves, never their targets).

    Iterative and by descriptor, one folder open at a time: a tree the sandbox made thousands of
    levels deep (longer than any path the kernel takes) is walked like any other.
    """
    os.chown(root, *owner, follow_symlinks=False)

    def own_entries(dfd: int) -> list[str]:
        subdirs = []
        for name in os.listdir(dfd):
            os.chown(name, *owner, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISDIR(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode):
                subdirs.append(name)
        return subdirs

    fd = os.open(root, _DIR_FLAGS)
    try:
        stack = [own_entries(fd)]
        while stack:
            if stack[-1]:
                nxt = os.open(stack[-1].pop(), _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nxt
                stack.append(own_entries(fd))
            else:
                stack.pop()
                if stack:
                    up = os.open("..", _DIR_FLAGS, dir_fd=fd)
                    os.close(fd)
                    fd = up
    finally:
        os.close(fd)
