"""Packed rows through Qwen3.5's Gated DeltaNet: each sample as if alone, and the leak without vltune's path.

The model-level packed == one-by-one comparison (logits, loss, gradients) of every packing family runs in
test_packing_torch.py; here: the two kernels against per-sample runs, the control that shows transformers'
own layer leaking one sample into the next, and the refusal of a packed row on that path.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("av")  # the corpus has videos

import gated_delta_rows  # noqa: E402  (tests/, on sys.path through its conftest)
from vltune.backends.torch.attention import enable_varlen, require_varlen  # noqa: E402
from vltune.backends.torch.batch import to_model_inputs  # noqa: E402
from vltune.backends.torch.linear_attention import linear_attention_modules  # noqa: E402
from vltune.backends.torch.models import load_model  # noqa: E402
from vltune.core.families import family_names, get_family  # noqa: E402
from vltune.data.dataset import SFTDataset  # noqa: E402
from vltune.data.formats import read_annotation  # noqa: E402
from vltune.data.packing import collate_packed  # noqa: E402
from vltune.data.synthetic_corpus import write_format_corpus  # noqa: E402
from vltune.ops.torch import gated_delta  # noqa: E402

HYBRID = [name for name in family_names("packing") if get_family(name).modules.linear_attention]
ROW = ("text-3", "single-0", "video-2")
"""Text, image, video: three samples of different lengths in one row."""


def test_hybrid_families_exist():
    assert {"qwen3_5", "qwen3_5_moe"} <= set(HYBRID)


def _reference():
    return gated_delta_rows.reference()


def _random_row(lengths, **sizes):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return (*gated_delta_rows.random_row(lengths, **sizes), cu)


@pytest.mark.parametrize("lengths", [(5, 70, 129), (64, 1, 64), (200,)])
def test_delta_rule_restarts_at_every_sample(lengths):
    """Lengths across chunk (64) borders, a one-token sample, one sample alone."""
    q, k, v, g, beta, cu = _random_row(lengths)
    packed = gated_delta.chunk_gated_delta_rule_varlen(q, k, v, g, beta, cu, _reference())
    alone = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        out, _ = _reference()(q[:, a:b], k[:, a:b], v[:, a:b], g=g[:, a:b], beta=beta[:, a:b], use_qk_l2norm_in_kernel=True)
        alone.append(out)
    torch.testing.assert_close(packed, torch.cat(alone, 1), rtol=0, atol=1e-5)
    if len(lengths) > 1:  # the control: the whole row as one sequence carries state across samples
        whole, _ = _reference()(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)
        assert (whole - packed).abs().max() > 1e-3


def test_causal_conv_restarts_at_every_sample():
    lengths = (3, 9, 1, 6)
    cu = torch.tensor([0, 3, 12, 13, 19], dtype=torch.int32)
    x = torch.randn(1, sum(lengths), 5)
    weight, bias = torch.randn(5, 4), torch.randn(5)
    packed = gated_delta.causal_conv1d_varlen(x, weight, bias, "silu", cu)
    alone = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        seg = torch.nn.functional.conv1d(x[:, a:b].transpose(1, 2), weight.unsqueeze(1), bias, padding=3, groups=5)
        alone.append(torch.nn.functional.silu(seg[..., : b - a]).transpose(1, 2))
    torch.testing.assert_close(packed, torch.cat(alone, 1), rtol=0, atol=1e-6)
    whole = torch.nn.functional.conv1d(x.transpose(1, 2), weight.unsqueeze(1), bias, padding=3, groups=5)
    whole = torch.nn.functional.silu(whole[..., : x.shape[1]]).transpose(1, 2)
    assert (whole - packed).abs().max() > 1e-3, "the window crosses sample borders without the restart"


def test_backend_choice(monkeypatch):
    x = torch.zeros(1, 2, 3)
    assert gated_delta.select_backend(x) == "torch"  # CPU tensors
    monkeypatch.setenv(gated_delta.BACKEND_ENV, "fla")
    with pytest.raises(RuntimeError, match="fla-core installed and CUDA"):
        gated_delta.select_backend(x)
    monkeypatch.setenv(gated_delta.BACKEND_ENV, "triton")
    with pytest.raises(ValueError, match="VLTUNE_GDN_BACKEND"):
        gated_delta.select_backend(x)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    files = write_format_corpus(tmp_path_factory.mktemp("corpus"), num_samples=12, seed=0)
    return {s.id: s for f in files for s in read_annotation(f).samples}


def _packed_row(corpus, model_dir):
    dataset = SFTDataset([corpus[i] for i in ROW], model_dir, max_length=4096, max_pixels=28 * 28 * 16)
    features = [dataset[i] for i in range(len(ROW))]
    return collate_packed(features, dataset.info), [len(f.input_ids) for f in features]


@pytest.mark.parametrize("model_type", HYBRID)
def test_stock_recurrent_layers_leak_across_samples(tiny_models, corpus, model_type):
    """The path on which the Gated DeltaNet sees a packed row through its position ids only (transformers'
    own layer without `cu_seqlens`; attention kept varlen) changes the later samples' logits: the leak the
    exact path prevents. (transformers >= 5.2x refuses `cu_seqlens` on its torch path; older ones ignored them.)"""
    model_dir = tiny_models[model_type]
    packed, lengths = _packed_row(corpus, model_dir)
    model = load_model(model_dir).eval()
    enable_varlen(model)
    modules = linear_attention_modules(model)
    assert len(modules) == 2
    inputs = to_model_inputs(packed, torch.device("cpu"), model=model)
    with torch.no_grad():
        exact = model(**inputs, use_cache=False).logits[0]
        for module in modules:
            stock = type(module).forward.__get__(module)
            module.forward = lambda *a, _stock=stock, **k: _stock(*a, **{n: v for n, v in k.items() if not n.startswith(("cu_seq", "max_length"))})
        leaky = model(**inputs, use_cache=False).logits[0]
    first = lengths[0]
    torch.testing.assert_close(leaky[:first], exact[:first], rtol=0, atol=1e-5)  # the first sample starts at zero
    assert (leaky[first:] - exact[first:]).abs().max() > 1e-3, "the stock layers carry state into the next samples"
    with pytest.raises(RuntimeError, match="Gated DeltaNet"):
        require_varlen(model)  # and a packed row is refused on that path


def test_compiled_decoder_layers_run_the_recurrent_kernels_eagerly(tiny_models, corpus, monkeypatch):
    """torch_compile compiles each decoder layer; the Gated DeltaNet's varlen kernels stay eager inside it
    (torch.compiler.disable: a data-dependent layout on the torch path, Triton kernels on fla's; compiling
    the torch path crashed torch 2.13's CPU backend). Same loss as the eager step."""
    from vltune.backends.torch.engine import Engine
    from vltune.core.config import ModelArgs, TrainArgs

    monkeypatch.setenv("VLTUNE_VARLEN_BACKEND", "reference")  # traceable attention, as the compile test elsewhere
    model_dir = tiny_models["qwen3_5"]
    packed, _ = _packed_row(corpus, model_dir)
    losses = []
    for compiled in (False, True):
        torch.manual_seed(0)
        dataset_info = SFTDataset([corpus["text-3"]], model_dir, max_length=4096).info
        engine = Engine(load_model(model_dir), model_dir, dataset_info, ModelArgs(model_name_or_path=str(model_dir)),
                        TrainArgs(torch_compile=compiled))
        losses.append(float(engine.forward_backward(packed, 1.0)))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
