"""Varlen attention kernels on the 3B bench's own rows, one H100: correctness against fp32 per-sequence
SDPA, then time per packed row (text: forward + backward, causal; vision: forward only, the tower is frozen).

Candidates: vltune's kernels (ops/torch/attention.py: `aten_flash` is FA2, `fa4` FlashAttention-4 when
flash-attn-4 is installed, `flex` compiled FlexAttention) and `cudnn`, the cuDNN fused attention torch's
nested tensors can call (`aten::_cudnn_attention_forward` with cumulative offsets; forward only, K/V
heads repeated: it takes no grouped-query K/V).

Usage (repo root, on the GPU machine, after tools/gpu/env.sh):
    python3 tools/gpu/attention_kernels.py [--rows 3] [--kernels aten_flash,fa4] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from vltune.ops.torch.attention import varlen_attention


def _cudnn(q, k, v, cu, max_len, causal, scale):
    """cuDNN's fused attention with cumulative offsets (`aten::_cudnn_attention_forward`, no GQA: K/V
    heads repeated). Forward only: a first try at its backward (torch 2.11, cuDNN 9.19) raised an IndexError,
    not investigated further."""
    groups = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    return torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, max_len, max_len, True, 0.0, causal, False, scale=scale)[0]


def kernel(name: str):
    if name == "cudnn":
        return _cudnn
    return lambda q, k, v, cu, max_len, causal, scale: varlen_attention(q, k, v, cu, max_len, causal=causal, scale=scale, backend=name)


def reference(q, k, v, cu, causal, scale):
    """fp32 SDPA one sub-sequence at a time: ops' `varlen_attention_reference` builds a dense T x T mask and
    score matrix, some 10 GB for a 12k-patch vision row."""
    outs = []
    groups = q.shape[1] // k.shape[1]
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs = q[a:b].float().transpose(0, 1)
        ks, vs = (t[a:b].float().repeat_interleave(groups, 1).transpose(0, 1) for t in (k, v))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale).transpose(0, 1))
    return torch.cat(outs)


def vision_segments(shape, row: dict) -> tuple[list[int], list[int]]:
    """A packed row's Qwen2.5-VL tower segments, in patches: full attention (one per frame, data/packing.py)
    and the windows transformers' own helper cuts (zero-length windows dropped, as the tower does)."""
    from transformers import vision_utils as vu

    from vltune.data.packing import vision_cu_seqlens

    _, cu_windows = vu.get_vision_window_index(torch.as_tensor(row["image_grid_thw"]), spatial_merge_size=2,
                                               window_size=shape.window_size, patch_size=shape.patch_size)
    windows = torch.unique_consecutive(torch.as_tensor(cu_windows))
    return np.diff(vision_cu_seqlens(row)).tolist(), torch.diff(windows).tolist()


def cases(rows: int) -> list[dict]:
    from vltune.backends.torch.bench import _packed_rows
    from vltune.core.flops import SHAPES

    shape = SHAPES["qwen2_5_vl-3b"]
    out = []
    for i, row in enumerate(_packed_rows(shape, 60, 4096, seed=0)[:rows]):
        text = np.diff(row["cu_seqlens"]).tolist()
        out.append({"name": f"text row {i}", "lengths": text, "heads": shape.heads, "kv_heads": shape.kv_heads,
                    "dim": shape.hidden // shape.heads, "causal": True, "backward": True})
        if "image_grid_thw" in row:
            full, windows = vision_segments(shape, row)
            vh = shape.vision_hidden // shape.vision_heads
            out.append({"name": f"vision full row {i}", "lengths": full, "heads": shape.vision_heads, "kv_heads": shape.vision_heads,
                        "dim": vh, "causal": False, "backward": False})
            out.append({"name": f"vision windows row {i}", "lengths": windows, "heads": shape.vision_heads,
                        "kv_heads": shape.vision_heads, "dim": vh, "causal": False, "backward": False})
    return out


def flops(lengths: list[int], heads: int, dim: int, causal: bool, backward: bool) -> float:
    fwd = sum(4 * n * n * heads * dim for n in lengths) / (2 if causal else 1)
    return fwd * (3.5 if backward else 1.0)  # backward: 2.5x the forward's matmuls


def run_case(case: dict, name: str, repeats: int) -> dict:
    torch.manual_seed(0)
    lengths, h, hk, d = case["lengths"], case["heads"], case["kv_heads"], case["dim"]
    total, scale = sum(lengths), d ** -0.5
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    max_len = max(lengths)
    q = torch.randn(total, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=case["backward"])
    k, v = (torch.randn(total, hk, d, device="cuda", dtype=torch.bfloat16, requires_grad=case["backward"]) for _ in range(2))
    fn = kernel(name)
    result = {"case": case["name"], "kernel": name, "tokens": total, "segments": len(lengths), "max_len": max_len}
    try:
        out = fn(q, k, v, cu, max_len, case["causal"], scale)
        ref_in = [t.detach().clone().requires_grad_(case["backward"]) for t in (q, k, v)]
        ref = reference(*ref_in, cu, case["causal"], scale)
        result["max_abs_err"] = float((out.detach().float() - ref.detach()).abs().max())
        if case["backward"]:
            grad = torch.randn_like(out)
            dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
            rdq, rdk, rdv = torch.autograd.grad(ref, ref_in, grad.float())
            result["grad_max_abs_err"] = max(float((a.float() - b).abs().max()) for a, b in ((dq, rdq), (dk, rdk), (dv, rdv)))
            result["grad_ref_max"] = max(float(b.abs().max()) for b in (rdq, rdk, rdv))

        def once():
            o = fn(q, k, v, cu, max_len, case["causal"], scale)
            if case["backward"]:
                torch.autograd.grad(o, (q, k, v), grad)

        for _ in range(3):
            once()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        host = time.perf_counter()
        for _ in range(repeats):
            once()
        host = (time.perf_counter() - host) * 1e3 / repeats  # the host's time to issue one call (and its backward)
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / repeats
        result.update(ms=round(ms, 3), host_ms=round(host, 3), tflops=round(flops(lengths, h, d, case["causal"], case["backward"]) / ms / 1e9, 1))
    except Exception as error:  # a kernel that rejects the shape: reported, the others go on
        result["error"] = f"{type(error).__name__}: {str(error)[:300]}"
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--kernels", default="aten_flash,fa4")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "attention_kernels.json"))
    args = parser.parse_args()
    print(torch.__version__, torch.version.cuda, "cudnn", torch.backends.cudnn.version(), torch.cuda.get_device_name())
    results = []
    for case in cases(args.rows):
        for name in args.kernels.split(","):
            r = run_case(case, name, args.repeats)
            results.append(r)
            print(json.dumps(r))
    with open(args.out, "w") as f:
        json.dump({"torch": torch.__version__, "cudnn": torch.backends.cudnn.version(), "gpu": torch.cuda.get_device_name(),
                   "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
