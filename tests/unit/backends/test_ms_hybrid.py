"""The hybrid families (Gated DeltaNet layers beside attention: Qwen3.5 dense and MoE) on the MindSpore
engine: generation with the recurrent cache, LoRA, Circle-RoPE and recompute (`vltune train` against
the torch engine step by step is in test_ms_demo.py).

The per-batch parity (padded and packed logits and loss, the weight round trip) runs in the family
conformance suite (tests/families/test_family_mindspore_parity.py); the kernels in
tests/unit/ops/test_ms_gated_delta.py; the MoE router loss in test_ms_moe.py.
"""

from __future__ import annotations

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
torch = pytest.importorskip("torch")

from vltune.core.families import family_names, get_family  # noqa: E402

HYBRID = [name for name in family_names("mindspore") if get_family(name).modules.linear_attention]


def test_hybrid_families_have_mindspore_models():
    assert {"qwen3_5", "qwen3_5_moe"} <= set(HYBRID)


@pytest.mark.parametrize("model_type", HYBRID)
def test_greedy_generation_with_the_recurrent_cache_equals_torch(tiny_models, tmp_path, model_type):
    """Four image prompts in one left-padded batch, decoded with the cache (each recurrent layer's conv
    window and state carried from the prefill through every step) and without it: the same greedy ids as
    torch decoding each prompt alone. The random tiny model never stops: 32 decisions compared."""
    from vltune.backends.mindspore.generate import end_token_ids, generate
    from vltune.backends.mindspore.models import load_model
    from vltune.backends.torch.generate import generate as torch_generate
    from vltune.core.generation import GenerationSettings
    from vltune.data.collate import Collator
    from vltune.data.formats import load_samples
    from vltune.data.synthetic import SyntheticVQAConfig, generate_vqa_dataset
    from vltune.inference import Predictor

    data = generate_vqa_dataset(tmp_path, SyntheticVQAConfig(num_train=1, num_eval=4, tasks=("color", "shape"), seed=3))
    samples, model_dir, greedy = load_samples(data["eval_file"]), tiny_models[model_type], GenerationSettings(max_new_tokens=8)
    predictor = Predictor(model_dir, max_pixels=12544, settings=greedy)
    dataset = predictor.dataset(samples)
    collate = Collator(dataset.info, dataset.tokenizer.pad_token_id)
    want = [torch_generate(predictor.model, collate([dataset.prompt(i)[0]], padding_side="left"), dataset.info, greedy)[0]
            for i in range(len(samples))]
    ms.set_context(mode=ms.PYNATIVE_MODE)
    model = load_model(model_dir)
    batch = collate([dataset.prompt(i)[0] for i in range(len(samples))], padding_side="left")
    assert len({int(n) for n in batch["attention_mask"].sum(1)}) > 1  # the rows really are padded differently
    ends = end_token_ids(model_dir, model.cfg)
    assert generate(model, batch, ends, greedy) == want
    assert generate(model, batch, ends, greedy, use_cache=False) == want
    assert sum(len(row) for row in want) == 4 * 8


@pytest.mark.parametrize("model_type", HYBRID)
def test_lora_on_the_recurrent_layers_is_peft_format(tiny_models, vqa_data, tmp_path, model_type):
    """A MindSpore LoRA whose targets include the Gated DeltaNet's projections (in_proj_qkv|z|b|a,
    out_proj), trained one step and saved as PEFT: peft loads it onto transformers and gives the MindSpore
    model's logits. The MoE family adapts its attention, recurrent and shared-expert layers (its fused
    routed experts are torch-only: lora_target_parameters none)."""
    from peft import PeftModel

    from vltune.backends.mindspore.engine import Engine
    from vltune.backends.mindspore.models import ModelInputs, load_model
    from vltune.backends.torch.batch import to_model_inputs
    from vltune.backends.torch.models import load_model as load_torch_model
    from vltune.core.config import ModelArgs, TrainArgs
    from vltune.data.collate import collate_padded
    from vltune.data.dataset import SFTDataset
    from vltune.data.formats import load_samples

    model_dir = tiny_models[model_type]
    dataset = SFTDataset(load_samples(vqa_data["train_file"])[:2], model_dir, max_length=512, max_pixels=12544)
    data = collate_padded([dataset[0], dataset[1]], dataset.info, dataset.tokenizer.pad_token_id)
    fused = get_family(model_type).modules.lora_target_parameters
    args = ModelArgs(model_name_or_path=str(model_dir), train_type="lora", lora_r=4, lora_dropout=0.0,
                     lora_target_parameters="none" if fused else None)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    engine = Engine(load_model(model_dir), model_dir, dataset.info, args, TrainArgs(learning_rate=1e-2))
    adapted = {p.name.split(".lora_")[0].rsplit(".", 1)[-1] for p in engine.params}
    assert {"in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj", "q_proj"} <= adapted
    assert not any(".experts." in p.name for p in engine.params)
    engine.forward_backward(data, 1.0 / int((data["labels"][:, 1:] != -100).sum()))
    engine.optimizer_step(1.0, 1.0)
    engine.save_model(tmp_path)

    peft_model = PeftModel.from_pretrained(load_torch_model(model_dir), str(tmp_path)).eval()
    with torch.no_grad():
        ref = peft_model(**to_model_inputs(data, torch.device("cpu"), model=peft_model), use_cache=False).logits.numpy()
    engine.model.set_train(False)
    got = engine.model(ModelInputs.from_batch(data, engine.model.cfg)).asnumpy()
    real = data["attention_mask"].astype(bool)
    assert np.abs(got[real] - ref[real]).max() <= 1e-4 * np.abs(ref[real]).max()


