"""Redaction of credentials from anything printed by sandboxed code or sent to and from an LLM.

One rule for the whole project: the values of the host's credential-like environment
variables (names matching :data:`SECRET_NAME`, 8 characters or longer) and token-shaped
strings (:data:`SECRET_PATTERNS`) become ``[REDACTED]`` before text is stored or shown.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

#: Names of environment variables that usually hold credentials.
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH|COOKIE|SESSION", re.I)

#: Token shapes redacted wherever they appear.
SECRET_PATTERNS = [
    re.compile(r"\bsk-[A-Za-z0-9_\-]{16,}"),  # OpenAI / Anthropic style
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}"),  # GitHub
    re.compile(r"\bhf_[A-Za-z0-9]{20,}"),  # Hugging Face
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"\bxox[abpr]-[A-Za-z0-9\-]{10,}"),  # Slack
    re.compile(r"(?i)bearer\s+[A-Za-z0-9_\-.]{16,}"),  # HTTP authorisation headers
]


#: Secrets handed to cellforge other than through the environment (:func:`register_secret`).
_REGISTERED: set[str] = set()


def register_secret(value: str) -> None:
    """Redact ``value`` from now on, wherever it appears (8 characters or longer; shorter ones are refused).

    For credentials cellforge receives as arguments rather than environment variables, such as
    a remote agent server's session key.

    Raises
    ------
    ValueError
        ``value`` is shorter than 8 characters (too short to redact without mangling text).
    """
    if len(value) < 8:  # noqa: PLR2004
        msg = "a secret shorter than 8 characters cannot be redacted reliably"
        raise ValueError(msg)
    _REGISTERED.add(value)


def host_secrets(host: Mapping[str, str] | None = None) -> list[str]:
    """Values of the host's credential-like environment variables (8 characters or longer) and registered secrets, longest first."""
    host = os.environ if host is None else host
    found = {v for k, v in host.items() if SECRET_NAME.search(k) and len(v) >= 8} | _REGISTERED  # noqa: PLR2004
    return sorted(found, key=len, reverse=True)


def redact(text: str, *, host: Mapping[str, str] | None = None) -> str:
    """``text`` with every host secret value and every token-shaped string replaced by ``[REDACTED]``."""
    for value in host_secrets(host):
        text = text.replace(value, "[REDACTED]")
    for pattern in SECRET_PATTERNS:
        text = pattern.sub("[REDACTED]", text)
    return text
