"""GPUs in sandboxes (runtime.gpu), tested at the boundary on a machine without one: which devices go
in, what the command's environment says, and a memory bound that CUDA tolerates (polled resident
memory instead of RLIMIT_AS), enforced for real."""

from __future__ import annotations

import sys

import pytest

from cellforge.execution.journal import FailureKind, classify
from runtime import gpu
from runtime.base import sandbox_env
from runtime.local import LocalSandbox


def _fake_dev(tmp_path, names):  # noqa: ANN001, ANN202
    dev = tmp_path / "dev"
    dev.mkdir(parents=True)
    for name in names:
        (dev / name).touch()
    return dev


def test_the_host_gpus_and_their_control_nodes_are_found(tmp_path):
    dev = _fake_dev(tmp_path, ["nvidia1", "nvidia0", "nvidia10", "nvidiactl", "nvidia-uvm", "null", "nvidia-caps"])
    assert gpu.nvidia_devices(dev) == [str(dev / n) for n in ("nvidia0", "nvidia1", "nvidia10", "nvidiactl", "nvidia-uvm")]
    assert gpu.nvidia_devices(_fake_dev(tmp_path / "none", ["nvidiactl", "null"])) == []  # control nodes alone: no GPU


def test_the_gpu_setting_is_checked(tmp_path):
    with_gpu, without = _fake_dev(tmp_path, ["nvidia0", "nvidiactl"]), _fake_dev(tmp_path / "cpu", ["null"])
    assert gpu.use_gpu({}, with_gpu) is True and gpu.use_gpu({}, without) is False
    assert gpu.use_gpu({"CELLFORGE_SANDBOX_GPU": "off"}, with_gpu) is False
    with pytest.raises(ValueError, match="no NVIDIA device"):
        gpu.use_gpu({"CELLFORGE_SANDBOX_GPU": "on"}, without)
    with pytest.raises(ValueError, match="valid: auto, on, off"):
        gpu.use_gpu({"CELLFORGE_SANDBOX_GPU": "yes"}, with_gpu)


def test_the_command_sees_the_gpus_only_when_given_them(tmp_path):
    assert sandbox_env(tmp_path, host={"CUDA_VISIBLE_DEVICES": "1"})["CUDA_VISIBLE_DEVICES"] == ""
    assert sandbox_env(tmp_path, host={}, gpu=True).get("CUDA_VISIBLE_DEVICES") is None  # every GPU given
    assert sandbox_env(tmp_path, host={"CUDA_VISIBLE_DEVICES": "1"}, gpu=True)["CUDA_VISIBLE_DEVICES"] == "1"


def test_a_gpu_sandbox_binds_the_devices_and_drops_the_address_space_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "nvidia_devices", lambda dev=None: ["/dev/nvidia0", "/dev/nvidiactl", "/dev/nvidia-uvm"])
    box = LocalSandbox(tmp_path / "work", gpu=True)
    try:
        line = box.wrap(["python", "train.py"], memory_mb=2048, env={"A": "1"})
    finally:
        box.close()
    assert not any(a.startswith("--as=") for a in line)  # CUDA reserves far more address space than it uses
    if box.use_bwrap:
        binds = [tuple(line[i + 1 : i + 3]) for i, a in enumerate(line) if a == "--dev-bind"]
        assert binds == [("/dev/nvidia0", "/dev/nvidia0"), ("/dev/nvidiactl", "/dev/nvidiactl"), ("/dev/nvidia-uvm", "/dev/nvidia-uvm")]
        assert line.index("--dev") < line.index("--dev-bind")  # into the private /dev, nothing else of the host's
    plain = LocalSandbox(tmp_path / "cpu", gpu=False)
    try:
        cpu_line = plain.wrap(["python", "train.py"], memory_mb=2048, env={})
    finally:
        plain.close()
    assert f"--as={2 * 2048 * 1024 * 1024}" in cpu_line and "--dev-bind" not in cpu_line


def test_without_an_address_space_limit_resident_memory_is_still_bounded(tmp_path):
    """A GPU sandbox (no devices here) stops a command whose resident memory passes the limit."""
    box = LocalSandbox(tmp_path / "work", gpu=True)
    try:
        hog = "import time\nblocks = []\nfor _ in range(40):\n    blocks.append(bytearray(50 * 2**20))\n    time.sleep(0.05)\ntime.sleep(5)\n"
        box.write_text("hog.py", hog)
        result = box.run([sys.executable, "hog.py"], timeout_s=60, memory_mb=400)
    finally:
        box.close()
    assert result.limit_hit == "memory" and result.exit_code != 0
    assert "memory passed its limit of 400 MiB" in result.log_tail
    assert classify(result.exit_code, result.timed_out, result.log_tail, limit_hit=result.limit_hit) is FailureKind.OOM


def test_a_docker_sandbox_with_gpus_keeps_its_memory_cgroup_and_drops_rlimit_as(tmp_path):
    from runtime.docker import DockerSandbox

    box = DockerSandbox.__new__(DockerSandbox)  # the command line only: no engine needed
    box.work_dir, box.enable_gpu = tmp_path, True
    line = box.container_command(["python", "train.py"], timeout_s=10, memory_mb=2048, env={})
    assert "--as=" not in line and "CUDA_VISIBLE_DEVICES=''" not in line and "CUDA_VISIBLE_DEVICES= " not in line
    box.enable_gpu = False
    assert f"--as={2 * 2048 * 1024 * 1024}" in box.container_command(["python", "train.py"], timeout_s=10, memory_mb=2048, env={})
