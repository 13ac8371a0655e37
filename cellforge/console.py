"""A quiet console: cellforge's own progress lines, and of the libraries only their warnings.

Left alone, the libraries under cellforge fill the terminal: the OpenHands SDK configures the
root logger at INFO when it is imported (and lifts every logger then at WARNING to INFO, torch's
included, so torch dumps its compile metrics at exit), transformers draws a "Loading weights"
bar for the embedding model, LiteLLM and httpx log each request. :func:`quiet_console` turns
all of that down before those libraries are imported; our own warnings (a torn log line, a
leftover container) still show, as ``warning: ...`` lines.
"""

from __future__ import annotations

import logging
import re
import unicodedata
import os
import sys

#: Environment read by libraries when they are imported: no progress bars, no INFO chatter.
QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub and transformers bars
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "LOG_AUTO_CONFIG": "false",  # the OpenHands SDK: leave the root logger alone
    "OPENHANDS_SUPPRESS_BANNER": "1",
    "LITELLM_LOG": "ERROR",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # the bundled price map: no fetch (and no warnings) when offline
}

#: Library loggers held at WARNING.
LIBRARY_LOGGERS = (
    "torch",
    "torch._dynamo",
    "torch._inductor",
    "transformers",
    "sentence_transformers",
    "huggingface_hub",
    "openhands",
    "LiteLLM",
    "litellm",
    "httpx",
    "httpcore",
    "urllib3",
    "filelock",
    "matplotlib",
    "h5py",
    "numba",
    "asyncio",
)

#: Our loggers; their warnings go to stderr as ``warning: <message>``.
OWN_LOGGERS = ("cellforge", "runtime")


class _OwnWarnings(logging.StreamHandler):
    """``warning: <message>`` on the current ``sys.stderr`` (looked up per record; marked, so that it is installed once)."""

    def __init__(self) -> None:
        super().__init__()
        self.setLevel(logging.WARNING)
        self.setFormatter(logging.Formatter("warning: %(message)s"))

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201 - a text stream
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def quiet_console() -> None:
    """Silence library logging and progress bars; keep cellforge's own warnings on stderr.

    Sets :data:`QUIET_ENV` (values already set by the user win), holds :data:`LIBRARY_LOGGERS`
    at WARNING, turns off the transformers / huggingface_hub progress bars if those are
    already imported, and gives :data:`OWN_LOGGERS` one stderr handler. Safe to call twice.
    """
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    for name in OWN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(h, _OwnWarnings) for h in logger.handlers):
            logger.addHandler(_OwnWarnings())


#: ANSI escape sequences: CSI (``ESC [ ... final``), OSC (``ESC ] ... BEL`` or ``ESC \\``, window titles,
#: hyperlinks, the clipboard), and any other two-character escape.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x9b[0-?]*[ -/]*[@-~]|\x1b[@-_]?")


def printable(text: object, *, max_chars: int | None = None) -> str:
    """``text`` as the terminal may show it: escape sequences and control or format characters removed.

    Output of generated code, file names made in a sandbox and a model's answers reach the
    operator's terminal through cellforge's progress lines. Removed: ANSI escape sequences (colours,
    cursor moves, clear screen, OSC window titles, hyperlinks and clipboard writes), every other
    control character (Unicode category ``Cc``) but newline and tab, and format characters
    (``Cf``: bidirectional overrides that reorder what is read). The result is plain text; callers
    that hand it to rich render it as ``rich.text.Text``, never as markup.

    Parameters
    ----------
    text
        Anything; ``str(text)`` is cleaned.
    max_chars
        Cut to this many characters (with ``...``) when given.
    """
    out = _ESCAPES.sub("", str(text))
    out = "".join(ch for ch in out if ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cf"))
    if max_chars is not None and len(out) > max_chars:
        out = out[: max(0, max_chars - 3)] + "..."
    return out
