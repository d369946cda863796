"""The `vltune` command. Subcommands map onto the Python API one to one.

    vltune train RECIPE [--key value ...]
    vltune keys [SECTION|KEY] [--markdown]   (every recipe key: type, default, description; core/recipe_keys.py)
    vltune infer --model DIR [--image P ...] [--video P] --prompt T | --input IN.jsonl --output OUT.jsonl [--backend torch|ms]
    vltune make-tiny --model-type FAMILY --out DIR   (FAMILY: a model_type of core/families)
    vltune merge-lora --model DIR --adapter DIR --out DIR [--overwrite]
    vltune convert hf-to-mindspeed|mindspeed-to-hf ...   (backends/torch/convert)
    vltune data check RECIPE [--key value ...]
    vltune bench data [--image-size 448x448 --workers 1 2]
    vltune pack ANNOTATION --pack-length N --model DIR|RECIPE [--output OUT.json]   (data/pack_annotation.py)

An error prints one line (what, where, the fix) and exits 1, Ctrl-C exits 130; `--debug` or VLTUNE_DEBUG=1
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any

from vltune.core.families import DEFAULT_FAMILY, all_shapes, family_names


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """`--max_steps 20 --bf16 --output_dir=x` -> {"max_steps": "20", "bf16": "true", "output_dir": "x"}.

    Values stay strings here; core.config coerces them to each key's declared type.
    """
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            raise SystemExit(f"vltune train: expected --key value, got {token!r}")
        key = token[2:].replace("-", "_")
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            value = tokens[i + 1]
            i += 2
        else:
            value = "true"
            i += 1
        overrides[key] = value
    return overrides


# Errors that describe bad input (recipe, data, model directory): shown as one clear line, no traceback.
def _user_errors() -> tuple[type[Exception], ...]:
    from vltune.core.config import ConfigError
    from vltune.core.families import BrokenConfigError, UnknownFamilyError
    from vltune.core.loop import TrainingStopped
    from vltune.data.formats import SampleError
    from vltune.data.prepare import DataValidationError
    from vltune.data.registry import DatasetSpecError

    return (ConfigError, UnknownFamilyError, BrokenConfigError, TrainingStopped, SampleError, DataValidationError, DatasetSpecError,
            FileNotFoundError, FileExistsError, NotImplementedError)


DEBUG_HINT = "run with --debug (or VLTUNE_DEBUG=1) for the traceback"


def describe_error(e: Exception) -> str:
    """One line for an error that ended a command: vltune's own input errors as they are; an OSError as its file
    and reason; anything else (possibly a bug, so not hidden) as its type and message, with the --debug hint."""
    if isinstance(e, OSError) and e.filename is not None:
        reason = f"{e.filename}: {e.strerror}"
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            reason += " (not writable or not readable here: fix its permissions or choose another path)"
        elif e.errno == errno.ENOSPC:
            reason += " (free some space or choose another output_dir)"
        return reason
    if isinstance(e, _user_errors()):
        cause = e.__cause__
        unexpected = cause is not None and not isinstance(cause, _user_errors() + (OSError,))
        return str(e) + (f" ({DEBUG_HINT})" if unexpected else "")
    return f"{type(e).__name__}: {e} ({DEBUG_HINT})"


def _command_name(args: argparse.Namespace) -> str:
    """`vltune train`, `vltune data check`, `vltune convert hf-to-mindspeed`: the prefix of its error lines."""
    words = [args.command] + [getattr(args, k) for k in ("data_command", "bench_command", "direction") if getattr(args, k, None)]
    return "vltune " + " ".join(words)


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from vltune.core.recipe import load_recipe
    from vltune.training import train

    if args.nproc is not None or args.print_launch:
        return _launch_train(args, extra)
    cfg = load_recipe(args.recipe, parse_overrides(extra))
    try:
        summary = train(cfg, show_progress=not args.no_progress)
    except KeyboardInterrupt as e:
        e.add_note(_resume_hint(args, extra, cfg.train.output_dir))  # main() prints it after "interrupted"
        raise
    # One summary line, however many workers share stdout: rank 0's (torchrun sets RANK; msrun sets
    # RANK_ID beside MS_ROLE, and RANK_ID alone may be a leftover of an Ascend rank-table setup).
    rank = os.environ.get("RANK") or (os.environ.get("RANK_ID") if "MS_ROLE" in os.environ else None) or "0"
    if int(rank) == 0:
        print(json.dumps(summary), flush=True)
    if summary["backend"] == "torch":
        from vltune.backends.torch import launch

        if launch.inside_launcher():
            launch.exit_worker(0)
    return 0


def _resume_hint(args: argparse.Namespace, extra: list[str], output_dir: str) -> str:
    """The command that takes an interrupted run up again: its newest checkpoint, if one was saved."""
    import shlex

    from vltune.core.checkpointing import complete_checkpoints

    overrides = {k: v for k, v in parse_overrides(extra).items() if k != "resume_from_checkpoint"}
    command = shlex.join(["vltune", "train", args.recipe, *(t for k, v in overrides.items() for t in (f"--{k}", str(v))),
                          *(["--no-progress"] if args.no_progress else [])])
    saved = complete_checkpoints(output_dir)
    if not saved:
        return f"no checkpoint was saved in {output_dir} yet (save_steps sets how often); start again with: {command}"
    return f"resume from {saved[-1]} with: {command} --resume_from_checkpoint auto"


def _launch_train(args: argparse.Namespace, extra: list[str]) -> int:
    """--nproc: re-run this very command (recipe and overrides) in launcher workers, or print it:
    torchrun for backend torch, msrun for backend mindspore (the recipe's or the override's)."""
    from vltune.core.recipe import load_recipe

    problems, cfg = [], None
    nproc = 1 if args.nproc is None else args.nproc  # --print-launch alone: one worker; --nproc 0 is refused
    try:  # a bad recipe fails here once, not in every worker
        cfg = load_recipe(args.recipe, parse_overrides(extra))
    except _user_errors() as e:
        problems.append(str(e))
    if cfg is not None and cfg.train.backend == "mindspore":
        from vltune.backends.mindspore import launch as launcher

        # msrun writes scheduler.log and one log per worker; beside the run's other outputs.
        launch = launcher.LaunchArgs(nproc, args.nnodes, args.node_rank, args.master_addr, args.master_port,
                                     log_dir=str(Path(cfg.train.output_dir) / "msrun_log"))
        name = "an msrun"
    else:
        from vltune.backends.torch import launch as launcher

        launch = launcher.LaunchArgs(nproc, args.nnodes, args.node_rank, args.master_addr, args.master_port)
        name = "a torchrun"
    problems = launch.problems() + problems
    if cfg is not None and (nproc * args.nnodes) % cfg.train.sequence_parallel_size:
        problems.append(f"sequence_parallel_size {cfg.train.sequence_parallel_size} must divide the number of processes "
                        f"({nproc * args.nnodes}: --nproc x --nnodes)")
    if launcher.inside_launcher():
        problems.append(f"already inside {name} worker: drop --nproc from the worker's command")
    if problems:
        print("vltune train: " + "; ".join(problems), file=sys.stderr)
        return 1
    worker = [args.recipe, *extra] + (["--no-progress"] if args.no_progress else [])
    return launcher.run_launch(launch, worker, print_only=args.print_launch)


def cmd_data_check(args: argparse.Namespace, extra: list[str]) -> int:
    """Validate the recipe's training and eval data; the report on stdout, exit 1 when errors remain."""
    from tqdm import tqdm

    from vltune.core.recipe import load_recipe
    from vltune.data.prepare import build_dataset
    from vltune.training import prepare_assets

    cfg = load_recipe(args.recipe, parse_overrides(extra))
    prepare_assets(cfg)
    n_errors = 0
    for title, spec in (("dataset_use", cfg.data.dataset_use), ("eval_dataset", cfg.data.eval_dataset)):
        if not spec:
            continue
        progress = partial(tqdm, desc=f"checking {title}", leave=False, disable=not sys.stderr.isatty())
        _, report = build_dataset(cfg, spec, decode=not args.no_decode, strict=False, progress=progress)
        print(f"== {title}: {spec}\n{report.format()}\n")
        n_errors += report.n_errors
    print(json.dumps({"errors": n_errors}))
    return 1 if n_errors else 0


