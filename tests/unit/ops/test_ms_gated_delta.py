"""ops/mindspore/gated_delta.py against transformers' torch reference (fp32, CPU): the chunked gated delta
rule and the causal depthwise conv per sample, a packed row equal to its samples run alone, and the
state carried between two calls equal to one call over the whole sequence (generation's prefill + steps)."""

from __future__ import annotations

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
torch = pytest.importorskip("torch")

import gated_delta_rows  # noqa: E402  (tests/, on sys.path through its conftest)
from mindspore import Tensor  # noqa: E402

from vltune.ops.mindspore import gated_delta  # noqa: E402

TOL = 1e-5


@pytest.fixture(autouse=True)
def _pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)


def _reference():
    return gated_delta_rows.reference()


def _random_row(lengths, **sizes):
    return gated_delta_rows.random_row(lengths, **sizes), np.array([0, *np.cumsum(lengths)])


def _ms(*tensors):
    return [Tensor(t.numpy()) for t in tensors]


@pytest.mark.parametrize("lengths", [(5, 70, 129), (64, 1, 64), (200,)])
def test_delta_rule_restarts_at_every_sample(lengths):
    """Lengths across chunk (64) borders, a one-token sample, one sample alone: each equals transformers'
    rule on that sample alone; the row run as one sequence (the control) does not."""
    inputs, cu = _random_row(lengths)
    packed = gated_delta.gated_delta_rule_varlen(*_ms(*inputs), gated_delta.Segments.from_cu_seqlens(cu)).asnumpy()
    q, k, v, g, beta = inputs
    for a, b in zip(cu[:-1], cu[1:]):
        alone, _ = _reference()(q[:, a:b], k[:, a:b], v[:, a:b], g=g[:, a:b], beta=beta[:, a:b], use_qk_l2norm_in_kernel=True)
        np.testing.assert_allclose(packed[:, a:b], alone.numpy(), rtol=0, atol=TOL)
    if len(lengths) > 1:
        whole = gated_delta.gated_delta_rule_varlen(*_ms(*inputs), None).asnumpy()
        assert np.abs(whole - packed).max() > 1e-3


def test_state_carries_a_sequence_on():
    """Two calls (the second from the first's final state) equal one call, and the final state equals
    transformers': what generation relies on."""
    inputs, _ = _random_row((150,))
    first = [t[:, :90] for t in inputs]
    second = [t[:, 90:] for t in inputs]
    out_a, state = gated_delta.chunk_gated_delta_rule(*_ms(*first))
    out_b, final = gated_delta.chunk_gated_delta_rule(*_ms(*second), state=state)
    q, k, v, g, beta = inputs
    whole, ref_state = _reference()(q, k, v, g=g, beta=beta, output_final_state=True, use_qk_l2norm_in_kernel=True)
    np.testing.assert_allclose(np.concatenate([out_a.asnumpy(), out_b.asnumpy()], 1), whole.numpy(), rtol=0, atol=TOL)
    np.testing.assert_allclose(final.asnumpy(), ref_state.numpy(), rtol=0, atol=TOL)


def test_delta_rule_gradients_equal_torch():
    """The backward pass (the solve's too) agrees with autograd through transformers' rule."""
    inputs, cu = _random_row((30, 41), seed=1)
    weights = torch.randn(1, 71, 4, 8, generator=torch.Generator().manual_seed(2))
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    segments = gated_delta.Segments.from_cu_seqlens(cu)
    outs = []
    for a, b in zip(cu[:-1], cu[1:]):
        q, k, v, g, beta = (t[:, a:b] for t in leaves)
        outs.append(_reference()(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)[0])
    (torch.cat(outs, 1) * weights).sum().backward()

    def loss(*xs):
        return (gated_delta.gated_delta_rule_varlen(*xs, segments) * Tensor(weights.numpy())).sum()

    grads = ms.grad(loss, grad_position=(0, 1, 2, 3, 4))(*_ms(*inputs))
    for name, ours, leaf in zip("q k v g beta".split(), grads, leaves):
        np.testing.assert_allclose(ours.asnumpy(), leaf.grad.numpy(), rtol=0, atol=1e-4, err_msg=name)


def _torch_conv(x, weight, width):
    out = torch.nn.functional.conv1d(x.transpose(1, 2), weight.unsqueeze(1), None, padding=width - 1, groups=x.shape[-1])
    return torch.nn.functional.silu(out[..., : x.shape[1]]).transpose(1, 2)


def test_causal_conv_restarts_at_every_sample():
    cu = np.array([0, 3, 12, 13, 19])
    g = torch.Generator().manual_seed(3)
    x, weight = torch.randn(1, 19, 5, generator=g), torch.randn(5, 4, generator=g)
    segments = gated_delta.Segments.from_cu_seqlens(cu)
    packed = gated_delta.causal_conv1d_varlen(Tensor(x.numpy()), Tensor(weight.numpy()), "silu", segments).asnumpy()
    for a, b in zip(cu[:-1], cu[1:]):
        np.testing.assert_allclose(packed[:, a:b], _torch_conv(x[:, a:b], weight, 4).numpy(), rtol=0, atol=TOL)
    whole = _torch_conv(x, weight, 4).numpy()
    assert np.abs(whole - packed).max() > 1e-3, "the window crosses sample borders without the restart"


def test_conv_window_continues_a_sequence():
    """The conv state after a prefix, passed as `window`, gives the rest of the sequence as one call would."""
    g = torch.Generator().manual_seed(4)
    x, weight = torch.randn(2, 11, 6, generator=g), torch.randn(6, 4, generator=g)
    ms_x, ms_w = Tensor(x.numpy()), Tensor(weight.numpy())
    window = gated_delta.conv_window(ms_x[:, :2], 4)  # shorter than the window: zeros before it
    rest = gated_delta.causal_conv1d(ms_x[:, 2:], ms_w, "silu", window=window).asnumpy()
    np.testing.assert_allclose(rest, _torch_conv(x, weight, 4).numpy()[:, 2:], rtol=0, atol=TOL)
