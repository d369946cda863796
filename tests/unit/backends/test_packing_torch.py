"""Packed rows on the tiny models: exactly the samples run one by one (losses, gradients, isolation)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("av")  # the corpus has videos

import torch.nn.functional as F  # noqa: E402

from vltune.backends.torch.batch import to_model_inputs  # noqa: E402
from vltune.backends.torch.models import load_model, model_entry, part  # noqa: E402
from vltune.backends.torch.attention import enable_varlen, vision_attention_modules  # noqa: E402
from vltune.backends.torch.engine import Engine as TorchBackend  # noqa: E402
from vltune.core.config import CIRCLE_ROPE_DEFAULTS, ModelArgs, TrainArgs  # noqa: E402
from vltune.core.contracts import count_trained_tokens  # noqa: E402
from vltune.core.families import FAMILIES, family_names  # noqa: E402
from vltune.data.collate import Collator  # noqa: E402
from vltune.data.dataset import SFTDataset  # noqa: E402
from vltune.data.formats import read_annotation  # noqa: E402
from vltune.data.packing import collate_packed  # noqa: E402
from vltune.data.synthetic_corpus import write_format_corpus  # noqa: E402

MIXED = ("single-0", "video-2", "text-3", "image_video-9", "multi-1")
"""Image, video, text-only, video + image, two images: every vision path in one row."""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    files = write_format_corpus(tmp_path_factory.mktemp("corpus"), num_samples=20, seed=0)
    samples = [s for f in files for s in read_annotation(f).samples]
    return {s.id: s for s in samples}


def _features(corpus, model_dir, ids=MIXED):
    dataset = SFTDataset([corpus[i] for i in ids], model_dir, max_length=4096, max_pixels=28 * 28 * 16)
    return dataset, [dataset[i] for i in range(len(ids))]


def _backend(model_dir, info, circle_rope=None) -> TorchBackend:
    args = ModelArgs(model_name_or_path=str(model_dir), tune_mm_vision=True)  # every parameter trains
    return TorchBackend(load_model(model_dir), model_dir, info, args, TrainArgs(), circle_rope)


def _token_losses(logits: torch.Tensor, labels: np.ndarray) -> torch.Tensor:
    """Per-token next-token CE at the trained positions of one row, in order."""
    labels = torch.as_tensor(labels).reshape(-1)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1])[:-1].float(), labels[1:], ignore_index=-100, reduction="none")
    return ce[labels[1:] != -100]


@pytest.mark.parametrize("model_type", family_names("packing"))  # every family that packs: a new one is covered
def test_packed_row_equals_samples_one_by_one(tiny_models, corpus, model_type):
    model_dir = tiny_models[model_type]
    dataset, features = _features(corpus, model_dir)
    assert {f.pixel_values is not None for f in features} == {True, False}
    assert any(f.pixel_values_videos is not None for f in features)
    collate = Collator(dataset.info, dataset.tokenizer.pad_token_id)
    singles = [collate([f]) for f in features]
    packed = collate_packed(features, dataset.info)
    # The loop's normaliser: the packed row trains exactly the tokens of the samples alone.
    n_tokens = count_trained_tokens(packed)
    assert n_tokens == sum(count_trained_tokens(b) for b in singles)

    backend = _backend(model_dir, dataset.info)
    # An MoE router's load-balancing loss is a statistic of the whole micro-batch (expert shares over
    # all its tokens), not a sum over samples: the per-sample CE below is compared with it on, the summed
    # loss and the gradients without it.
    with torch.no_grad():
        packed_losses = _token_losses(backend._logits(packed)[0], packed["labels"])
        single_losses = torch.cat([_token_losses(backend._logits(b)[0], b["labels"]) for b in singles])
    assert packed_losses.shape == single_losses.shape == (n_tokens,)
    torch.testing.assert_close(packed_losses, single_losses, rtol=0, atol=1e-5)

    backend.router_aux_coef = 0.0
    loss_packed = float(backend.forward_backward(packed, 1.0 / n_tokens))
    # (a parameter the forward never reaches has no gradient either way: Ovis2.5's tower post-norm, which its
    # visual tokenizer skips by reading the last layer's hidden states)
    grads_packed = {n: p.grad.clone() for n, p in backend.model.named_parameters() if p.grad is not None}
    backend.zero_grad()
    loss_single = float(sum(backend.forward_backward(b, 1.0 / n_tokens) for b in singles))
    grads_single = {n: p.grad.clone() for n, p in backend.model.named_parameters() if p.grad is not None}
    assert abs(loss_packed - loss_single) <= 1e-5 * n_tokens
    assert grads_packed.keys() == grads_single.keys() and len(grads_packed) > 0
    blocks = FAMILIES[model_type].modules.vision_blocks
    assert any(n.startswith(blocks) for n in grads_packed), "the vision tower's gradients are compared too"
    worst = max((grads_packed[n] - grads_single[n]).abs().max().item() for n in grads_packed)
    assert worst <= 1e-5, worst


def _perturb_first(packed: dict, features, first_special_id: int) -> dict:
    """Sample A (the first) with other text tokens and other pixels, nothing else moved."""
    changed = {k: v.copy() for k, v in packed.items()}
    n = len(features[0].input_ids)
    ids = changed["input_ids"][0, :n]  # a view: edits land in `changed`
    text = ids < first_special_id  # ordinary BPE tokens (the added special tokens follow them)
    ids[text] = (ids[text] * 7 + 13) % first_special_id
    n_patches = int(np.prod(features[0].image_grid_thw, axis=1).sum())
    changed["pixel_values"][:n_patches] += 0.5
    return changed


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_changing_sample_a_leaves_sample_b_unchanged(tiny_model_dirs, corpus, model_type):
    model_dir = tiny_model_dirs[model_type]
    dataset, features = _features(corpus, model_dir, ("single-0", "image_video-9"))
    packed = collate_packed(features, dataset.info)
    changed = _perturb_first(packed, features, dataset.tokenizer.pad_token_id)
    split = int(packed["cu_seqlens"][1])
    model = load_model(model_dir).eval()
    enable_varlen(model)

    def logits(batch, packed_attention=True):
        inputs = to_model_inputs(batch, torch.device("cpu"), model=model)
        if not packed_attention:  # the control: the same row with the packing arguments dropped
            inputs = {k: v for k, v in inputs.items() if not k.startswith(("cu_seq_lens", "max_length"))}
        with torch.no_grad():
            return model(**inputs, use_cache=False).logits[0]

    before, after = logits(packed), logits(changed)
    assert (before[:split] - after[:split]).abs().max() > 1e-2, "the change must reach sample A's own logits"
    torch.testing.assert_close(after[split:], before[split:], rtol=0, atol=1e-6)
    # Without the varlen attention the packed row leaks A into B: the test above can fail.
    leaked = (logits(changed, False)[split:] - logits(packed, False)[split:]).abs().max()
    assert leaked > 1e-3


def test_circle_rope_age_packed_equals_padded(tiny_model_dirs, corpus):
    """Circle-RoPE ids (floats) and AGE's plain ids both restart per sample; the M-RoPE layers get the alt ids."""
    circle = {**CIRCLE_ROPE_DEFAULTS, "AGE_mode": "strategy_4"}
    model_dir = tiny_model_dirs["qwen2_5_vl"]
    dataset, features = _features(corpus, model_dir, ("single-0", "text-3", "video-2"))
    packed = collate_packed(features, dataset.info, circle)
    assert packed["position_ids"].dtype == np.float64 and "position_ids_alt" in packed
    collate = Collator(dataset.info, dataset.tokenizer.pad_token_id, circle)
    backend = _backend(model_dir, dataset.info, circle)
    with torch.no_grad():
        packed_logits = backend._logits(packed)[0]
        single_logits = torch.cat([backend._logits(collate([f]))[0] for f in features])
    torch.testing.assert_close(packed_logits, single_logits, rtol=0, atol=1e-5)