def cmd_bench_model(args: argparse.Namespace, extra: list[str]) -> int:
    if extra or not args.model_shape:
        raise SystemExit("vltune bench: give --model-shape NAME (or `vltune bench data`)")
    if args.gradient_checkpointing is not None and args.gradient_checkpointing < 1:
        raise SystemExit(f"vltune bench: --gradient-checkpointing {args.gradient_checkpointing} must be >= 1 (every N-th block)")
    from vltune.backends.torch.bench import run_bench, write_report

    command = "vltune bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else f"vltune bench --model-shape {args.model_shape}"
    result = run_bench(
        args.model_shape, steps=args.steps, warmup=args.warmup, batch_size=args.batch_size,
        pack_length=args.pack_length, command=command, train_type=args.train_type,
        with_stock=not args.no_stock, match_steps=args.match_steps, samples_per_step=args.samples_per_step,
        rows_per_step=args.rows_per_step,
        learning_rate=args.learning_rate, name=args.name, layers=args.layers,
        train_options={"torch_compile": args.torch_compile, "use_liger_kernel": args.liger_kernel, "pure_bf16": args.pure_bf16,
                       "bf16_master_weights": args.bf16_master_weights, "gradient_checkpointing": args.gradient_checkpointing is not None,
                       "gradient_checkpointing_every_n_layers": args.gradient_checkpointing or 1, "optim": args.optim,
                       "fp8": args.fp8},
    )
    write_report(result, args.out)
    print(json.dumps({k: v for k, v in result.items() if k not in ("runs", "shape")}), flush=True)
    return 0


