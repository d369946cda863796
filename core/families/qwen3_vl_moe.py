"""Qwen3-VL-MoE: Qwen3-VL with a sparse MoE text model (Qwen3-VL-30B-A3B, 235B-A22B).

Every decoder layer's MLP is a top-k router over fused experts (`mlp.gate`, `mlp.experts.gate_up_proj`
[E, 2I, H] and `mlp.experts.down_proj` [E, H, I], not nn.Linear). So LoRA adapts the experts through
peft's parameter targeting, ZeRO-3 gathers the MoE block whole, FLOPs count the routed experts only,
and training adds the router's load-balancing loss (`router_aux_loss_coef`) to the loss.
"""

from __future__ import annotations

from dataclasses import replace

from .qwen3_vl import Qwen3VL
from .spec import Capabilities, ModelShape, ModuleMap


class Qwen3VLMoe(Qwen3VL):
    name = "qwen3_vl_moe"
    architecture = "Qwen3VLMoeForConditionalGeneration"
    modules = ModuleMap(
        projectors=("model.visual.merger", "model.visual.deepstack_merger_list"),
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
        lora_target_parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
        moe_block="Qwen3VLMoeTextSparseMoeBlock",
        moe_router="mlp.gate",
    )
    capabilities = Capabilities(liger=False)  # vltune's Liger SwiGLU binding expects dense gate/up/down MLPs
    shapes = {
        "qwen3_vl-30b-a3b": ModelShape(
            "qwen3_vl-30b-a3b", "qwen3_vl_moe", 2048, 6144, 48, 32, 4, 151936, False, 1152, 4304, 27, 16,
            patch_size=16, deepstack=(8, 16, 24), head_dim=128, experts=128, experts_per_token=8, moe_intermediate=768,
        ),
    }

    def text_config(self, shape, ids) -> dict:
        config = super().text_config(shape, ids)
        config.update({
            "num_experts": shape.experts, "num_experts_per_tok": shape.experts_per_token,
            "moe_intermediate_size": shape.moe_intermediate, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "router_aux_loss_coef": 0.001, "hidden_act": "silu",
        })
        return config

    def vision_config(self, shape: ModelShape) -> dict:
        return {**super().vision_config(shape), "model_type": "qwen3_vl_moe"}

    def tiny_shape(self, **sizes) -> ModelShape:
        shape = super().tiny_shape(**sizes)
        return replace(shape, experts=4, experts_per_token=2, moe_intermediate=shape.intermediate // 2)


SPEC = Qwen3VLMoe()
