"""MindSpore models against transformers: same weights, same numpy batch from vltune's own data pipeline.

fp32 on CPU. Logits are compared at real (unpadded) positions; the loss is the summed next-token CE
over the batch divided by its trained tokens, computed by each backend's own loss function.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
torch = pytest.importorskip("torch")

from vltune.backends.mindspore.models import ModelInputs, load_model  # noqa: E402
from vltune.backends.mindspore.loss import token_loss_sum  # noqa: E402
from vltune.backends.torch.batch import to_model_inputs, to_tensor  # noqa: E402
from vltune.backends.torch.models import load_model as load_torch_model  # noqa: E402
from vltune.backends.torch.loss import token_loss_sum as torch_token_loss_sum  # noqa: E402
from vltune.data.collate import Collator  # noqa: E402
from vltune.data.dataset import SFTDataset  # noqa: E402
from vltune.data.formats import load_samples  # noqa: E402
from vltune.data.synthetic_corpus import write_format_corpus  # noqa: E402

LOSS_TOL = 1e-5
LOGITS_REL_TOL = 1e-4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The first sample of each kind (single, multi, video, text, image_video, ...) of the format corpus."""
    files = write_format_corpus(tmp_path_factory.mktemp("ms_corpus"), num_samples=17, seed=0)
    samples = [s for f in files for s in load_samples(f)]
    first = {}
    for s in samples:
        first.setdefault(s.id.split("-")[0], s)
    return first


def _dataset(corpus, model_dir):
    return SFTDataset(list(corpus.values()), model_dir, max_length=4096, max_pixels=50176, min_pixels=3136)


def _batch(corpus, dataset, kinds, circle_rope=None):
    index = {s.id.split("-")[0]: i for i, s in enumerate(dataset.samples)}
    collate = Collator(dataset.info, dataset.tokenizer.pad_token_id, circle_rope)
    return collate([dataset[index[k]] for k in kinds])


def _compare(ms_model, torch_model, batch, circle=None):
    logits = ms_model(ModelInputs.from_batch(batch, ms_model.cfg))
    ms_loss = float(token_loss_sum(logits, ms.Tensor(batch["labels"].astype(np.int32))).asnumpy())
    with torch.no_grad():
        alt = batch.get("position_ids_alt")
        ctx = circle.alt_positions(to_tensor(alt, torch.device("cpu"), torch.long)) if circle is not None else nullcontext()
        with ctx:
            ref = torch_model(**to_model_inputs(batch, torch.device("cpu"), model=torch_model), use_cache=False).logits
        ref_loss = float(torch_token_loss_sum(ref, torch.as_tensor(batch["labels"]))[0])
    n = int((batch["labels"][:, 1:] != -100).sum())
    real = batch["attention_mask"].astype(bool)
    got, want = logits.asnumpy()[real], ref.numpy()[real]
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    return abs(ms_loss - ref_loss) / n, rel


# Each case: the kinds of samples in one padded batch.
QWEN2_5_CASES = {
    "text_only": ["text"],
    "image": ["single"],
    "video": ["video"],
    "padded_images_video_text": ["single", "video", "text", "multi"],
    "image_and_video_in_one_sample": ["image_video"],
}


@pytest.mark.parametrize("case", list(QWEN2_5_CASES))
def test_qwen2_5_vl_matches_transformers(tiny_model_dirs, corpus, case):
    model_dir = tiny_model_dirs["qwen2_5_vl"]
    ms_model, torch_model = _models(model_dir)
    batch = _batch(corpus, _dataset(corpus, model_dir), QWEN2_5_CASES[case])
    loss_diff, rel = _compare(ms_model, torch_model, batch)
    assert loss_diff <= LOSS_TOL and rel <= LOGITS_REL_TOL, (case, loss_diff, rel)


@pytest.mark.parametrize("kinds", [["single", "text"], ["video", "multi"]])
def test_qwen3_vl_matches_transformers(tiny_model_dirs, corpus, kinds):
    """Deepstack taps, interleaved M-RoPE, per-head q/k norms, the learned position grid, per-frame videos."""
    model_dir = tiny_model_dirs["qwen3_vl"]
    ms_model, torch_model = _models(model_dir)
    loss_diff, rel = _compare(ms_model, torch_model, _batch(corpus, _dataset(corpus, model_dir), kinds))
    assert loss_diff <= LOSS_TOL and rel <= LOGITS_REL_TOL, (kinds, loss_diff, rel)


def test_circle_rope_age_strategy_4_matches_torch_adapter(tiny_model_dirs, corpus):
    """Even layers rotate by the Circle-RoPE ids, odd ones by the plain M-RoPE ids (position_ids_alt)."""
    from vltune.backends.torch.models.circle_rope import CircleRopeAdapter
    from vltune.core.circle_rope import age_layer_mask
    from vltune.core.config import CIRCLE_ROPE_DEFAULTS

    model_dir = tiny_model_dirs["qwen2_5_vl"]
    circle = {**CIRCLE_ROPE_DEFAULTS, "AGE_mode": "strategy_4"}
    ms_model, torch_model = _models(model_dir)
    ms_model.model.language_model.set_alt_layers(age_layer_mask("strategy_4", ms_model.cfg.text.num_hidden_layers))
    adapter = CircleRopeAdapter(torch_model, circle)
    batch = _batch(corpus, _dataset(corpus, model_dir), ["single", "video", "text"], circle_rope=circle)
    assert "position_ids_alt" in batch and np.issubdtype(batch["position_ids"].dtype, np.floating)
    loss_diff, rel = _compare(ms_model, torch_model, batch, circle=adapter)
    assert loss_diff <= LOSS_TOL and rel <= LOGITS_REL_TOL, (loss_diff, rel)
    # The alt ids matter: without them the M-RoPE layer would see circle ids and the logits would move.
    plain = dict(batch, position_ids_alt=batch["position_ids"])
    assert not np.allclose(ms_model(ModelInputs.from_batch(plain, ms_model.cfg)).asnumpy(),
                           ms_model(ModelInputs.from_batch(batch, ms_model.cfg)).asnumpy())


def _models(model_dir):
    """Fresh models per test (cheap: the tiny weights load in milliseconds)."""
    return load_model(model_dir), load_torch_model(model_dir).eval()


def test_released_qwen2_vl_config_reads_to_the_towers_sizes():
    """Qwen2-VL-2B-Instruct's config.json as released (flat text keys, rope_scaling, a vision config that
    names its width `embed_dim`, its MLP `mlp_ratio`, the merger's output `hidden_size`, and no
    hidden_act): the sizes transformers builds, quick-GELU and Qwen2's rope defaults."""
    from vltune.backends.mindspore.models.config import VLConfig

    cfg = VLConfig.from_dict({
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "vocab_size": 151936,
        "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "image_token_id": 151655, "video_token_id": 151656,
        "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3, "hidden_size": 1536,
                          "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14, "temporal_patch_size": 2},
    })
    v, t = cfg.vision, cfg.text
    assert (v.hidden_size, v.intermediate_size, v.out_hidden_size, v.num_heads, v.in_channels) == (1280, 5120, 1536, 16, 3)
    assert v.hidden_act == "quick_gelu" and v.patch_size == 14 and v.depth == 32
    assert (t.hidden_size, t.head_dim, t.num_key_value_heads, t.rope_theta, t.mrope_section) == (1536, 128, 2, 1e6, (16, 24, 24))
    assert t.attention_bias and not t.qk_norm and cfg.tie_word_embeddings
