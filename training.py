"""`vltune train`: recipe -> data -> engine -> the backend-neutral loop -> an HF-format model.

This is the only place where the layers meet: core/ (config, loop), data/ (samples, features,
batches) and one backend (chosen by the recipe's `backend` key) are wired together here.
"""

from __future__ import annotations

import json
import math
import os
import random
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from vltune.core.config import ConfigError, RecipeConfig, TrainArgs
from vltune.core.recipe import load_recipe
from vltune.core.recipe_rules import check_family, circle_rope_settings
from vltune.core.checkpointing import CheckpointManager, read_trainer_state
from vltune.core.families import read_config
from vltune.core.flops import batch_flops, shape_from_config
from vltune.core.loop import LoopResult, LoopState, TrainingStopped, run_training
from vltune.core.mdlm import MaskedBatches
from vltune.core.metrics import MetricsWriter
from vltune.core.run_dir import OutputDirLock, claim_output_dir
from vltune.core.sequence_parallel import SequenceLayout, model_head_problems
from vltune.data.collate import Collator
from vltune.data.packing import PackedCollator, packed_rows
from vltune.data.prepare import build_dataset
from vltune.data.loader import BatchIterator
from vltune.data.prefetch import Prefetcher
from vltune.data.model_info import read_model_info
from vltune.data.synthetic import SyntheticVQAConfig, generate_vqa_dataset
from vltune.evaluation import Evaluator


def prepare_assets(cfg: RecipeConfig) -> None:
    """Build what the recipe asks to be built when absent: the tiny model and the synthetic data."""
    model_dir = Path(cfg.model.model_name_or_path)
    if cfg.model.make_tiny_model and not (model_dir / "config.json").exists():
        from vltune.backends.torch.tiny import make_tiny

        print(f"[vltune] building a tiny {cfg.model.make_tiny_model} model in {model_dir}", flush=True)
        make_tiny(cfg.model.make_tiny_model, model_dir, seed=cfg.train.seed)
    if cfg.data.synthetic_vqa:
        spec = dict(cfg.data.synthetic_vqa)
        out_dir = spec.pop("out_dir", None)
        if out_dir is None:
            raise ConfigError("synthetic_vqa needs an out_dir")
        spec["tasks"] = tuple(spec.get("tasks", ("color",)))
        try:
            config = SyntheticVQAConfig(**spec)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"synthetic_vqa: {e}") from None
        generate_vqa_dataset(out_dir, config)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)


def mdlm_objective(cfg: RecipeConfig):
    """objective mdlm: the recipe's MDLM settings bound to the model's mask / vision / end token ids."""
    if cfg.train.objective != "mdlm":
        return None
    from vltune.core.mdlm import MdlmObjective
    from vltune.data.mdlm_tokens import resolve_mdlm_tokens

    try:
        tokens = resolve_mdlm_tokens(cfg.model.model_name_or_path, cfg.mdlm.mask_token)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    # The trained EOS tail must be a token the sampler stops at.
    tail = tokens.pad_token_id if tokens.pad_token_id in tokens.end_token_ids else tokens.end_token_ids[0]
    return MdlmObjective(cfg.mdlm, tokens.mask_token_id, tokens.protected_ids, tokens.end_token_ids, tail, seed=cfg.train.seed)


def _build_backend(cfg: RecipeConfig, info, circle_rope: dict | None, mdlm=None, ctx=None):
    """The recipe's engine (backends.engine: torch or mindspore), one process or data parallel."""
    from vltune.backends import engine

    return engine(cfg.train.backend, "parallel").build_backend(cfg, info, circle_rope, mdlm, ctx)


class _OneProcess:
    """The distributed context of a run without a launcher."""

    rank, local_rank, world_size, is_main = 0, 0, 1, True

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


def _distributed_context(cfg: RecipeConfig):
    """The msrun cluster when msrun started this MindSpore worker; the torch process group when
    torchrun started this worker or the recipe shards (DeepSpeed and FSDP2 need a group even on one
    process); otherwise a single process."""
    if cfg.train.backend == "mindspore":
        from vltune.backends.mindspore.launch import inside_launcher

        if not inside_launcher():
            return _OneProcess()
        from vltune.backends.mindspore.distributed import init_distributed

        return init_distributed()  # msrun's scheduler process ends inside this call
    if cfg.train.backend != "torch" or not (os.environ.get("WORLD_SIZE", "1") != "1" or cfg.train.deepspeed or cfg.train.fsdp):
        return _OneProcess()
    from vltune.backends.torch.distributed import init_distributed

    return init_distributed(need_group=True)


