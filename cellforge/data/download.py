"""Find a registered file: local cache, then mirror folders, then the upstream URL.

Downloads stream with httpx, resume a partial file with an HTTP Range request,
show a rich progress bar and verify the md5 before the file is used.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cellforge.data.registry import DatasetCard
from cellforge.errors import ChecksumError, DatasetError
from cellforge.paths import cache_dir, mirror_dirs

_CHUNK = 1 << 20


def md5sum(path: Path) -> str:
    """Hex md5 of a file, read in 1 MiB chunks."""
    digest = hashlib.md5()  # noqa: S324 - md5 is the upstream checksum, not security
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _offline() -> bool:
    return os.environ.get("CELLFORGE_OFFLINE", "").lower() in {"1", "true", "yes"}


def fetch(card: DatasetCard, *, show_progress: bool = True) -> Path:
    """Path to a verified local copy of ``card``'s file.

    Looks in ``cache_dir()/data``, then each folder of ``CELLFORGE_DATA_MIRROR``,
    then downloads ``card.url`` into the cache (unless ``CELLFORGE_OFFLINE=1``).

    Raises
    ------
    ChecksumError
        A cached, mirrored or downloaded file has the wrong md5.
    DatasetError
        The file is nowhere locally and cannot be downloaded; the message lists
        every place tried.
    """
    tried: list[str] = []
    cached = cache_dir() / "data" / card.filename
    for candidate in [cached, *(m / card.filename for m in mirror_dirs())]:
        tried.append(str(candidate))
        if candidate.is_file():
            actual = md5sum(candidate)
            if actual != card.md5:
                msg = (
                    f"{candidate} has md5 {actual}, but the registry card {card.name!r} expects {card.md5}; "
                    "delete or replace the file"
                )
                raise ChecksumError(msg)
            return candidate
    if _offline():
        msg = (
            f"data set {card.name!r} is not available offline; looked in: {', '.join(tried)}. "
            "Set CELLFORGE_DATA_MIRROR to a folder holding "
            f"{card.filename!r} or unset CELLFORGE_OFFLINE to download {card.url}"
        )
        raise DatasetError(msg)
    try:
        return download(card.url, cached, md5=card.md5, size_hint=card.size_bytes, show_progress=show_progress)
    except ChecksumError:
        raise
    except DatasetError as exc:
        msg = f"data set {card.name!r}: not found locally (looked in: {', '.join(tried)}) and {exc}"
        raise DatasetError(msg) from exc


def download(
    url: str,
    dest: Path,
    *,
    md5: str | None = None,
    size_hint: int | None = None,
    show_progress: bool = True,
    timeout_s: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest``, resuming ``dest.part`` if present, and check the md5.

    Parameters
    ----------
    url
        HTTP(S) address.
    dest
        Final path; the partial download lives at ``dest`` + ``.part`` until verified.
    md5
        Expected hex md5; on mismatch the partial file is removed.
    size_hint
        Total size in bytes for the progress bar when the server does not send it.

    Raises
    ------
    ChecksumError
        The finished file has another md5 (it is deleted so the next try starts clean).
    DatasetError
        Network or HTTP failure.
    """
    import httpx
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        with httpx.stream("GET", url, headers=headers, timeout=timeout_s, follow_redirects=True) as resp:
            if resp.status_code == 416:  # noqa: PLR2004 - the part file is already complete
                pass
            elif resp.status_code >= 400:  # noqa: PLR2004
                msg = f"download of {url} failed with HTTP {resp.status_code}"
                raise DatasetError(msg)
            else:
                resumed = resp.status_code == 206  # noqa: PLR2004
                if not resumed:
                    have = 0
                length = resp.headers.get("Content-Length")
                total = (int(length) + have) if length else size_hint
                with (
                    part.open("ab" if resumed else "wb") as fh,
                    Progress(
                        "[progress.description]{task.description}",
                        BarColumn(),
                        DownloadColumn(),
                        TransferSpeedColumn(),
                        disable=not show_progress,
                        transient=True,
                    ) as progress,
                ):
                    task = progress.add_task(f"downloading {dest.name}", total=total, completed=have)
                    for chunk in resp.iter_bytes(_CHUNK):
                        fh.write(chunk)
                        progress.advance(task, len(chunk))
    except httpx.HTTPError as exc:
        msg = f"download of {url} failed: {exc!r} (a partial file is kept at {part} and will be resumed)"
        raise DatasetError(msg) from exc
    if md5 is not None:
        actual = md5sum(part)
        if actual != md5:
            part.unlink()
            msg = f"download of {url} has md5 {actual}, expected {md5}; the corrupt file was removed"
            raise ChecksumError(msg)
    part.replace(dest)
    return dest
