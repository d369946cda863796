"""`vltune bench --model-shape NAME`: the stock transformers training step vs vltune's, in one run.

Both paths get a random-init model of the released shape (core/flops.py SHAPES) from the same seed and
the same micro-batches of a realistic mixed workload (data/synthetic_workload.py), and train for the
same number of steps:

(a) stock: the transformers model with sdpa, padded batches, its own loss (`labels=`), torch AdamW
    (default foreach implementation), bf16 autocast, mm_token_type_ids for its own M-RoPE ids;
(b) vltune: the engine (engine.Engine) as `vltune train` drives it (fused AdamW, vltune's position ids, its loss
    over trained positions only) on the same samples packed into rows of `pack_length` tokens with
    varlen attention in the LLM and one varlen call per vision layer (data/packing.py, ops/torch).

Reported per path: tokens/s (non-pad tokens), samples/s, MFU (core/flops.py), peak memory, the losses
(per step, and the trained-token-weighted mean over the same samples, which both paths must agree on)
and the ratio b/a. Timing excludes warm-up steps and synchronises the GPU around the timed steps only.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from vltune.core.config import ModelArgs, TrainArgs
from vltune.core.recipe_rules import precision_problems
from vltune.core.families import TokenIds, get_family
from vltune.core.flops import H100_BF16_PEAK, SHAPES, ModelShape, batch_flops
from vltune.data.collate import collate_padded
from vltune.data.model_info import ModelInfo
from vltune.data.packing import best_fit_decreasing, collate_packed
from vltune.data.synthetic_workload import WorkloadTokens, mixed_features

from vltune.ops.torch.gated_delta import prepare_fla_kernels

from .batch import mm_token_types, to_model_inputs
from .lora import apply_lora
from .models import part
from .optim import bf16_weights, upcast_trainable
from .engine import Engine
from .fp8 import check_fp8_device



def reduced_depth(shape: ModelShape, layers: int | None) -> ModelShape:
    """`shape` with its first `layers` decoder layers (None: as released)."""
    if layers is None:
        return shape
    if not 1 <= layers <= shape.layers:
        raise ValueError(f"--layers {layers}: the shape has {shape.layers} decoder layers")
    deepstack = tuple(i for i in shape.deepstack if i < layers)
    return replace(shape, layers=layers, layer_types=shape.layer_types[:layers], deepstack=deepstack)


def hf_config(shape: ModelShape) -> dict:
    """A config.json dict of that shape, as the released checkpoint's."""
    return get_family(shape.model_type).config_json(shape, _ids(shape))


def _ids(shape: ModelShape) -> TokenIds:
    """The released tokenizer's special token ids (the bench has no tokenizer): the family's."""
    ids = get_family(shape.model_type).released_token_ids
    if ids is None:
        raise ValueError(f"{shape.model_type}: the family spec names no released token ids; the bench cannot build its batches")
    return ids


def build_model(shape: ModelShape, seed: int, device: torch.device):
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.for_model(**hf_config(shape))
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with device:  # initialise on the GPU: minutes faster than on the host for billions of weights
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():  # values a released (bf16) checkpoint can hold, loaded in fp32 as both paths load it
        for param in model.parameters():
            param.copy_(param.to(torch.bfloat16))
    return model


def _info(shape: ModelShape) -> ModelInfo:
    ids = _ids(shape)
    return ModelInfo(shape.model_type, ids.image, ids.video, ids.vision_start, 2, 2, shape.layers, shape.attention_layers)


def _features(shape: ModelShape, n: int, seed: int):
    ids = _ids(shape)
    tokens = WorkloadTokens(shape.vocab, ids.image, ids.vision_start, ids.vision_end)
    return mixed_features(n, tokens, patch_size=shape.patch_size, temporal_patch=shape.temporal_patch, seed=seed,
                          max_pixels=1280 * (shape.patch_size * 2) ** 2)


def _batches(shape: ModelShape, steps: int, batch_size: int, seed: int, per_step: int) -> list[list[dict]]:
    """Step k = `per_step` samples in padded micro-batches of `batch_size` (the stock path's input)."""
    features, info = _features(shape, steps * per_step, seed), _info(shape)
    micro = [collate_padded(features[i:i + batch_size], info, pad_token_id=_ids(shape).pad) for i in range(0, len(features), batch_size)]
    per = per_step // batch_size
    return [micro[k * per:(k + 1) * per] for k in range(steps)]


