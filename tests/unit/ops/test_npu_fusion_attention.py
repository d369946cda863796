"""The `npu_fusion` varlen kernel (torch_npu's `npu_fusion_attention`, TND layout), checked on CPU.

torch_npu is not installed here and there is no NPU, so the kernel's Ascend call cannot run. A stand-in
`torch_npu` module (put in sys.modules by the test) has the real function's signature and computes, from
nothing but the arguments it is given and in float64, what the documented semantics say: TND layout,
`actual_seq_qlen` = the cumulative sequence ends without the leading 0, N2 key/value heads dividing N1,
sparse_mode 0 = no mask, sparse_mode 3 = right-down causal read from a [2048, 2048] bool mask (True =
not attended). The kernel's output through it must equal ops.torch.attention's CPU reference on a packed
row with grouped-query heads. Nothing here has run on an NPU.
"""

from __future__ import annotations

import sys
import types

import pytest

torch = pytest.importorskip("torch")

from vltune.ops.torch.attention import (  # noqa: E402
    BACKENDS,
    NPU_MASK_SIZE,
    _KERNELS,
    available_backends,
    select_backend,
    varlen_attention_reference,
)

from test_varlen_attention import LENGTHS, _qkv  # noqa: E402  (the same directory)


class FakeTorchNpu:
    """`torch_npu.npu_fusion_attention` with torch_npu's signature, recording each call's arguments."""

    def __init__(self):
        self.calls: list[dict] = []

    def npu_fusion_attention(self, query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
                             scale=1., keep_prob=1., pre_tockens=2147483647, next_tockens=2147483647, inner_precise=0,
                             prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                             gen_mask_parallel=True, sync=False):
        self.calls.append({"head_num": head_num, "layout": input_layout, "mask": atten_mask, "scale": scale,
                           "keep_prob": keep_prob, "q_ends": actual_seq_qlen, "kv_ends": actual_seq_kvlen,
                           "sparse_mode": sparse_mode})
        assert input_layout == "TND" and pse is None and padding_mask is None and prefix is None
        assert query.shape[1] == head_num and head_num % key.shape[1] == 0 and key.shape == value.shape
        ends = list(actual_seq_qlen)
        assert all(isinstance(end, int) for end in ends) and ends == sorted(ends) and ends[-1] == query.shape[0]
        assert list(actual_seq_kvlen) == ends  # self-attention: the same segments for keys
        q, k, v = (t.double() for t in (query, key, value))
        k, v = (t.repeat_interleave(head_num // key.shape[1], dim=1) for t in (k, v))
        out = torch.zeros_like(q)
        for start, end in zip([0] + ends[:-1], ends):
            scores = torch.einsum("qhd,khd->hqk", q[start:end], k[start:end]) * scale
            if sparse_mode == 3:  # right-down causal: with S1 == S2 the mask's top-left S x S block
                assert atten_mask.dtype == torch.bool and tuple(atten_mask.shape) == (NPU_MASK_SIZE, NPU_MASK_SIZE)
                scores = scores.masked_fill(atten_mask[: end - start, : end - start], float("-inf"))
            else:
                assert sparse_mode == 0 and atten_mask is None
            out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[start:end])
        # (attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, numels), as torch_npu returns
        return out.to(query.dtype), None, None, None, 0, 0, 0


@pytest.fixture()
def fake_torch_npu(monkeypatch):
    fake = FakeTorchNpu()
    module = types.ModuleType("torch_npu")
    module.npu_fusion_attention = fake.npu_fusion_attention
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    return fake


def _packed_row(heads: int, kv_heads: int, dim: int = 16, seed: int = 0):
    return _qkv(heads, kv_heads, dim, seed)  # test_varlen_attention's row: lengths 5, 1, 17, 9


def test_npu_fusion_is_the_npu_table_and_only_there():
    assert "npu_fusion" in BACKENDS and "npu_fusion" in _KERNELS
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert available_backends(torch.device("meta"), dtype) == ["sdpa", "flex"]  # not cuda, not npu
    assert "npu_fusion" not in available_backends(torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match="npu_fusion.*usable here: sdpa, flex"):
        select_backend(torch.zeros(2, 1, 8), "npu_fusion")


def test_auto_picks_npu_fusion_on_an_npu_device():
    """`npu` is a device type only once torch_npu has renamed torch's PrivateUse1 backend. The kernel
    table reads the type alone, so a stand-in for such a device shows the choice (a tensor on it cannot
    be made here)."""
    npu = types.SimpleNamespace(type="npu", index=0)
    for dtype in (torch.bfloat16, torch.float32):
        assert available_backends(npu, dtype) == ["npu_fusion", "sdpa"]


@pytest.mark.parametrize("causal", [True, False])
def test_tnd_call_arguments_give_the_reference_attention(fake_torch_npu, causal):
    """A packed row, 4 query heads over 2 key/value heads: the stand-in's attention, computed from the
    arguments the kernel built, is the CPU reference's; the call is TND with the cumulative ends."""
    q, k, v, cu = _packed_row(heads=4, kv_heads=2)
    out = _KERNELS["npu_fusion"](q, k, v, cu, max(LENGTHS), causal, 0.3)
    want = varlen_attention_reference(q, k, v, cu, max(LENGTHS), causal, 0.3)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
    (call,) = fake_torch_npu.calls
    assert call["layout"] == "TND" and call["head_num"] == 4 and call["scale"] == 0.3 and call["keep_prob"] == 1.0
    assert call["q_ends"] == call["kv_ends"] == [5, 6, 23, 32]
    assert call["sparse_mode"] == (3 if causal else 0)
    if causal:
        assert torch.equal(call["mask"], torch.ones(NPU_MASK_SIZE, NPU_MASK_SIZE, dtype=torch.bool).triu(1))
    else:
        assert call["mask"] is None