def test_padded_batches_are_unchanged_after_enable_varlen(tiny_model_dirs, corpus):
    """Evaluation and generation keep running padded batches through the same (switched) model."""
    model_dir = tiny_model_dirs["qwen2_5_vl"]
    dataset, features = _features(corpus, model_dir, ("single-0", "text-3", "multi-1"))
    batch = Collator(dataset.info, dataset.tokenizer.pad_token_id)(features)
    model = load_model(model_dir).eval()
    with torch.no_grad():
        stock = model(**to_model_inputs(batch, torch.device("cpu"), model=model), use_cache=False).logits
        assert enable_varlen(model) == "vltune_varlen_sdpa"
        switched = model(**to_model_inputs(batch, torch.device("cpu"), model=model), use_cache=False).logits
    mask = torch.as_tensor(batch["attention_mask"]).bool()
    torch.testing.assert_close(switched[mask], stock[mask], rtol=0, atol=1e-5)


def test_packed_batch_refused_by_a_stock_model(tiny_model_dirs, corpus):
    model_dir = tiny_model_dirs["qwen2_5_vl"]
    dataset, features = _features(corpus, model_dir, ("text-3", "single-0"))
    with pytest.raises(RuntimeError, match="enable_varlen"):
        to_model_inputs(collate_packed(features, dataset.info), torch.device("cpu"), model=load_model(model_dir))


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_vision_tower_one_varlen_call_equals_the_stock_window_loop(tiny_model_dirs, corpus, monkeypatch, backend):
    """Qwen2.5-VL's window layers and full layer as one varlen call each, against the stock per-window loop."""
    model_dir = tiny_model_dirs["qwen2_5_vl"]
    dataset, features = _features(corpus, model_dir, ("single-0", "multi-1", "single-10"))
    batch = Collator(dataset.info, dataset.tokenizer.pad_token_id)(features)
    pixels, grid = torch.as_tensor(batch["pixel_values"]), torch.as_tensor(batch["image_grid_thw"])
    model = load_model(model_dir).eval()
    visual = model.model.visual
    calls = []
    with torch.no_grad():
        stock = visual(pixels, grid_thw=grid).pooler_output
        enable_varlen(model)
        monkeypatch.setenv("VLTUNE_VARLEN_BACKEND", backend)
        import vltune.backends.torch.attention as varlen

        real = varlen.varlen_attention
        monkeypatch.setattr(varlen, "varlen_attention", lambda *a, **k: calls.append(a[3].numel() - 1) or real(*a, **k))
        switched = visual(pixels, grid_thw=grid).pooler_output
    assert len(calls) == len(vision_attention_modules(model)), "one attention call per layer"
    assert max(calls) > len(features), "window layers split each image into several windows"
    torch.testing.assert_close(switched, stock, rtol=0, atol=1e-5)