def _pack(features: list, info: ModelInfo, pack_length: int) -> list[dict]:
    """`features` packed best-fit-decreasing into rows of <= pack_length tokens."""
    packing = best_fit_decreasing([len(f.input_ids) for f in features], pack_length)
    return [collate_packed([features[i] for i in bin_], info) for bin_ in packing.bins]


def _packed_rows(shape: ModelShape, n_samples: int, pack_length: int, seed: int) -> list[dict]:
    """The same samples as `_batches(..., seed)` packed into rows (the bench's vltune path)."""
    return _pack(_features(shape, n_samples, seed), _info(shape), pack_length)


def _packed_steps(shape: ModelShape, steps: int, per_step: int, pack_length: int, seed: int) -> list[list[dict]]:
    """Step k = the samples of the stock path's step k, packed into as few rows as fit: the optimizer
    then sees the same samples per step on both paths, so the loss curves compare step by step."""
    features, info = _features(shape, steps * per_step, seed), _info(shape)
    return [_pack(features[k * per_step:(k + 1) * per_step], info, pack_length) for k in range(steps)]


def _row_steps(shape: ModelShape, n_samples: int, pack_length: int, seed: int, rows_per_step: int) -> list[list[dict]]:
    """The same samples as `_batches(..., seed)`, packed all together (as `vltune train` packs a data set:
    full rows) and taken `rows_per_step` rows per optimizer step."""
    rows = _packed_rows(shape, n_samples, pack_length, seed)
    return [rows[i:i + rows_per_step] for i in range(0, len(rows), rows_per_step)]


def _sequence_lengths(batch: dict) -> list[int]:
    if "cu_seqlens" in batch:
        return [int(n) for n in np.diff(batch["cu_seqlens"])]
    return [int(n) for n in batch["attention_mask"].sum(axis=1)]


def step_flops(shape: ModelShape, batch: dict, train_type: str = "full") -> float:
    """Model FLOPs of one micro-batch, vision tower frozen (forward only, 2N). The LLM counts 6N per token
    in full fine-tuning; with LoRA 4N (forward plus the activation gradients; its frozen weights get no
    weight gradients, and the adapters' own FLOPs are under 1% at r=64)."""
    return batch_flops(shape, batch, llm_multiplier=6 if train_type == "full" else 4, vision_multiplier=2)


