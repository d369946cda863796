"""GPU checks of packing and varlen attention (run by tools/gpu/packing.sh on the lent H100).

1. Vision tower: a Qwen2.5-VL-3B-shaped tower (random init, bf16) on one 1008x1008 image (5184 patches,
   81 windows per window layer), the stock sdpa path (one attention per window) against one varlen call
   per layer with each CUDA kernel, forward and forward + backward, in the same process.
2. Packed vs one-by-one on a small random Qwen2.5-VL / Qwen3-VL (head dim 64) over mixed image, video and
   text samples: per-token losses and gradients in bf16 autocast and in fp32, each measured against the
   fp32 one-by-one reference next to the stock padded bf16 error, so "within bf16 tolerance" is a
   comparison, not a guess.

Prints one JSON object per section and writes them to $OUT/packing_bench.json.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from vltune.backends.torch.attention import enable_varlen_vision
from vltune.ops.torch.attention import BACKEND_ENV, available_backends

OUT = Path(os.environ.get("OUT", "/tmp/vltune-gpu"))
RESULTS: dict = {}
DRY = "--dry-run" in sys.argv
"""--dry-run: a CPU pass over the same code at toy sizes (catches mistakes before device time is spent)."""
DEVICE = torch.device("cpu" if DRY else "cuda")


def timed(fn, warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds of fn() over `iters` runs after `warmup`, by CUDA events."""
    if DRY:
        fn()
        return 1.0
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def vision_tower_bench() -> dict:
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    # Qwen2.5-VL-3B-Instruct's vision_config (the 7B differs only in out_hidden_size).
    config = Qwen2_5_VLConfig(vision_config=dict(
        depth=2 if DRY else 32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1] if DRY else [7, 15, 23, 31],
        hidden_act="silu", in_channels=3, tokens_per_second=2,
    )).vision_config
    torch.manual_seed(0)
    tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(config, attn_implementation="sdpa").to(DEVICE)
    side = 16 if DRY else 72  # 1008 / 14 = 72 patches a side
    dtype = torch.float32 if DRY else torch.bfloat16
    grid = torch.tensor([[1, side, side]], device=DEVICE)
    pixels = torch.randn(side * side, 3 * 2 * 14 * 14, device=DEVICE, dtype=dtype)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():  # the fp32 stock tower: what both bf16 paths are measured against
        exact = tower(pixels.float(), grid_thw=grid).pooler_output
    tower = tower.to(dtype)

    def forward():
        with torch.no_grad():
            return tower(pixels, grid_thw=grid).pooler_output

    def train_step():
        tower.zero_grad(set_to_none=True)
        tower(pixels, grid_thw=grid).pooler_output.float().square().mean().backward()

    out = {"image": f"{side * 14}x{side * 14}", "patches": side * side, "dtype": str(dtype), "layers": config.depth}
    reference = forward().float()
    out["stock_sdpa_ms"] = {"forward": timed(forward), "forward_backward": timed(train_step, 2, 5),
                            "rel_err_vs_fp32": ((reference - exact).norm() / exact.norm()).item()}
    enable_varlen_vision(tower)
    for backend in available_backends(pixels.device, dtype):
        os.environ[BACKEND_ENV] = backend
        try:
            t0 = time.perf_counter()
            result = forward().float()
            first = time.perf_counter() - t0
            row = {
                "forward": timed(forward), "forward_backward": timed(train_step, 2, 5), "first_call_s": round(first, 2),
                "max_abs_diff_vs_stock": (result - reference).abs().max().item(),
                "rel_diff_vs_stock": ((result - reference).norm() / reference.norm()).item(),
                "rel_err_vs_fp32": ((result - exact).norm() / exact.norm()).item(),
            }
            row["speedup_forward"] = out["stock_sdpa_ms"]["forward"] / row["forward"]
            row["speedup_forward_backward"] = out["stock_sdpa_ms"]["forward_backward"] / row["forward_backward"]
        except Exception as e:  # noqa: BLE001 -- one kernel failing must not hide the others' numbers
            row = {"error": f"{type(e).__name__}: {e}"[:500]}
        out[f"varlen_{backend}_ms"] = row
    os.environ.pop(BACKEND_ENV, None)
    return out