PRECOMPUTED_KEYS = {
    "get_vision_position_ids": ("position_ids",),
    "get_vision_cu_seqlens": ("cu_seqlens",),
    "get_vision_window_index": ("window_index", "cu_window_seqlens"),
    "get_vision_interpolation_indices_and_weights": ("interp_indices", "interp_weights"),
}
"""Each transformers grid helper and the precomputed keys that make it return without computing."""


def _spy(helper, name: str, computed: list):
    """`helper`, noting `name` in `computed` whenever it is called without every one of its precomputed inputs."""
    def call(*args, **kwargs):
        given = kwargs.get("kwargs") or {}
        if not all(given.get(key) is not None for key in PRECOMPUTED_KEYS[name]):
            computed.append(name)
        return helper(*args, **kwargs)
    return call


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_vision_inputs_computed_on_the_host_give_the_stock_forward(tiny_models, corpus, model_type, monkeypatch):
    """The one-process forward runs the tower itself with grid-derived inputs computed on the host
    (batch.vision_tower_kwargs); images and videos, padded and packed, give the stock model's hidden states."""
    model_dir = tiny_models[model_type]
    dataset, features = _features(corpus, model_dir, ("single-0", "image_video-9", "multi-1"))
    backend = _backend(model_dir, dataset.info)
    backend.model.eval()
    padded = Collator(dataset.info, dataset.tokenizer.pad_token_id)(features)
    packed = collate_packed(features, dataset.info)
    # Every tower consumes the precomputed inputs: none of transformers' grid helpers computes anything
    # while our forward runs (handed its precomputed key, a helper returns it without computing).
    computed = []
    modeling = sys.modules[type(part(backend.base, "vision_tower")).__module__]
    for name in PRECOMPUTED_KEYS:
        if hasattr(modeling, name):
            monkeypatch.setattr(modeling, name, _spy(getattr(modeling, name), name, computed))
    enable_varlen(backend.base)
    for batch in (padded, packed):
        inputs = to_model_inputs(batch, backend.device, model=backend.model)
        routed = backend._encode_vision(batch, dict(inputs))
        assert "pixel_values" not in routed and "pixel_values_videos" not in routed
        if model_entry(model_type).features_to_forward:  # DeepStack: the stock forward places them
            assert set(routed["mm_encoder_outputs"]) == {"image", "video"}
        else:  # placed into the embeddings here, with no device read-back
            assert "inputs_embeds" in routed and "input_ids" not in routed and "mm_encoder_outputs" not in routed
        with torch.no_grad():
            ours = backend.base.model(**routed, use_cache=False).last_hidden_state
            assert computed == [], computed
            stock = backend.base.model(**inputs, use_cache=False).last_hidden_state
        assert computed, "the stock path computes them from the grid (the spy works)"
        computed.clear()
        torch.testing.assert_close(ours, stock, rtol=0, atol=1e-6)


