"""Qwen3.5 (dense): Qwen3-VL's vision tower without DeepStack, and a hybrid language model.

Three Gated DeltaNet layers (linear attention: a causal depthwise conv, then the gated delta rule's
recurrent state) per gated full-attention layer (`layer_types`, from `full_attention_interval` 4). The
attention layers use head_dim 256, a quarter of it rotated with interleaved M-RoPE. So packed rows need
the recurrence restarted at every sample too (the module map's `linear_attention`), FLOPs count the
recurrent layers' own term, Circle-RoPE's AGE counts attention layers only, and MDLM is refused: the
recurrence is causal by construction. Checkpoints carry a multi-token-prediction head (`mtp.*`) that
transformers does not load; vltune carries it through save untouched.
"""

from __future__ import annotations

from dataclasses import replace

from .chat_templates import QWEN3_5_CHAT_TEMPLATE
from .qwen3_vl import Qwen3VL
from .spec import Capabilities, ModelShape, ModuleMap, TokenIds

CHUNK = 64
"""Chunk length of the chunked gated delta rule (fla's and transformers' torch path): FLOPs."""


def hybrid_layer_types(layers: int, interval: int = 4) -> tuple[str, ...]:
    """transformers' rule: every `interval`-th layer is full attention, the rest Gated DeltaNet."""
    return tuple("linear_attention" if (i + 1) % interval else "full_attention" for i in range(layers))


def _released(name, model_type, hidden, intermediate, layers, heads, kv_heads, vision, **kw) -> ModelShape:
    vision_hidden, vision_intermediate, vision_depth, vision_heads = vision
    return ModelShape(
        name, model_type, hidden, intermediate, layers, heads, kv_heads, 248320, kw.pop("tie", False),
        vision_hidden, vision_intermediate, vision_depth, vision_heads, patch_size=16, head_dim=256,
        layer_types=hybrid_layer_types(layers), linear_key_heads=16, linear_value_heads=kw.pop("linear_value_heads", 32),
        linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel=4, partial_rotary=0.25,
        max_position_embeddings=262144, **kw,
    )


class Qwen3_5(Qwen3VL):
    name = "qwen3_5"
    architecture = "Qwen3_5ForConditionalGeneration"
    chat_template = QWEN3_5_CHAT_TEMPLATE
    modules = ModuleMap(
        projectors=("model.visual.merger",),
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                      "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"),
        linear_attention="linear_attn",
    )
    # MDLM: the Gated DeltaNet is a causal recurrence. Liger: the norms are zero-centred (1 + w) and the
    # DeltaNet's gated norm is its own.
    capabilities = Capabilities(mdlm=False, liger=False)
    capability_reasons = {
        "mdlm": "its Gated DeltaNet layers are a causal recurrence, which a bidirectional denoising objective cannot use",
        "liger": "its RMSNorms are zero-centred (1 + w) and its DeltaNet's norm is gated, which vltune's Liger binding does not fit",
    }
    untrained_prefixes = ("mtp.",)
    # <|endoftext|> 248044, <|im_end|> 248046, <|vision_start|> 248053 ... <|video_pad|> 248057
    released_token_ids = TokenIds(image=248056, video=248057, vision_start=248053, vision_end=248054, bos=248044,
                                  eos=248046, pad=248044)
    shapes = {
        s.name: s
        for s in (
            _released("qwen3_5-2b", "qwen3_5", 2048, 6144, 24, 8, 2, (1024, 4096, 24, 16), tie=True,
                      linear_value_heads=16),
            _released("qwen3_5-9b", "qwen3_5", 4096, 12288, 32, 16, 4, (1152, 4304, 27, 16)),
        )
    }

    def mrope_section(self, head_dim: int) -> list[int]:
        """The released interleaved [11, 11, 10] split of the rotated 64 of head_dim 256, scaled."""
        half = int(head_dim * 0.25) // 2
        t = (half * 11 + 16) // 32
        return [t, t, half - 2 * t]

    def rope_parameters(self, shape: ModelShape) -> dict:
        return {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": shape.partial_rotary,
                "mrope_section": self.mrope_section(shape.text_head_dim), "mrope_interleaved": True}

    def text_config(self, shape: ModelShape, ids: TokenIds) -> dict:
        config = super().text_config(shape, ids)
        config.update({
            "hidden_act": "silu", "layer_types": list(shape.layer_types),
            "linear_num_key_heads": shape.linear_key_heads, "linear_num_value_heads": shape.linear_value_heads,
            "linear_key_head_dim": shape.linear_key_head_dim, "linear_value_head_dim": shape.linear_value_head_dim,
            "linear_conv_kernel_dim": shape.linear_conv_kernel,
        })
        return config

    def vision_config(self, shape: ModelShape) -> dict:
        config = super().vision_config(shape)
        del config["deepstack_visual_indexes"]
        return {**config, "model_type": f"{self.name}_vision"}

    # -- FLOPs -----------------------------------------------------------------------------------

    def llm_params(self, shape: ModelShape) -> int:
        """Gated attention (q_proj also emits the output gate) on the attention layers, the Gated
        DeltaNet's projections and depthwise conv on the others, the MLP everywhere, the LM head."""
        hd, h = shape.text_head_dim, shape.hidden
        attention = 3 * h * shape.heads * hd + 2 * h * shape.kv_heads * hd
        key, value = shape.linear_key_heads * shape.linear_key_head_dim, shape.linear_value_heads * shape.linear_value_head_dim
        conv_channels = 2 * key + value
        delta = h * conv_channels + h * value + 2 * h * shape.linear_value_heads + value * h + conv_channels * shape.linear_conv_kernel
        linear_layers = shape.layers - shape.attention_layers
        mixers = shape.attention_layers * attention + linear_layers * delta
        return mixers + shape.layers * self.mlp_params(shape) + h * shape.vocab

    def sequence_mixing_flops(self, shape: ModelShape, seq_lens: list[int], multiplier: int = 6) -> float:
        """Softmax attention on the attention layers (the base rule) plus, per token of a Gated DeltaNet
        layer and value head, `m * (3 * dk * dv + C * (dk + dv))`: the chunked delta rule's state read,
        correction and write (three dk x dv products) and its within-chunk scores and mix over C = 64
        tokens, at the same forward-to-train multiplier convention as the attention term (m / 2 times
        the forward FLOPs). Linear in the sequence length: no n**2 term for these layers."""
        attention = super().sequence_mixing_flops(shape, seq_lens, multiplier)
        dk, dv = shape.linear_key_head_dim, shape.linear_value_head_dim
        per_token = multiplier * shape.linear_value_heads * (3 * dk * dv + CHUNK * (dk + dv))
        return attention + (shape.layers - shape.attention_layers) * per_token * sum(seq_lens)

    def tiny_shape(self, **sizes) -> ModelShape:
        """Four decoder layers (Gated DeltaNet, attention, Gated DeltaNet, attention), head_dim 64 so
        that the rotated quarter splits into all three M-RoPE sections."""
        shape = super().tiny_shape(**sizes)
        layers = max(shape.layers, 4)
        return replace(shape, layers=layers, deepstack=(), head_dim=64, layer_types=hybrid_layer_types(layers, 2),
                       linear_key_heads=2, linear_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
                       linear_conv_kernel=4, partial_rotary=0.25)


SPEC = Qwen3_5()
