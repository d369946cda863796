"""backends/torch/device.py: which device, process-group backend and DeepSpeed accelerator each kind of
machine gets (CUDA, Ascend through torch_npu, CPU), checked on CPU.

There is no NPU here and torch_npu is not installed. A stand-in `torch_npu` (put in sys.modules by the
test) does what importing the real one does that matters to the choice: it registers `torch.npu` with
`is_available`, `device_count`, `current_device` and `set_device`. The real import also names torch's
PrivateUse1 device type `npu`, which is what makes `torch.device("npu", i)` exist; that renaming cannot be
undone and leaves torch expecting PrivateUse1 hooks (pinning memory then fails), so only a process of its
own does it. Process-group creation is recorded, not performed. Nothing here has run on an NPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

from vltune.backends.torch import device as device_module  # noqa: E402
from vltune.backends.torch.device import Accelerator, accelerator, current_device, deepspeed_accelerator  # noqa: E402
from vltune.backends.torch.distributed import init_distributed  # noqa: E402


class FakeNpuModule(types.ModuleType):
    """`torch.npu` as torch_npu registers it: the calls device.py makes, with torch_npu's signatures."""

    def __init__(self, count: int):
        super().__init__("torch.npu")
        self.count, self.current = count, 0

    def is_available(self) -> bool:
        return self.count > 0

    def device_count(self) -> int:
        return self.count

    def current_device(self) -> int:
        return self.current

    def set_device(self, device) -> None:
        self.current = torch.device(device).index if not isinstance(device, int) else device


def _install_torch_npu(monkeypatch, count: int) -> FakeNpuModule:
    npu = FakeNpuModule(count)
    torch_npu = types.ModuleType("torch_npu")
    torch_npu.npu = npu
    monkeypatch.setitem(sys.modules, "torch_npu", torch_npu)
    monkeypatch.setitem(sys.modules, "torch.npu", npu)  # DeepSpeed's npu accelerator runs `import torch.npu`
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    return npu


@pytest.fixture(autouse=True)
def fresh_detection(monkeypatch):
    """No CUDA unless a test says so, no torch_npu unless a test installs one, and detection rerun."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # `import torch_npu` -> ModuleNotFoundError
    accelerator.cache_clear()
    yield
    accelerator.cache_clear()


@pytest.fixture()
def recorded_groups(monkeypatch):
    """init_process_group's calls, recorded instead of joining a group (the env of torchrun rank 1 of 2)."""
    calls: list[tuple[str, dict]] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: calls.append((backend, kwargs)))
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    return calls


def test_cpu_machine_gets_gloo_and_deepspeed_cpu():
    assert accelerator() == Accelerator("cpu")
    assert (accelerator().process_group_backend, accelerator().deepspeed_accelerator) == ("gloo", "cpu")
    assert current_device() == torch.device("cpu") and accelerator().module is None


def test_cuda_wins_over_an_installed_torch_npu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _install_torch_npu(monkeypatch, count=8)
    assert accelerator() == Accelerator("cuda")
    assert (accelerator().process_group_backend, accelerator().deepspeed_accelerator) == ("nccl", "cuda")


def test_ascend_machine_gets_npu_hccl_and_deepspeed_npu(monkeypatch):
    npu = _install_torch_npu(monkeypatch, count=8)
    assert accelerator() == Accelerator("npu")
    assert (accelerator().process_group_backend, accelerator().deepspeed_accelerator) == ("hccl", "npu")
    accelerator().set_device(3)
    assert npu.current == 3 and accelerator().module is npu


NPU_DEVICES_SCRIPT = """
import sys, types, torch
npu = types.ModuleType("torch.npu")
npu.current = 0
npu.is_available, npu.device_count = (lambda: True), (lambda: 8)
npu.current_device, npu.set_device = (lambda: npu.current), (lambda index: setattr(npu, "current", index))
torch_npu = types.ModuleType("torch_npu")
torch_npu.npu = npu
sys.modules["torch_npu"], torch.npu = torch_npu, npu
torch.utils.rename_privateuse1_backend("npu")  # as importing torch_npu does
torch.cuda.is_available = lambda: False
from vltune.backends.torch.device import accelerator, current_device
from vltune.backends.torch.distributed import DistContext
accelerator().set_device(3)
print(current_device(), DistContext(rank=1, world_size=2, local_rank=5).device)
"""


