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


def _stub_fa4(monkeypatch):
    """flash_attn.cute.interface stand-in (CPU, the reference math) with FA4's calling convention:
    `_flash_attn_fwd(q, k, v, cu_seqlens_q=, ..., return_lse=)` returns (out, lse, ...) with contiguous
    outputs, `_flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale, causal, cu_seqlens_q=, ...)`
    returns (dq, dk, dv)."""
    import sys
    import types

    def fwd(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, return_lse):
        assert cu_seqlens_q is cu_seqlens_k and max_seqlen_q == max_seqlen_k and return_lse
        out = varlen_attention_reference(q, k, v, cu_seqlens_q, max_seqlen_q, causal, softmax_scale)
        return out.contiguous(), torch.zeros(q.shape[1], q.shape[0]), None, None, None

    def bwd(q, k, v, out, dout, lse, softmax_scale, causal, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        # Attention's gradients in closed form (a custom op's kernel runs below autograd).
        assert lse.shape == (q.shape[1], q.shape[0])
        doc = document_ids(cu_seqlens_q, q.shape[0])
        allowed = doc[:, None] == doc[None, :]
        if causal:
            allowed &= torch.ones_like(allowed).tril()
        groups = q.shape[1] // k.shape[1]
        kr, vr = (t.repeat_interleave(groups, dim=1) for t in (k, v))
        p = (torch.einsum("qhd,khd->hqk", q, kr) * softmax_scale).masked_fill(~allowed, float("-inf")).softmax(-1)
        dv = torch.einsum("hqk,qhd->khd", p, dout)
        dp = torch.einsum("qhd,khd->hqk", dout, vr)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        dq = torch.einsum("hqk,khd->qhd", ds, kr) * softmax_scale
        dk = torch.einsum("hqk,qhd->khd", ds, q) * softmax_scale
        fold = lambda t: t.unflatten(1, (k.shape[1], groups)).sum(2)  # noqa: E731 -- the query heads sharing a K/V head
        return dq, fold(dk), fold(dv)

    interface = types.ModuleType("flash_attn.cute.interface")
    interface._flash_attn_fwd, interface._flash_attn_bwd = fwd, bwd
    for name, module in (("flash_attn", types.ModuleType("flash_attn")), ("flash_attn.cute", types.ModuleType("flash_attn.cute")),
                         ("flash_attn.cute.interface", interface)):
        monkeypatch.setitem(sys.modules, name, module)


@pytest.mark.parametrize("causal", [True, False])
def test_fa4_kernel_wiring_forward_backward_and_compile_contract(monkeypatch, causal):
    """The fa4 kernel's two custom ops around FA4 (stubbed here with the reference math; the real
    kernels: the CUDA test above, on sm90+): they pass FA4 its arguments, return its output, send the
    gradients through its backward, and their fake versions agree with the real ones (opcheck: shapes,
    strides, the autograd registration, an AOT-compiled run), also for a non-contiguous q."""
    from vltune.ops.torch.attention import _KERNELS

    _stub_fa4(monkeypatch)
    q, k, v, cu = _qkv(4, 2, seed=2)
    q = q.transpose(0, 1).contiguous().transpose(0, 1)  # [T, H, D] with the heads outermost in memory
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    out = _KERNELS["fa4"](qs, ks, vs, cu, max(LENGTHS), causal, 0.3)
    ref = varlen_attention_reference(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), cu, max(LENGTHS), causal, 0.3)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    for got, want in zip(torch.autograd.grad(out.square().sum(), (qs, ks, vs)), torch.autograd.grad(ref.square().sum(), (q, k, v))):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.library.opcheck(torch.ops.vltune.fa4_varlen_forward.default, (qs, ks, vs, cu, max(LENGTHS), causal, 0.3))


def test_fa4_is_found_without_importing_flash_attn(tmp_path, monkeypatch):
    """flash-attn-4 is recognised by its `flash_attn/cute/interface.py`; the `flash_attn` package is not
    imported to find it (FA2's __init__ loads a CUDA extension, or fails on an ABI mismatch)."""
    import importlib
    import sys

    from vltune.ops.torch.attention import _fa4_installed

    (tmp_path / "flash_attn").mkdir()
    (tmp_path / "flash_attn" / "__init__.py").write_text("raise ImportError('a broken FA2 install')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    importlib.invalidate_caches()
    assert not _fa4_installed()
    (tmp_path / "flash_attn" / "cute").mkdir()
    (tmp_path / "flash_attn" / "cute" / "interface.py").write_text("")
    assert _fa4_installed()
    assert "flash_attn" not in sys.modules
