"""Crash-safe writes of run artifacts and tolerant reads of JSON Lines logs.

A run must survive being killed, or the disk filling up, at any moment, and resume from
what is on disk. So:

- whole files (JSON, text, ``.h5ad``) are written to a temporary file beside the target
  and renamed over it: a reader sees the old file or the new one, never half of one;
- a log line is appended with one ``os.write`` of the whole line on an ``O_APPEND``
  descriptor; a write the disk cuts short is truncated away again;
- a reader of a JSON Lines file skips a line that is not JSON (a kill during an append can
  still tear the last line of a large record) with a warning naming the file and line;
- a full disk (``ENOSPC``, ``EDQUOT``) becomes a :class:`~cellforge.errors.DiskFullError`
  that names the path, instead of a traceback.

``.h5ad`` files are built in memory and written as bytes: HDF5 that meets a full disk in
the middle of a file leaves objects it can neither flush nor free, and the interpreter
then dies at exit (segmentation fault, after a screen of "Exception ignored" tracebacks).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cellforge.errors import DiskFullError

logger = logging.getLogger(__name__)

#: ``errno`` values that mean "no room left": no space, or the user's quota spent.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

_warned: set[tuple[str, int, str]] = set()


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` or an exception it was raised from or during means the disk is full.

    Looks at ``errno`` (``ENOSPC``, ``EDQUOT``) and at the text HDF5 puts in its messages
    ("No space left on device", "errno = 28").
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFullError):
            return True
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        text = str(exc)
        if "No space left on device" in text or "Disk quota exceeded" in text or f"errno = {errno.ENOSPC}," in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full(path: str | os.PathLike[str], exc: BaseException) -> DiskFullError:
    """A :class:`DiskFullError` for a failed write of ``path`` (raise it ``from exc``)."""
    reason = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS else "no space left on device"
    msg = f"disk full: could not write {path} ({reason}); free some space, then resume the run"
    return DiskFullError(msg, path=str(path))


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | bytearray | memoryview, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    Parent folders are created. On any failure the temporary file is removed and ``path``
    keeps its old content (or stays absent).

    Parameters
    ----------
    path
        Target file.
    data
        The whole content.
    fsync
        Flush the data to the device before the rename (so that a crash of the machine
        cannot leave an empty file under the final name).

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    DiskFullError
        The disk (or the quota) is full; the message names ``path``.
    OSError
        Any other failure to write.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, data)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and is_disk_full(exc):
            raise disk_full(target, exc) from exc
        raise
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str, *, fsync: bool = True) -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def write_json(path: str | os.PathLike[str], payload: Any, *, indent: int | None = 2) -> Path:
    """``payload`` as JSON (``default=str``), written atomically (:func:`atomic_write_text`)."""
    return atomic_write_text(path, json.dumps(payload, indent=indent, default=str))


def h5ad_bytes(adata: Any) -> memoryview:
    """The ``.h5ad`` file of ``adata``, built in memory.

    The same content as ``adata.write_h5ad`` (string columns become categoricals first, as
    anndata does on write; ``adata`` is changed that way, like ``write_h5ad`` changes it).

    Returns
    -------
    memoryview
        The file's bytes (a view of an in-memory buffer: no second copy).
    """
    import h5py
    from anndata.io import write_elem

    adata.strings_to_categoricals()
    if adata.raw is not None:
        adata.strings_to_categoricals(adata.raw.var)
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        write_elem(f, "/", adata)
    return buffer.getbuffer()


def write_h5ad_in_blocks(path: str | os.PathLike[str], obs: Any, var: Any, blocks: Any, *, fsync: bool = True) -> Path:
    """Write the ``.h5ad`` file of an AnnData whose ``X`` is the CSR row blocks ``blocks`` stacked, a block at a time.

    Neither the stacked matrix nor the file's bytes are held: each block is appended to the
    file's ``X`` (``anndata.io.sparse_dataset(...).append``) in a temporary file beside
    ``path`` before the next is made, and the file is renamed to ``path`` once complete, as
    :func:`atomic_write_bytes` does. On a Norman-sized screen the sandbox's training cells are
    about 2 GB at 8,000 genes; building the file in memory first (as :func:`write_h5ad` does
    for small files) held those 2 GB in the cellforge process besides the data set.

    Parameters
    ----------
    path
        Target file.
    obs, var
        The AnnData's ``obs`` (one row per row of the stacked blocks) and ``var`` DataFrames.
    blocks
        Iterable of ``scipy.sparse.csr_matrix`` blocks of rows, in order, each with ``len(var)`` columns.
    fsync
        Flush the file to the device before the rename.

    Returns
    -------
    Path
        ``path``, with the content :func:`write_h5ad` would give for the stacked AnnData.

    Raises
    ------
    ValueError
        The blocks' rows do not add up to ``len(obs)`` (``path`` is left as it was).
    DiskFullError
        The disk (or the quota) is full; the message names ``path``; no partial file is left.

    Notes
    -----
    HDF5 that meets a full disk mid-write leaves objects it cannot close, and the interpreter
    may crash at exit. So the space each block (and the header before, and ``obs`` after)
    will take is claimed first, with ``fallocate`` on the temporary file ahead of what HDF5
    has written (:func:`_claim`): a full disk fails that claim, before HDF5 writes into space
    that is not there.
    """
    import anndata as ad
    import h5py
    from anndata.io import sparse_dataset, write_elem

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    table_bytes = int(obs.memory_usage(deep=True).sum() + var.memory_usage(deep=True).sum())
    fd = -1
    try:
        blocks = iter(blocks)
        first = next(blocks)
        head = ad.AnnData(X=first, obs=obs.iloc[: first.shape[0]], var=var)
        head.strings_to_categoricals()
        rows = first.shape[0]
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        with h5py.File(tmp, "w") as f:
            claimed = _claim(fd, 0, _csr_bytes(first) + 2 * table_bytes)
            write_elem(f, "/", head)
            del head
            stacked = sparse_dataset(f["X"])
            for block in blocks:
                claimed = _claim(fd, claimed, _csr_bytes(block))
                stacked.append(block)
                rows += block.shape[0]
            if rows != len(obs):
                msg = f"the blocks hold {rows} rows; obs has {len(obs)}"
                raise ValueError(msg)
            full = ad.AnnData(obs=obs, var=var)
            full.strings_to_categoricals()
            claimed = _claim(fd, claimed, 2 * table_bytes)
            del f["obs"]
            write_elem(f, "obs", full.obs)
        os.ftruncate(fd, os.fstat(fd).st_size)  # release what was claimed beyond the file's end and not used
        if fsync:
            os.fsync(fd)
        tmp.replace(target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if is_disk_full(exc):
            raise disk_full(target, exc) from exc
        raise
    finally:
        if fd >= 0:
            os.close(fd)
    return target


#: Room claimed beyond each piece's own bytes, for HDF5's chunk indexes and metadata.
_CLAIM_SLACK = 256 * 1024

#: ``fallocate(2)`` mode: allocate beyond the end of the file without moving it.
_FALLOC_FL_KEEP_SIZE = 1


def _csr_bytes(block: Any) -> int:
    """Bytes a CSR block's arrays take (its data, indices and row pointers)."""
    return int(block.data.nbytes + block.indices.nbytes + block.indptr.nbytes)