def test_circle_rope_age_counts_the_attention_layers_as_torch(tiny_models, vqa_data):
    """Circle-RoPE with AGE strategy_4 on the hybrid model: the mask runs over the attention layers only
    (the recurrent layers have no positions), on MindSpore as on the torch adapter; logits within 1e-4."""
    from vltune.backends.mindspore.models import ModelInputs, load_model
    from vltune.backends.torch.batch import to_model_inputs, to_tensor
    from vltune.backends.torch.models import load_model as load_torch_model
    from vltune.backends.torch.models.circle_rope import CircleRopeAdapter
    from vltune.core.config import CIRCLE_ROPE_DEFAULTS
    from vltune.data.collate import Collator
    from vltune.data.dataset import SFTDataset
    from vltune.data.formats import load_samples

    model_dir = tiny_models["qwen3_5"]
    circle = {**CIRCLE_ROPE_DEFAULTS, "AGE_mode": "strategy_4"}
    dataset = SFTDataset(load_samples(vqa_data["train_file"])[:2], model_dir, max_length=512, max_pixels=12544)
    batch = Collator(dataset.info, dataset.tokenizer.pad_token_id, circle)([dataset[0], dataset[1]])
    assert "position_ids_alt" in batch
    ms.set_context(mode=ms.PYNATIVE_MODE)
    model = load_model(model_dir)
    model.model.language_model.set_age_mode("strategy_4")
    layer_types = model.cfg.text.layer_types
    assert [uses for uses, kind in zip(model.model.language_model.layer_uses_main, layer_types) if kind == "full_attention"] == [True, False]
    torch_model = load_torch_model(model_dir).eval()
    adapter = CircleRopeAdapter(torch_model, circle)
    with torch.no_grad(), adapter.alt_positions(to_tensor(batch["position_ids_alt"], torch.device("cpu"), torch.long)):
        ref = torch_model(**to_model_inputs(batch, torch.device("cpu"), model=torch_model), use_cache=False).logits.numpy()
    got = model(ModelInputs.from_batch(batch, model.cfg)).asnumpy()
    real = batch["attention_mask"].astype(bool)
    assert np.abs(got[real] - ref[real]).max() <= 1e-4 * np.abs(ref[real]).max()
    plain = dict(batch, position_ids_alt=batch["position_ids"])  # the alt ids reach the second attention layer
    assert not np.allclose(model(ModelInputs.from_batch(plain, model.cfg)).asnumpy(), got)


def test_recompute_and_accumulation_give_the_same_gradients(tiny_models, vqa_data):
    """Activation recomputation through the recurrent layers, and two micro-batches accumulated, give the
    whole batch's gradients (the Gated DeltaNet's backward rebuilt from its inputs)."""
    from vltune.backends.mindspore.engine import Engine
    from vltune.backends.mindspore.models import load_model
    from vltune.core.config import ModelArgs, TrainArgs
    from vltune.data.collate import collate_padded
    from vltune.data.dataset import SFTDataset
    from vltune.data.formats import load_samples

    model_dir = tiny_models["qwen3_5"]
    dataset = SFTDataset(load_samples(vqa_data["train_file"])[:2], model_dir, max_length=512, max_pixels=12544)
    features = [dataset[0], dataset[1]]
    collate = lambda fs: collate_padded(fs, dataset.info, dataset.tokenizer.pad_token_id)  # noqa: E731
    whole = collate(features)
    total = int((whole["labels"][:, 1:] != -100).sum())
    ms.set_context(mode=ms.PYNATIVE_MODE)

    def grads(batches, recompute=False):
        engine = Engine(load_model(model_dir), model_dir, dataset.info, ModelArgs(model_name_or_path=str(model_dir), tune_mm_vision=True),
                        TrainArgs(gradient_checkpointing=recompute))
        for batch in batches:
            engine.forward_backward(batch, 1.0 / total)
        return {p.name: g.asnumpy() for p, g in zip(engine.params, engine.grads)}

    reference = grads([whole])
    assert any("linear_attn.A_log" in name and np.abs(g).sum() > 0 for name, g in reference.items())
    for other in (grads([whole], recompute=True), grads([collate(features[:1]), collate(features[1:])])):
        for name, g in reference.items():
            assert np.allclose(g, other[name], atol=1e-6, rtol=1e-4), name