def test_compiled_packed_step_has_no_graph_breaks(tiny_model_dirs, corpus, monkeypatch):
    """Each compiled decoder layer and vision block is one graph: a graph break would split it into
    several compiled regions, each with its own guards and launch overhead per layer and step."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("VLTUNE_VARLEN_BACKEND", "reference")  # traceable on CPU, like the CUDA kernels (the sdpa loop is not)
    model_dir = tiny_model_dirs["qwen2_5_vl"]
    dataset, features = _features(corpus, model_dir, ("single-0", "text-3", "multi-1"))
    packed = collate_packed(features, dataset.info)
    args = ModelArgs(model_name_or_path=str(model_dir))
    backend = TorchBackend(load_model(model_dir), model_dir, dataset.info, args, TrainArgs(torch_compile=True))
    torch._dynamo.reset()
    counters.clear()
    backend.forward_backward(packed, 1.0)
    assert counters["stats"]["unique_graphs"] >= 2, "the decoder layers and vision blocks were compiled"
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])


def test_vision_features_and_placeholders_that_disagree_are_refused(tiny_model_dirs, corpus):
    model_dir = tiny_model_dirs["qwen2_5_vl"]
    dataset, features = _features(corpus, model_dir, ("single-0", "text-3"))
    backend = _backend(model_dir, dataset.info)
    batch = Collator(dataset.info, dataset.tokenizer.pad_token_id)(features)
    ids = batch["input_ids"]
    ids[ids == dataset.info.image_token_id] = [dataset.info.image_token_id] * (int((ids == dataset.info.image_token_id).sum()) - 1) + [0]
    with pytest.raises(ValueError, match=r"image placeholders and features disagree: \d+ tokens, \d+ features"):
        backend._encode_vision(batch, to_model_inputs(batch, backend.device, model=backend.model))
