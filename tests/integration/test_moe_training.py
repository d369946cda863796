"""The MoE families end to end on their tiny models (4 experts, top 2; Qwen3-VL-MoE, Qwen3.5-MoE): the loss with the router's
load-balancing term equals transformers' own `outputs.loss`; LoRA adapts the fused experts; DDP, ZeRO-3
and FSDP2 on 2 CPU processes reproduce the single-process loss curve.

The load-balancing loss is a statistic of each micro-batch (expert shares over its tokens), so the
single-process reference runs the same micro-batches as the ranks: one sample each, four per step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")

from vltune.backends.torch.batch import to_model_inputs  # noqa: E402
from vltune.backends.torch.models import load_model  # noqa: E402
from vltune.backends.torch.engine import Engine as TorchBackend  # noqa: E402
from vltune.core.config import ConfigError, ModelArgs, TrainArgs  # noqa: E402
from vltune.core.recipe import load_recipe  # noqa: E402
from vltune.core.contracts import loss_denominator  # noqa: E402
from vltune.core.families import FAMILIES  # noqa: E402
from vltune.data.collate import Collator  # noqa: E402
from vltune.data.dataset import SFTDataset  # noqa: E402
from vltune.data.formats import load_samples  # noqa: E402

MOE_FAMILIES = sorted(name for name, spec in FAMILIES.items() if spec.modules.moe_block)
STEPS, SEED, TOL = 6, 3, 1e-4
RUN_TIMEOUT_S = 300


@pytest.fixture(scope="module", params=MOE_FAMILIES)
def moe_family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def moe_dir(tiny_models, moe_family) -> Path:
    return tiny_models[moe_family]


@pytest.fixture(scope="module")
def padded_batch(moe_dir, vqa_data):
    samples = load_samples(vqa_data["train_file"])[:3]
    dataset = SFTDataset(samples, moe_dir, max_length=4096, max_pixels=200 * 200)
    features = [dataset[i] for i in range(3)]
    assert len({len(f.input_ids) for f in features}) > 1, "rows of different lengths: the batch is padded"
    return dataset, Collator(dataset.info, dataset.tokenizer.pad_token_id)(features)


def test_loss_with_router_aux_equals_transformers(moe_dir, padded_batch):
    dataset, batch = padded_batch
    backend = TorchBackend(load_model(moe_dir), moe_dir, dataset.info, ModelArgs(model_name_or_path=str(moe_dir)), TrainArgs())
    assert backend.router_aux_coef == pytest.approx(0.001)
    loss_sum, n = backend.eval_loss(batch)
    assert n == loss_denominator(batch)
    reference = load_model(moe_dir).eval()
    inputs = to_model_inputs(batch, torch.device("cpu"), model=reference)
    with torch.no_grad():
        out = reference(**inputs, labels=torch.as_tensor(batch["labels"]), output_router_logits=True, use_cache=False)
        plain = reference(**inputs, labels=torch.as_tensor(batch["labels"]), use_cache=False).loss
    assert abs(loss_sum / n - float(out.loss)) <= 1e-5
    # the aux term is really in there (and bigger than the tolerance): without it the CE alone remains
    assert float(out.loss) - float(plain) == pytest.approx(0.001 * float(out.aux_loss), rel=1e-4)
    assert 0.001 * float(out.aux_loss) > 100 * 1e-5


def test_training_step_logs_the_aux_loss(moe_dir, padded_batch):
    dataset, batch = padded_batch
    backend = TorchBackend(load_model(moe_dir), moe_dir, dataset.info, ModelArgs(model_name_or_path=str(moe_dir)), TrainArgs())
    backend.forward_backward(batch, 1.0 / loss_denominator(batch))
    router = [p for n, p in backend.model.named_parameters() if n.endswith("mlp.gate.weight")]
    assert router and all(p.grad is not None and p.grad.abs().sum() > 0 for p in router)
    metrics = backend.step_metrics()
    assert set(metrics) == {"aux_loss"} and 1.0 < metrics["aux_loss"] < 4.0  # top-2 of 4: 2.0 when balanced
    assert backend.step_metrics() == {}  # read once per logged window


def test_lora_adapts_the_fused_experts(moe_dir):
    from vltune.backends.torch.lora import apply_lora

    model = apply_lora(load_model(moe_dir), ModelArgs(train_type="lora", lora_dropout=0.0))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".mlp.experts." in n and "lora_A" in n for n in trained), trained
    assert any("q_proj.lora_A" in n for n in trained)
    with pytest.raises(ValueError, match="lora_dropout"):
        apply_lora(load_model(moe_dir), ModelArgs(train_type="lora", lora_dropout=0.05))
    attention_only = apply_lora(load_model(moe_dir), ModelArgs(train_type="lora", lora_dropout=0.05, lora_target_parameters="none"))
    assert not any(".mlp.experts." in n for n, p in attention_only.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="no parameter of the decoder layers"):
        apply_lora(load_model(moe_dir), ModelArgs(train_type="lora", lora_dropout=0.0, lora_target_parameters="mlp.experts.nope"))


def test_recipe_refuses_dropout_with_expert_lora_before_loading(moe_dir, moe_family):
    with pytest.raises(ConfigError, match=f"lora_dropout: 0.05 with LoRA on {moe_family}"):
        load_recipe({"model_name_or_path": str(moe_dir), "dataset_use": "x.jsonl", "train_type": "lora", "model_type": moe_family})


def _losses(out_dir: Path) -> list[float]:
    return [row["loss"] for row in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in row]


@pytest.fixture(scope="module")
def moe_recipe(mixed_jsonl, moe_dir) -> Path:
    data = mixed_jsonl(24)
    recipe = {
        "model_name_or_path": str(moe_dir), "dataset_use": str(data), "max_pixels": 12544, "model_max_length": 512,
        "max_steps": STEPS, "learning_rate": 1e-3, "lr_scheduler_type": "constant", "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 2, "logging_steps": 1, "seed": SEED, "tune_mm_vision": True,
    }
    (data.parent / "moe.yaml").write_text(yaml.safe_dump(recipe))
    return data.parent / "moe.yaml"


def _vltune_train(recipe: Path, out_dir: Path, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "vltune.cli", "train", str(recipe), "--output_dir", str(out_dir), "--no-progress", *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


@pytest.fixture(scope="module")
def single_moe_run(moe_recipe, tmp_path_factory) -> Path:
    """One process, the ranks' micro-batches one after another: 1 sample each, 4 per step."""
    from vltune.training import train

    out = tmp_path_factory.mktemp("moe_single") / "out"
    train(str(moe_recipe), {"gradient_accumulation_steps": 4, "output_dir": str(out)}, show_progress=False)
    return out


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
@pytest.mark.parametrize("engine", [[], ["--deepspeed", "zero3"], ["--fsdp", "true"]], ids=["ddp", "zero3", "fsdp"])
def test_two_ranks_match_one_process(engine, moe_recipe, single_moe_run, tmp_path):
    out = tmp_path / "out"
    _vltune_train(moe_recipe, out, "--nproc", "2", *engine)
    expected, got = _losses(single_moe_run), _losses(out)
    assert len(got) == STEPS
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("aux_loss" in r for r in rows if "loss" in r)


