"""The stock baseline of issue 28's MoE run: the transformers model trained with plain torch FSDP2.

    python3 -m torch.distributed.run --standalone --nproc_per_node 8 tools/gpu/stock_fsdp.py \
        --recipe recipes/qwen2_5_vl_3b_full_1gpu.yaml --out OUT_DIR [--batch 4] [--steps 12] [--pure-bf16] [--checkpointing] \
        model_name_or_path=MODEL_DIR dataset_use=DATA.jsonl ...

`AutoModelForImageTextToText.from_pretrained` of the same directory, `fully_shard` per decoder layer, vision
block and projector (the family's module map) and the root, bf16 compute with fp32 parameters and fp32 gradient reduction
(`MixedPrecisionPolicy`; `--pure-bf16`: bf16 parameters and AdamW state, as vltune's pure_bf16), torch
AdamW (lr 1e-5, no weight decay), the vision tower frozen and the projectors trained (the recipes' tune_mm_*).
Batches are padded (right), `--batch` samples per GPU per step, made by vltune's own data pipeline from
the recipe and KEY=VALUE overrides (the same samples the vltune run packs: tokenised, resized, patched),
rank r taking the samples r, r + world, ... of each step. Writes OUT_DIR/metrics.jsonl with vltune's row
format: step, loss, tokens_per_s = real (non-pad) tokens of all ranks / step time, peak_mem_gib = the
largest over ranks. The stock loss is transformers' own (mean over each micro-batch's answer tokens).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=4, help="samples per GPU per step (padded)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--pure-bf16", action="store_true")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("keys", nargs="*", help="recipe keys, KEY=VALUE (model_name_or_path, dataset_use, max_pixels, ...)")
    args = parser.parse_args()

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForImageTextToText

    from vltune.backends.torch.batch import mm_token_types, to_model_inputs
    from vltune.backends.torch.models import part
    from vltune.core.families import get_family
    from vltune.core.recipe import load_recipe
    from vltune.data.collate import Collator
    from vltune.data.model_info import read_model_info
    from vltune.data.prepare import build_dataset

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    cfg = load_recipe(args.recipe, dict(kv.split("=", 1) for kv in args.keys))
    info = read_model_info(cfg.model.model_name_or_path)
    dataset, _ = build_dataset(cfg, cfg.data.dataset_use)
    collate = Collator(info, dataset.tokenizer.pad_token_id)

    dtype = torch.bfloat16 if (args.pure_bf16 and cuda) else torch.float32
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(cfg.model.model_name_or_path, dtype=dtype)
    modules = get_family(model.config.model_type).modules  # the family's module map, as vltune's engine reads it
    vision, projectors = part(model, "vision_tower"), [model.get_submodule(p) for p in modules.projectors]
    vision.requires_grad_(False)
    for projector in projectors:
        projector.requires_grad_(True)
    if args.checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if (cuda and not args.pure_bf16) else MixedPrecisionPolicy()
    model.to(device)
    units = [m for p in projectors for m in (p if isinstance(p, torch.nn.ModuleList) else [p])]  # Qwen3-VL's deepstack list
    for module in [*part(model, "vision_blocks"), *units, *part(model, "decoder_layers")]:
        fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)

    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text("")
    n = len(dataset)
    wants_types = "mm_token_type_ids" in inspect.signature(type(model).forward).parameters  # transformers 5.x's M-RoPE input
    for step in range(1, args.steps + 1):
        first = (step - 1) * args.batch * world
        ids = [(first + rank + k * world) % n for k in range(args.batch)]
        batch = collate([dataset[i] for i in ids])
        inputs = to_model_inputs(batch, device, model=model)  # the inputs its forward names
        inputs.pop("position_ids", None)  # the stock model computes its own positions
        inputs["labels"] = torch.as_tensor(batch["labels"]).to(device)
        if wants_types:
            inputs["mm_token_type_ids"] = mm_token_types(inputs["input_ids"], info.image_token_id, info.video_token_id)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        stats = torch.tensor([float(inputs["attention_mask"].sum()), float(loss.detach())], dtype=torch.float64, device=device)
        dist.all_reduce(stats)
        slowest = torch.tensor([seconds, torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0], dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        if rank == 0:
            row = {"step": step, "loss": round(float(stats[1]) / world, 6), "tokens_per_s": round(float(stats[0]) / float(slowest[0]), 1),
                   "tokens": int(stats[0]), "step_s": round(float(slowest[0]), 4)}
            if cuda:
                row["peak_mem_gib"] = round(float(slowest[1]), 2)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
