"""Optional speed-ups of the transformers model's own modules: Liger's Triton kernels and torch.compile.

Both leave the weights, the module tree and the checkpoint format alone, so saving, LoRA and the
sharding engines see the stock model.

* `use_liger_kernel`: Liger's fused RMSNorm (every norm of the language model and the vision blocks,
  Qwen3-VL's q/k norms included) and SwiGLU (the language model's MLPs) forwards, bound to this
  model's modules. Not through Liger's `apply_liger_kernel_to_qwen2_5_vl`: with transformers 5.23 that
  function fails to import (it names an output class transformers removed) and its M-RoPE
  replacement expects the (3, B, L, D) cos/sin that transformers no longer passes. Liger's fused
  linear cross-entropy is not used either: on the 3B bench shape it made the step 34% slower than
  vltune's chunked loss (loss.py), see docs/performance.md.
* `torch_compile`: each decoder layer (and each vision block) compiled on its own, as torchtitan
  compiles per transformer block: small graphs that compile once and are reused by every layer, with
  dynamic sequence lengths (packed rows differ in length). The elementwise chains between the
  matmuls (norms, rotary, gating, residuals) fuse, and the step launches far fewer kernels.
"""

from __future__ import annotations

import types

import torch


def _liger_modules():
    try:
        from liger_kernel.transformers import LigerRMSNorm, LigerSwiGLUMLP
    except ImportError as e:
        raise RuntimeError("use_liger_kernel: true needs the liger-kernel package (pip install liger-kernel)") from e
    return LigerRMSNorm, LigerSwiGLUMLP


def apply_liger_kernels(model: torch.nn.Module) -> dict[str, int]:
    """Bind Liger's RMSNorm and SwiGLU forwards to a transformers Qwen VL model's modules; returns counts."""
    model_type = model.config.model_type
    if model_type not in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        raise ValueError(f"use_liger_kernel: vltune has Liger kernels for qwen2_vl, qwen2_5_vl and qwen3_vl, not model_type {model_type!r}")
    rms_norm, swiglu = _liger_modules()
    counts = {"rms_norm": 0, "swiglu": 0}
    inner = model.model
    for module in list(inner.language_model.modules()) + list(inner.visual.blocks.modules()):
        if type(module).__name__.endswith("RMSNorm"):
            # LigerRMSNorm's forward reads these; "llama" casting = the stock norm's fp32 math.
            eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", 1e-6)
            module.variance_epsilon, module.offset, module.casting_mode, module.in_place, module.row_mode = eps, 0.0, "llama", True, None
            module.forward = types.MethodType(rms_norm.forward, module)
            counts["rms_norm"] += 1
    text_act = getattr(inner.language_model.config, "hidden_act", None)
    if text_act in ("silu", "swish"):
        for layer in inner.language_model.layers:
            layer.mlp.forward = types.MethodType(swiglu.forward, layer.mlp)
            counts["swiglu"] += 1
    return counts


def compile_blocks(model: torch.nn.Module, vision: bool = True) -> int:
    """torch.compile every decoder layer (and with `vision` every vision block) in place; returns the count."""
    inner = model.model
    blocks = list(inner.language_model.layers) + (list(inner.visual.blocks) if vision else [])
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)