def test_mdlm_loss_carries_the_router_aux(moe_dir, moe_family, padded_batch):
    """objective mdlm on an MoE model: the weighted masked CE plus coef * aux over the unpadded tokens."""
    if not FAMILIES[moe_family].capabilities.mdlm:
        pytest.skip(f"{moe_family} does not offer MDLM")
    from vltune.core.config import MdlmArgs
    from vltune.core.mdlm import MdlmObjective
    from vltune.data.mdlm_tokens import resolve_mdlm_tokens

    dataset, batch = padded_batch
    tokens = resolve_mdlm_tokens(moe_dir)
    objective = MdlmObjective(MdlmArgs(), tokens.mask_token_id, tokens.protected_ids, tokens.end_token_ids, tokens.end_token_ids[0])
    args = ModelArgs(model_name_or_path=str(moe_dir))
    backend = TorchBackend(load_model(moe_dir), moe_dir, dataset.info, args, TrainArgs(objective="mdlm"), mdlm=objective)
    masked = objective.mask_for_eval(batch)
    with_aux, n = backend.eval_loss(masked)
    aux = float(backend._router_aux)
    backend.router_aux_coef = 0.0
    without, _ = backend.eval_loss(masked)
    assert 1.0 < aux < 4.0 and with_aux - without == pytest.approx(0.001 * aux * n, rel=1e-4)
