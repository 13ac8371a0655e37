"""Optional online connectors: PubMed (NCBI E-utilities) papers and GitHub repositories.

Off unless ``CELLFORGE_ONLINE=1`` (or ``online=True``). Base URLs come from
``CELLFORGE_PUBMED_URL`` (default ``https://eutils.ncbi.nlm.nih.gov/entrez/eutils``) and
``CELLFORGE_GITHUB_API`` (default ``https://api.github.com``), so tests point them at a local
server. A connector that fails is skipped and says why; it never stops the analysis.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

import httpx

from cellforge.knowledge.retrieval import Retrieved

PUBMED_URL = "https://eutils.ncbi.nlm.nih.gov/entrez/eutils"
GITHUB_API = "https://api.github.com"


def online_enabled() -> bool:
    """``CELLFORGE_ONLINE`` is 1/true/yes."""
    return os.environ.get("CELLFORGE_ONLINE", "").lower() in {"1", "true", "yes"}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def pubmed(query: str, *, limit: int = 5, timeout: float = 15.0) -> list[Retrieved]:
    """Papers for ``query``: ``esearch`` (ids, JSON) then ``esummary`` (titles, journals, dates).

    Raises
    ------
    httpx.HTTPError
        The service failed or answered with an error status.
    """
    base = os.environ.get("CELLFORGE_PUBMED_URL", PUBMED_URL).rstrip("/")
    with httpx.Client(timeout=timeout) as client:
        search = client.get(f"{base}/esearch.fcgi", params={"db": "pubmed", "term": query, "retmode": "json", "retmax": limit})
        search.raise_for_status()
        ids = search.json()["esearchresult"]["idlist"][:limit]
        if not ids:
            return []
        summary = client.get(f"{base}/esummary.fcgi", params={"db": "pubmed", "id": ",".join(ids), "retmode": "json"})
        summary.raise_for_status()
        result = summary.json()["result"]
    items = []
    for rank, uid in enumerate(ids):
        doc = result.get(uid, {})
        items.append(
            Retrieved(
                id=f"pmid:{uid}",
                name=str(doc.get("title", "")).strip(),
                score=round(1.0 - rank / max(len(ids), 1), 4),
                how="pubmed",
                source=f"https://pubmed.ncbi.nlm.nih.gov/{uid}/",
                detail={"journal": doc.get("source"), "date": doc.get("pubdate"), "query": query, "retrieved_at": _now(), "api": base},
            )
        )
    return items


def github(query: str, *, limit: int = 5, timeout: float = 15.0) -> list[Retrieved]:
    """Repositories for ``query`` from GitHub's repository search, most starred first.

    Uses ``GITHUB_TOKEN`` when set (sent as a header, never recorded).

    Raises
    ------
    httpx.HTTPError
        The service failed or answered with an error status.
    """
    base = os.environ.get("CELLFORGE_GITHUB_API", GITHUB_API).rstrip("/")
    headers = {"Accept": "application/vnd.github+json"}
    if os.environ.get("GITHUB_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['GITHUB_TOKEN']}"
    with httpx.Client(timeout=timeout, headers=headers) as client:
        response = client.get(f"{base}/search/repositories", params={"q": query, "sort": "stars", "order": "desc", "per_page": limit})
        response.raise_for_status()
        repos = response.json().get("items", [])[:limit]
    return [
        Retrieved(
            id=f"github:{repo['full_name']}",
            name=repo["full_name"],
            score=round(1.0 - rank / max(len(repos), 1), 4),
            how="github",
            source=repo["html_url"],
            detail={"description": repo.get("description"), "stars": repo.get("stargazers_count"), "query": query, "retrieved_at": _now(), "api": base},
        )
        for rank, repo in enumerate(repos)
    ]


def search_online(query: str, *, limit: int = 5, online: bool | None = None) -> tuple[list[Retrieved], dict[str, str]]:
    """Both connectors when online; returns the items and a status per connector (``ok``, ``off`` or the error)."""
    if not (online_enabled() if online is None else online):
        return [], {"pubmed": "off (set CELLFORGE_ONLINE=1)", "github": "off (set CELLFORGE_ONLINE=1)"}
    items: list[Retrieved] = []
    status: dict[str, str] = {}
    for name, fn in [("pubmed", pubmed), ("github", github)]:
        try:
            found: list[Any] = fn(query, limit=limit)
            items += found
            status[name] = f"ok ({len(found)} items)"
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            status[name] = f"skipped: {type(exc).__name__}: {str(exc)[:200]}"
    return items, status
