"""Every module-map path resolves on the tiny model, the roles partition the parameters as the model's
own structure says, and the default LoRA targets adapt every decoder layer."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def test_every_module_map_path_resolves(spec, torch_model):
    for role, path in spec.modules.all_paths().items():
        module = torch_model.get_submodule(path)  # raises AttributeError on a wrong path
        assert isinstance(module, torch.nn.Module), role
    assert len(torch_model.get_submodule(spec.modules.decoder_layers)) == torch_model.config.get_text_config().num_hidden_layers
    assert torch_model.get_submodule(spec.modules.embeddings) is torch_model.get_input_embeddings()
    assert torch_model.get_submodule(spec.modules.head) is torch_model.get_output_embeddings()


def test_component_roles_follow_the_tower(spec, torch_model):
    """merger = under a projector, vision = the rest of the tower, llm = everything else."""
    tower = spec.modules.vision_tower
    for name, _ in torch_model.named_parameters():
        role = spec.modules.component_of(name)
        under = lambda path: name.startswith(path + ".")  # noqa: E731
        if any(under(p) for p in spec.modules.projectors):
            assert role == "merger", name
        elif under(tower):
            assert role == "vision", name
        else:
            assert role == "llm", name
    # the same rule on peft's names
    assert spec.modules.component_of(f"base_model.model.{spec.modules.projectors[0]}.modules_to_save.default.x") == "merger"


def test_default_lora_targets_adapt_every_decoder_layer(spec, model_dir):
    pytest.importorskip("peft")
    from vltune.backends.torch.lora import apply_lora
    from vltune.backends.torch.models import load_model
    from vltune.core.config import ModelArgs

    # lora_dropout 0: peft adapts fused parameters (an MoE family's experts) only without dropout
    model = apply_lora(load_model(model_dir), ModelArgs(train_type="lora", tune_mm_mlp=True, lora_dropout=0.0))
    layers = model.get_base_model().get_submodule(spec.modules.decoder_layers)
    targets, everywhere = set(spec.modules.lora_targets), set()
    for i, layer in enumerate(layers):
        adapted = {n.rsplit(".", 1)[-1] for n, m in layer.named_modules() if hasattr(m, "lora_A")}
        # a hybrid model's layer has one token mixer (attention or Gated DeltaNet): its own targets, the MLP's
        assert adapted & targets, (i, adapted)
        mixer = "self_attn" if hasattr(layer, "self_attn") else spec.modules.linear_attention
        mixer_targets = {n.rsplit(".", 1)[-1] for n, _ in layer.get_submodule(mixer).named_modules()} & targets
        assert mixer_targets and mixer_targets <= adapted, (i, mixer_targets - adapted)
        everywhere |= adapted
    assert targets <= everywhere, targets - everywhere
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    for target in spec.modules.lora_target_parameters:  # fused weights: adapters on the module that holds them
        holder = target.rsplit(".", 1)[0]
        assert sum(f".{holder}." in n and "lora_A" in n for n in trained) >= len(layers), target
    assert any("lora_" in n for n in trained)
    assert any(spec.modules.component_of(n) == "merger" for n in trained)
