"""The torch half of MDLM on the tiny models: bidirectional attention, the loss against numpy, the
trainable mask row under LoRA, and the sampler on a real model."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from vltune.backends.torch.mdlm import bidirectional_logits, make_propose  # noqa: E402
from vltune.backends.torch.models import load_model  # noqa: E402
from vltune.backends.torch.engine import Engine as TorchBackend  # noqa: E402
from vltune.core.config import MdlmArgs, ModelArgs, TrainArgs  # noqa: E402
from vltune.core.contracts import IGNORE_INDEX  # noqa: E402
from vltune.core.mdlm import MdlmObjective, maskable_positions, masked_batch  # noqa: E402
from vltune.core.mdlm_sampler import SamplerSettings, diffusion_generate  # noqa: E402
from vltune.data.collate import collate_padded  # noqa: E402
from vltune.data.dataset import SFTDataset  # noqa: E402
from vltune.data.formats import load_samples  # noqa: E402
from vltune.data.mdlm_tokens import resolve_mdlm_tokens  # noqa: E402


def _objective(model_dir, **kw) -> MdlmObjective:
    tokens = resolve_mdlm_tokens(model_dir)
    return MdlmObjective(MdlmArgs(**kw), tokens.mask_token_id, tokens.protected_ids, tokens.end_token_ids, tokens.pad_token_id)


@pytest.fixture(scope="module")
def data(tiny_model_dirs, vqa_data):
    """Per family: the dataset and a right-padded batch of 3 samples with images."""
    out = {}
    for family, model_dir in tiny_model_dirs.items():
        dataset = SFTDataset(load_samples(vqa_data["train_file"])[:3], model_dir, max_length=512, max_pixels=12544)
        batch = collate_padded([dataset[i] for i in range(3)], dataset.info, dataset.tokenizer.pad_token_id)
        out[family] = (dataset, batch)
    return out


def _backend(model_dir, info, objective=None, attn="sdpa", **model_kw) -> TorchBackend:
    args = ModelArgs(model_name_or_path=str(model_dir), **model_kw)
    return TorchBackend(load_model(model_dir, attn_implementation=attn), model_dir, info, args, TrainArgs(learning_rate=1e-2), mdlm=objective)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("padded", [True, False])
def test_a_later_token_changes_earlier_logits_only_under_mdlm(tiny_model_dirs, data, family, attn, padded):
    """`padded=False` is the trap: an all-ones mask that transformers would drop, leaving SDPA causal."""
    dataset, batch = data[family]
    if not padded:
        n = int(batch["attention_mask"][0].sum())
        batch = {k: (v[:, :1, :n] if k.startswith("position_ids") else v[:1, :n]) if k in ("input_ids", "labels", "attention_mask", "position_ids") else v for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"][: int(batch["image_grid_thw"][0].prod())]
        batch["image_grid_thw"] = batch["image_grid_thw"][:1]
    last = int(batch["attention_mask"][0].sum()) - 1
    earlier = int(np.flatnonzero(batch["labels"][0] != IGNORE_INDEX)[0]) - 1  # a prompt position before the answer
    changed = {**batch, "input_ids": batch["input_ids"].copy()}
    changed["input_ids"][0, last] = 5 if batch["input_ids"][0, last] != 5 else 6
    model_dir = tiny_model_dirs[family]
    for objective in (None, _objective(model_dir)):
        backend = _backend(model_dir, dataset.info, objective, attn)
        with torch.no_grad():
            a, b = backend._logits(batch)[0, earlier], backend._logits(changed)[0, earlier]
        diff = float((a - b).abs().max())
        if objective is None:
            assert diff == 0.0, f"ar: a later token changed position {earlier}'s logits by {diff}"
        else:
            assert diff > 1e-4, f"mdlm: position {earlier} did not see the later token (diff {diff})"
            assert all(not layer.self_attn.is_causal for layer in backend.base.model.language_model.layers)


@pytest.mark.parametrize("normalization", ["sequence", "token", "batch"])
def test_loss_equals_a_direct_numpy_computation(tiny_model_dirs, data, normalization):
    model_dir = tiny_model_dirs["qwen2_5_vl"]
    dataset, batch = data["qwen2_5_vl"]
    objective = _objective(model_dir, loss_normalization=normalization)
    maskable = maskable_positions(batch, np.asarray(objective.protected_ids), True)
    masked = maskable & (np.arange(batch["input_ids"].shape[1])[None] % 2 == 0)  # a fixed mask
    masked[np.arange(3), np.argmax(maskable, axis=1)] = True  # at least one per row
    t = np.array([0.3, 0.05, 0.8])
    prepared = masked_batch(batch, t, masked, maskable, mask_token_id=objective.mask_token_id, schedule="linear", normalization=normalization)
    backend = _backend(model_dir, dataset.info, objective)
    loss = float(backend.forward_backward(prepared, 1.0)) / int(prepared["loss_denominator"])
    with torch.no_grad():
        logits = bidirectional_logits(backend.model, prepared, backend.device).double().cpu().numpy()

    # Directly from the formula, on the clean ids, without the batch's loss_weights.
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    ce = -np.take_along_axis(log_probs, batch["input_ids"][..., None], axis=-1)[..., 0]
    per_row = np.array([(ce[i][masked[i]] / t[i]).sum() for i in range(3)])
    lengths = (batch["labels"] != IGNORE_INDEX).sum(axis=1)
    expected = {
        "sequence": (per_row / lengths).sum() / 3,
        "token": per_row.sum() / lengths.sum(),
        "batch": per_row.sum() / 3,
    }[normalization]
    assert loss == pytest.approx(expected, rel=1e-5)


def test_nothing_masked_still_gives_every_trainable_parameter_a_gradient(tiny_model_dirs, data):
    model_dir = tiny_model_dirs["qwen2_5_vl"]
    dataset, batch = data["qwen2_5_vl"]
    objective = _objective(model_dir)
    maskable = maskable_positions(batch, np.asarray(objective.protected_ids), True)
    prepared = masked_batch(batch, np.full(3, 0.5), np.zeros_like(maskable), maskable,
                            mask_token_id=objective.mask_token_id, schedule="linear", normalization="sequence")
    backend = _backend(model_dir, dataset.info, objective)
    assert float(backend.forward_backward(prepared, 1.0)) == 0.0
    assert all(p.grad is not None and float(p.grad.abs().max()) == 0.0 for p in backend.trainable)


def test_lora_trains_the_mask_row_and_saves_it(tiny_model_dirs, data, tmp_path):
    from peft import PeftModel

    model_dir = tiny_model_dirs["qwen3_vl"]
    dataset, batch = data["qwen3_vl"]
    objective = _objective(model_dir)
    backend = _backend(model_dir, dataset.info, objective, train_type="lora", lora_r=4, lora_alpha=8.0,
                       lora_target_modules="q_proj,k_proj,v_proj,o_proj", tune_mm_vision=True)
    names = [n for n, p in backend.model.named_parameters() if p.requires_grad]
    assert not any("visual" in n for n in names)  # freeze_vision / freeze_merger (defaults) win over tune_mm_*
    embed = backend.base.get_input_embeddings()
    ids = torch.tensor([[objective.mask_token_id, 5]], device=backend.device)
    before = embed(ids).detach().clone()
    prepared = objective.mask(batch, np.random.default_rng(0))
    backend.forward_backward(prepared, 1.0 / int(prepared["loss_denominator"]))
    backend.optimizer_step(1.0, 1.0)
    after = embed(ids).detach()
    assert not torch.equal(after[0, 0], before[0, 0]) and torch.equal(after[0, 1], before[0, 1])

    backend.save_model(tmp_path)
    reloaded = PeftModel.from_pretrained(load_model(model_dir), str(tmp_path))
    torch.testing.assert_close(reloaded.to(backend.device).get_input_embeddings()(ids), after, atol=0, rtol=0)
    from tokenizers import Tokenizer

    assert (tmp_path / "mdlm.json").exists()
    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).token_to_id("<|mask|>") == objective.mask_token_id


def test_sampler_on_the_model(tiny_model_dirs, data):
    model_dir = tiny_model_dirs["qwen2_5_vl"]
    dataset, _ = data["qwen2_5_vl"]
    objective = _objective(model_dir)
    backend = _backend(model_dir, dataset.info, objective)
    prompts = collate_padded([dataset.prompt(i)[0] for i in range(2)], dataset.info, dataset.tokenizer.pad_token_id, "left")
    propose = make_propose(backend.model, objective.mask_token_id)

    def run(settings, seed=0, on_step=None, ends=(-1,)):
        return diffusion_generate(propose, prompts, settings, mask_token_id=objective.mask_token_id,
                                  end_token_ids=ends, rng=np.random.default_rng(seed), on_step=on_step)

    after = []
    out = run(SamplerSettings(5, block_length=1, steps=5), on_step=after.append)
    assert [int((g == objective.mask_token_id).sum(axis=1).max()) for g in after] == [4, 3, 2, 1, 0]
    assert all(len(row) == 5 and objective.mask_token_id not in row for row in out)
    assert run(SamplerSettings(6, block_length=3)) == run(SamplerSettings(6, block_length=3))  # temperature 0
    hot = SamplerSettings(6, block_length=3, temperature=1.0)
    assert run(hot, seed=1) == run(hot, seed=1)
    assert backend.generate(prompts, 4) == run(SamplerSettings(4, block_length=32), ends=objective.end_token_ids)
