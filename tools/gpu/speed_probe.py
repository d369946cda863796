"""Predict, change, measure: times vltune's training step on a released shape under each speed option,
in one process on one GPU, and breaks one step down (issue 12's work method; docs/performance.md).

Variants (each on a fresh random-init model of the same seed, the same packed 4096-token rows):
  kept_logits   stock LM head on the kept positions (`logits_to_keep`), fp32 CE: the data-parallel engines' path
  chunked       LM head + CE after the forward, in checkpointed chunks: the one-process default
  compile_text  chunked + torch.compile of each decoder layer
  compile       chunked + torch_compile (each decoder layer and vision block)
  liger         chunked + use_liger_kernel (RMSNorm / SwiGLU kernels)
  unaligned     chunked with the stock 3420-wide vision MLP (the default zero-pads it to 3456); _compile on top
  vision_bf16   chunked with the frozen vision blocks held in bf16 (no per-step weight casts, bf16 activations)
  vision_bf16_compile  vision_bf16 + torch_compile
  bf16_8bit     pure_bf16 + optim adamw_torch_8bit (bf16 weights, 8-bit AdamW); _liger / _compile on top
  bf16_base     pure_bf16, for --train-type lora (bf16 base, fp32 adapters); _liger / _compile on top
  master        bf16_master_weights (bf16 weights, fp32 masters for AdamW); compile_master with torch_compile;
                compile_master_cpp with Inductor's C++ wrapper (kernel launches from C++, not Python)
  *_pad         every row padded to --pack-length with one padding sub-sequence (one shape for the
                compiled layers); decoder layers compiled with automatic dynamic shapes, not dynamic=True
(The `*_nosync` variants of docs/performance.md's 2026-11-23 table kept each row's loss on the device
before TorchBackend did so itself; since then every variant does, and they were removed.)
--rows-per-step K: K rows' gradients per optimizer step (an accumulated step); --steady: warm up on
the timed rows themselves, so every shape they meet is compiled before the clock starts.
Also: the bf16 matmul ceiling of this GPU at the model's MLP shape, and (--profile) a torch.profiler
breakdown of one step of the first variant: device time by kernel class and device-idle share.

Usage (GPU machine, repo root): python3 tools/gpu/speed_probe.py --shape qwen2_5_vl-3b --variants chunked,bf16_8bit
       python3 tools/gpu/speed_probe.py --shape qwen2_5_vl-7b --train-type lora --variants bf16_base,bf16_base_liger
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
import traceback
from pathlib import Path

import torch

from vltune.backends.torch.bench import _info, _packed_rows, build_model, packed_step, step_flops
from vltune.backends.torch.speed import compile_blocks
from vltune.backends.torch.engine import Engine as TorchBackend
from vltune.core.config import ModelArgs, TrainArgs
from vltune.core.flops import H100_BF16_PEAK, SHAPES

VARIANTS = {
    "kept_logits": ({}, {"head_loss_after_forward": False}),
    "chunked": ({}, {}),
    "compile_text": ({}, {"compile_text": True}),
    "compile": ({"torch_compile": True}, {}),
    "liger": ({"use_liger_kernel": True}, {}),
    "unaligned": ({}, {"unaligned_vision_mlp": True}),
    "unaligned_compile": ({"torch_compile": True}, {"unaligned_vision_mlp": True}),
    "vision_bf16": ({}, {"vision_bf16": True}),
    "vision_bf16_compile": ({"torch_compile": True}, {"vision_bf16": True}),
    # bf16 weights with no fp32 copy; full fine-tuning needs the 8-bit AdamW's stochastic rounding with them
    "bf16_8bit": ({"pure_bf16": True, "optim": "adamw_torch_8bit"}, {}),
    "bf16_8bit_liger": ({"pure_bf16": True, "optim": "adamw_torch_8bit", "use_liger_kernel": True}, {}),
    "bf16_8bit_compile": ({"pure_bf16": True, "optim": "adamw_torch_8bit", "torch_compile": True}, {}),
    # --train-type lora: a bf16 base under fp32 adapters
    "bf16_base": ({"pure_bf16": True}, {}),
    "bf16_base_liger": ({"pure_bf16": True, "use_liger_kernel": True}, {}),
    "bf16_base_compile": ({"pure_bf16": True, "torch_compile": True}, {}),
    "compile_pad": ({"torch_compile": True}, {"pad": True}),
    "compile_master": ({"torch_compile": True, "bf16_master_weights": True}, {}),
    "master": ({"bf16_master_weights": True}, {}),
    "compile_master_cpp": ({"torch_compile": True, "bf16_master_weights": True}, {"cpp_wrapper": True}),
    "chunked_pad": ({}, {"pad": True}),
}


def pad_row(batch: dict, length: int, pad_id: int = 151643) -> dict:
    """The row with one more sub-sequence of padding (labels -100, text positions from 0) up to `length`."""
    import numpy as np

    n = length - batch["input_ids"].shape[1]
    if n <= 0:
        return batch
    out = dict(batch)
    out["input_ids"] = np.concatenate([batch["input_ids"], np.full((1, n), pad_id, dtype=batch["input_ids"].dtype)], axis=1)
    out["labels"] = np.concatenate([batch["labels"], np.full((1, n), -100, dtype=batch["labels"].dtype)], axis=1)
    pos = np.broadcast_to(np.arange(n, dtype=batch["position_ids"].dtype), (3, 1, n))
    out["position_ids"] = np.concatenate([batch["position_ids"], pos], axis=2)
    out["cu_seqlens"] = np.append(batch["cu_seqlens"], np.int32(length)).astype(np.int32)
    out["max_seqlen"] = np.asarray(max(int(batch["max_seqlen"]), n), dtype=np.int64)
    out["real_tokens"] = int(batch["cu_seqlens"][-1])
    return out


def row_tokens(batch: dict) -> int:
    return batch.get("real_tokens", int(batch["cu_seqlens"][-1]))


def unpadded(batch: dict) -> dict:
    """The row as packed, for the FLOPs count (padding is not model work)."""
    if "real_tokens" not in batch:
        return batch
    out = dict(batch)
    out["cu_seqlens"] = batch["cu_seqlens"][:-1]
    return out


def matmul_ceiling(m: int, k: int, n: int) -> float:
    a, b = torch.randn(m, k, device="cuda", dtype=torch.bfloat16), torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(50):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * m * k * n * 50 / (start.elapsed_time(end) / 1e3)


def make_backend(shape, train: dict, hooks: dict, train_type: str) -> TorchBackend:
    model = build_model(shape, seed=0, device=torch.device("cuda"))
    args = TrainArgs(bf16=True, learning_rate=1e-5, max_grad_norm=1.0, weight_decay=0.0, **train)
    backend = TorchBackend(model, Path("."), _info(shape), ModelArgs(model_name_or_path="bench", train_type=train_type), args)
    if "head_loss_after_forward" in hooks:
        backend.head_loss_after_forward = hooks["head_loss_after_forward"]
    if hooks.get("vision_bf16"):
        backend.base.model.visual.blocks.to(torch.bfloat16)
        backend.base.model.visual.patch_embed.to(torch.bfloat16)
    if hooks.get("unaligned_vision_mlp"):  # the stock 3420-wide vision MLP (before align_vision_mlp)
        for block in backend.base.model.visual.blocks:
            block.mlp.__dict__.pop("forward", None)
            block.mlp._compiled_call_impl = None
        if train.get("torch_compile"):
            compile_blocks(backend.base)
    if hooks.get("compile_text"):
        compile_blocks(backend.base, vision=False)
    if hooks.get("pad") and train.get("torch_compile"):  # rows of one length: automatic dynamic for the decoder layers
        for layer in backend.base.model.language_model.layers:
            layer._compiled_call_impl = None
            layer.compile()
    return backend


def step(backend: TorchBackend, batch: dict | list[dict]) -> float:
    """One optimizer step over one row or a list of rows (accumulated), as the bench and core/loop.py run it."""
    return packed_step(backend, batch if isinstance(batch, list) else [batch])


def phase_times(backend: TorchBackend, batch: dict) -> dict:
    """Milliseconds of the step's parts, each timed alone with a sync around it."""
    from vltune.backends.torch.batch import to_model_inputs

    def timed(fn, n=3):
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        return round((time.perf_counter() - t) / n * 1e3, 2)

    inputs = to_model_inputs(batch, backend.device, model=backend.model)

    def vision():  # the tower as the training forward runs it (its grid-derived inputs from the host)
        with torch.no_grad(), backend._autocast():
            backend._encode_vision(batch, dict(inputs))

    count = int((batch["labels"][:, 1:] != -100).sum())

    def forward_backward():
        backend.forward_backward(batch, 1.0 / count)
        backend.zero_grad()

    def whole_step():
        backend.forward_backward(batch, 1.0 / count)
        backend.optimizer_step(0.0, 1.0)  # lr 0: the same work, the weights unchanged

    out = {
        "h2d_inputs_ms": timed(lambda: to_model_inputs(batch, backend.device, model=backend.model)),
        "vision_forward_ms": timed(vision) if "pixel_values" in inputs else 0.0,
        "forward_backward_ms": timed(forward_backward),
        "step_ms": timed(whole_step),
    }
    out["clip_and_optimizer_ms"] = round(out["step_ms"] - out["forward_backward_ms"], 2)
    return out