def _fallocate_keep_size(fd: int, offset: int, length: int) -> None:
    """Linux ``fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, length)``; ``OSError`` on failure (``ENOSYS`` where absent)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.fallocate
    except (OSError, AttributeError) as exc:
        raise OSError(errno.ENOSYS, "fallocate is not available") from exc
    call.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if call(fd, _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _claim(fd: int, claimed: int, more: int) -> int:
    """Allocate disk to the file ``fd`` for ``more`` bytes (plus slack) beyond what it holds or was claimed; the new claimed end.

    ``fallocate`` with ``FALLOC_FL_KEEP_SIZE``: blocks past the end of the file, where HDF5
    writes next, without moving the end (HDF5 reads the end of the file as its own); the
    writer cuts what was not used with ``ftruncate`` at the end of the file. On a full disk the
    partial claim is released and the ``OSError`` (``ENOSPC``) raised. Where the file system
    cannot preallocate, nothing is claimed (a full disk then surfaces from HDF5).
    """
    size = os.fstat(fd).st_size
    start = max(claimed, size)
    try:
        _fallocate_keep_size(fd, start, more + _CLAIM_SLACK)
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            os.ftruncate(fd, size)
            raise
        return claimed  # EOPNOTSUPP, ENOSYS: no preallocation here
    return start + more + _CLAIM_SLACK


def write_h5ad(adata: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``adata`` to ``path`` as ``.h5ad``: built in memory, then written atomically.

    HDF5 never touches the disk, so a full disk is a clean :class:`DiskFullError` (no
    half-written file, no HDF5 objects left open at exit).

    Raises
    ------
    DiskFullError
        The disk is full; the message names ``path``.
    """
    return atomic_write_bytes(path, h5ad_bytes(adata))


