"""GPU check of vltune's Gated DeltaNet path (Qwen3.5): fla's kernels, with vltune's port of the backward
kernel fla refuses on Hopper + Triton 3.4-3.7.0, against the torch reference; then a packed row against
its samples alone through the whole engine in bf16.

1. Kernels. A packed row of 3 sequences (2048 tokens, the 9B's 16 key / 32 value heads of 128) in bf16:
   `chunk_gated_delta_rule_varlen` and `causal_conv1d_varlen` on the GPU (fla) against transformers' torch
   delta rule and a per-sample conv1d in fp32 on the CPU, each sample alone; outputs and the gradients of
   q, k, v, g, beta, x, weight. Before the port is registered, fla's own backward is tried once to record
   whether it refuses (fla #640) on this machine.
2. Engine. A random-init Qwen3.5 of the 2B's width cut to 4 layers (2 of each kind), bf16 autocast: the
   per-sample losses of a packed row of 3 bench samples against each sample run alone (padded batch of 1).

Writes one JSON to $OUT/gdn_check.json. Usage (repo root, on the GPU machine):
    python3 tools/gpu/gdn_check.py
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def kernel_check() -> dict:
    from transformers.models.qwen3_5 import modeling_qwen3_5

    import fla
    import triton

    from vltune.ops.torch import fla_hopper, gated_delta

    lengths, heads, value_heads, dim = (300, 700, 1048), 16, 32, 128
    total = sum(lengths)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, total, heads, dim, generator=gen)
    k = torch.randn(1, total, heads, dim, generator=gen)
    v = torch.randn(1, total, value_heads, dim, generator=gen)
    g = -torch.rand(1, total, value_heads, generator=gen) * 0.2 - 0.01
    beta = torch.rand(1, total, value_heads, generator=gen)
    dout = torch.randn(1, total, value_heads, dim, generator=gen)
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    # transformers wraps its torch delta rule to dispatch to fla when fla is installed: the torch function itself
    torch_rule = getattr(modeling_qwen3_5.torch_chunk_gated_delta_rule, "__wrapped__", modeling_qwen3_5.torch_chunk_gated_delta_rule)
    report = {"fla": fla.__version__, "triton": triton.__version__, "gpu": torch.cuda.get_device_name(),
              "needs_port": fla_hopper.needs_port()}

    def gpu_leaves():
        return [t.cuda().to(torch.bfloat16).requires_grad_(t.dtype.is_floating_point) for t in (q, k, v)] + \
               [g.cuda().requires_grad_(), beta.cuda().to(torch.bfloat16).requires_grad_()]

    # fla's own backward on this machine, before vltune's port is registered
    if report["needs_port"]:
        leaves = gpu_leaves()
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        out, _ = chunk_gated_delta_rule(*leaves[:3], g=leaves[3], beta=leaves[4], use_qk_l2norm_in_kernel=True, cu_seqlens=cu.cuda().long())
        try:
            out.backward(dout.cuda().to(out.dtype))
            report["fla_own_backward"] = "ran"
        except RuntimeError as e:
            report["fla_own_backward"] = f"refused: {str(e)[:160]}"
    report["port_registered"] = gated_delta.prepare_fla_kernels() and fla_hopper.ensure_registered()

    leaves = gpu_leaves()
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = gated_delta.chunk_gated_delta_rule_varlen(*leaves, cu.cuda(), modeling_qwen3_5.torch_chunk_gated_delta_rule)
    out.backward(dout.cuda().to(out.dtype))
    torch.cuda.synchronize()
    report["fla_fwd_bwd_ms_first_call"] = round((time.perf_counter() - start) * 1e3, 1)
    ours = [out] + [t.grad for t in leaves]

    # the reference: fp32 on the CPU (transformers' torch path), each sample alone
    ref_leaves = [t.detach().to(torch.bfloat16).float().requires_grad_() for t in (q, k, v)] + \
                 [g.clone().requires_grad_(), beta.to(torch.bfloat16).float().requires_grad_()]
    pieces = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        o, _ = torch_rule(
            *[t[:, a:b] for t in ref_leaves[:3]], g=ref_leaves[3][:, a:b], beta=ref_leaves[4][:, a:b], use_qk_l2norm_in_kernel=True)
        pieces.append(o)
    ref_out = torch.cat(pieces, 1)
    ref_out.backward(dout.to(torch.bfloat16).float())
    reference = [ref_out] + [t.grad for t in ref_leaves]
    report["delta_rule_rel_err"] = {name: round(rel(a, b), 5) for name, a, b in
                                    zip(("out", "dq", "dk", "dv", "dg", "dbeta"), ours, reference)}
    whole, _ = torch_rule(*[t.detach() for t in ref_leaves[:3]], g=ref_leaves[3].detach(),
                                                             beta=ref_leaves[4].detach(), use_qk_l2norm_in_kernel=True)
    report["whole_row_vs_per_sample_rel"] = round(rel(whole, ref_out), 5)  # the leak a boundary-blind path has

    # the causal conv: fla's varlen conv against a per-sample conv1d, fp32 reference
    channels = 2 * heads * dim + value_heads * dim
    x = torch.randn(1, total, channels, generator=gen)
    weight, bias = torch.randn(channels, 4, generator=gen) * 0.5, None
    xg, wg = x.cuda().to(torch.bfloat16).requires_grad_(), weight.cuda().to(torch.bfloat16).requires_grad_()
    y = gated_delta.causal_conv1d_varlen(xg, wg, bias, "silu", cu.cuda())
    dy = torch.randn(y.shape, generator=gen)
    y.backward(dy.cuda().to(y.dtype))
    xr, wr = x.to(torch.bfloat16).float().requires_grad_(), weight.to(torch.bfloat16).float().requires_grad_()
    ys = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        seg = F.conv1d(xr[:, a:b].transpose(1, 2), wr.unsqueeze(1), None, padding=3, groups=channels)[..., : b - a]
        ys.append(F.silu(seg).transpose(1, 2))
    yr = torch.cat(ys, 1)
    yr.backward(dy.to(torch.bfloat16).float())
    report["conv_rel_err"] = {"out": round(rel(y, yr), 5), "dx": round(rel(xg.grad, xr.grad), 5), "dweight": round(rel(wg.grad, wr.grad), 5)}
    return report


def engine_check(shape=None, device: str = "cuda") -> dict:
    from pathlib import Path

    from vltune.backends.torch import bench
    from vltune.backends.torch.engine import Engine
    from vltune.core.config import ModelArgs, TrainArgs
    from vltune.core.flops import SHAPES
    from vltune.data.collate import collate_padded
    from vltune.data.packing import collate_packed

    shape = shape or bench.reduced_depth(SHAPES["qwen3_5-2b"], 4)
    device = torch.device(device)
    model = bench.build_model(shape, 0, device)
    info = bench._info(shape)
    features = bench._features(shape, 3, 0)
    engine = Engine(model, Path("."), info, ModelArgs(model_name_or_path="bench"), TrainArgs(bf16=device.type == "cuda"))
    engine.model.eval()
    packed = collate_packed(features, info)

    def sample_losses(batch) -> list[float]:
        with torch.no_grad():
            logits = engine._logits(batch)[0].float()
        labels = torch.as_tensor(batch["labels"]).reshape(-1).to(device)
        ce = F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="none")
        if "cu_seqlens" not in batch:
            return [float(ce[labels[1:] != -100].mean())]
        out = []
        for a, b in zip(batch["cu_seqlens"][:-1], batch["cu_seqlens"][1:]):
            piece, keep = ce[a:b - 1], labels[a + 1:b] != -100
            out.append(float(piece[keep].mean()))
        return out

    packed_losses = sample_losses(packed)
    alone = [sample_losses(collate_padded([f], info, bench._ids(shape).pad))[0] for f in features]
    lengths = [len(f.input_ids) for f in features]
    return {"lengths": lengths, "packed": [round(x, 5) for x in packed_losses], "alone": [round(x, 5) for x in alone],
            "max_rel_diff": round(max(abs(a - b) / abs(b) for a, b in zip(packed_losses, alone)), 5)}


def main() -> None:
    out = os.environ.get("OUT", "/tmp/vltune-gpu")
    os.makedirs(out, exist_ok=True)
    result = {"kernels": kernel_check(), "engine_bf16_packed_vs_alone": engine_check()}
    print(json.dumps(result, indent=1))
    with open(os.path.join(out, "gdn_check.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