def sync_sites(backend: TorchBackend, batch: dict | list[dict]) -> dict[str, int]:
    """Where one step makes the host wait for the GPU (torch's sync debug mode), by call site."""
    import traceback
    import warnings
    from collections import Counter

    sites: Counter = Counter()

    def record(message, *args, **kwargs):
        if "synchroniz" in str(message):
            frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.startswith(torch.__path__[0]) or "/optim/" in f.filename]
            sites[" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(backend, batch)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return dict(sites.most_common())


def profile_step(backend: TorchBackend, batch: dict | list[dict], out_dir: Path, name: str) -> dict:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        step(backend, batch)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    classes: dict[str, float] = {}
    total = 0.0
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", 0.0) or 0.0
        if device_us <= 0 or event.device_type.name != "CUDA":
            continue
        key = event.key.lower()
        if "gemm" in key or "cutlass" in key or "sm90" in key or "matmul" in key or "xmma" in key:
            kind = "matmul"
        elif "flash" in key or "fmha" in key or "attn" in key:
            kind = "attention"
        elif "adam" in key or "multi_tensor" in key:
            kind = "optimizer"
        elif "memcpy" in key or "memset" in key:
            kind = "copy"
        elif "triton" in key or "liger" in key:
            kind = "triton"
        else:
            kind = "other_elementwise"
        classes[kind] = classes.get(kind, 0.0) + device_us / 1e3
        total += device_us / 1e3
    averages = prof.key_averages()
    table = averages.table(sort_by="self_cuda_time_total", row_limit=40)
    cpu_table = averages.table(sort_by="self_cpu_time_total", row_limit=40)
    (out_dir / f"profile_{name}.txt").write_text(table + "\n\nHost side, by self CPU time:\n" + cpu_table)
    host = {e.key: e.count for e in averages if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::item",
                                                          "aten::_local_scalar_dense", "cudaMemcpyAsync", "aten::nonzero")}
    return {"wall_ms": round(wall * 1e3, 1), "device_busy_ms": round(total, 1), "idle_share": round(1 - total / (wall * 1e3), 3),
            "by_class_ms": {k: round(v, 1) for k, v in sorted(classes.items(), key=lambda kv: -kv[1])}, "host_calls": host}


