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
