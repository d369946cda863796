"""The native MindSpore model of a family (where `capabilities.mindspore`) against transformers: the same
tiny weights, the same numpy batch from data/, fp32 on the CPU; the loss of each backend's own loss
function agrees within 1e-5."""

from __future__ import annotations

import numpy as np
import pytest

from vltune.data.collate import Collator
from vltune.data.dataset import SFTDataset
from vltune.data.formats import load_samples

LOSS_TOL = 1e-5


def test_mindspore_loss_equals_torch(spec, model_dir, torch_model, vqa_data):
    if not spec.capabilities.mindspore:
        pytest.skip(f"{spec.name} has no MindSpore model (capabilities.mindspore is False)")
    ms = pytest.importorskip("mindspore")
    import torch

    from vltune.backends.mindspore.loss import token_loss_sum
    from vltune.backends.mindspore.models import ModelInputs, load_model
    from vltune.backends.torch.batch import to_model_inputs
    from vltune.backends.torch.loss import token_loss_sum as torch_token_loss_sum

    samples = load_samples(vqa_data["train_file"])[:3]
    dataset = SFTDataset(samples, model_dir, max_length=4096, max_pixels=200 * 200)
    batch = Collator(dataset.info, dataset.tokenizer.pad_token_id)([dataset[i] for i in range(len(samples))])
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms_model = load_model(model_dir)
    logits = ms_model(ModelInputs.from_batch(batch, ms_model.cfg))
    ms_loss_sum = float(token_loss_sum(logits, ms.Tensor(batch["labels"].astype(np.int32))).asnumpy())
    with torch.no_grad():
        ref = torch_model(**to_model_inputs(batch, torch.device("cpu"), model=torch_model), use_cache=False).logits
        torch_loss_sum, count = torch_token_loss_sum(ref, torch.as_tensor(batch["labels"]))
    assert abs(ms_loss_sum / count - float(torch_loss_sum) / count) <= LOSS_TOL
