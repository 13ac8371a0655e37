"""Find a registered file: local cache, then mirror folders, then the upstream URL.

Downloads stream with httpx, resume a partial file with an HTTP Range request,
show a rich progress bar and verify the md5 before the file is used.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

from cellforge.data.registry import DatasetCard
from cellforge.errors import ChecksumError, DatasetError
from cellforge.paths import cache_dir, mirror_dirs, mirror_source

_CHUNK = 1 << 20


def md5sum(path: Path, algorithm: str = "md5") -> str:
    """Hex digest (md5 by default, or sha256) of a file, read in 1 MiB chunks."""
    digest = hashlib.new(algorithm)
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def expected_checksum(card: DatasetCard, path: Path) -> tuple[str, str] | None:
    """(algorithm, hex digest) a file of ``card`` must have: the card's md5, else its sha256,
    else the md5 recorded beside ``path`` on first download (``<file>.md5``), else ``None``."""
    if card.md5:
        return "md5", card.md5
    if card.sha256:
        return "sha256", card.sha256
    sidecar = path.with_name(path.name + ".md5")
    return ("md5", sidecar.read_text().strip()) if sidecar.is_file() else None


def check_file(card: DatasetCard, path: Path) -> None:
    """Verify a local copy of ``card``'s file.

    Raises
    ------
    ChecksumError
        Wrong md5 / sha256; the message names the file, both digests and what to do.
    """
    expected = expected_checksum(card, path)
    if expected is None:
        return
    algorithm, digest = expected
    actual = md5sum(path, algorithm)
    if actual != digest:
        msg = (
            f"{path} has {algorithm} {actual}, but the registry card {card.name!r} expects {digest}; "
            "delete or replace the file"
        )
        raise ChecksumError(msg)


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
    candidates = local_candidates(card)
    tried, cached = [str(c) for c in candidates], candidates[0]
    found = local_copy(card)
    if found is not None:
        check_file(card, found)
        return found
    hint = (
        f"Set CELLFORGE_DATA_MIRROR to a folder holding {card.filename!r} (mirrors now from {mirror_source()}; "
        "`cellforge doctor` shows where data is looked for)"
    )
    if _offline():
        msg = f"data set {card.name!r} is not available offline; looked in: {', '.join(tried)}. {hint}, or unset CELLFORGE_OFFLINE to download {card.url}"
        raise DatasetError(msg)
    try:
        got = download(card.url, cached, md5=card.md5, sha256=card.sha256, size_hint=card.size_bytes, show_progress=show_progress)
        if not card.md5 and not card.sha256:
            # No published checksum: record the first download's md5 so later copies are checked against it.
            warnings.warn(f"data set {card.name!r} has no published checksum; recorded md5 of the first download", stacklevel=2)
            got.with_name(got.name + ".md5").write_text(md5sum(got))
        return got
    except ChecksumError:
        raise
    except DatasetError as exc:
        msg = f"data set {card.name!r}: not found locally (looked in: {', '.join(tried)}) and {exc}. {hint}"
        raise DatasetError(msg) from exc


def local_candidates(card: DatasetCard) -> list[Path]:
    """Where ``card``'s file is looked for before any download: the cache, then each mirror."""
    return [cache_dir() / "data" / card.filename, *(m / card.filename for m in mirror_dirs())]


def local_copy(card: DatasetCard) -> Path | None:
    """The first local copy of ``card``'s file (not yet checked against its checksum), or ``None``."""
    return next((c for c in local_candidates(card) if c.is_file()), None)


def download(
    url: str,
    dest: Path,
    *,
    md5: str | None = None,
    sha256: str | None = None,
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
    md5, sha256
        Expected hex digests (either or both); on mismatch the partial file is removed.
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
        kept = part.stat().st_size if part.exists() else 0
        resume = f"; {kept} bytes are kept at {part} and the next try resumes them" if kept else ""
        msg = f"download of {url} failed ({type(exc).__name__}: {exc}){resume}"
        raise DatasetError(msg) from exc
    for algorithm, expected in (("md5", md5), ("sha256", sha256)):
        if expected is None:
            continue
        actual = md5sum(part, algorithm)
        if actual != expected:
            part.unlink()
            msg = f"download of {url} has {algorithm} {actual}, expected {expected}; the corrupt file was removed"
            raise ChecksumError(msg)
    part.replace(dest)
    return dest