def _stock_step(model, optimizer, batches: list[dict], device: torch.device) -> torch.Tensor:
    """One optimizer step over gradients accumulated on `batches`, each micro-batch's loss normalised
    by the step's trained tokens (transformers' `num_items_in_batch`, as its Trainer does)."""
    total = sum(_trained(b) for b in batches)
    step_loss = torch.zeros((), device=device)
    for batch in batches:
        inputs = to_model_inputs(batch, device, model=model)
        inputs.pop("position_ids")  # the stock model computes its own M-RoPE ids from mm_token_type_ids
        mm_types = mm_token_types(inputs["input_ids"], model.config.image_token_id, model.config.video_token_id)
        labels = torch.as_tensor(batch["labels"]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(**inputs, mm_token_type_ids=mm_types, labels=labels, num_items_in_batch=total).loss
        loss.backward()
        step_loss += loss.detach()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss


def _time(run_step, warmup: list, steps: list) -> tuple[float, list[float], int]:
    """Seconds for `steps` (after the untimed `warmup` ones), their losses, and how many graphs
    torch.compile built inside them (each costs seconds: a warm-up that missed a row length)."""
    from torch._dynamo.utils import counters

    for step in warmup:
        run_step(step)
    torch.cuda.synchronize()
    graphs = counters["stats"]["unique_graphs"]
    start = time.perf_counter()
    timed = [run_step(step) for step in steps]
    torch.cuda.synchronize()
    return time.perf_counter() - start, [float(x) for x in timed], counters["stats"]["unique_graphs"] - graphs


def packed_step(backend, rows: list[dict]) -> float:
    """One optimizer step of `backend` over `rows`, as core/loop.py runs it: each row's loss scaled by the
    step's trained tokens, the summed loss read once (the losses stay on the device until then)."""
    count = sum(_trained(row) for row in rows)
    loss_sum = float(sum(backend.forward_backward(row, 1.0 / count) for row in rows))
    backend.optimizer_step(1.0, 1.0)
    return loss_sum / count


def _trained(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def _summary(name: str, shape: ModelShape, steps: list[list[dict]], seconds: float, losses: list[float], train_type: str) -> dict:
    batches = [b for step in steps for b in step]
    tokens = sum(sum(_sequence_lengths(b)) for b in batches)
    flops = sum(step_flops(shape, b, train_type) for b in batches)
    trained = [sum(_trained(b) for b in step) for step in steps]
    return {
        "path": name, "steps": len(steps), "rows": len(batches), "tokens_per_s": round(tokens / seconds, 1),
        "samples_per_s": round(sum(len(_sequence_lengths(b)) for b in batches) / seconds, 2),
        "mfu": round(flops / seconds / H100_BF16_PEAK, 4), "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "seconds": round(seconds, 2), "mean_loss": round(sum(l * n for l, n in zip(losses, trained)) / sum(trained), 4),
        "losses": [round(x, 4) for x in losses],
    }


def _run_stock(shape, seed, device, model_args: ModelArgs, padded, padded_warmup, learning_rate: float) -> tuple[dict, dict]:
    """(a) on padded batches; returns its summary and the initial weights, for (b) to start from."""
    model = build_model(shape, seed, device)
    initial = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    train_type = model_args.train_type
    if train_type == "lora":
        # What a peft user runs: the base in bf16, fp32 adapters (peft's default), the merger trained in full.
        bf16_weights(model)
        torch.manual_seed(seed)  # the adapters' init, as (b) draws it
        model = apply_lora(model, model_args)
        upcast_trainable(model)
    else:
        modules = get_family(shape.model_type).modules  # vision tower frozen (qwen-vl-finetune's default), projectors trained
        part(model, "vision_tower").requires_grad_(False)
        for path in modules.projectors:
            model.get_submodule(path).requires_grad_(True)
        for path in modules.unreached:
            model.get_submodule(path).requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    torch.cuda.reset_peak_memory_stats()
    seconds, losses, _ = _time(lambda b: _stock_step(model, optimizer, b, device), padded_warmup, padded)
    summary = _summary("stock", shape, padded, seconds, losses, train_type)
    model = optimizer = None  # free the GPU for (b)
    gc.collect()
    torch.cuda.empty_cache()
    return summary, initial


def run_bench(
    model_shape: str, *, steps: int = 20, warmup: int = 5, batch_size: int = 2, pack_length: int = 4096,
    seed: int = 0, command: str = "", train_type: str = "full", train_options: dict | None = None,
    with_stock: bool = True, match_steps: bool = False, samples_per_step: int | None = None,
    learning_rate: float = 1e-5, name: str | None = None, rows_per_step: int | None = None,
    layers: int | None = None,
) -> dict:
    """(a) stock on `steps` padded micro-batches of `batch_size`, (b) vltune on the very same samples
    packed into rows of <= `pack_length` tokens; each after untimed warm-up steps on other samples.

    `train_type`: full (vision tower frozen) or lora (adapters on the LLM, merger trained; stock runs
    peft on a bf16 base). `train_options`: TrainArgs keys for (b), e.g. {"torch_compile": True} (whose
    warm-up must be long enough to compile for the row lengths it will see), {"pure_bf16": True},
    {"fp8": True} (torchao's float8 decoder linears; the stock path stays bf16).
    `with_stock=False` runs (b) alone (a configuration the stock path cannot fit). By default (a) steps
    once per micro-batch and (b) once per packed row. `samples_per_step` (a multiple of `batch_size`):
    both paths take one optimizer step per that many samples, (a) accumulating gradients over its
    micro-batches, (b) over those samples packed into rows; `steps` then counts optimizer steps.
    `match_steps` is `samples_per_step=batch_size` (the loss-curve comparison, step by step).
    `rows_per_step` (with `samples_per_step`, which sets the stock path's step): vltune packs all the
    samples together into full rows, as `vltune train` packs a data set, and steps once per that many
    rows; its steps then hold other groupings of the same samples, so only the mean losses compare.
    Its warm-up: the `warmup` x `samples_per_step` warm-up samples packed the same way; a last step
    may hold fewer rows.
    `learning_rate` for both paths (a larger one makes the loss curves move).
    `name`: the report's file name (default MODEL_SHAPE, or MODEL_SHAPE-lora).
    `layers`: the released shape cut to its first N decoder layers (every width and the layer-type
    pattern kept), for a comparison the stock path cannot fit at full depth; named in the report."""
    per_step = batch_size if match_steps else samples_per_step
    if per_step is not None and (per_step < batch_size or per_step % batch_size):
        raise ValueError(f"--samples-per-step {per_step} must be a multiple of the batch size {batch_size}")
    if rows_per_step is not None and (samples_per_step is None or match_steps or rows_per_step < 1):
        raise ValueError("--rows-per-step N (N >= 1) goes with --samples-per-step, which sets the stock path's step")
    if model_shape not in SHAPES:
        raise ValueError(f"unknown --model-shape {model_shape!r}; choose one of {', '.join(SHAPES)}")
    if train_type not in ("full", "lora"):
        raise ValueError(f"unknown --train-type {train_type!r}; choose full or lora")
    options = {k: v for k, v in (train_options or {}).items() if v != getattr(TrainArgs, k)}  # only what differs
    problems = precision_problems(TrainArgs(bf16=True, **options), train_type)
    if problems:  # the recipe's own rules: e.g. pure_bf16 full fine-tuning with plain AdamW would not train
        raise ValueError("; ".join(problems))
    if not torch.cuda.is_available():
        raise RuntimeError("vltune bench needs a CUDA GPU (speed is claimed only from GPU runs)")
    shape, device = reduced_depth(SHAPES[model_shape], layers), torch.device("cuda")
    if options.get("fp8"):  # before the stock path's minutes: a GPU without float8 refuses at once
        check_fp8_device(device)
    # fla-core's kernels for both paths where installed (stock transformers picks fla's delta rule up by
    # itself), with vltune's port of the one backward kernel fla refuses on Hopper + Triton 3.4-3.7.0
    prepare_fla_kernels()
    # torch 2.11's cuDNN attention fails on some of these shapes ("mha_graph.execute"); both paths use
    # the flash / memory-efficient sdpa kernels instead.
    torch.backends.cuda.enable_cudnn_sdp(False)
    stock_per_step = per_step or batch_size  # without samples_per_step: a step per stock micro-batch
    n_samples = steps * stock_per_step
    if rows_per_step is not None:
        packed = _row_steps(shape, n_samples, pack_length, seed, rows_per_step)
        packed_warmup = _row_steps(shape, warmup * per_step, pack_length, seed + 1, rows_per_step)
    elif per_step is not None:
        packed = _packed_steps(shape, steps, per_step, pack_length, seed)
        packed_warmup = _packed_steps(shape, warmup, per_step, pack_length, seed + 1)
    else:
        packed = [[row] for row in _packed_rows(shape, n_samples, pack_length, seed)]
        packed_warmup = [[row] for row in _packed_rows(shape, warmup * batch_size, pack_length, seed + 1)]

    # The recipe's LoRA defaults; --match-steps turns LoRA dropout off, whose masks would differ between
    # the padded and the packed layout and make the curves drift for a reason other than the math.
    # An MoE family's default LoRA also adapts its fused experts, which peft does only without dropout.
    fused = bool(get_family(shape.model_type).modules.lora_target_parameters)
    model_args = ModelArgs(model_name_or_path="bench", train_type=train_type,
                           lora_dropout=0.0 if match_steps or fused else ModelArgs.lora_dropout)
    stock_run = None
    if with_stock:
        padded = _batches(shape, steps, batch_size, seed, stock_per_step)
        padded_warmup = _batches(shape, warmup, batch_size, seed + 1, stock_per_step)
        stock_run, initial = _run_stock(shape, seed, device, model_args, padded, padded_warmup, learning_rate)

    # (b) vltune, same init, same samples
    model = build_model(shape, seed, device)
    if with_stock:
        model.load_state_dict(initial)
        del initial
    torch.manual_seed(seed)  # the LoRA adapters' init, as (a) drew it
    backend = Engine(model, Path("."), _info(shape), model_args,
                           TrainArgs(bf16=True, learning_rate=learning_rate, max_grad_norm=1.0, weight_decay=0.0, **options))
    torch.cuda.reset_peak_memory_stats()

    seconds, losses, compiled = _time(lambda rows: packed_step(backend, rows), packed_warmup, packed)
    ours = _summary("vltune", shape, packed, seconds, losses, train_type)
    if options.get("torch_compile"):
        ours["graphs_compiled_while_timed"] = compiled
    runs = [r for r in (stock_run, ours) if r is not None]

    extras = "".join(f" + {key}" if value is True else f" + {key}={value}" for key, value in options.items() if value)
    stock_text = "not run"
    if with_stock:
        stock_text = f"padded batches of {batch_size}" + (" on a bf16 base (peft)" if train_type == "lora" else "")
    mode = f"{train_type} (vision tower frozen); stock: {stock_text}; vltune: packed rows of {pack_length}{extras}"
    if layers is not None:
        mode = f"first {layers} of {SHAPES[model_shape].layers} decoder layers; " + mode
    if match_steps:
        mode += "; one step per stock micro-batch" + ("; LoRA dropout 0" if train_type == "lora" else "")
    elif rows_per_step is not None:
        mode += (f"; stock: one optimizer step per {per_step} samples; vltune: all samples packed together, "
                 f"one optimizer step per {rows_per_step} rows")
    elif per_step is not None:
        mode += f"; one optimizer step per {per_step} samples on both paths"
    name = name or model_shape + ("-lora" if train_type == "lora" else "")
    result = {
        "name": name, "model": model_shape, "gpu": torch.cuda.get_device_name(), "mode": mode, "train_type": train_type,
        "tokens_per_s": ours["tokens_per_s"], "stock_tokens_per_s": None, "speedup_vs_stock": None,
        "mfu": ours["mfu"], "stock_mfu": None, "peak_mem_gib": ours["peak_mem_gib"], "stock_peak_mem_gib": None,
        "samples": n_samples, "batch_size": batch_size, "samples_per_step": per_step, "rows_per_step": rows_per_step, "learning_rate": learning_rate, "pack_length": pack_length, "warmup": warmup,
        "train_options": options, "command": command, "shape": asdict(shape), "runs": runs,
    }
    if stock_run is not None:
        a = stock_run
        result.update(stock_tokens_per_s=a["tokens_per_s"], speedup_vs_stock=round(ours["tokens_per_s"] / a["tokens_per_s"], 3),
                      stock_mfu=a["mfu"], stock_peak_mem_gib=a["peak_mem_gib"])
        result["mean_loss_rel_diff"] = round(abs(ours["mean_loss"] - a["mean_loss"]) / abs(a["mean_loss"]), 5)
        if per_step is not None and rows_per_step is None:  # the same samples per step: the loss curves compare step by step
            result["loss_max_rel_diff"] = round(max(abs(x - y) / abs(y) for x, y in zip(ours["losses"], a["losses"])), 5)
    return result


def write_report(result: dict, out_dir: str | Path) -> Path:
    """docs/bench/NAME.json plus a row in docs/bench/README.md's table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = result.get("name", result["model"])
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    table = out / "README.md"
    header = "| name | gpu | mode | tokens/s | stock tokens/s | speedup | MFU | stock MFU | peak GiB | command |\n|---|---|---|---|---|---|---|---|---|---|\n"
    rows = {}
    if table.exists():
        for line in table.read_text().splitlines()[2:]:
            if line.startswith("| "):
                rows[line.split("|")[1].strip()] = line
    r = result
    rows[name] = (f"| {name} | {r['gpu']} | {r['mode']} | {r['tokens_per_s']} | {r['stock_tokens_per_s']} | "
                        f"{r['speedup_vs_stock']} | {r['mfu']} | {r['stock_mfu']} | {r['peak_mem_gib']} | `{r['command']}` |")
    table.write_text(header + "\n".join(rows[k] for k in sorted(rows)) + "\n")
    return path
