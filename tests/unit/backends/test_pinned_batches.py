"""The torch engine's host-side staging (TorchBackend.stage_batch, batch.pin_batch): on a GPU the data
loader's thread copies each batch into pinned memory, and the copy to the device then uses it as it is."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from vltune.backends.torch.batch import send  # noqa: E402
from vltune.backends.torch.engine import Engine as TorchBackend  # noqa: E402


def _batch() -> dict:
    rng = np.random.default_rng(0)
    return {
        "input_ids": rng.integers(0, 1000, (1, 37)),
        "pixel_values": rng.standard_normal((64, 1176), dtype=np.float32),  # 301 KB: pinned
        "cu_seqlens": np.arange(0, 1 << 15, 2, dtype=np.int32),  # 64 KiB: pinned
        "position_ids": rng.random((3, 1, 37)),  # Circle-RoPE's fractional ids
        "loss_denominator": np.array(12),
        "empty": np.zeros((0, 4), np.float32),
        "names": ["not an array"],
    }


def test_on_cpu_the_batch_is_left_as_it_is():
    batch = _batch()
    assert TorchBackend.stage_batch(SimpleNamespace(device=torch.device("cpu")), batch) is batch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_arrays_hold_the_same_values_and_are_sent_without_another_copy():
    batch = _batch()
    staged = {}
    backend = SimpleNamespace(device=torch.device("cuda", torch.cuda.current_device()))
    # As on the loader's thread, through the engine's hook (which sets the thread's device first).
    worker = threading.Thread(target=lambda: staged.update(TorchBackend.stage_batch(backend, batch)))
    worker.start()
    worker.join()
    assert staged.keys() == batch.keys()
    for key in ("pixel_values", "cu_seqlens"):
        assert staged[key].dtype == batch[key].dtype and np.array_equal(staged[key], batch[key]), key
        host = torch.as_tensor(staged[key])
        assert host.is_pinned() and host.pin_memory().data_ptr() == host.data_ptr(), key
    for key in ("input_ids", "position_ids", "loss_denominator", "empty", "names"):  # small: left to `send`
        assert staged[key] is batch[key], key
    device = send(torch.as_tensor(staged["pixel_values"]), torch.device("cuda"))
    assert torch.equal(device.cpu(), torch.as_tensor(batch["pixel_values"]))