def cmd_bench_data(args: argparse.Namespace, extra: list[str]) -> int:
    from vltune.data.bench import run_data_bench

    if extra:
        raise SystemExit(f"vltune bench data: unknown arguments {extra}")
    width, _, height = args.image_size.partition("x")
    model_dir = Path(args.model) if args.model else Path(args.work_dir) / f"tiny-{args.model_type}"
    if not (model_dir / "config.json").exists():
        from vltune.backends.torch.tiny import make_tiny

        make_tiny(args.model_type, model_dir)
    result = run_data_bench(
        args.work_dir, model_dir, image_size=(int(width), int(height)), num_samples=args.samples, workers=args.workers
    )
    print(json.dumps(result), flush=True)
    return 0


def cmd_infer(args: argparse.Namespace, extra: list[str]) -> int:
    """One prompt (answer streamed to stdout), or batch mode (--input/--output, summary JSON on stdout)."""
    if extra:
        raise SystemExit(f"vltune infer: unknown arguments {extra}")
    batch = args.input is not None
    problems = []
    if batch == (args.prompt is not None):
        problems.append("give either --prompt (one question) or --input FILE --output FILE (batch mode)")
    if batch and not args.output:
        problems.append("--input needs --output FILE (an existing one is resumed)")
    if batch and (args.image or args.video):
        problems.append("--image/--video are for --prompt; batch records name their own media")
    if args.objective == "mdlm":
        ar_only = {"--input": batch, "--thinking": args.thinking, "--thinking-budget": args.thinking_budget,
                   "--top-p": args.top_p, "--top-k": args.top_k, "--repetition-penalty": args.repetition_penalty}
        used = [flag for flag, value in ar_only.items() if value not in (None, False)]
        if used:
            problems.append(f"{', '.join(used)}: autoregressive decoding only, not --objective mdlm")
    if problems:
        print(f"vltune infer: {'; '.join(problems)}", file=sys.stderr)
        return 2
    from vltune.core.generation import GenerationSettings
    from vltune.inference import Predictor, answer_prompt, infer

    if args.objective == "mdlm":
        answer = infer(
            args.model, args.prompt, args.image, max_new_tokens=args.max_new_tokens, backend=args.backend,
            min_pixels=args.min_pixels, max_pixels=args.max_pixels, adapter=args.adapter,
            objective=args.objective, block_length=args.block_length, steps=args.steps,
            remasking=args.remasking, temperature=args.temperature, seed=args.seed, videos=args.video,
        )
        print(answer, flush=True)
        return 0
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        repetition_penalty=args.repetition_penalty, seed=args.seed,
    )
    predictor_args = dict(
        adapter=args.adapter, backend=args.backend, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
        settings=settings, thinking=args.thinking, thinking_budget=args.thinking_budget,
    )
    if batch:
        from vltune.inference_batch import run_batch

        summary = run_batch(
            partial(Predictor, args.model, **predictor_args), args.input, args.output, data_path=args.data_path,
            show_progress=not args.no_progress and sys.stderr.isatty(),
        )
        print(json.dumps(summary), flush=True)
        return 0
    stream = None if args.no_stream else partial(print, end="", flush=True)
    result = answer_prompt(args.model, args.prompt, args.image, args.video, stream=stream, **predictor_args)
    print("" if stream else result.text, flush=True)
    return 0


