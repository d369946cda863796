"""ops.torch.attention: every kernel usable here against the eager block-diagonal definition."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from vltune.ops.torch.attention import (  # noqa: E402
    available_backends,
    document_ids,
    select_backend,
    varlen_attention,
    varlen_attention_reference,
)

LENGTHS = [5, 1, 17, 9]


def _qkv(heads: int, kv_heads: int, dim: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    total = sum(LENGTHS)
    q = torch.randn(total, heads, dim, generator=g)
    k, v = (torch.randn(total, kv_heads, dim, generator=g) for _ in range(2))
    cu = torch.tensor([0] + LENGTHS).cumsum(0).to(torch.int32)
    return q, k, v, cu


def _one_by_one(q, k, v, cu, causal):
    """Each sub-sequence alone through plain SDPA (K/V heads repeated): what packing must reproduce."""
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        rep = q.shape[1] // k.shape[1]
        qs, ks, vs = q[a:b].transpose(0, 1), k[a:b].repeat_interleave(rep, 1).transpose(0, 1), v[a:b].repeat_interleave(rep, 1).transpose(0, 1)
        outs.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2)])
def test_reference_is_attention_inside_each_sub_sequence(causal, heads, kv_heads):
    q, k, v, cu = _qkv(heads, kv_heads)
    out = varlen_attention(q, k, v, cu, max(LENGTHS), causal=causal, backend="reference")
    torch.testing.assert_close(out, _one_by_one(q, k, v, cu, causal), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", available_backends(torch.device("cpu"), torch.float32))
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 1)])
def test_kernels_match_the_reference(backend, causal, heads, kv_heads):
    q, k, v, cu = _qkv(heads, kv_heads, seed=1)
    trains = backend != "flex"  # FlexAttention has no backward on CPU (it does on CUDA: see the gpu test)
    q.requires_grad_(trains)
    out = varlen_attention(q, k, v, cu, max(LENGTHS), causal=causal, scale=0.3, backend=backend)
    ref = varlen_attention_reference(q, k, v, cu, max(LENGTHS), causal, 0.3)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    if not trains:
        return
    grad, = torch.autograd.grad(out.square().sum(), q)
    ref_grad, = torch.autograd.grad(ref.square().sum(), q)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-5)


def test_auto_picks_sdpa_on_cpu_and_the_env_override_wins(monkeypatch):
    q = torch.zeros(3, 2, 8)
    assert select_backend(q) == "sdpa"
    monkeypatch.setenv("VLTUNE_VARLEN_BACKEND", "reference")
    assert select_backend(q) == "reference"
    with pytest.raises(ValueError, match="cannot run"):
        select_backend(q, "torch_varlen")
    with pytest.raises(ValueError, match="not one of"):
        select_backend(q, "magic")


def test_document_ids():
    cu = torch.tensor([0, 2, 3, 6], dtype=torch.int32)
    assert document_ids(cu, 6).tolist() == [0, 0, 1, 2, 2, 2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_kernels_match_the_reference(dtype, causal):
    """Every CUDA kernel (flash_attn if installed, aten_flash and torch's varlen_attn in bf16, compiled flex
    and sdpa in bf16 and fp32), forward and the gradients of q, k and v, at a vision-tower-like size with GQA."""
    g = torch.Generator(device="cuda").manual_seed(0)
    lengths = [64, 1, 256, 200, 31, 1024]
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    total = int(cu[-1])
    q = torch.randn(total, 8, 64, device="cuda", generator=g, dtype=dtype)
    k, v = (torch.randn(total, 2, 64, device="cuda", generator=g, dtype=dtype) for _ in range(2))
    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
    ref = varlen_attention_reference(qf, kf, vf, cu, max(lengths), causal, 0.125)
    ref_grads = torch.autograd.grad(ref.square().sum(), (qf, kf, vf))
    atol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    backends = available_backends(q.device, dtype)
    assert "flex" in backends and (dtype == torch.float32 or {"aten_flash", "torch_varlen"} <= set(backends))
    for backend in backends:
        qb, kb, vb = (t.clone().requires_grad_() for t in (q, k, v))
        out = varlen_attention(qb, kb, vb, cu, max(lengths), causal=causal, scale=0.125, backend=backend)
        torch.testing.assert_close(out.float(), ref, rtol=0, atol=atol, msg=lambda m, b=backend: f"{b}: {m}")
        grads = torch.autograd.grad(out.float().square().sum(), (qb, kb, vb))
        for name, grad, ref_grad in zip("qkv", grads, ref_grads):  # dk, dv: summed over the query heads sharing them
            torch.testing.assert_close(grad.float(), ref_grad, rtol=0, atol=atol * 10,
                                       msg=lambda m, b=backend, n=name: f"{b} d{n}: {m}")


def test_fa4_ops_shapes_for_torch_compile():
    """The FA4 kernel runs as two custom ops so that torch.compile traces around it: their fake (meta)
    versions must give the shapes FA4 returns (out like q, the log-sum-exp [H, T] in fp32, grads like
    q, k, v), without flash-attn-4 installed. The kernels themselves: the CUDA test above, on sm90+."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = torch.empty(37, 8, 64, dtype=torch.bfloat16), torch.empty(37, 2, 64, dtype=torch.bfloat16), torch.empty(37, 2, 64, dtype=torch.bfloat16)
        cu = torch.empty(4, dtype=torch.int32)
        out, lse = torch.ops.vltune.fa4_varlen_forward(q, k, v, cu, 17, True, 0.125)
        dq, dk, dv = torch.ops.vltune.fa4_varlen_backward(out, q, k, v, out, lse, cu, 17, True, 0.125)
    assert (out.shape, out.dtype, lse.shape, lse.dtype) == (q.shape, q.dtype, (8, 37), torch.float32)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
