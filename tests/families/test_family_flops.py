"""The FLOPs shape of a family against an independent count: the weights of the tiny model itself.

core/flops.py counts, per token, the weight matrices a token passes through (the LM head included, the
token embedding not; a routed MoE layer only the experts it is sent to); per image patch, the vision
blocks' matrices and the projectors'. Here the same numbers are read off the model's parameters.
"""

from __future__ import annotations

import json

import pytest

from vltune.core.flops import llm_params, shape_from_config, vision_flops

torch = pytest.importorskip("torch")


def _matrices(module: torch.nn.Module, routed: float = 1.0) -> float:
    """Weights of the matrices in `module`: 2-D weights whole (embedding lookups excluded), 3-D fused expert weights times `routed`
    (the share of experts a token is sent to); a depthwise conv's [C, 1, W] weight whole (Qwen3.5's Gated
    DeltaNet: W multiply-adds per channel and token). Biases and norms are vector parameters: not counted."""
    total = 0.0
    lookups = {f"{name}.weight" for name, sub in module.named_modules() if isinstance(sub, torch.nn.Embedding)}
    for name, param in module.named_parameters():
        if name in lookups:  # token and position tables are looked up, not multiplied (Ovis2.5's visual
            continue  # embedding table is an nn.Linear over the visual-token softmax: a matrix, counted)
        if param.dim() == 2:
            total += param.numel()
        elif param.dim() == 3:
            total += param.numel() * (routed if ".experts." in f".{name}" else 1.0)
    return total


def test_llm_params_count_the_models_matrices(spec, model_dir, torch_model):
    shape = shape_from_config(json.loads((model_dir / "config.json").read_text()))
    routed = shape.experts_per_token / shape.experts if shape.experts else 1.0
    layers = torch_model.get_submodule(spec.modules.decoder_layers)
    expected = sum(_matrices(layer, routed) for layer in layers)
    expected += torch_model.get_submodule(spec.modules.head).weight.numel()
    assert llm_params(shape) == pytest.approx(expected, rel=1e-9)


def test_vision_flops_count_the_towers_matrices(spec, model_dir, torch_model):
    shape = shape_from_config(json.loads((model_dir / "config.json").read_text()))
    blocks = torch_model.get_submodule(spec.modules.vision_blocks)
    per_patch_blocks = sum(_matrices(block) for block in blocks)
    projectors = sum(_matrices(torch_model.get_submodule(p)) for p in spec.modules.projectors)
    patch_embed = shape.temporal_patch * 3 * shape.patch_size**2 * shape.vision_hidden  # the conv, frames x RGB x P x P -> hidden
    merge = shape.merge_size**2
    # One (1, m, m) grid = m*m patches = one merged token, forward only (multiplier 2): the matrices per
    # patch, the projectors per merged token, and attention over a window of m*m patches in every block.
    got = vision_flops(shape, [merge], multiplier=2)
    attention = 2 * 2 * shape.vision_depth * shape.vision_hidden * merge * merge
    expected = 2 * (per_patch_blocks + patch_embed) * merge + 2 * projectors + attention
    assert got == pytest.approx(expected, rel=1e-9)