def cmd_keys(args: argparse.Namespace, extra: list[str]) -> int:
    """Every recipe key (or one section's, or one key) with its type, default and description."""
    if extra:
        raise SystemExit(f"vltune keys: unknown arguments {extra}")
    from vltune.core.recipe_keys import find, render_markdown, render_text

    if args.markdown:
        if args.query:
            raise SystemExit("vltune keys: --markdown renders every key; drop the SECTION|KEY argument")
        print(render_markdown(), end="")
        return 0
    print(render_text(find(args.query) if args.query else None), end="")
    return 0


def cmd_make_tiny(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise SystemExit(f"vltune make-tiny: unknown arguments {extra}")
    from vltune.backends.torch.tiny import make_tiny

    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"--out {out}: already exists and is not empty (a model directory?); a tiny random model "
                              "would replace its files: choose a new directory, or pass --overwrite")
    print(make_tiny(args.model_type, out, seed=args.seed))
    return 0


def cmd_merge_lora(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise SystemExit(f"vltune merge-lora: unknown arguments {extra}")
    from vltune.backends.torch.models import merge_lora

    print(merge_lora(args.model, args.adapter, args.out, overwrite=args.overwrite))
    return 0


def cmd_convert(args: argparse.Namespace, extra: list[str]) -> int:
    """HF <-> MindSpeed-MM checkpoints (backends/torch/convert); prints the written directory."""
    if extra:
        raise SystemExit(f"vltune convert: unknown arguments {extra}")
    from vltune.backends.torch.convert import hf_to_mindspeed, mindspeed_to_hf, parse_layer_list

    if args.direction == "hf-to-mindspeed":
        llm = parse_layer_list(args.llm_pp_layers, "--llm-pp-layers") if args.llm_pp_layers else None
        vit = parse_layer_list(args.vit_pp_layers, "--vit-pp-layers") if args.vit_pp_layers else None
        out = hf_to_mindspeed(args.hf_dir, args.out, tp=args.tp, llm_pp_layers=llm, vit_pp_layers=vit, vpp=args.vpp)
    else:
        out = mindspeed_to_hf(args.mm_dir, args.hf_dir, args.out, trust_pickle=args.trust_pickle)
    print(out)
    return 0


def cmd_pack(args: argparse.Namespace, extra: list[str]) -> int:
    """Count tokens as training will, pack into --pack-length bins, write the packed file; summary JSON last."""
    from tqdm import tqdm

    from vltune.data.pack_annotation import CountSettings, default_cache_dir, pack_annotation, settings_from_recipe

    target = Path(args.model)
    if (target / "config.json").exists():  # a model directory: its processor's defaults, raw counts
        if extra:
            raise SystemExit(f"vltune pack: recipe overrides {extra} need --model RECIPE, not a model directory")
        settings = CountSettings(str(target), min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    else:  # a recipe: its model, pixel limits, video settings, model_max_length and truncation
        from vltune.core.recipe import load_recipe
        from vltune.training import prepare_assets

        overrides = parse_overrides(extra)
        overrides.update({k: v for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels)) if v is not None})
        cfg = load_recipe(args.model, overrides)
        prepare_assets(cfg)
        settings = settings_from_recipe(cfg)
    progress = partial(tqdm, desc="counting tokens", leave=False, disable=not sys.stderr.isatty())
    summary, counts = pack_annotation(
        args.annotation, args.pack_length, settings, output=args.output, data_path=args.data_path,
        cache_dir=None if args.no_cache else Path(args.cache_dir) if args.cache_dir else default_cache_dir(),
        skip_bad_samples=args.skip_bad_samples, progress=progress,
    )
    for title, problems in (("error", counts.errors), ("dropped (over model_max_length)", counts.dropped)):
        for problem in problems[:5]:
            print(f"vltune pack: {title}: {problem}", file=sys.stderr)
        if len(problems) > 5:
            print(f"vltune pack: ... and {len(problems) - 5} more ({title})", file=sys.stderr)
    oversize = sorted((n, where) for where, _, n in counts.counted if n > args.pack_length)
    for n, where in oversize[-5:]:
        print(f"vltune pack: oversize: {where}: {n} tokens > pack length {args.pack_length} (a pack of its own)", file=sys.stderr)
    if counts.errors and not summary["written"]:
        print("vltune pack: nothing written; fix the samples above or pass --skip-bad-samples", file=sys.stderr)
    print(json.dumps(summary), flush=True)
    return 0 if summary["written"] else 1


