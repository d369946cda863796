"""Kernel choice by device target, and the Ascend kernels' arguments, checked on CPU.

`ops.flash_attention_score` and `ops.rms_norm` have no CPU kernels, so the Ascend path cannot run here.
These tests replace the two primitives by stand-ins that implement their documented semantics (layouts
BNSD / TND, bool mask True = masked, cumulative `actual_seq_qlen`, sparse_mode 3 = causal) in fp32 and
check that a model built with the Ascend kernels computes what the eager CPU path computes, for
padded, packed and vision (windowed) attention. Nothing here has run on an NPU.
"""

from __future__ import annotations

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
from mindspore import Tensor, ops  # noqa: E402

from vltune.backends.mindspore import attention as dispatch  # noqa: E402
from vltune.backends.mindspore.models import ModelInputs, build_model, load_model  # noqa: E402
from vltune.backends.mindspore.models.config import VLConfig  # noqa: E402
from vltune.backends.mindspore.checkpoint import load_hf_weights  # noqa: E402


def test_kernels_follow_the_device_target(monkeypatch):
    assert dispatch.kernels_for("Ascend") == dispatch.Kernels(attention="flash", rms_norm="fused")
    assert dispatch.kernels_for("Ascend").flash_dtype == ms.bfloat16  # the kernel takes only fp16/bf16
    assert dispatch.kernels_for("CPU") == dispatch.Kernels(attention="eager", rms_norm="eager")
    monkeypatch.setattr(ms, "get_context", lambda key: "Ascend")
    assert dispatch.kernels_for().attention == "flash"
    with pytest.raises(ValueError, match="device_target"):
        dispatch.kernels_for("TPU")


def _segments(actual: list[int]) -> list[tuple[int, int]]:
    starts = [0] + list(actual[:-1])
    return list(zip(starts, actual))


class FakeAscend:
    """fp32 stand-ins for the two Ascend-only primitives, recording their calls."""

    def __init__(self):
        self.calls: list[dict] = []

    def flash_attention_score(self, q, k, v, head_num, attn_mask=None, actual_seq_qlen=None, actual_seq_kvlen=None,
                              scalar_value=1.0, next_tokens=2147483647, input_layout="BSH", sparse_mode=0, **unused):
        self.calls.append({"layout": input_layout, "sparse_mode": sparse_mode, "dtype": q.dtype})
        assert q.shape[1] == head_num  # N1 is axis 1 in both BNSD and TND
        qn, kn, vn = (x.asnumpy().astype(np.float64) for x in (q, k, v))
        if input_layout == "TND":
            assert actual_seq_qlen == actual_seq_kvlen and actual_seq_qlen[-1] == qn.shape[0]
            out = np.zeros_like(qn)
            for start, end in _segments(actual_seq_qlen):
                n = end - start
                causal = None
                if sparse_mode == 3:
                    assert attn_mask is not None and tuple(attn_mask.shape) == (2048, 2048) and next_tokens == 0
                    causal = attn_mask.asnumpy()[:n, :n]  # right-down causal: the top-left block when S1 == S2
                else:
                    assert attn_mask is None and sparse_mode == 0
                seg = [x[start:end].transpose(1, 0, 2)[None] for x in (qn, kn, vn)]  # [1, N, S, D]
                out[start:end] = _attend(*seg, scalar_value, causal)[0].transpose(1, 0, 2)
            return Tensor(out.astype(np.float32)).astype(q.dtype)
        assert input_layout == "BNSD" and sparse_mode == 0
        masked = None if attn_mask is None else attn_mask.asnumpy()
        return Tensor(_attend(qn, kn, vn, scalar_value, masked).astype(np.float32)).astype(q.dtype)

    def rms_norm(self, x, gamma, epsilon=1e-6):
        self.calls.append({"rms_norm": True})
        xn = x.asnumpy().astype(np.float64)
        rstd = 1.0 / np.sqrt((xn * xn).mean(-1, keepdims=True) + epsilon)
        return Tensor((xn * rstd * gamma.asnumpy()).astype(np.float32)), Tensor(rstd.astype(np.float32))