def run_variant(name: str, shape, rows: list[dict], warmup: list[dict], profile: bool, out_dir: Path, train_type: str,
                rows_per_step: int = 1, steady: bool = False, pack_length: int = 4096) -> dict:
    train, hooks = VARIANTS[name]
    from torch._dynamo.utils import counters

    counters.clear()
    if hooks.get("pad"):
        rows, warmup = [pad_row(b, pack_length) for b in rows], [pad_row(b, pack_length) for b in warmup]
    if steady:
        warmup = warmup + rows
    k = rows_per_step
    steps, warm_steps = [rows[i:i + k] for i in range(0, len(rows), k)], [warmup[i:i + k] for i in range(0, len(warmup), k)]
    torch._inductor.config.cpp_wrapper = bool(hooks.get("cpp_wrapper"))
    backend = make_backend(shape, train, hooks, train_type)
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for batch in warm_steps:
        step(backend, batch)
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t
    graphs_warm = counters["stats"]["unique_graphs"]
    breaks = {str(reason)[:160]: n for reason, n in counters["graph_break"].items()}
    t = time.perf_counter()
    losses = [step(backend, batch) for batch in steps]
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    tokens = sum(row_tokens(b) for b in rows)
    flops = sum(step_flops(shape, unpadded(b), train_type) for b in rows)
    result = {"variant": name, "rows_per_step": k, "steady": steady, "tokens_per_s": round(tokens / seconds, 1),
              "mfu": round(flops / seconds / H100_BF16_PEAK, 4),
              "ms_per_row": round(seconds / len(rows) * 1e3, 1), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
              "warmup_s": round(warm_s, 1), "graphs_after_warmup": graphs_warm,
              "graphs_compiled_in_timed_steps": counters["stats"]["unique_graphs"] - graphs_warm, "graph_breaks": breaks,
              "losses": [round(x, 4) for x in losses]}
    if profile:
        result["phases"] = phase_times(backend, rows[0])
        result["profile"] = profile_step(backend, steps[0], out_dir, name)
        result["sync_sites"] = sync_sites(backend, steps[0])
    del backend
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen2_5_vl-3b")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--samples", type=int, default=60)
    parser.add_argument("--pack-length", type=int, default=4096)
    parser.add_argument("--train-type", default="full", choices=["full", "lora"])
    parser.add_argument("--warmup-samples", type=int, default=12)
    parser.add_argument("--profile", default="", help="comma-separated variants to break down (phase times, profile)")
    parser.add_argument("--rows-per-step", type=int, default=1)
    parser.add_argument("--steady", action="store_true", help="warm up on the timed rows too: no compile in the timed steps")
    args = parser.parse_args()
    out_dir = Path(os.environ.get("OUT", "/tmp/vltune-gpu"))
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.enable_cudnn_sdp(False)
    shape = SHAPES[args.shape]
    h, i = shape.hidden, shape.intermediate
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}; bf16 matmul [4096x{h}]x[{h}x{i}]: "
          f"{matmul_ceiling(4096, h, i) / 1e12:.0f} TFLOP/s, [4096x{i}]x[{i}x{h}]: {matmul_ceiling(4096, i, h) / 1e12:.0f} TFLOP/s", flush=True)
    if shape.model_type == "qwen2_5_vl":  # the vision MLP at a 10k-patch row: as released, and zero-padded to 3456
        vh, vi = shape.vision_hidden, shape.vision_intermediate
        print(f"vision MLP [10240x{vh}]x[{vh}x{vi}]: {matmul_ceiling(10240, vh, vi) / 1e12:.0f} TFLOP/s, padded to 3456: "
              f"{matmul_ceiling(10240, vh, 3456) / 1e12:.0f}; [10240x{vi}]x[{vi}x{vh}]: {matmul_ceiling(10240, vi, vh) / 1e12:.0f}, "
              f"padded: {matmul_ceiling(10240, 3456, vh) / 1e12:.0f}", flush=True)
    rows = _packed_rows(shape, args.samples, args.pack_length, seed=0)
    warmup = _packed_rows(shape, args.warmup_samples, args.pack_length, seed=1)
    print(f"{len(rows)} timed rows, {len(warmup)} warm-up rows", flush=True)
    results = []
    for name in args.variants.split(","):
        try:
            results.append(run_variant(name, shape, rows, warmup, name in args.profile.split(","), out_dir, args.train_type,
                                       args.rows_per_step, args.steady, args.pack_length))
        except Exception as e:  # one failing variant must not cost the others' numbers
            traceback.print_exc()
            results.append({"variant": name, "error": f"{type(e).__name__}: {e}"[:300]})
            torch._dynamo.reset()
            gc.collect()
            torch.cuda.empty_cache()
        print(json.dumps(results[-1]), flush=True)
    (out_dir / f"speed_probe_{args.shape}-{args.train_type}.json").write_text(json.dumps(results, indent=2))
    print("\n| variant | tokens/s | MFU | ms/row | peak GiB | first loss |\n|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['variant']} | error: {r['error'][:80]} |")
        else:
            print(f"| {r['variant']} | {r['tokens_per_s']} | {r['mfu']} | {r['ms_per_row']} | {r['peak_gib']} | {r['losses'][0]} |")


if __name__ == "__main__":
    main()
