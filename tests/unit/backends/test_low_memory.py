"""Low-memory training options of the torch engine: `optim: adamw_torch_8bit` (torchao) and `pure_bf16`.

They exist so that a 7B full fine-tune fits one 80 GB GPU; here they must train the tiny model like
the default path does, hold what they claim (bf16 weights, 8-bit moments), resume exactly and refuse
the combinations that would not train or not apply.
"""

from __future__ import annotations

import re

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchao")

from vltune.backends.torch.models import load_model  # noqa: E402
from vltune.core.config import ConfigError  # noqa: E402


def _state_bytes(optimizer) -> int:
    """Bytes of optimizer state, counting an 8-bit state's codes and scales (not its logical fp32 size)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            parts = [value.codes, value.scale] if hasattr(value, "codes") else [value]
            total += sum(t.numel() * t.element_size() for t in parts if isinstance(t, torch.Tensor))
    return total


def test_8bit_adamw_trains_like_adamw_in_a_quarter_of_the_state(tiny_qwen2_5_vl, tiny_training):
    batches, info = tiny_training.batches(tiny_qwen2_5_vl)
    plain = tiny_training.backend(tiny_qwen2_5_vl, info)
    small = tiny_training.backend(tiny_qwen2_5_vl, info, optim="adamw_torch_8bit")
    from torchao.optim import AdamW8bit

    assert isinstance(small.optimizer, AdamW8bit)
    reference, losses = tiny_training.train(plain, batches, 4), tiny_training.train(small, batches, 4)
    assert losses[0] == pytest.approx(reference[0], rel=1e-6)  # same init, same batch, before any update
    assert losses == pytest.approx(reference, rel=5e-3)  # 8-bit moments: a quantised copy of the same update
    assert losses[3] < losses[0]
    # fp32 AdamW keeps 8 bytes per weight; 8-bit codes + block scales are ~2 (small tensors stay fp32 in torchao)
    assert _state_bytes(small.optimizer) < 0.4 * _state_bytes(plain.optimizer)


def test_8bit_step_runs_eagerly_on_the_cpu(tiny_qwen2_5_vl, tiny_training):
    """torchao compiles its update once per weight shape; on the CPU vltune runs it eagerly (a C++ build per
    shape there, ~30 s per run with a cold cache): no graph is compiled by a step."""
    from torch._dynamo.utils import counters

    batches, info = tiny_training.batches(tiny_qwen2_5_vl)
    backend = tiny_training.backend(tiny_qwen2_5_vl, info, optim="adamw_torch_8bit")
    torch._dynamo.reset()
    counters.clear()
    tiny_training.train(backend, batches, 1)
    assert counters["stats"]["unique_graphs"] == 0 and backend.optimizer.state


def test_pure_bf16_full_fine_tune_holds_bf16_weights_and_trains(tiny_qwen2_5_vl, tiny_training):
    batches, info = tiny_training.batches(tiny_qwen2_5_vl)
    reference = tiny_training.train(tiny_training.backend(tiny_qwen2_5_vl, info), batches, 4)
    backend = tiny_training.backend(tiny_qwen2_5_vl, info, bf16=True, pure_bf16=True, optim="adamw_torch_8bit")
    assert {p.dtype for p in backend.model.parameters()} == {torch.bfloat16}
    # buffers keep their dtype: rotary inv_freq rounded to bf16 would shift positions by radians
    inv_freqs = [b for name, b in backend.model.named_buffers() if name.endswith("inv_freq")]
    assert inv_freqs and {b.dtype for b in inv_freqs} == {torch.float32}
    assert backend.autocast_dtype is torch.bfloat16  # bf16 weights compute in bf16 on the CPU too
    losses = tiny_training.train(backend, batches, 4)
    assert losses[0] == pytest.approx(reference[0], rel=2e-2)  # bf16 rounding of the same model
    assert losses[3] < losses[0] - 0.1  # stochastic rounding lets the 1e-3 updates through
    assert all(p.grad is None for p in backend.trainable)


def test_pure_bf16_lora_keeps_a_bf16_base_and_fp32_trained_weights(tiny_qwen2_5_vl, tiny_training):
    batches, info = tiny_training.batches(tiny_qwen2_5_vl)
    lora = {"train_type": "lora", "tune_mm_mlp": True, "lora_r": 8, "lora_alpha": 16}
    reference = tiny_training.train(tiny_training.backend(tiny_qwen2_5_vl, info, **lora), batches, 3)
    backend = tiny_training.backend(tiny_qwen2_5_vl, info, bf16=True, pure_bf16=True, **lora)
    dtypes = {(p.requires_grad, p.dtype) for p in backend.model.parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}  # merger copy (modules_to_save) included
    from peft.tuners.lora import LoraLayer

    adapted = [m for m in backend.model.modules() if isinstance(m, LoraLayer)]
    assert adapted and not any(m.cast_input_dtype_enabled for m in adapted)  # no fp32 copy of inputs under autocast
    with torch.no_grad():  # ... and no change to the math: autocast rounds the fp32 copy straight back to bf16
        without_cast = float(backend._loss_sum(batches[0]))
        for m in adapted:
            m.cast_input_dtype_enabled = True
        with_cast = float(backend._loss_sum(batches[0]))
        for m in adapted:
            m.cast_input_dtype_enabled = False
    assert without_cast == with_cast
    losses = tiny_training.train(backend, batches, 3)
    assert losses == pytest.approx(reference, rel=5e-3)
    assert losses[2] < losses[0]


def test_8bit_state_of_small_bf16_tensors_is_fp32_and_decays(tiny_training):
    """torchao leaves tensors under 4096 values unquantised, in the weight's dtype; in bf16 the second
    moment could never decay (0.999 * v rounds back to v). vltune keeps that state in fp32."""
    from vltune.backends.torch.optim import build_optimizer

    cfg = tiny_training.recipe("unused", bf16=True, pure_bf16=True, optim="adamw_torch_8bit")
    norm = torch.nn.Parameter(torch.ones(3584, dtype=torch.bfloat16))
    matrix = torch.nn.Parameter(torch.randn(64, 256, dtype=torch.bfloat16))
    optimizer = build_optimizer([{"params": [norm, matrix], "lr": 1e-3, "base_lr": 1e-3, "weight_decay": 0.0, "name": "llm"}],
                                cfg.train, torch.device("cpu"))
    seen = []
    for step in range(40):
        scale = 1.0 if step < 20 else 0.01  # the gradients shrink 100x
        norm.grad, matrix.grad = torch.full_like(norm, scale), torch.full_like(matrix, scale)
        optimizer.step()
        seen.append(float(optimizer.state[norm]["exp_avg_sq"].mean()))
    assert optimizer.state[norm]["exp_avg_sq"].dtype == torch.float32
    assert hasattr(optimizer.state[matrix]["exp_avg_sq"], "codes")  # the large tensor is still 8-bit
    assert seen[-1] < 0.99 * seen[19]  # decays once gradients shrink (in bf16 state it stays put)


def test_8bit_optimizer_state_resumes_exactly(tiny_qwen2_5_vl, tiny_training, tmp_path):
    batches, info = tiny_training.batches(tiny_qwen2_5_vl)
    options = {"bf16": True, "pure_bf16": True, "optim": "adamw_torch_8bit"}
    first = tiny_training.backend(tiny_qwen2_5_vl, info, **options)
    tiny_training.train(first, batches, 2)
    first.save_checkpoint(tmp_path)
    expected = tiny_training.train(first, batches, 2)
    resumed = tiny_training.backend(tiny_qwen2_5_vl, info, **options)
    resumed.load_checkpoint(tmp_path)
    large = next(i for i, p in enumerate(resumed.trainable) if p.numel() >= 4096)
    small = next(i for i, p in enumerate(resumed.trainable) if p.numel() < 4096)
    assert hasattr(resumed.optimizer.state[resumed.trainable[large]]["exp_avg"], "codes")  # 8-bit moments restored as 8-bit
    assert resumed.optimizer.state[resumed.trainable[small]]["exp_avg_sq"].dtype == torch.float32  # not cast to the bf16 weight's
    assert tiny_training.train(resumed, batches, 2) == expected  # weights, 8-bit moments, step and rounding noise all restored


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"optim": "adamw_bnb_8bit"}, "optim: 'adamw_bnb_8bit' is not one of adamw_torch, adamw_torch_8bit"),
        ({"pure_bf16": True, "optim": "adamw_torch_8bit"}, "pure_bf16 needs bf16: true"),
        ({"pure_bf16": True, "bf16": True}, "pure_bf16 with train_type full needs optim: adamw_torch_8bit"),
        ({"optim": "adamw_torch_8bit", "fsdp": True}, "optim: adamw_torch_8bit is for one process; fsdp"),
        ({"pure_bf16": True, "bf16": True, "train_type": "lora", "deepspeed": "zero2"}, "pure_bf16 is for one process; deepspeed"),
    ],
)
def test_low_memory_options_refuse_what_would_not_train(tiny_qwen2_5_vl, tiny_training, train, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        tiny_training.recipe(tiny_qwen2_5_vl, **train)


def test_8bit_optimizer_is_refused_across_ddp_ranks(tiny_qwen2_5_vl, tiny_training):
    """Stochastic rounding would differ between ranks and the replicas drift: refused before DDP is built."""
    from types import SimpleNamespace

    from vltune.backends.torch.parallel import build_torch_backend

    cfg = tiny_training.recipe(tiny_qwen2_5_vl, optim="adamw_torch_8bit")
    ctx = SimpleNamespace(world_size=2, rank=0, local_rank=0, is_main=True)
    with pytest.raises(ConfigError, match="adamw_torch_8bit is for one process"):
        build_torch_backend(load_model(tiny_qwen2_5_vl), tiny_qwen2_5_vl, None, cfg.model, cfg.train, None, None, ctx)