def build_parser(key_help: bool = True) -> argparse.ArgumentParser:
    """The command line; `key_help` renders every recipe key into `vltune train --help` (it reads
    core/config.py's source, so main() asks for it only when help is asked for)."""
    from vltune.core.config import OPTIMIZERS

    parser = argparse.ArgumentParser(prog="vltune", description="Fine-tune Qwen-family vision-language models.")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also anywhere after the command, or VLTUNE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    from vltune.core.recipe_keys import render_text

    p = sub.add_parser("train", help="train a recipe (a YAML path or a bundled name such as 'demo')",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="recipe keys (in the YAML, or on the command line as --key value; "
                              "`vltune keys SECTION|KEY` shows a part):\n\n" + render_text() if key_help else None)
    p.add_argument("recipe")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--nproc", type=int, help="launch N workers on this node, one per device (torchrun; msrun for backend mindspore)")
    p.add_argument("--nnodes", type=int, default=1, help="nodes of a multi-node run (each runs the same command)")
    p.add_argument("--node_rank", "--node-rank", dest="node_rank", type=int, default=0, help="this node's index")
    p.add_argument("--master_addr", "--master-addr", dest="master_addr", help="address of node 0 (needed with --nnodes > 1)")
    p.add_argument("--master_port", "--master-port", dest="master_port", type=int, default=29500)
    p.add_argument("--print-launch", action="store_true", help="print the torchrun (or msrun) command instead of running it")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("infer", help="answer a prompt about images/videos, or a whole annotation file, with a model directory")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter")
    p.add_argument("--image", action="append", default=[])
    p.add_argument("--video", action="append", default=[])
    p.add_argument("--prompt", help="one question (the answer is streamed to stdout)")
    p.add_argument("--input", help="batch mode: a JSON/JSONL file in the training formats; the last answer turn is the reference")
    p.add_argument("--output", help="batch mode: JSONL, one line per input sample (input + prediction or error); resumed if present")
    p.add_argument("--data-path", help="batch mode: folder the records' media paths are relative to (default: the input's)")
    p.add_argument("--no-progress", action="store_true", help="batch mode: no progress bar")
    p.add_argument("--no-stream", action="store_true", help="print the answer once complete instead of token by token")
    p.add_argument("--thinking", action="store_true", help="render the prompt with enable_thinking=True (without it: False, which templates with a thinking switch, Qwen3.5's, answer directly)")
    p.add_argument("--thinking-budget", type=int,
                   help="after N generated tokens without </think>, insert a closing phrase and </think> and let the model answer")
    p.add_argument("--max-new-tokens", type=int, default=64, help="at most this many generated tokens (thinking and answer together)")
    p.add_argument("--top-p", type=float, help="ar: nucleus sampling (samples at temperature 1 unless --temperature is given)")
    p.add_argument("--top-k", type=int, help="ar: sample among the k most likely tokens")
    p.add_argument("--repetition-penalty", type=float, help="ar: penalty on tokens already in the sequence (1 = off)")
    p.add_argument("--min-pixels", type=int, help="default: the training run's recipe.json beside the model, else the processor's")
    p.add_argument("--max-pixels", type=int, help="default: the training run's recipe.json beside the model, else the processor's")
    p.add_argument("--backend", default="torch", choices=["torch", "mindspore", "ms"],
                   help="engine: torch (transformers) or mindspore / ms (the native MindSpore model, KV-cached; same greedy answers)")
    p.add_argument("--objective", default="ar", choices=["ar", "mdlm"],
                   help="mdlm: masked-diffusion sampling over a canvas of --max-new-tokens mask tokens")
    p.add_argument("--block-length", type=int, help="mdlm: semi-autoregressive block length (default: as trained, else 32)")
    p.add_argument("--steps", type=int, help="mdlm: denoising steps (default: as trained, else one per token)")
    p.add_argument("--remasking", choices=["low_confidence", "random"], help="mdlm: which positions each step commits")
    p.add_argument("--temperature", type=float,
                   help="ar: > 0 samples at this temperature (default: greedy); mdlm: Gumbel-noise temperature (0 = argmax)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling (ar) / of random remasking and Gumbel noise (mdlm)")
    p.set_defaults(run=cmd_infer)

    p = sub.add_parser("make-tiny", help="write a tiny random-init HF-format model directory")
    p.add_argument("--model-type", required=True, choices=family_names())
    p.add_argument("--out", required=True, help="a new (or empty) directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="write into a directory that already holds files")
    p.set_defaults(run=cmd_make_tiny)

    p = sub.add_parser("keys", help="list the recipe keys: type, default and description, grouped by section")
    p.add_argument("query", nargs="?", metavar="SECTION|KEY", help="one section (model, data, train, mdlm) or one key")
    p.add_argument("--markdown", action="store_true", help="all keys as docs/recipe-keys.md (`vltune keys --markdown > docs/recipe-keys.md`)")
    p.set_defaults(run=cmd_keys)

    p = sub.add_parser("merge-lora", help="fold a LoRA adapter into its base model: a full HF-format directory")
    p.add_argument("--model", required=True, help="the base model directory the adapter was trained on")
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True, help="a new (or empty) directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the files of an existing directory (never the base model's or the adapter's own)")
    p.set_defaults(run=cmd_merge_lora)

    p = sub.add_parser("data", help="data tools: `data check RECIPE` validates every sample of a recipe")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("check", help="read every sample; counts per problem, length histogram; exit 1 on errors")
    p.add_argument("recipe")
    p.add_argument("--no-decode", action="store_true", help="read image headers only (faster; misses corrupt bodies)")
    p.set_defaults(run=cmd_data_check)

    p = sub.add_parser("bench", help="`bench --model-shape NAME`: training speed vs stock transformers (GPU); `bench data`: data loading")
    p.add_argument("--model-shape", help=" | ".join(all_shapes()))
    p.add_argument("--steps", type=int, default=20, help="timed steps per path (after --warmup)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=2, help="samples per padded micro-batch of the stock path (2 fits a 3B on 80 GB)")
    p.add_argument("--pack-length", type=int, default=4096, help="tokens per packed row of the vltune path")
    p.add_argument("--torch-compile", action="store_true", help="vltune path with torch_compile (give it a longer --warmup)")
    p.add_argument("--liger-kernel", action="store_true", help="vltune path with use_liger_kernel")
    p.add_argument("--train-type", default="full", choices=["full", "lora"], help="full (vision tower frozen) or lora")
    p.add_argument("--pure-bf16", action="store_true", help="vltune path with pure_bf16 (bf16 weights, no fp32 copy)")
    p.add_argument("--bf16-master-weights", action="store_true",
                   help="vltune path with bf16_master_weights (bf16 weights for compute, fp32 masters for AdamW)")
    p.add_argument("--optim", default="adamw_torch", choices=OPTIMIZERS, help="vltune path's optimizer")
    p.add_argument("--fp8", action="store_true",
                   help="vltune path with fp8 (torchao float8 decoder linears; SM 8.9+); the stock path stays bf16")
    p.add_argument("--gradient-checkpointing", nargs="?", type=int, const=1, default=None, metavar="N",
                   help="vltune path with gradient_checkpointing; N: gradient_checkpointing_every_n_layers (default 1: every block)")
    p.add_argument("--no-stock", action="store_true", help="run the vltune path alone (e.g. a size the stock path cannot fit)")
    p.add_argument("--match-steps", action="store_true",
                   help="vltune takes one optimizer step per stock micro-batch (same samples per step): compares the loss curves")
    p.add_argument("--samples-per-step", type=int,
                   help="one optimizer step per N samples on both paths (stock accumulates its micro-batches; "
                        "default: stock steps per micro-batch, vltune per packed row); --steps then counts optimizer steps")
    p.add_argument("--rows-per-step", type=int,
                   help="with --samples-per-step: vltune packs all samples together into full rows (as vltune train "
                        "packs a data set) and steps once per N rows; only the mean losses then compare")
    p.add_argument("--learning-rate", type=float, default=1e-5, help="both paths (constant; no warm-up)")
    p.add_argument("--layers", type=int, help="the shape cut to its first N decoder layers (a depth the stock path fits)")
    p.add_argument("--name", help="report name (default MODEL_SHAPE, or MODEL_SHAPE-lora)")
    p.add_argument("--out", default="docs/bench", help="where NAME.json and the README table go")
    p.set_defaults(run=cmd_bench_model)
    bench_sub = p.add_subparsers(dest="bench_command")
    p = bench_sub.add_parser("data", help="samples/s and tokens/s of the data pipeline with N worker processes")
    p.add_argument("--image-size", default="448x448", help="WIDTHxHEIGHT of the generated JPEG images")
    p.add_argument("--samples", type=int, default=300)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--model", help="model directory whose tokenizer and processor config to use (default: a tiny one)")
    p.add_argument("--model-type", default=DEFAULT_FAMILY, choices=family_names(), help="tiny model to build")
    p.add_argument("--work-dir", default="runs/bench-data")
    p.set_defaults(run=cmd_bench_data)

    p = sub.add_parser("convert", help="convert checkpoints between HF and MindSpeed-MM (tensor/pipeline splits)")
    convert_sub = p.add_subparsers(dest="direction", required=True)
    p = convert_sub.add_parser("hf-to-mindspeed", help="HF model directory -> MindSpeed-MM release checkpoint")
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--out", required=True, help="a new (or empty) directory")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--llm-pp-layers", help="text layers per pipeline stage, e.g. 1,10,10,7 (default: one stage)")
    p.add_argument("--vit-pp-layers", help="vision layers per pipeline stage, e.g. 32,0,0,0 (default: one stage)")
    p.add_argument("--vpp", type=int, default=1,
                   help="virtual pipeline chunks per rank; the layer lists then give pp*vpp counts, chunk 0 of every rank first")
    p.set_defaults(run=cmd_convert)
    p = convert_sub.add_parser("mindspeed-to-hf", help="MindSpeed-MM checkpoint -> HF model directory")
    p.add_argument("--mm-dir", required=True)
    p.add_argument("--hf-dir", required=True, help="an HF directory of the same model: config, tokenizer, processor files")
    p.add_argument("--out", required=True, help="a new (or empty) directory")
    p.add_argument("--trust-pickle", action="store_true",
                   help="fully unpickle checkpoint files that hold more than tensors (only files you trust)")
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("pack", help="pack an annotation file into fixed-length bins (for data_packing: true)")
    p.add_argument("annotation", help="a JSON/JSONL annotation file (an already packed file is re-packed)")
    p.add_argument("--pack-length", type=int, required=True, help="tokens per pack (bin capacity)")
    p.add_argument("--model", required=True,
                   help="a model directory (its processor's pixel limits, no length cap) or a recipe (its model, "
                        "pixel limits, video settings, model_max_length, truncation_strategy; --key value overrides)")
    p.add_argument("--output", help="packed JSON file (default: <annotation stem>_packed<N>.json beside the annotation)")
    p.add_argument("--data-path", help="folder the records' media paths are relative to (default: the annotation's)")
    p.add_argument("--min-pixels", type=int)
    p.add_argument("--max-pixels", type=int)
    p.add_argument("--cache-dir", help="token-count cache (default: $XDG_CACHE_HOME/vltune/token_counts)")
    p.add_argument("--no-cache", action="store_true", help="count every record again and keep nothing")
    p.add_argument("--skip-bad-samples", action="store_true", help="write the pack without the samples that cannot train (counted)")
    p.set_defaults(run=cmd_pack)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. An error becomes one line on stderr (describe_error) and exit status 1, Ctrl-C status
    130; with --debug (anywhere on the line) or VLTUNE_DEBUG=1 the traceback is shown instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("VLTUNE_DEBUG", "") not in ("", "0")
    args, extra = build_parser(key_help="-h" in argv or "--help" in argv).parse_known_args([token for token in argv if token != "--debug"])
    args.debug = debug
    try:
        return args.run(args, extra)
    except KeyboardInterrupt as e:
        if debug:
            raise
        notes = "; ".join(getattr(e, "__notes__", ()))
        print(f"\n{_command_name(args)}: interrupted" + (f"; {notes}" if notes else ""), file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        print(f"{_command_name(args)}: {describe_error(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
