"""The MindSpore MoE pieces against transformers: the load-balancing loss on the same router logits, and
each MoE family's tiny model's training loss (CE + coef * aux) on a padded batch, fp32 on the CPU."""

from __future__ import annotations

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
torch = pytest.importorskip("torch")

from vltune.backends.mindspore.loss import load_balancing_loss  # noqa: E402
from vltune.core.families import family_names, get_family  # noqa: E402

MOE = [name for name in family_names("mindspore") if get_family(name).modules.moe_block]


def test_moe_families_are_covered():
    assert {"qwen3_vl_moe", "qwen3_5_moe"} <= set(MOE)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("model_type", MOE)
def test_load_balancing_loss_equals_transformers(masked, model_type):
    import importlib

    load_balancing_loss_func = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}").load_balancing_loss_func

    rng = np.random.default_rng(0)
    layers = [rng.normal(size=(2 * 7, 6)).astype(np.float32) for _ in range(3)]
    mask = (rng.random((2, 7)) < 0.7).astype(np.int64) if masked else None
    theirs = load_balancing_loss_func(tuple(torch.as_tensor(x) for x in layers), 6, 2, None if mask is None else torch.as_tensor(mask))
    ours = load_balancing_loss([ms.Tensor(x) for x in layers], 6, 2, None if mask is None else ms.Tensor(mask))
    assert abs(float(ours.asnumpy()) - float(theirs)) <= 1e-6


@pytest.mark.parametrize("model_type", MOE)
def test_training_loss_equals_transformers(tiny_models, vqa_data, model_type):
    from vltune.backends.mindspore.models import load_model
    from vltune.backends.mindspore.engine import Engine as MindSporeBackend
    from vltune.backends.torch.batch import to_model_inputs
    from vltune.backends.torch.models import load_model as load_torch_model
    from vltune.core.config import ModelArgs, TrainArgs
    from vltune.data.collate import Collator
    from vltune.data.dataset import SFTDataset
    from vltune.data.formats import load_samples

    model_dir = tiny_models[model_type]
    samples = load_samples(vqa_data["train_file"])[:3]
    dataset = SFTDataset(samples, model_dir, max_length=4096, max_pixels=200 * 200)
    batch = Collator(dataset.info, dataset.tokenizer.pad_token_id)([dataset[i] for i in range(3)])
    ms.set_context(mode=ms.PYNATIVE_MODE)
    backend = MindSporeBackend(load_model(model_dir), model_dir, dataset.info, ModelArgs(model_name_or_path=str(model_dir)), TrainArgs())
    loss_sum, n = backend.eval_loss(batch)
    reference = load_torch_model(model_dir).eval()
    with torch.no_grad():
        out = reference(**to_model_inputs(batch, torch.device("cpu"), model=reference), labels=torch.as_tensor(batch["labels"]),
                        output_router_logits=True, use_cache=False)
    assert abs(loss_sum / n - float(out.loss)) <= 1e-5


@pytest.mark.parametrize("model_type", MOE)
def test_training_step_carries_the_router_aux(tiny_models, vqa_data, model_type):
    """A MindSpore training micro-step on the MoE model: the router gets a gradient and aux_loss is logged."""
    from vltune.backends.mindspore.engine import Engine
    from vltune.backends.mindspore.models import load_model
    from vltune.core.config import ModelArgs, TrainArgs
    from vltune.core.contracts import loss_denominator
    from vltune.data.collate import Collator
    from vltune.data.dataset import SFTDataset
    from vltune.data.formats import load_samples

    model_dir = tiny_models[model_type]
    dataset = SFTDataset(load_samples(vqa_data["train_file"])[:2], model_dir, max_length=4096, max_pixels=200 * 200)
    batch = Collator(dataset.info, dataset.tokenizer.pad_token_id)([dataset[0], dataset[1]])
    ms.set_context(mode=ms.PYNATIVE_MODE)
    engine = Engine(load_model(model_dir), model_dir, dataset.info, ModelArgs(model_name_or_path=str(model_dir)), TrainArgs())
    engine.forward_backward(batch, 1.0 / loss_denominator(batch))
    grads = dict(zip((p.name for p in engine.params), engine.grads))
    router = [g for name, g in grads.items() if name.endswith("mlp.gate.weight")]
    assert router and all(float(abs(g).sum().asnumpy()) > 0 for g in router)
    metrics = engine.step_metrics()
    assert set(metrics) == {"aux_loss"} and 1.0 < metrics["aux_loss"] < 4.0
