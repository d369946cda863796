"""Qwen3.5-MoE (and Qwen3.6, which uses this architecture): Qwen3.5 with a sparse MoE MLP in every layer.

Top-8 of 256 fused experts (`mlp.experts.gate_up_proj` / `down_proj`, not nn.Linear) plus a gated
shared expert (`mlp.shared_expert`, `mlp.shared_expert_gate`). As for Qwen3-VL-MoE: LoRA reaches the
experts through peft's parameter targeting, ZeRO-3 gathers the MoE block whole, FLOPs count the routed
experts and the shared one, and training adds the router's load-balancing loss.
"""

from __future__ import annotations

from dataclasses import replace

from .qwen3_5 import Qwen3_5, _released
from .spec import ModelShape, ModuleMap, TokenIds


class Qwen3_5Moe(Qwen3_5):
    name = "qwen3_5_moe"
    architecture = "Qwen3_5MoeForConditionalGeneration"
    modules = ModuleMap(
        projectors=("model.visual.merger",),
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a",
                      "out_proj", "gate_proj", "up_proj", "down_proj"),  # the last three: the shared expert's
        lora_target_parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
        moe_block="Qwen3_5MoeSparseMoeBlock",
        moe_router="mlp.gate",
        linear_attention="linear_attn",
    )
    shapes = {
        "qwen3_5-35b-a3b": _released(
            "qwen3_5-35b-a3b", "qwen3_5_moe", 2048, 0, 40, 16, 2, (1152, 4304, 27, 16),
            experts=256, experts_per_token=8, moe_intermediate=512, shared_expert_intermediate=512,
        ),
    }

    def text_config(self, shape: ModelShape, ids: TokenIds) -> dict:
        config = super().text_config(shape, ids)
        del config["intermediate_size"]
        config.update({
            "num_experts": shape.experts, "num_experts_per_tok": shape.experts_per_token,
            "moe_intermediate_size": shape.moe_intermediate,
            "shared_expert_intermediate_size": shape.shared_expert_intermediate, "router_aux_loss_coef": 0.001,
        })
        return config

    def tiny_shape(self, **sizes) -> ModelShape:
        shape = super().tiny_shape(**sizes)
        half = shape.intermediate // 2
        return replace(shape, experts=4, experts_per_token=2, moe_intermediate=half, shared_expert_intermediate=half)


SPEC = Qwen3_5Moe()