class _NoWriter:
    """Ranks other than 0 log nothing: rank 0 writes the metrics, which the loop has already reduced."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _mfu_inputs(cfg: RecipeConfig, backend, world_size: int):
    """(FLOPs of a micro-batch, peak FLOP/s of all devices) for the `mfu` metric, or (None, None) where
    the device's peak is unknown (CPU, an unlisted GPU). Multipliers per core/flops.py: 6 for trained
    weights, 4 for frozen weights that gradients flow through (LoRA), 2 for forward only."""
    peak = getattr(backend, "peak_flops", lambda: None)()
    if not peak:
        return None, None
    m = cfg.model
    shape = shape_from_config(read_config(m.model_name_or_path))
    lora = m.train_type == "lora"
    llm = 6 if (m.tune_mm_llm and not lora) else 4
    vision = 6 if (m.tune_mm_vision and not lora) else 4 if (m.tune_mm_vision and lora) else 2
    return partial(batch_flops, shape, llm_multiplier=llm, vision_multiplier=vision), peak * world_size


def _engine_name(cfg: RecipeConfig, world_size: int) -> str:
    if cfg.train.deepspeed:
        return "deepspeed"
    if cfg.train.fsdp:
        return "fsdp"
    if world_size == 1:
        return "single"
    return "data_parallel" if cfg.train.backend == "mindspore" else "ddp"


def stop_reason(args: TrainArgs, result: LoopResult, total_steps: int) -> str:
    """Why the run ended, in words, for run_summary.json (`stopped_early_at` says when)."""
    if result.stopped_early_at is not None:
        return (f"early stopping at step {result.stopped_early_at}: {args.metric_for_best_model} did not improve on its "
                f"best ({result.best_metric}) by more than early_stopping_threshold {args.early_stopping_threshold} for "
                f"early_stopping_patience {args.early_stopping_patience} evaluations in a row")
    planned = "max_steps" if args.max_steps > 0 else f"num_train_epochs {args.num_train_epochs}"
    return f"finished: step {result.steps} of the {total_steps} planned ({planned})"


def train(config: dict | str | RecipeConfig, overrides: dict[str, Any] | None = None, show_progress: bool = True) -> dict:
    """Run a recipe end to end and return the run summary (also written to OUTPUT_DIR/run_summary.json)."""
    cfg = config if isinstance(config, RecipeConfig) else load_recipe(config, overrides)
    ctx = _distributed_context(cfg)
    try:
        with OutputDirLock(cfg.train.output_dir, enabled=ctx.is_main):  # one run at a time per output_dir
            return _train(cfg, ctx, show_progress)
    finally:
        ctx.close()


def _sequence_layout(cfg: RecipeConfig, ctx) -> SequenceLayout:
    """This rank's sequence group and data-parallel coordinates; the loader reads the data of its
    data-parallel rank (the ranks of one sequence group share a row). Checked before any model loads:
    the world size and the model's head counts must divide by sequence_parallel_size."""
    n = cfg.train.sequence_parallel_size
    problems = []
    if ctx.world_size % n:
        problems.append(f"sequence_parallel_size {n} must divide the number of processes ({ctx.world_size}; --nproc)")
    if n > 1:
        problems += model_head_problems(cfg.model.model_name_or_path, n)
    if problems:
        raise ConfigError("invalid recipe:\n  - " + "\n  - ".join(problems))
    return SequenceLayout.of(ctx.rank, ctx.world_size, n)