def _attend(q, k, v, scale, masked):
    """[B, N1, S, D] x [B, N2, S, D] with N2 dividing N1 (grouped heads), `masked` True = not attended."""
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    scores = q @ k.swapaxes(-1, -2) * scale
    if masked is not None:
        scores = np.where(masked, -np.inf, scores)
    scores -= scores.max(-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(-1, keepdims=True)
    return probs @ v


@pytest.fixture()
def fake_ascend(monkeypatch):
    fake = FakeAscend()
    monkeypatch.setattr(ops, "flash_attention_score", fake.flash_attention_score, raising=False)
    monkeypatch.setattr(ops, "rms_norm", fake.rms_norm, raising=False)
    return fake


def _ascend_model(model_dir):
    """The Ascend kernel choice, but fp32 (CPU cannot do bf16 arithmetic) so results compare to 1e-5."""
    kernels = dispatch.Kernels(attention="flash", rms_norm="fused", flash_dtype=ms.float32)
    model = build_model(VLConfig.from_dir(model_dir), kernels)
    load_hf_weights(model, model_dir)
    return model


def _text_batch(rng, vocab, lengths):
    length = max(lengths)
    ids = np.zeros((len(lengths), length), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(0, 500, n)
        mask[row, :n] = 1
    pos = np.broadcast_to(np.cumsum(mask, 1) - 1, (3, *ids.shape)).clip(0).copy()
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "labels": ids}


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_ascend_path_equals_cpu_path_padded_and_vision(tiny_models, fake_ascend, model_type):
    model_dir = tiny_models[model_type]
    cpu, npu = load_model(model_dir), _ascend_model(model_dir)
    cfg = cpu.cfg
    rng = np.random.default_rng(0)
    # One image of 8x8 patches in row 0 (16 merged tokens): vision attention goes through TND.
    patch = 16 if model_type == "qwen3_vl" else 14
    grid = np.array([[1, 8, 8]])
    batch = _text_batch(rng, cfg.text.vocab_size, [25, 6])
    batch["input_ids"][0, 2:18] = cfg.image_token_id
    batch["pixel_values"] = rng.standard_normal((64, 3 * 2 * patch * patch)).astype(np.float32)
    batch["image_grid_thw"] = grid
    want = cpu(ModelInputs.from_batch(batch, cfg)).asnumpy()
    got = npu(ModelInputs.from_batch(batch, cfg)).asnumpy()
    real = batch["attention_mask"].astype(bool)
    assert np.abs(got[real] - want[real]).max() <= 1e-5 * np.abs(want[real]).max()
    layouts = {(c["layout"], c["sparse_mode"]) for c in fake_ascend.calls if "layout" in c}
    assert layouts == {("BNSD", 0), ("TND", 0)}  # text padded + vision windows/frames
    assert any("rms_norm" in c for c in fake_ascend.calls)


def test_packed_rows_equal_padded_rows_on_both_paths(tiny_model_dirs, fake_ascend):
    """A packed row (cu_seqlens) attends within each sequence only: its logits are the padded rows'."""
    model_dir = tiny_model_dirs["qwen2_5_vl"]
    rng = np.random.default_rng(1)
    padded = _text_batch(rng, 0, [7, 5])
    lengths = [7, 5]
    packed = {
        "input_ids": np.concatenate([padded["input_ids"][r, :n] for r, n in enumerate(lengths)])[None],
        "position_ids": np.concatenate([np.arange(n) for n in lengths])[None, None].repeat(3, 0),
        "cu_seqlens": np.array([0, 7, 12], dtype=np.int32),
    }
    real = padded["attention_mask"].astype(bool)
    for model in (load_model(model_dir), _ascend_model(model_dir)):
        want = model(ModelInputs.from_batch(padded, model.cfg)).asnumpy()[real]
        got = model(ModelInputs.from_batch(packed, model.cfg)).asnumpy()[0]
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert ("TND", 3) in {(c["layout"], c["sparse_mode"]) for c in fake_ascend.calls if "layout" in c}


@pytest.mark.parametrize("model_type", ["ovis2_5", "qwen3_5", "qwen3_5_moe"])
def test_ascend_path_equals_cpu_path_on_a_dataset_batch(tiny_models, vqa_data, fake_ascend, model_type):
    """A family whose batches need the data pipeline's own tokens around each image (Ovis2.5's indicator
    start / end), or whose layers are not all attention (Qwen3.5's Gated DeltaNet layers, the same eager
    kernels on both paths, around gated attention layers and zero-centred fused norms), padded then
    packed: its text attention in BNSD then TND (causal), its tower in TND."""
    from vltune.data.collate import collate_padded
    from vltune.data.dataset import SFTDataset
    from vltune.data.formats import load_samples
    from vltune.data.packing import collate_packed

    model_dir = tiny_models[model_type]
    dataset = SFTDataset(load_samples(vqa_data["train_file"])[:2], model_dir, max_length=512, max_pixels=200 * 200)
    features = [dataset[0], dataset[1]]
    padded = collate_padded(features, dataset.info, dataset.tokenizer.pad_token_id)
    real = padded["attention_mask"].astype(bool)
    cpu, npu = load_model(model_dir), _ascend_model(model_dir)
    want = cpu(ModelInputs.from_batch(padded, cpu.cfg)).asnumpy()[real]
    for batch in (padded, collate_packed(features, dataset.info)):
        got = npu(ModelInputs.from_batch(batch, npu.cfg)).asnumpy()
        got = got[real] if "attention_mask" in batch else got[0]
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    layouts = {(c["layout"], c["sparse_mode"]) for c in fake_ascend.calls if "layout" in c}
    assert layouts == {("BNSD", 0), ("TND", 0), ("TND", 3)}  # padded text, vision segments, packed text
