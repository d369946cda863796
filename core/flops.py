"""Model shapes of the released Qwen VL checkpoints and the FLOPs that MFU is measured against.

Convention (torchtitan's, extended to the vision tower; REFERENCE.md section 7):

* LLM, per trained token of a sequence of length `seq`: `m * N_llm + 2 * m * layers * heads * head_dim * seq`
  where N_llm counts every weight the token passes through except the token embedding (the LM head
  included: with a 151k vocabulary it is real work) and m = 6 when the weights train (forward 2 +
  backward 4), 4 when they are frozen but gradients flow through them (LoRA), 2 for forward only.
  With m = 6 the attention term is torchtitan's `12 * l * h * q * t`.
* Vision tower, per image of P patches: `m * N_blocks * P + 2 * m * depth * heads * head_dim * ctx * P`
  (ctx = the attention window of each layer: 64 patches for Qwen2.5-VL's windowed layers, P for full
  attention) plus `m * N_merger * P / merge**2`; m = 2 when the tower is frozen (no backward is run).
* MFU = achieved FLOP/s / (peak FLOP/s * GPUs), peak = 989 TFLOP/s bf16 dense for an H100 SXM.
"""

from __future__ import annotations

from .families import ModelShape, all_shapes, family_of_config, get_family

H100_BF16_PEAK = 989e12

# Dense bf16 peak per GPU (vendor figures); MFU is reported only for GPUs listed here.
GPU_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "H20": 148e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}


def gpu_peak_flops(device_name: str) -> float | None:
    """The bf16 dense peak of a GPU from its name (e.g. 'NVIDIA H100 80GB HBM3'), None if unknown."""
    words = device_name.upper().replace("-", " ").split()
    for key, peak in GPU_BF16_PEAK.items():
        if key in words:
            return peak
    return None


SHAPES: dict[str, ModelShape] = all_shapes()
"""The released shapes of every family (`vltune bench --model-shape NAME`)."""


def llm_params(shape: ModelShape) -> int:
    """Weights a text token passes through, the token embedding excluded (the LM head included); an MoE
    family counts the experts a token is routed to, not all of them."""
    return get_family(shape.model_type).llm_params(shape)


def llm_flops(shape: ModelShape, seq_lens: list[int], multiplier: int = 6) -> float:
    """FLOPs of one step over sequences of these lengths (every token trained through)."""
    tokens = sum(seq_lens)
    mixing = get_family(shape.model_type).sequence_mixing_flops(shape, seq_lens, multiplier)
    return multiplier * llm_params(shape) * tokens + mixing


def vision_flops(shape: ModelShape, patches_per_image: list[int], multiplier: int = 2) -> float:
    """FLOPs of the vision tower (blocks, patch embedding, merger) over these images."""
    h, p, m = shape.vision_hidden, shape.patch_size, shape.merge_size
    family = get_family(shape.model_type)
    block = 4 * h * h + family.vision_mlp_matrices * h * shape.vision_intermediate
    embed = 3 * shape.temporal_patch * p * p * h
    merger = family.merger_params(shape)
    head_dim = h // shape.vision_heads
    window = (shape.window_size // p) ** 2 if shape.fullatt_blocks else None
    total = 0.0
    for n in patches_per_image:
        ctx = [n if window is None or i in shape.fullatt_blocks else min(window, n) for i in range(shape.vision_depth)]
        total += multiplier * (shape.vision_depth * block + embed) * n
        total += 2 * multiplier * shape.vision_heads * head_dim * n * sum(ctx)
        total += multiplier * merger * n / (m * m)  # the family's merger (Qwen3-VL: DeepStack mergers too)
    return total


def shape_from_config(config: dict) -> ModelShape:
    """The ModelShape of an HF config.json dict (any size: the tiny test models too)."""
    return family_of_config(config).shape(config)


def batch_flops(shape: ModelShape, batch: dict, llm_multiplier: int = 6, vision_multiplier: int = 2) -> float:
    """Model FLOPs of one micro-batch (padded or packed): attention counted per sample, so packing
    earns no credit for attention across samples; every image and video grid through the tower."""
    if "cu_seqlens" in batch:
        lengths = [int(b - a) for a, b in zip(batch["cu_seqlens"][:-1], batch["cu_seqlens"][1:])]
    else:
        lengths = [int(n) for n in batch["attention_mask"].sum(axis=1)]
    patches = [int(t * h * w) for key in ("image_grid_thw", "video_grid_thw") for t, h, w in batch.get(key, ())]
    return llm_flops(shape, lengths, llm_multiplier) + vision_flops(shape, patches, vision_multiplier)