def _train(cfg: RecipeConfig, ctx, show_progress: bool) -> dict:
    """train() inside its process group: every rank runs this; rank 0 alone writes files and logs."""
    _seed_everything(cfg.train.seed)
    if ctx.local_rank == 0:  # one writer per machine for the tiny model and the synthetic data
        prepare_assets(cfg)
    ctx.barrier()
    info = read_model_info(cfg.model.model_name_or_path)  # fail here, clearly, on a wrong model directory
    check_family(cfg, info.family)  # its capability flags, before any model loads
    layout = _sequence_layout(cfg, ctx)
    circle_rope = circle_rope_settings(cfg.model, info.model_type)
    out_dir = Path(cfg.train.output_dir)
    # The checkpoint to resume (whole, same recipe), before recipe.json is rewritten; a fresh run into
    # another run's checkpoints stops here (core/run_dir.py).
    resume_from = claim_output_dir(cfg, ctx)

    # Every sample is read and measured before step 1: bad ones stop the run here (or are skipped
    # and counted with skip_bad_samples), over-long ones follow truncation_strategy.
    train_set, train_report = build_dataset(cfg, cfg.data.dataset_use)
    if train_report.n_errors or train_report.n_dropped:
        print(f"[vltune] training data: {json.dumps(train_report.summary())}", flush=True)
    eval_set = eval_report = None
    if cfg.data.eval_dataset:  # validated like the training data, before any model loads; none left is an error
        eval_set, eval_report = build_dataset(cfg, cfg.data.eval_dataset, limit=cfg.data.num_eval_samples, key="eval_dataset")
        if eval_report.n_errors or eval_report.n_dropped:
            print(f"[vltune] eval data: {json.dumps(eval_report.summary())}", flush=True)
    collate = Collator(info, train_set.tokenizer.pad_token_id, circle_rope)
    rows, per_row, train_collate = train_set, cfg.train.per_device_train_batch_size, collate
    if cfg.data.data_flatten or cfg.data.data_packing:  # one [1, L] row per micro-batch, cu_seqlens inside
        rows, per_row = packed_rows(
            train_set, train_report.lengths, data_packing=cfg.data.data_packing,
            max_tokens_per_batch=cfg.data.max_tokens_per_batch, batch_size=per_row, seed=cfg.train.seed,
        )
        train_collate = PackedCollator(info, circle_rope)
    batches = BatchIterator(rows, per_row, train_collate, seed=cfg.train.seed, skip_bad_samples=cfg.data.skip_bad_samples,
        rank=layout.dp_rank, world_size=layout.dp_size, num_workers=cfg.data.dataloader_num_workers)
    steps_per_epoch = max(1, batches.batches_per_epoch // cfg.train.gradient_accumulation_steps)
    total_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else math.ceil(cfg.train.num_train_epochs * steps_per_epoch)

    mdlm = mdlm_objective(cfg)
    # Under mdlm every training micro-batch is masked in core/ (seeded), before any engine sees it.
    source = MaskedBatches(batches, mdlm) if mdlm is not None else batches
    backend = _build_backend(cfg, info, circle_rope, mdlm, ctx)
    if cfg.data.dataloader_prefetch:  # made ahead on a thread, pinned there on a GPU (data/prefetch.py)
        source = Prefetcher(source, cfg.data.dataloader_prefetch, stage=backend.stage_batch)
    evaluator = None
    if eval_set is not None:
        evaluator = Evaluator(
            eval_set, backend, collate, cfg.train.per_device_eval_batch_size,
            cfg.train.eval_max_new_tokens, predictions_file=out_dir / "eval_predictions.jsonl" if ctx.is_main else None,
        )

    # Resume: the engine's files, then the loop's state and the data position, from one checkpoint.
    state = None
    if resume_from is not None:
        trainer_state = read_trainer_state(resume_from)
        backend.load_checkpoint(resume_from)
        try:
            source.load_state_dict(trainer_state["data"])
        except ConfigError as e:  # the data changed since the checkpoint
            raise ConfigError(f"resume_from_checkpoint {resume_from}: {e}") from None
        state = LoopState.from_dict(trainer_state)
        if ctx.is_main:
            print(f"[vltune] resuming from {resume_from} (step {state.step})", flush=True)
    writer = MetricsWriter(out_dir / "metrics.jsonl", resume_step=state.step if state else None) if ctx.is_main else _NoWriter()
    flops, peak = _mfu_inputs(cfg, backend, ctx.world_size)
    try:
        result = run_training(
            cfg.train, backend, source, total_steps, writer, evaluate=evaluator,
            checkpoints=CheckpointManager(out_dir, cfg.train.save_total_limit, cfg.to_flat_dict(), ctx), state=state, show_progress=show_progress and ctx.is_main,
            flops=flops, peak_flops=peak,
        )
    finally:
        source.close()  # the prefetch thread and the worker processes
    writer.close()
    backend.save_model(out_dir)  # every rank: sharded engines gather the weights, rank 0 writes them, even
    # when the final evaluation failed (result.eval_error, raised below once the run is on disk)

    summary = {
        "steps": result.steps,
        "train_loss": round(result.train_loss, 6),
        "last_loss": round(result.last_loss, 6),
        "tokens_per_s": round(result.tokens_per_s, 1),
        "samples_per_s": round(result.samples_per_s, 2),
        **{k: round(v, 6) for k, v in result.eval.items()},
        "output_dir": str(out_dir),
        "eval_file": cfg.data.eval_dataset,
        "model_type": info.model_type + ("_circle_rope" if circle_rope else ""),
        "train_type": cfg.model.train_type,
        "best_metric": result.best_metric,
        "best_checkpoint": result.best_checkpoint,
        "stopped_early_at": result.stopped_early_at,
        "stop_reason": stop_reason(cfg.train, result, total_steps),
        "bad_steps": result.bad_steps,
        "resumed_from": str(resume_from) if resume_from else None,
        "backend": cfg.train.backend,
        "world_size": ctx.world_size,
        "engine": _engine_name(cfg, ctx.world_size),
        "objective": cfg.train.objective,
        "data": {**train_report.summary(), "skipped_while_training": len(source.skipped)},
        "eval_data": eval_report.summary() if eval_report is not None else None,
    }
    if result.eval_error is not None:
        summary["eval_error"] = f"{type(result.eval_error).__name__}: {result.eval_error}"
    if ctx.is_main:
        (out_dir / "run_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if result.eval_error is not None:
        raise TrainingStopped(f"training finished and the model is saved in {out_dir}, but the final evaluation "
                              f"failed: {summary['eval_error']}") from result.eval_error
    return summary
