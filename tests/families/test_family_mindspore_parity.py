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


LOGITS_REL_TOL = 1e-4


@pytest.fixture(scope="module")
def ms_features(spec, model_dir, vqa_data):
    """Three VQA samples (images) of the family's tiny model, tokenized once for the tests below."""
    if not spec.capabilities.mindspore:
        pytest.skip(f"{spec.name} has no MindSpore model (capabilities.mindspore is False)")
    pytest.importorskip("mindspore")
    samples = load_samples(vqa_data["train_file"])[:3]
    dataset = SFTDataset(samples, model_dir, max_length=4096, max_pixels=200 * 200)
    return [dataset[i] for i in range(len(samples))], dataset


def _reference(torch_model, padded):
    """transformers' logits [B, L, V] and summed loss on the padded batch."""
    import torch

    from vltune.backends.torch.batch import to_model_inputs
    from vltune.backends.torch.loss import token_loss_sum as torch_token_loss_sum

    with torch.no_grad():
        ref = torch_model(**to_model_inputs(padded, torch.device("cpu"), model=torch_model), use_cache=False).logits
        return ref.numpy(), float(torch_token_loss_sum(ref, torch.as_tensor(padded["labels"]))[0])


def _ms_forward(model_dir, batch):
    import mindspore as ms

    from vltune.backends.mindspore.loss import token_loss_sum
    from vltune.backends.mindspore.models import ModelInputs, load_model

    ms.set_context(mode=ms.PYNATIVE_MODE)
    model = load_model(model_dir)
    logits = model(ModelInputs.from_batch(batch, model.cfg))
    return logits.asnumpy(), float(token_loss_sum(logits, ms.Tensor(batch["labels"].astype(np.int32))).asnumpy())


def test_mindspore_padded_and_packed_logits_equal_torch(model_dir, torch_model, ms_features):
    """The padded batch, and the same samples packed into one row (cu_seqlens, positions restarting per
    sample, every image's tower segment its own): logits at the real tokens within 1e-4 of the largest,
    loss within 1e-5 -- both against transformers on the padded batch."""
    from vltune.data.collate import collate_padded
    from vltune.data.packing import collate_packed

    features, dataset = ms_features
    padded = collate_padded(features, dataset.info, dataset.tokenizer.pad_token_id)
    packed = collate_packed(features, dataset.info)
    want, ref_loss = _reference(torch_model, padded)
    real = padded["attention_mask"].astype(bool)
    want = want[real]  # the real tokens, row by row: the packed order
    n = int((padded["labels"][:, 1:] != -100).sum())
    assert int((packed["labels"][:, 1:] != -100).sum()) == n
    for name, batch in (("padded", padded), ("packed", packed)):
        got, loss = _ms_forward(model_dir, batch)
        got = got[real] if name == "padded" else got[0]
        rel = float(np.abs(got - want).max() / np.abs(want).max())
        assert rel <= LOGITS_REL_TOL and abs(loss - ref_loss) / n <= LOSS_TOL, (name, rel, abs(loss - ref_loss) / n)


def test_mindspore_round_trip_is_bit_exact(spec, model_dir, tmp_path):
    """HF safetensors -> the native model -> HF: the same names, dtypes and bytes as the source file."""
    if not spec.capabilities.mindspore:
        pytest.skip(f"{spec.name} has no MindSpore model (capabilities.mindspore is False)")
    pytest.importorskip("mindspore")
    from safetensors.numpy import load_file

    from vltune.backends.mindspore import checkpoint
    from vltune.backends.mindspore.models import load_model
    from vltune.core.safetensors_files import weight_files

    checkpoint.save_hf_model(load_model(model_dir), model_dir, tmp_path)
    # every weight file: tensors the model does not load (Qwen3.5's mtp.*) are carried into a file of their own
    before, after = ({k: v for f in weight_files(d) for k, v in load_file(f).items()} for d in (model_dir, tmp_path))
    assert before.keys() == after.keys()
    for name, array in before.items():
        assert array.dtype == after[name].dtype and array.tobytes() == after[name].tobytes(), name


def test_mindspore_video_logits_equal_torch(spec, model_dir, torch_model, tmp_path):
    """A video sample (several temporal patches: the tower attends within each frame group, the text
    positions count frames) beside an image sample: logits within 1e-4 of the largest and the loss within
    1e-5 of transformers on the padded batch."""
    if not spec.capabilities.mindspore:
        pytest.skip(f"{spec.name} has no MindSpore model (capabilities.mindspore is False)")
    pytest.importorskip("mindspore")
    from vltune.data.collate import collate_padded
    from vltune.data.synthetic_corpus import write_format_corpus

    first = {}
    for sample in (s for f in write_format_corpus(tmp_path, num_samples=6, seed=0) for s in load_samples(f)):
        first.setdefault(sample.id.split("-")[0], sample)
    dataset = SFTDataset([first["video"], first["single"]], model_dir, max_length=4096, max_pixels=12544, min_pixels=3136)
    padded = collate_padded([dataset[0], dataset[1]], dataset.info, dataset.tokenizer.pad_token_id)
    assert "pixel_values_videos" in padded and int(np.asarray(padded["video_grid_thw"])[:, 0].min()) >= 2
    want, ref_loss = _reference(torch_model, padded)
    got, loss = _ms_forward(model_dir, padded)
    real = padded["attention_mask"].astype(bool)
    n = int((padded["labels"][:, 1:] != -100).sum())
    rel = float(np.abs(got[real] - want[real]).max() / np.abs(want[real]).max())
    assert rel <= LOGITS_REL_TOL and abs(loss - ref_loss) / n <= LOSS_TOL, (rel, abs(loss - ref_loss) / n)
