"""Shared fixtures: the offline data mirror, small real data sets, a local HTTP server."""

from __future__ import annotations

import functools
import http.server
import os
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MIRROR = (ROOT.parent / "shared" / "data").resolve()

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("OPENHANDS_SUPPRESS_BANNER", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-docker", action="store_true", help="run tests that need a Docker engine")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-docker"):
        return
    skip = pytest.mark.skip(reason="needs --run-docker and a Docker engine")
    for item in items:
        if "docker" in item.keywords:
            item.add_marker(skip)


#: Reason of every skip that means "this machine cannot isolate generated code" (tests/test_sandbox_battery.py).
NO_ISOLATION = "bubblewrap does not work here"


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001, ARG001
    """A skipped sandbox battery is a failure to isolate: said in capitals at the end of every run."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if NO_ISOLATION in str(getattr(r, "longrepr", ""))]
    if skipped:
        terminalreporter.write_sep("!", "FAILURE TO ISOLATE", red=True, bold=True)
        terminalreporter.write_line(
            f"{len(skipped)} sandbox battery test(s) skipped: {NO_ISOLATION}. Code written by a language model would not be "
            "contained on this machine. Install bubblewrap (sudo apt-get install bubblewrap); CI sets "
            "CELLFORGE_REQUIRE_ISOLATION=1, which makes these tests fail instead.",
            red=True,
        )


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every test: the shipped mirror, an empty cache, the offline planner."""
    monkeypatch.setenv("CELLFORGE_DATA_MIRROR", os.environ.get("CELLFORGE_DATA_MIRROR", str(MIRROR)))
    monkeypatch.setenv("CELLFORGE_CACHE", str(tmp_path_factory.mktemp("cache")))
    for key in list(os.environ):
        if key.startswith("CELLFORGE_LLM") or key == "CELLFORGE_SANDBOX":
            monkeypatch.delenv(key, raising=False)


@pytest.fixture
def lib():  # noqa: ANN201
    """The template library's shared code (templates/_common.py) as a fresh module."""
    import importlib.util

    path = ROOT / "cellforge" / "execution" / "templates" / "_common.py"
    spec = importlib.util.spec_from_file_location("template_common", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.CONFIG = {"member_ridge": 1e-6}
    return module


@functools.cache
def _load(name: str):  # noqa: ANN202
    from cellforge.data import load_dataset

    os.environ.setdefault("CELLFORGE_DATA_MIRROR", str(MIRROR))
    return load_dataset(name, show_progress=False)


@pytest.fixture
def load():  # noqa: ANN201
    """Load a shipped data set once per test session (returns a cached object: do not modify)."""
    if not MIRROR.exists():
        pytest.skip(f"offline mirror {MIRROR} not present")
    return _load


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with HTTP Range support (206), enough to test resumed downloads."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        header = self.headers.get("Range")
        if header and header.startswith("bytes="):
            start = int(header.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def http_server(tmp_path: Path):  # noqa: ANN201
    """(base_url, folder): an HTTP server on 127.0.0.1 serving ``folder``."""
    folder = tmp_path / "www"
    folder.mkdir()
    handler = functools.partial(_RangeHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", folder
    server.shutdown()