def parity(model_type: str) -> dict:
    import torch.nn.functional as F

    from vltune.backends.torch.models import load_model
    from vltune.backends.torch.tiny import TinySize, make_tiny
    from vltune.backends.torch.engine import Engine as TorchBackend
    from vltune.core.config import ModelArgs, TrainArgs
    from vltune.core.contracts import count_trained_tokens
    from vltune.data.collate import Collator
    from vltune.data.dataset import SFTDataset
    from vltune.data.formats import read_annotation
    from vltune.data.packing import collate_packed
    from vltune.data.synthetic_corpus import write_format_corpus

    torch.backends.cuda.matmul.allow_tf32 = False  # an fp32 reference that is fp32 (cuDNN's conv default is TF32)
    torch.backends.cudnn.allow_tf32 = False
    work = Path(tempfile.mkdtemp())
    size = TinySize(text_hidden=256, text_layers=4, text_heads=4, text_kv_heads=2, text_intermediate=704,
                    vision_hidden=128, vision_layers=4, vision_heads=2, vision_intermediate=352)
    model_dir = make_tiny(model_type, work / model_type, seed=0, size=size)
    files = write_format_corpus(work / "corpus", num_samples=20, seed=0)
    samples = {s.id: s for f in files for s in read_annotation(f).samples}
    ids = ("single-0", "video-2", "text-3", "image_video-9", "multi-1", "grounding-6")
    dataset = SFTDataset([samples[i] for i in ids], model_dir, max_length=4096, max_pixels=28 * 28 * 64)
    features = [dataset[i] for i in range(len(ids))]
    singles = [Collator(dataset.info, dataset.tokenizer.pad_token_id)([f]) for f in features]
    packed = collate_packed(features, dataset.info)
    n = count_trained_tokens(packed)

    def run(batches, bf16: bool):
        model = load_model(model_dir)
        backend = TorchBackend(model, model_dir, dataset.info, ModelArgs(model_name_or_path=str(model_dir), tune_mm_vision=True), TrainArgs(bf16=bf16))
        losses = []
        for b in batches:
            with torch.no_grad():
                logits = backend._logits(b)[0].float()
            labels = torch.as_tensor(b["labels"]).reshape(-1).to(backend.device)
            ce = F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="none")
            losses.append(ce[labels[1:] != -100])
            backend.forward_backward(b, 1.0 / n)
        grads = {k: p.grad.float().clone() for k, p in backend.model.named_parameters()}
        return torch.cat(losses), grads

    ref_loss, ref_grad = run(singles, bf16=False)

    def error(loss, grads):
        rel = [((grads[k] - ref_grad[k]).norm() / ref_grad[k].norm().clamp_min(1e-12)).item() for k in ref_grad]
        total = torch.sqrt(sum((grads[k] - ref_grad[k]).square().sum() for k in ref_grad)) / torch.sqrt(sum(g.square().sum() for g in ref_grad.values()))
        return {"loss_max_abs": (loss - ref_loss).abs().max().item(), "loss_mean_abs": (loss - ref_loss).abs().mean().item(),
                "grad_rel_global": total.item(), "grad_rel_worst_param": max(rel)}

    out = {"model_type": model_type, "samples": list(ids), "row_tokens": int(packed["input_ids"].shape[1]), "trained_tokens": n,
           "reference": "fp32, one sample at a time (padded path, stock sdpa)"}
    for name, batches, bf16 in (("packed_fp32", [packed], False), ("single_bf16_stock", singles, True), ("packed_bf16", [packed], True)):
        try:
            out[name] = error(*run(batches, bf16))
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": f"{type(e).__name__}: {e}"[:500], "trace": traceback.format_exc()[-1500:]}
    ok = "error" not in out["packed_bf16"] and "error" not in out["packed_fp32"]
    if ok:
        stock, mine = out["single_bf16_stock"], out["packed_bf16"]
        out["packed_bf16_within_bf16_tolerance"] = bool(
            mine["loss_max_abs"] <= max(2 * stock["loss_max_abs"], 0.05) and mine["grad_rel_global"] <= max(2 * stock["grad_rel_global"], 0.02)
        )
        out["packed_fp32_within_1e-4"] = bool(out["packed_fp32"]["loss_max_abs"] <= 1e-4)
    return out


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    RESULTS["env"] = {"torch": torch.__version__, "device": "cpu (dry run)" if DRY else torch.cuda.get_device_name(),
                      "bf16_backends": available_backends(DEVICE, torch.bfloat16),
                      "fp32_backends": available_backends(DEVICE, torch.float32)}
    print(json.dumps(RESULTS["env"]), flush=True)
    sections = [("vision_tower", vision_tower_bench)] + [(f"parity_{m}", lambda m=m: parity(m)) for m in ("qwen2_5_vl", "qwen3_vl")]
    if "--vision-only" in sys.argv:
        sections = sections[:1]
    for name, fn in sections:
        t0 = time.perf_counter()
        try:
            RESULTS[name] = fn()
        except Exception as e:  # noqa: BLE001
            RESULTS[name] = {"error": f"{type(e).__name__}: {e}"[:800], "trace": traceback.format_exc()[-2500:]}
        RESULTS[name]["section_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps({name: RESULTS[name]}), flush=True)
        (OUT / "packing_bench.json").write_text(json.dumps(RESULTS, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
