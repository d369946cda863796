"""Speed-ups of the transformers model's own modules: Liger's Triton kernels and torch.compile (recipe
keys), and the padded vision MLP (always on).

All three leave the weights, the module tree and the checkpoint format alone, so saving, LoRA and the
sharding engines see the stock model.

* `use_liger_kernel`: Liger's fused RMSNorm (every norm of the language model and the vision blocks,
  Qwen3-VL's q/k norms included) and SwiGLU (the language model's MLPs) forwards, bound to this
  model's modules. Not through Liger's per-model `apply_liger_kernel_to_*` functions: with transformers 5.23 they
  fail to import (they name an output class transformers removed) and their M-RoPE
  replacement expects the (3, B, L, D) cos/sin that transformers no longer passes. Liger's fused
  linear cross-entropy is not used either: on the 3B bench shape it made the step 34% slower than
  vltune's chunked loss (loss.py), see docs/performance.md.
* `align_vision_mlp` (Engine, on every device, not under DeepSpeed): Qwen2.5-VL's vision MLP is 3420 wide, not a multiple of 8, so
  its bf16 rows are not 16-byte aligned and cuBLAS falls back to slower kernels for a quarter of the
  frozen tower's forward. The forward zero-pads the three weights to a multiple of 64 on the fly: the
  padded columns give silu(0) * 0 = 0 and multiply zero rows of down_proj, so the output is the same
  sum, and gradients flow back through the pad into the unpadded parameters.
* `torch_compile`: each decoder layer (and each vision block) compiled on its own, as torchtitan
  compiles per transformer block: small graphs that compile once and are reused by every layer, with
  dynamic sequence lengths (packed rows differ in length). The elementwise chains between the
  matmuls (norms, rotary, gating, residuals) fuse, and the step launches far fewer kernels.
  Inductor's "mix-order reduction" fusion is off (`COMPILE_OPTIONS`): it decides on the row length
  (fused from 4096 rows, worth it from 2560) and guards on that, so a 3B decoder layer compiled for
  one length range was compiled again, seconds each, for rows of 2-2559 and 2560-4095 tokens, inside
  timed steps of `vltune bench` (docs/performance.md). Packed rows are at most 4096 tokens, so the
  fusion only ever applied to a row of exactly 4096.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from vltune.core.families import family_names, get_family


def _liger_modules():
    try:
        from liger_kernel.transformers import LigerRMSNorm, LigerSwiGLUMLP
    except ImportError as e:
        raise RuntimeError("use_liger_kernel: true needs the liger-kernel package (pip install liger-kernel)") from e
    return LigerRMSNorm, LigerSwiGLUMLP


def apply_liger_kernels(model: torch.nn.Module) -> dict[str, int]:
    """Bind Liger's RMSNorm and SwiGLU forwards to a transformers Qwen VL model's modules; returns counts."""
    spec = get_family(model.config.model_type)
    if not spec.capabilities.liger:
        raise ValueError(f"use_liger_kernel: vltune has no Liger wiring for {spec.name} (families that have it: "
                         f"{', '.join(family_names('liger'))})")
    rms_norm, swiglu = _liger_modules()
    counts = {"rms_norm": 0, "swiglu": 0}
    llm = model.get_submodule(spec.modules.llm)
    for module in list(llm.modules()) + list(model.get_submodule(spec.modules.vision_blocks).modules()):
        if type(module).__name__.endswith("RMSNorm"):
            # LigerRMSNorm's forward reads these; "llama" casting = the stock norm's fp32 math.
            eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", 1e-6)
            module.variance_epsilon, module.offset, module.casting_mode, module.in_place, module.row_mode = eps, 0.0, "llama", True, None
            module.forward = types.MethodType(rms_norm.forward, module)
            counts["rms_norm"] += 1
    text_act = getattr(llm.config, "hidden_act", None)
    if text_act in ("silu", "swish"):
        for layer in model.get_submodule(spec.modules.decoder_layers):
            layer.mlp.forward = types.MethodType(swiglu.forward, layer.mlp)
            counts["swiglu"] += 1
    return counts


COMPILE_OPTIONS = {"triton.mix_order_reduction": False}
"""Inductor options of the compiled blocks: no fusion decision that depends on the row length."""


def compile_blocks(model: torch.nn.Module, vision: bool = True) -> int:
    """torch.compile every decoder layer (and with `vision` every vision block) in place; returns the count."""
    modules = get_family(model.config.model_type).modules
    blocks = list(model.get_submodule(modules.decoder_layers))
    blocks += list(model.get_submodule(modules.vision_blocks)) if vision else []
    for block in blocks:
        block.compile(dynamic=True, options=COMPILE_OPTIONS)
    return len(blocks)


def checkpoint_every(model: torch.nn.Module, every: int) -> int:
    """gradient_checkpointing_every_n_layers: after transformers' `gradient_checkpointing_enable` has marked
    every block, keep the mark on the first and then every `every`-th decoder layer and vision block (all of
    them for 1), counted
    in each stack as the MindSpore engine counts them (transformers' own `every_n_layers` counts both stacks
    as one). The unmarked blocks keep their activations for the backward. Returns how many blocks recompute."""
    modules = get_family(model.config.model_type).modules
    recomputed = 0
    for stack in (modules.decoder_layers, modules.vision_blocks):
        for i, block in enumerate(model.get_submodule(stack)):
            block.gradient_checkpointing = i % every == 0
            recomputed += block.gradient_checkpointing
    return recomputed


def _padded_mlp_forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
    """Qwen2_5_VLMLP.forward with the intermediate width zero-padded by `self.vltune_pad` columns."""
    pad = self.vltune_pad
    gate = F.linear(hidden_state, F.pad(self.gate_proj.weight, (0, 0, 0, pad)), _pad_bias(self.gate_proj.bias, pad))
    up = F.linear(hidden_state, F.pad(self.up_proj.weight, (0, 0, 0, pad)), _pad_bias(self.up_proj.bias, pad))
    return F.linear(self.act_fn(gate) * up, F.pad(self.down_proj.weight, (0, pad)), self.down_proj.bias)


def _pad_bias(bias: torch.Tensor | None, pad: int) -> torch.Tensor | None:
    return None if bias is None else F.pad(bias, (0, pad))


def align_vision_mlp(model: torch.nn.Module, multiple: int = 64) -> int:
    """Zero-pad, in the forward, every vision MLP whose width is not a multiple of `multiple`; returns
    how many. Only plain gate/up/down linears (a LoRA-wrapped one keeps its own forward)."""
    count = 0
    for block in model.get_submodule(get_family(model.config.model_type).modules.vision_blocks):
        mlp = getattr(block, "mlp", None)
        linears = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
        if not all(type(lin) is torch.nn.Linear for lin in linears):
            continue
        width = linears[0].out_features
        if width % multiple:
            mlp.vltune_pad = -width % multiple
            mlp.forward = types.MethodType(_padded_mlp_forward, mlp)
            count += 1
    return count