def test_ascend_devices_are_npu_devices():
    """The engine's device (the current NPU) and a worker's (its LOCAL_RANK), in a process of their own."""
    result = subprocess.run([sys.executable, "-c", NPU_DEVICES_SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["npu:3", "npu:5"]


def test_torch_npu_without_an_npu_is_the_cpu(monkeypatch):
    _install_torch_npu(monkeypatch, count=0)
    assert accelerator() == Accelerator("cpu")


def test_a_torch_npu_that_fails_to_load_is_reported_and_skipped(tmp_path, monkeypatch):
    (tmp_path / "torch_npu").mkdir()
    (tmp_path / "torch_npu" / "__init__.py").write_text("raise OSError('libascendcl.so: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torch_npu")
    with pytest.warns(UserWarning, match="libascendcl"):
        assert accelerator() == Accelerator("cpu")


def test_process_group_backend_per_machine(monkeypatch, recorded_groups):
    """Each worker binds its LOCAL_RANK device first; NCCL also gets it as device_id, HCCL and gloo do not."""
    assert init_distributed().device == torch.device("cpu")
    npu = _install_torch_npu(monkeypatch, count=2)
    accelerator.cache_clear()
    init_distributed()
    assert npu.current == 1
    cuda_devices: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", cuda_devices.append)
    accelerator.cache_clear()
    init_distributed()
    assert cuda_devices == [1]
    assert recorded_groups == [
        ("gloo", {"rank": 1, "world_size": 2}),
        ("hccl", {"rank": 1, "world_size": 2}),
        ("nccl", {"rank": 1, "world_size": 2, "device_id": torch.device("cuda", 1)}),
    ]


@pytest.fixture()
def deepspeed_unchosen(monkeypatch):
    """DeepSpeed as before its first choice of accelerator (restored afterwards), DS_ACCELERATOR unset."""
    real_accelerator = pytest.importorskip("deepspeed.accelerator.real_accelerator")
    monkeypatch.setattr(real_accelerator, "ds_accelerator", None)
    monkeypatch.setenv(device_module.DEEPSPEED_ACCELERATOR_ENV, "")  # so that teardown restores the variable's state,
    monkeypatch.delenv(device_module.DEEPSPEED_ACCELERATOR_ENV)  # which deepspeed_accelerator() then sets
    return real_accelerator


def test_deepspeed_takes_its_npu_accelerator_on_ascend(monkeypatch, deepspeed_unchosen):
    _install_torch_npu(monkeypatch, count=8)
    chosen = deepspeed_accelerator()
    assert (chosen.device_name(), chosen.communication_backend_name()) == ("npu", "hccl")
    assert type(chosen).__name__ == "NPU_Accelerator"
    assert os.environ[device_module.DEEPSPEED_ACCELERATOR_ENV] == "npu"


def test_deepspeed_takes_its_cpu_accelerator_on_cpu(deepspeed_unchosen):
    assert deepspeed_accelerator().device_name() == "cpu"
    assert os.environ[device_module.DEEPSPEED_ACCELERATOR_ENV] == "cpu"


def test_deepspeed_on_another_accelerator_is_an_error(monkeypatch, deepspeed_unchosen):
    """A DS_ACCELERATOR that contradicts the machine would put ZeRO's state on the wrong device."""
    _install_torch_npu(monkeypatch, count=8)
    monkeypatch.setenv(device_module.DEEPSPEED_ACCELERATOR_ENV, "cpu")
    with pytest.raises(RuntimeError, match="DeepSpeed runs on its 'cpu' accelerator but this process trains on 'npu'"):
        deepspeed_accelerator()
