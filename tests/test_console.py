"""A quiet console: library logging, banners and progress bars stay off; our own warnings show."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_NOISY = textwrap.dedent(
    """
    import logging
    from cellforge.console import quiet_console

    quiet_console()
    from openhands.sdk.workspace import RemoteWorkspace  # what the Docker sandbox imports: it configures logging at INFO
    from cellforge.knowledge.retrieval import embed

    embed(["a perturbation"])  # loads the embedding model (transformers' "Loading weights" bar)
    import torch._dynamo  # noqa: F401

    logging.getLogger("runtime.factory").info("sandbox backend local: a line for the log, not the console")
    logging.getLogger("torch._dynamo.utils").info("TorchDynamo compilation metrics")
    logging.getLogger("cellforge.safeio").warning("llm_calls.jsonl line 3 is incomplete; skipped")
    print("done")
    """
)


def test_libraries_stay_quiet_and_our_warnings_show():
    env = {k: v for k, v in os.environ.items() if k not in {"OPENHANDS_SUPPRESS_BANNER", "LITELLM_LOCAL_MODEL_COST_MAP", "HF_HUB_DISABLE_PROGRESS_BARS"}}
    done = subprocess.run([sys.executable, "-c", _NOISY], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)  # noqa: S603
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "done"
    assert done.stderr.strip().splitlines() == ["warning: llm_calls.jsonl line 3 is incomplete; skipped"], done.stderr[-3000:]


def test_the_sandbox_probe_prints_nothing_of_what_docker_says(tmp_path, monkeypatch, capfd):
    fake = tmp_path / "bin" / "docker"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'Client: Docker Engine - Community'\necho ' Version: 27.0.0'\necho 'Server: Docker Engine' >&2\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    from runtime.factory import choose_backend

    backend, why = choose_backend("auto")
    assert backend == "docker" and "answers" in why  # the fake engine answered the probe ...
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # ... and none of its output reached the console