def append_line(path: str | os.PathLike[str], line: str, *, fsync: bool = False) -> None:
    """Append one line to a log with a single ``os.write`` on an ``O_APPEND`` descriptor.

    A kill between two appends leaves whole lines; one ``write`` call is not split between
    processes either. Should the file not end with a newline (a line torn by an earlier
    crash), a newline is written first, so the new line stays whole and readable. A write
    that a full disk cuts short is truncated away.

    Parameters
    ----------
    path
        The log file (created when missing).
    line
        One line of text without newlines inside; the newline is added.
    fsync
        Flush to the device after the write.

    Raises
    ------
    ValueError
        ``line`` contains a newline.
    DiskFullError
        The disk is full; the log keeps its earlier lines.
    """
    if "\n" in line or "\r" in line:
        msg = "append_line takes one line: it must not contain newlines"
        raise ValueError(msg)
    target = Path(path)
    data = line.encode("utf-8") + b"\n"
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:
            with open(target, "rb") as fh:  # noqa: PTH123 - one byte, no decoding
                fh.seek(size - 1)
                if fh.read(1) != b"\n":
                    data = b"\n" + data
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
            if fsync:
                os.fsync(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                if os.fstat(fd).st_size > size:
                    os.ftruncate(fd, size)  # no half line left behind
            if is_disk_full(exc):
                raise disk_full(target, exc) from exc
            raise
    finally:
        os.close(fd)


def append_jsonl(path: str | os.PathLike[str], record: Any, *, fsync: bool = False) -> None:
    """Append ``record`` as one JSON line (:func:`append_line`, ``default=str``)."""
    append_line(path, json.dumps(record, default=str), fsync=fsync)


def _warn_once(path: Path, number: int, what: str) -> None:
    key = (str(path), number, what)
    if key not in _warned:
        _warned.add(key)
        logger.warning("%s line %d %s; skipped", path, number, what)


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[Any]:
    """The records of a JSON Lines file; lines that are not JSON are skipped with a warning.

    A torn last line (a kill or a full disk during an append) is the usual case: the warning
    (logger ``cellforge.safeio``, once per file and line) names the file and the line
    number. Blank lines are ignored. A missing file has no records.
    """
    target = Path(path)
    try:
        raw = target.read_bytes()
    except FileNotFoundError:
        return
    lines = raw.split(b"\n")
    complete = raw.endswith(b"\n")
    last = len(lines) - (2 if complete else 1)
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            if index == last and not complete:
                _warn_once(target, index + 1, f"is incomplete (torn by an interrupted write: {exc.msg if isinstance(exc, json.JSONDecodeError) else exc})")
            else:
                _warn_once(target, index + 1, f"is not valid JSON ({exc.msg if isinstance(exc, json.JSONDecodeError) else exc})")


def read_jsonl(path: str | os.PathLike[str]) -> list[Any]:
    """All records of a JSON Lines file (:func:`iter_jsonl`: bad lines skipped with a warning)."""
    return list(iter_jsonl(path))


def read_setting_file(path: str | os.PathLike[str], *, what: str) -> str:
    """The text of a file the user pointed cellforge at (task file, split manifest).

    Raises
    ------
    ConfigError
        The file cannot be read or is not text; the message names ``what`` and the path.
    """
    from cellforge.errors import ConfigError

    p = Path(path)
    try:
        return p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        msg = f"{what} {p}: cannot read it ({exc.strerror if isinstance(exc, OSError) else exc})"
        raise ConfigError(msg) from exc
