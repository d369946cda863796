"""Packed rows (data/packing.py's cu_seqlens batches) and the MDLM objective: MindSpore against the torch side."""

from __future__ import annotations

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
torch = pytest.importorskip("torch")

from vltune.backends.mindspore.loss import token_loss_sum  # noqa: E402
from vltune.backends.mindspore.models import ModelInputs, load_model  # noqa: E402
from vltune.backends.torch.batch import to_model_inputs  # noqa: E402
from vltune.backends.torch.models import load_model as load_torch_model  # noqa: E402
from vltune.backends.torch.loss import token_loss_sum as torch_token_loss_sum  # noqa: E402
from vltune.core.config import ModelArgs, TrainArgs  # noqa: E402
from vltune.data.collate import collate_padded  # noqa: E402
from vltune.data.dataset import SFTDataset  # noqa: E402
from vltune.data.formats import load_samples  # noqa: E402


@pytest.fixture(scope="module")
def features(tiny_qwen2_5_vl, vqa_data):
    samples = load_samples(vqa_data["train_file"])[:3]
    dataset = SFTDataset(samples, tiny_qwen2_5_vl, max_length=512, max_pixels=12544)
    return [dataset[i] for i in range(3)], dataset


def test_packed_row_matches_transformers_on_the_padded_batch(tiny_qwen2_5_vl, features):
    packing = pytest.importorskip("vltune.data.packing")
    feats, dataset = features
    packed = packing.collate_packed(feats, dataset.info)
    padded = collate_padded(feats, dataset.info, dataset.tokenizer.pad_token_id)
    model = load_model(tiny_qwen2_5_vl)
    logits = model(ModelInputs.from_batch(packed, model.cfg))
    ms_loss = float(token_loss_sum(logits, ms.Tensor(packed["labels"].astype(np.int32))).asnumpy())
    reference = load_torch_model(tiny_qwen2_5_vl).eval()
    with torch.no_grad():
        ref = reference(**to_model_inputs(padded, torch.device("cpu"), model=reference), use_cache=False).logits
        ref_loss = float(torch_token_loss_sum(ref, torch.as_tensor(padded["labels"]))[0])
    want = ref.numpy()[padded["attention_mask"].astype(bool)]  # the real tokens, row by row = the packed order
    got = logits.asnumpy()[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    n = int((padded["labels"][:, 1:] != -100).sum())
    assert int((packed["labels"][:, 1:] != -100).sum()) == n
    assert abs(ms_loss - ref_loss) / n <= 1e-5


def _objective(model_dir):
    from vltune.core.config import MdlmArgs
    from vltune.core.mdlm import MdlmObjective
    from vltune.data.mdlm_tokens import resolve_mdlm_tokens

    tokens = resolve_mdlm_tokens(model_dir, "<|mask|>")
    return MdlmObjective(MdlmArgs(), tokens.mask_token_id, tokens.protected_ids, tokens.end_token_ids, tokens.end_token_ids[0], seed=3)


def test_mdlm_loss_and_gradient_step_match_torch(tiny_qwen2_5_vl, features):
    """The same core-masked batch: bidirectional forward + 1/t-weighted CE, MindSpore vs torch, within 1e-5."""
    from vltune.backends.mindspore.engine import Engine as MindSporeBackend
    from vltune.backends.torch.engine import Engine as TorchBackend

    feats, dataset = features
    objective = _objective(tiny_qwen2_5_vl)
    batch = objective.mask(collate_padded(feats, dataset.info, dataset.tokenizer.pad_token_id), np.random.default_rng(0))
    assert (batch["input_ids"] == objective.mask_token_id).any()
    args = ModelArgs(model_name_or_path=str(tiny_qwen2_5_vl))
    ms_backend = MindSporeBackend(load_model(tiny_qwen2_5_vl), tiny_qwen2_5_vl, dataset.info, args, TrainArgs(), mdlm=objective)
    torch_backend = TorchBackend(load_torch_model(tiny_qwen2_5_vl), tiny_qwen2_5_vl, dataset.info, args, TrainArgs(), mdlm=objective)
    denominator = float(batch["loss_denominator"])
    (ms_loss, ms_n), (torch_loss, torch_n) = ms_backend.eval_loss(batch), torch_backend.eval_loss(batch)
    assert ms_n == torch_n
    assert abs(ms_loss - torch_loss) / denominator <= 1e-5
    assert abs(ms_backend.forward_backward(batch, 1.0) - float(torch_backend.forward_backward(batch, 1.0))) / denominator <= 1e-5


def test_mdlm_attention_is_bidirectional(tiny_qwen2_5_vl):
    """Changing a later token changes an earlier position's logits only under causal=False."""
    model = load_model(tiny_qwen2_5_vl)
    ids = np.arange(20, 32, dtype=np.int64)[None]
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    changed = dict(batch, input_ids=ids.copy())
    changed["input_ids"][0, -1] = 7
    for causal, moves in ((True, False), (False, True)):
        a = model(ModelInputs.from_batch(batch, model.cfg, causal=causal)).asnumpy()[0, 2]
        b = model(ModelInputs.from_batch(changed, model.cfg, causal=causal)).asnumpy()[0, 2]
        assert (not np.allclose(a, b)) == moves
