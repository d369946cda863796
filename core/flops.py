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

from dataclasses import dataclass

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


@dataclass(frozen=True)
class ModelShape:
    """The sizes that set speed and memory; the values of the released config.json files."""

    name: str
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie_word_embeddings: bool
    vision_hidden: int
    vision_intermediate: int
    vision_depth: int
    vision_heads: int
    patch_size: int = 14
    merge_size: int = 2
    window_size: int = 112
    fullatt_blocks: tuple[int, ...] = ()
    deepstack: tuple[int, ...] = ()
    head_dim: int | None = None

    @property
    def text_head_dim(self) -> int:
        return self.head_dim or self.hidden // self.heads


SHAPES = {
    s.name: s
    for s in (
        ModelShape("qwen2_5_vl-3b", "qwen2_5_vl", 2048, 11008, 36, 16, 2, 151936, True, 1280, 3420, 32, 16, fullatt_blocks=(7, 15, 23, 31)),
        ModelShape("qwen2_5_vl-7b", "qwen2_5_vl", 3584, 18944, 28, 28, 4, 152064, False, 1280, 3420, 32, 16, fullatt_blocks=(7, 15, 23, 31)),
        ModelShape("qwen3_vl-2b", "qwen3_vl", 2048, 6144, 28, 16, 8, 151936, True, 1024, 4096, 24, 16, patch_size=16, deepstack=(5, 11, 17), head_dim=128),
        ModelShape("qwen3_vl-8b", "qwen3_vl", 4096, 12288, 36, 32, 8, 151936, False, 1152, 4304, 27, 16, patch_size=16, deepstack=(8, 16, 24), head_dim=128),
    )
}


def llm_params(shape: ModelShape) -> int:
    """Weights a text token passes through, the token embedding excluded (the LM head included)."""
    hd = shape.text_head_dim
    attn = shape.hidden * shape.heads * hd * 2 + shape.hidden * shape.kv_heads * hd * 2
    mlp = 3 * shape.hidden * shape.intermediate
    return shape.layers * (attn + mlp) + shape.hidden * shape.vocab


def llm_flops(shape: ModelShape, seq_lens: list[int], multiplier: int = 6) -> float:
    """FLOPs of one step over sequences of these lengths (every token trained through)."""
    tokens = sum(seq_lens)
    attention = 2 * multiplier * shape.layers * shape.heads * shape.text_head_dim * sum(n * n for n in seq_lens)
    return multiplier * llm_params(shape) * tokens + attention


def vision_flops(shape: ModelShape, patches_per_image: list[int], multiplier: int = 2) -> float:
    """FLOPs of the vision tower (blocks, patch embedding, merger) over these images."""
    h, p, m = shape.vision_hidden, shape.patch_size, shape.merge_size
    block = 4 * h * h + 3 * h * shape.vision_intermediate if shape.model_type != "qwen3_vl" else 4 * h * h + 2 * h * shape.vision_intermediate
    embed = 3 * 2 * p * p * h
    merger_in = h * m * m
    merger = merger_in * merger_in + merger_in * shape.hidden
    head_dim = h // shape.vision_heads
    window = (shape.window_size // p) ** 2 if shape.fullatt_blocks else None
    total = 0.0
    for n in patches_per_image:
        ctx = [n if window is None or i in shape.fullatt_blocks else min(window, n) for i in range(shape.vision_depth)]
        total += multiplier * (shape.vision_depth * block + embed) * n
        total += 2 * multiplier * shape.vision_heads * head_dim * n * sum(ctx)
        total += multiplier * merger * n / (m * m)
    return total


def shape_from_config(config: dict) -> ModelShape:
    """The ModelShape of an HF config.json dict (any size: the tiny test models too)."""
    text = config.get("text_config", config)
    vision = config["vision_config"]
    heads = text["num_attention_heads"]
    qwen2_vl = config["model_type"] == "qwen2_vl"
    vision_hidden = vision.get("embed_dim") if qwen2_vl else vision["hidden_size"]
    vision_intermediate = int(vision_hidden * vision.get("mlp_ratio", 4)) if qwen2_vl else vision["intermediate_size"]
    return ModelShape(
        name=config["model_type"], model_type=config["model_type"], hidden=text["hidden_size"],
        intermediate=text["intermediate_size"], layers=text["num_hidden_layers"], heads=heads,
        kv_heads=text.get("num_key_value_heads", heads), vocab=text["vocab_size"],
        tie_word_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        vision_hidden=vision_hidden, vision_intermediate=vision_intermediate, vision_depth=vision["depth"],
        vision_heads=vision["num_heads"], patch_size=vision.get("patch_size", 14), merge_size=vision.get("spatial_merge_size", 2),
        window_size=vision.get("window_size", 112), fullatt_blocks=tuple(vision.get("fullatt_block_indexes", ())),
        deepstack=tuple(vision.get("deepstack_visual_indexes", ())), head_dim=text.get("head_dim"),
    )


def batch_flops(shape: ModelShape, batch: dict, llm_multiplier: int = 6, vision_multiplier: int = 2) -> float:
    """Model FLOPs of one micro-batch (padded or packed): attention counted per sample, so packing
    earns no credit for attention across samples; every image and video grid through the tower."""
    if "cu_seqlens" in batch:
        lengths = [int(b - a) for a, b in zip(batch["cu_seqlens"][:-1], batch["cu_seqlens"][1:])]
    else:
        lengths = [int(n) for n in batch["attention_mask"].sum(axis=1)]
    patches = [int(t * h * w) for key in ("image_grid_thw", "video_grid_thw") for t, h, w in batch.get(key, ())]
    return llm_flops(shape, lengths, llm_multiplier) + vision_flops(shape, patches, vision_multiplier)
