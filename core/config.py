"""Recipe configuration: one dataclass per section, flat keys on the command line.

Users of qwen-vl-finetune and ms-swift type `--learning_rate 1e-5`, not `--train.lr`, so recipe
keys are flat. Each key belongs to exactly one section dataclass; `load_recipe` routes a flat dict
into the sections, then validates everything at once and raises a single error that lists every
problem with the key, the value and a fix (litgpt's `validate_args` habit).
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from .circle_rope import resolve_config
from .families import FAMILIES, FamilySpec, family_names, get_family

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"


class ConfigError(ValueError):
    """A recipe that cannot run; the message lists every problem found."""


@dataclass
class ModelArgs:
    """The model directory, which parts of it train (full or LoRA), attention kernel, Circle-RoPE."""

    model_name_or_path: str = ""
    """Local HF-format model directory (config.json, weights, tokenizer, preprocessor_config.json)."""
    make_tiny_model: str | None = None
    """If set (a family's model_type, see core/families) and `model_name_or_path` does not exist, build a tiny
    random-init model of that family there. A `model_type` of another family (e.g. the demo with
    `--model_type <another family>`) switches the tiny model to that family, in `tiny-<family>` beside the given path."""
    train_type: str = "full"
    """full | lora (LoRA adapters through peft; the base weights stay frozen)."""
    tune_mm_llm: bool = True
    """Train the language model (and the LM head, tied or not)."""
    tune_mm_vision: bool = False
    """Train the vision tower's blocks and patch embedding (off by default, as in qwen-vl-finetune)."""
    tune_mm_mlp: bool = True
    """Train the merger (vision -> language projector)."""
    attn_implementation: str = "sdpa"
    """Attention kernel of the transformers model: sdpa | eager."""
    lora_r: int = 64
    """LoRA rank: the inner dimension of each adapter (more = more trainable weights)."""
    lora_alpha: float = 128.0
    """LoRA scaling: the adapter's output is multiplied by lora_alpha / lora_r."""
    lora_dropout: float = 0.05
    """Dropout on each adapter's input during training; 0.0 stays 0.0 (the official scripts silently turn it into 0.05)."""
    lora_target_modules: str | None = None
    """Comma-separated LLM module names that get adapters (default q,k,v,o,gate,up,down_proj).
    In LoRA mode tune_mm_llm puts adapters on the LLM, tune_mm_vision on the vision blocks' linear
    layers, and tune_mm_mlp trains the (small) merger in full."""
    lora_target_parameters: str | None = None
    """Comma-separated parameter names (peft `target_parameters`) that get adapters besides the modules:
    fused weights that are not nn.Linear, e.g. MoE experts' mlp.experts.gate_up_proj. None = the family's
    default (the experts of an MoE family, nothing for a dense one); "none" = no parameter targets.
    peft adapts such parameters only with lora_dropout: 0."""
    lora_modules_to_save: str | None = None
    """Comma-separated modules trained in full next to the adapters (e.g. embed_tokens,lm_head)."""
    model_type: str | None = None
    """None = config.json's model_type; `<that>_circle_rope` (a family name + `_circle_rope`) turns Circle-RoPE on."""
    circle_rope: dict | None = None
    """Circle-RoPE settings {alpha, radius, method, move_to_origin, move_to_positive, dff_rate, AGE_mode};
    keys left out take the released configuration's values."""


@dataclass
class DataArgs:
    """Datasets, eval data, sample validation and truncation, image/video resizing, packing, data loading."""

    dataset_use: str = ""
    """Comma-separated datasets: registered names, JSON/JSONL paths (their folder is the data path) or HF
    `datasets` directories; `name%50` samples 50% of it (seeded), `dir[train:1000,test:100]` takes slices."""
    datasets: dict | None = None
    """Registry in the recipe: {name: {annotation_path, data_path}} (qwen-vl-finetune's data_dict)."""
    dataset_registry: str | None = None
    """A YAML/JSON file holding more registry entries of the same shape."""
    eval_dataset: str | None = None
    """Held-out data (same syntax as dataset_use) for eval loss and exact-match accuracy."""
    skip_bad_samples: bool = False
    """Skip (and count) samples that fail validation; otherwise the run stops before step 1 with the report."""
    truncation_strategy: str = "delete"
    """Samples longer than model_max_length: delete (dropped, counted) | right (cut trailing text, never
    inside an image/video span; dropped when no answer token survives) | error."""
    video_min_pixels: int | None = None
    """Pixel bounds of a video (default: the model's video preprocessor config): per frame for Qwen2/2.5-VL,
    frames x height x width for Qwen3-VL (as its processor's smart_resize counts them)."""
    video_max_pixels: int | None = None
    """Upper pixel bound of a video, counted as video_min_pixels says (default: the video preprocessor config)."""
    base_interval: float | None = None
    """Seconds between sampled video frames (Qwen2/2.5-VL; default: the video preprocessor's fps)."""
    video_min_frames: int | None = None
    """Fewest frames sampled from a video; a shorter video is an error (default: the video preprocessor config)."""
    video_max_frames: int | None = None
    """Most frames sampled from a video (default: the video preprocessor config)."""
    synthetic_vqa: dict | None = None
    """Generate the synthetic VQA set before training: {out_dir, num_train, num_eval, tasks, image_size, seed}."""
    max_pixels: int | None = None
    """Upper bound on pixels per image after smart_resize (default: the model's preprocessor_config.json)."""
    min_pixels: int | None = None
    """Lower bound on pixels per image after smart_resize (default: the model's preprocessor_config.json)."""
    model_max_length: int = 2048
    """Longest tokenised sample (image/video tokens included); see truncation_strategy."""
    num_eval_samples: int | None = None
    """Evaluate on the first N held-out samples only (None = all)."""
    data_flatten: bool = False
    """Concatenate each training micro-batch into one row with cu_seqlens (no padding). Exact: attention,
    M-RoPE/Circle-RoPE positions and the loss stay per sample (data/packing.py)."""
    data_packing: bool = False
    """The annotation files are packed (`vltune pack`): each pack is one row; a micro-batch is
    per_device_train_batch_size packs, concatenated."""
    max_tokens_per_batch: int = 0
    """With data_flatten: rows of up to this many tokens, filled by best-fit decreasing over the measured
    lengths (a longer sample gets a row alone), instead of per_device_train_batch_size samples; 0 = off."""
    dataloader_prefetch: int = 2
    """Training micro-batches made ahead on a background thread (collated, packed, masked, and on a GPU
    copied into pinned memory) while the step runs; 0 = made on the training thread when needed."""
    dataloader_num_workers: int = 0
    """Processes that build the training samples (decode, resize, tokenise) ahead of need, as HF's
    dataloader_num_workers; 0 = built by the data loader itself. Same order, skips and resume either way."""


@dataclass
class TrainArgs:
    """Output, engine, objective, optimizer and schedule, batch sizes, eval / save / early-stop cadence, precision, parallelism."""

    output_dir: str = "runs/vltune"
    """Where checkpoints, metrics.jsonl and the final model go."""
    backend: str = "torch"
    """The engine that trains: torch (PyTorch; CUDA GPUs or CPU) | mindspore (Ascend NPUs or CPU)."""
    objective: str = "ar"
    """ar (next-token SFT) | mdlm (masked diffusion; settings in the mdlm section)."""
    seed: int = 42
    """Seeds model init order, data order and dropout."""
    learning_rate: float = 1e-5
    """Learning rate of the language model (and of every group without its own rate)."""
    vision_tower_lr: float | None = None
    """Learning rate of the vision tower's blocks and patch embedding (None = learning_rate)."""
    mm_projector_lr: float | None = None
    """Learning rate of the merger / projector (None = learning_rate); independent of vision_tower_lr."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay, applied to weight matrices (LoRA A/B included); norms, biases and other 1-D parameters get 0."""
    adam_beta1: float = 0.9
    """AdamW's decay rate of the gradient's running mean."""
    adam_beta2: float = 0.999
    """AdamW's decay rate of the squared gradient's running mean."""
    adam_epsilon: float = 1e-8
    """AdamW's denominator term that keeps the update finite where the squared-gradient mean is ~0."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    lr_scheduler_type: str = "cosine"
    """cosine | linear | constant (after warmup)."""
    warmup_ratio: float = 0.0
    """Fraction of the total optimizer steps spent warming the learning rate up linearly from 0, in [0, 1)."""
    warmup_steps: int = 0
    """Overrides warmup_ratio when > 0."""
    max_steps: int = -1
    """Optimizer steps to run; -1 = derive from num_train_epochs and the dataset size."""
    num_train_epochs: float = 1.0
    """Passes over the training data when max_steps is -1 (fractions allowed: 0.5 = half the optimizer steps of one epoch)."""
    per_device_train_batch_size: int = 1
    """Samples per micro-batch on each device (with data_packing: packs per micro-batch)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches whose gradients add up before one optimizer step (effective batch = this x
    per_device_train_batch_size x devices)."""
    per_device_eval_batch_size: int = 8
    """Samples per evaluation batch on each device."""
    logging_steps: int = 10
    """Write a row to metrics.jsonl (loss, learning rates, grad norm, throughput) every N optimizer steps and at the last one."""
    eval_steps: int = 0
    """Evaluate every N steps (0 = only at the end)."""
    eval_max_new_tokens: int = 16
    """Generation length for exact-match evaluation."""
    save_steps: int = 0
    """Write OUTPUT_DIR/checkpoint-STEP every N steps (0 = none; the final model is always saved)."""
    save_total_limit: int | None = None
    """Keep at most this many checkpoints (the best one is never deleted)."""
    resume_from_checkpoint: str | None = None
    """auto (newest complete checkpoint in output_dir, if any) | a checkpoint path."""
    overwrite_output_dir: bool = False
    """A fresh run into an output_dir that holds checkpoints removes them (and does not resume); without it
    such a run is refused, so a later `resume_from_checkpoint: auto` never picks up another run's checkpoint."""
    metric_for_best_model: str = "eval_loss"
    """The evaluation metric that picks the best checkpoint and drives early stopping: eval_loss | eval_accuracy."""
    greater_is_better: bool | None = None
    """None = True unless the metric name ends in 'loss'."""
    early_stopping_patience: int = 0
    """Stop after this many evaluations without improvement (0 = never)."""
    early_stopping_threshold: float = 0.0
    """An evaluation improves only when it beats the best by more than this."""
    max_bad_steps: int = 10
    """Steps with a NaN/inf loss are skipped; the run stops once more than this many were, or once 3 in a row
    were (the weights are then most likely non-finite; core/loop.py), without saving NaN weights."""
    bf16: bool = False
    """bf16 autocast on GPU; CPU runs fp32."""
    gradient_checkpointing: bool = False
    """Recompute decoder and vision blocks in the backward pass: less activation memory, ~30% more compute."""
    use_liger_kernel: bool = False
    """torch on GPU: Liger's fused RMSNorm and SwiGLU kernels (needs liger-kernel)."""
    torch_compile: bool = False
    """torch: compile each decoder layer and vision block (torch.compile, dynamic shapes)."""
    optim: str = "adamw_torch"
    """adamw_torch (torch AdamW, fused on GPU) | adamw_torch_8bit (torchao's 8-bit AdamW: 2 bytes of
    optimizer state per trained weight instead of 8; torch, one process)."""
    pure_bf16: bool = False
    """torch, without deepspeed / fsdp: hold the weights in bf16 with no fp32 copy (LLaMA-Factory's
    pure_bf16), halving weight and gradient memory (gradients also accumulate in bf16); LoRA adapters and
    other LoRA-trained modules stay fp32. Needs bf16: true; full fine-tuning with it needs optim:
    adamw_torch_8bit, whose stochastic rounding keeps the updates that bf16 would round away."""
    bf16_master_weights: bool = False
    """torch, one process, full fine-tuning: the model's weights in bf16 for compute, fp32 master copies
    for AdamW (DeepSpeed's and Megatron's bf16 mode). No fp32 -> bf16 weight casts in every forward and
    backward, a bf16 residual stream; gradients accumulate in fp32 on the masters, the checkpoint is
    written from the masters (fp32). 2 more bytes per trained weight than bf16 autocast. Needs bf16: true."""
    num_threads: int = 0
    """torch intra-op threads on CPU (0 = library default)."""
    deepspeed: str | None = None
    """DeepSpeed ZeRO config: a JSON path, or a bundled one (zero0..zero3, zero3_offload = recipes/deepspeed/NAME.json).
    Its "auto" values come from this recipe; the optimizer and schedule always do (per-module learning rates)."""
    fsdp: bool = False
    """Shard parameters, gradients and optimizer state with torch FSDP2 (`fully_shard`); bf16 follows `bf16`."""


# The configuration released with the Circle-RoPE paper's code.
CIRCLE_ROPE_DEFAULTS = {"alpha": 0.5, "radius": 10, "method": "circle", "move_to_origin": True, "AGE_mode": "strategy_4"}
CIRCLE_ROPE_SUFFIX = "_circle_rope"


def circle_rope_settings(model: "ModelArgs", config_model_type: str) -> dict | None:
    """The Circle-RoPE dict to use, or None, from the recipe and the model's own config.json type."""
    if model.model_type in (None, config_model_type):
        if model.circle_rope:
            raise ConfigError(
                f"circle_rope is set but model_type is {model.model_type or config_model_type!r}; "
                f"use model_type: {config_model_type}{CIRCLE_ROPE_SUFFIX} to turn Circle-RoPE on"
            )
        return None
    if model.model_type != config_model_type + CIRCLE_ROPE_SUFFIX:
        raise ConfigError(
            f"model_type: {model.model_type!r} does not fit the model directory, whose config.json says "
            f"{config_model_type!r}; use {config_model_type!r} or {config_model_type + CIRCLE_ROPE_SUFFIX!r}"
        )
    settings = {**CIRCLE_ROPE_DEFAULTS, **_numbers_from_strings(model.circle_rope or {})}
    settings["AGE_mode"] = settings.get("AGE_mode") or "strategy_1"  # no AGE: every layer is Circle-RoPE
    try:
        resolve_config(settings)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return settings


# Circle-RoPE keys that take numbers: the released configurations (and `--circle_rope` overrides) may
# give them as strings ("move_to_positive": "2"); "auto" / "auto-k" radii stay strings.
CIRCLE_ROPE_NUMBER_KEYS = ("alpha", "radius", "move_to_positive", "dff_rate", "temporal_stride")


def _numbers_from_strings(circle_rope: dict) -> dict:
    settings = dict(circle_rope)
    for key in CIRCLE_ROPE_NUMBER_KEYS:
        value = settings.get(key)
        if isinstance(value, str):
            try:
                settings[key] = float(value)
            except ValueError:
                pass  # "auto", or a typo that resolve_config names with what is allowed
    return settings


def deepspeed_stage(value: str | None) -> int | None:
    """The ZeRO stage of a recipe's `deepspeed` value (None: no DeepSpeed, or a JSON that cannot be read)."""
    if not value:
        return None
    try:
        ds = json.loads(resolve_deepspeed_config(value).read_text())
    except (ConfigError, OSError, ValueError):
        return None  # _parallel_problems reports it
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


def family_problems(cfg: "RecipeConfig", spec: FamilySpec) -> list[str]:
    """What the recipe asks of its model family that the family's capability flags do not allow."""
    d, t = cfg.data, cfg.train
    asks = (
        ("packing", d.data_flatten or d.data_packing, "data_flatten / data_packing (packed rows)"),
        ("mdlm", t.objective == "mdlm", "objective: mdlm"),
        ("circle_rope", bool(cfg.model.model_type and cfg.model.model_type.endswith(CIRCLE_ROPE_SUFFIX)), "Circle-RoPE"),
        ("liger", t.use_liger_kernel, "use_liger_kernel"),
        ("mindspore", t.backend == "mindspore", "backend: mindspore"),
        ("zero3", deepspeed_stage(t.deepspeed) == 3, "DeepSpeed ZeRO-3"),
        ("fsdp2", t.fsdp, "fsdp"),
    )
    problems = [
        f"{what}: vltune does not support it for {spec.name}"
        + (f": {spec.capability_reasons[flag]}" if flag in spec.capability_reasons else "")
        + f" (families that have it: {', '.join(family_names(flag)) or 'none'})"
        for flag, asked, what in asks
        if asked and not getattr(spec.capabilities, flag)
    ]
    m = cfg.model
    fused = lora_target_parameters(m, spec) if m.train_type == "lora" and m.tune_mm_llm else []
    if fused and m.lora_dropout != 0:
        problems.append(
            f"lora_dropout: {m.lora_dropout} with LoRA on {spec.name}'s fused parameters "
            f"({', '.join(fused)}): peft adapts them only with lora_dropout: 0; "
            "set lora_dropout: 0, or lora_target_parameters: none to adapt the attention only"
        )
    return problems


def lora_target_parameters(m: "ModelArgs", spec: FamilySpec) -> list[str]:
    """The parameter names LoRA adapts besides its target modules (recipe value, else the family's)."""
    if m.lora_target_parameters is None:
        return list(spec.modules.lora_target_parameters)
    if m.lora_target_parameters.strip().lower() == "none":
        return []
    return [p.strip() for p in m.lora_target_parameters.split(",") if p.strip()]


def check_family(cfg: "RecipeConfig", spec: FamilySpec) -> None:
    """Raise once for everything the recipe asks that the model directory's family cannot do."""
    problems = family_problems(cfg, spec)
    if problems:
        raise ConfigError(f"invalid recipe for a {spec.name} model:\n  - " + "\n  - ".join(problems))


def mdlm_model_args(model_args: "ModelArgs", args: "MdlmArgs") -> "ModelArgs":
    """The model flags under mdlm: freeze_vision / freeze_merger (default on) override tune_mm_vision /
    tune_mm_mlp, as in the seed, where only the language model learns to denoise."""
    return replace(
        model_args,
        tune_mm_vision=model_args.tune_mm_vision and not args.freeze_vision,
        tune_mm_mlp=model_args.tune_mm_mlp and not args.freeze_merger,
    )


@dataclass
class MdlmArgs:
    """Masked diffusion (`objective: mdlm`, REFERENCE.md s4): noising, loss and sampler. Unused under `ar`."""

    noise_schedule: str = "linear"
    """linear (alpha_t = 1 - t, so p_mask = t) | cosine (alpha_t = 1 - sin(pi t / 2), MD4 / MaskGIT)."""
    mdlm_eps: float = 1e-3
    """Per sequence t ~ U(mdlm_eps, 1): keeps the 1/t loss weight finite."""
    mask_prompt_loss: bool = True
    """Only the response (labels != -100, found from the template structure) is masked and trained;
    false masks prompt text too. Vision tokens are never masked."""
    loss_normalization: str = "sequence"
    """sequence (sum CE/t / L_i / B, L_i = maskable tokens of row i) | token (/ all maskable tokens) | batch (/ B)."""
    train_eos_tail: bool = False
    """Fill each row's right padding with the end token and train it, so the sampler learns where to stop."""
    mask_token: str = "<|mask|>"
    """Added inside the embedding's spare rows (no resize) when the tokenizer lacks it."""
    freeze_vision: bool = True
    """Under mdlm the vision tower stays frozen even when tune_mm_vision is on (set false to let it train)."""
    freeze_merger: bool = True
    """Under mdlm the merger stays frozen even when tune_mm_mlp is on (set false to let it train)."""
    mdlm_steps: int = 0
    """Sampler denoising steps for eval / infer (0 = one per generated token)."""
    mdlm_block_length: int = 32
    """Sampler block length (semi-autoregressive blocks; capped at the generation length)."""
    mdlm_remasking: str = "low_confidence"
    """Which masked positions the sampler commits each step: low_confidence (most confident) | random."""
    mdlm_temperature: float = 0.0
    """Gumbel-noise temperature of the sampler's token choice (0 = argmax, deterministic)."""


SECTIONS = {"model": ModelArgs, "data": DataArgs, "train": TrainArgs, "mdlm": MdlmArgs}


@dataclass
class RecipeConfig:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    mdlm: MdlmArgs = field(default_factory=MdlmArgs)

    def to_flat_dict(self) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for name in SECTIONS:
            flat.update(asdict(getattr(self, name)))
        return flat


def _key_index() -> dict[str, tuple[str, type]]:
    """Flat key -> (section name, annotated type)."""
    index = {}
    for section, cls in SECTIONS.items():
        hints = get_type_hints(cls)
        for f in fields(cls):
            index[f.name] = (section, hints[f.name])
    return index


def _coerce(value: Any, annotated: Any) -> Any:
    """Turn a command-line string into the annotated type (YAML values are already typed)."""
    if not isinstance(value, str):
        if annotated is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    targets = getattr(annotated, "__args__", (annotated,))
    if value.lower() in ("none", "null") and type(None) in targets:
        return None
    for target in targets:
        if target is bool:
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
        elif target in (int, float):
            try:
                return target(value)
            except ValueError:
                continue
        elif target is dict:
            parsed = yaml.safe_load(value)
            if isinstance(parsed, dict):
                return parsed
        elif target is str:
            return value
    return value


def _type_ok(value: Any, annotated: Any) -> bool:
    targets = getattr(annotated, "__args__", (annotated,))
    for target in targets:
        if target is type(None) and value is None:
            return True
        if target is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if target is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if target in (str, bool, dict, list) and isinstance(value, target):
            return True
    return False


def resolve_recipe_path(recipe: str) -> Path:
    """A YAML path, or the name of a bundled recipe (`demo` -> recipes/demo.yaml)."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ConfigError(f"recipe file {recipe!r} does not exist")
        if path.is_dir():
            raise ConfigError(f"recipe {recipe!r} is a directory: give a recipe's YAML file (or a bundled recipe's name)")
        return path
    bundled = RECIPE_DIR / f"{recipe}.yaml"
    if bundled.exists():
        return bundled
    names = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
    raise ConfigError(f"unknown recipe {recipe!r}: not a file and not a bundled recipe ({', '.join(names)})")


def load_recipe(recipe: str | os.PathLike | dict | None, overrides: dict[str, Any] | None = None) -> RecipeConfig:
    """Build a validated RecipeConfig from a recipe (path, bundled name or dict) plus flat overrides."""
    if recipe is None:
        raw: dict[str, Any] = {}
    elif isinstance(recipe, dict):
        raw = dict(recipe)
    else:
        path = resolve_recipe_path(str(recipe))
        raw = _read_yaml(path)
        if not isinstance(raw, dict):
            raise ConfigError(f"recipe {path}: expected a mapping of keys to values, got {type(raw).__name__}")
    raw.update(overrides or {})

    index = _key_index()
    problems: list[str] = []
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in raw.items():
        if key not in index:
            problems.append(f"unknown key {key!r}{_suggestion(key, index)}")
            continue
        section, annotated = index[key]
        value = _coerce(value, annotated)
        if not _type_ok(value, annotated):
            problems.append(f"{key}: {value!r} is not a valid {getattr(annotated, '__name__', annotated)}")
            continue
        values[section][key] = value
    if problems:
        raise ConfigError("invalid recipe:\n  - " + "\n  - ".join(problems))

    cfg = RecipeConfig(**{name: cls(**values[name]) for name, cls in SECTIONS.items()})
    _tiny_follows_model_type(cfg.model)
    validate(cfg)
    return cfg


def _read_yaml(path: Path) -> Any:
    """The recipe's YAML; a syntax error names the recipe file and line (PyYAML's own says "<unicode string>")."""
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        reason = " ".join(str(part) for part in (getattr(e, "context", None), getattr(e, "problem", None)) if part) or str(e)
        raise ConfigError(f"recipe {where}: not valid YAML ({reason}); check the indentation and quoting there") from None


def _suggestion(key: str, index: dict[str, Any]) -> str:
    """"; did you mean 'x'?" for an unknown key. Among near-equal matches a training key comes first: a user who
    types `per_device_batch_size` means the training batch, though the shorter eval key scores a little higher."""
    scored = sorted(((difflib.SequenceMatcher(None, key, known).ratio(), known) for known in index), reverse=True)
    close = [known for ratio, known in scored if ratio >= 0.6 and ratio >= scored[0][0] - 0.05]
    close.sort(key=lambda known: "eval" in known and "eval" not in key)  # stable: ratio order otherwise
    if not close:
        return ""
    return f"; did you mean {close[0]!r}?" + (f" (or {close[1]!r})" if len(close) > 1 else "")


def base_model_type(model_type: str) -> str:
    """The family of a recipe `model_type` (the Circle-RoPE suffix dropped)."""
    return model_type[: -len(CIRCLE_ROPE_SUFFIX)] if model_type.endswith(CIRCLE_ROPE_SUFFIX) else model_type


def _tiny_follows_model_type(m: ModelArgs) -> None:
    """With `make_tiny_model`, a `model_type` of another known family picks the tiny model's family."""
    if not (m.make_tiny_model and m.model_type):
        return
    wanted = base_model_type(m.model_type)
    if wanted == m.make_tiny_model or wanted not in FAMILIES:
        return
    m.model_name_or_path = str(Path(m.model_name_or_path).parent / f"tiny-{wanted}")
    m.make_tiny_model = wanted


def validate(cfg: RecipeConfig) -> None:
    """Collect every semantic problem of a recipe and raise once."""
    m, d, t = cfg.model, cfg.data, cfg.train
    problems = _non_finite_problems(cfg)
    if not m.model_name_or_path:
        problems.append("model_name_or_path is empty: give a local HF-format model directory")
    if m.make_tiny_model is not None and m.make_tiny_model not in FAMILIES:
        problems.append(f"make_tiny_model: {m.make_tiny_model!r} is not one of {', '.join(FAMILIES)}")
    if m.model_type is not None and base_model_type(m.model_type) not in FAMILIES:
        problems.append(f"model_type: {m.model_type!r} is not a supported family (one of {', '.join(FAMILIES)}, "
                        f"optionally with {CIRCLE_ROPE_SUFFIX})")
    known = m.make_tiny_model if m.make_tiny_model in FAMILIES else None
    if m.model_type is not None and base_model_type(m.model_type) in FAMILIES:
        known = base_model_type(m.model_type)
    if known is not None:  # the family is known before any model directory is read
        problems += family_problems(cfg, get_family(known))
    if m.train_type not in ("full", "lora"):
        problems.append(f"train_type: {m.train_type!r} is not one of full, lora")
    if m.train_type == "lora" and (m.lora_r < 1 or m.lora_alpha <= 0 or not 0.0 <= m.lora_dropout < 1.0):
        problems.append(f"lora: r {m.lora_r} must be >= 1, alpha {m.lora_alpha} > 0, dropout {m.lora_dropout} in [0, 1)")
    if m.attn_implementation not in ("sdpa", "eager"):
        problems.append(f"attn_implementation: {m.attn_implementation!r} is not one of sdpa, eager")
    if not d.dataset_use:
        problems.append("dataset_use is empty: name a registered dataset or a JSON/JSONL path")
    if d.truncation_strategy not in ("delete", "right", "error"):
        problems.append(f"truncation_strategy: {d.truncation_strategy!r} is not one of delete, right, error")
    if d.model_max_length <= 0:
        problems.append(f"model_max_length: {d.model_max_length} must be > 0")
    if t.backend not in ("torch", "mindspore"):
        problems.append(f"backend: {t.backend!r} is not one of torch, mindspore")
    if t.objective not in ("ar", "mdlm"):
        problems.append(f"objective: {t.objective!r} is not one of ar, mdlm")
    problems += _mdlm_problems(cfg)
    if t.lr_scheduler_type not in ("cosine", "linear", "constant"):
        problems.append(f"lr_scheduler_type: {t.lr_scheduler_type!r} is not one of cosine, linear, constant")
    for key in ("learning_rate", "vision_tower_lr", "mm_projector_lr"):
        value = getattr(t, key)
        if value is not None and value <= 0:
            problems.append(f"{key}: {value} must be > 0")
    if not 0.0 <= t.warmup_ratio < 1.0:
        problems.append(f"warmup_ratio: {t.warmup_ratio} must be in [0, 1)")
    problems += _count_problems(cfg)
    if Path(t.output_dir).is_file():
        problems.append(f"output_dir: {t.output_dir} is a file; give a directory (new, or a run's own to resume)")
    if t.save_total_limit is not None and t.save_total_limit < 1:
        problems.append(f"save_total_limit: {t.save_total_limit} must be >= 1 (or null for no limit)")
    if t.early_stopping_patience and not (t.eval_steps and d.eval_dataset):
        problems.append("early_stopping_patience needs eval_steps > 0 and an eval_dataset")
    if t.max_steps == 0 or t.max_steps < -1:
        problems.append(f"max_steps: {t.max_steps} must be -1 (use num_train_epochs) or >= 1")
    if t.max_steps == -1 and t.num_train_epochs <= 0:
        problems.append(f"num_train_epochs: {t.num_train_epochs} must be > 0 when max_steps is -1")
    problems += _packing_problems(cfg)
    problems += _parallel_problems(t)
    problems += precision_problems(t, m.train_type)
    if t.use_liger_kernel and t.backend == "torch" and importlib.util.find_spec("liger_kernel") is None:
        problems.append("use_liger_kernel: the liger-kernel package is not installed: pip install liger-kernel "
                        "(or set use_liger_kernel: false)")
    if t.use_liger_kernel and t.torch_compile:
        # Liger's Triton autograd functions inside compiled decoder layers fail in dynamo (torch 2.11).
        problems.append("use_liger_kernel and torch_compile are both set: pick one (compile fuses the same norms and gating)")
    if problems:
        raise ConfigError("invalid recipe:\n  - " + "\n  - ".join(problems))


def _non_finite_problems(cfg: RecipeConfig) -> list[str]:
    """Every float key must be a finite number: a NaN learning rate (YAML `.nan`, `--learning_rate nan`) would
    train NaN weights and still report a finite mean loss over the steps before it."""
    return [
        f"{f.name}: {value} is not a finite number; give a finite value"
        for name in SECTIONS
        for f in fields(getattr(cfg, name))
        if isinstance(value := getattr(getattr(cfg, name), f.name), float) and not math.isfinite(value)
    ]


# Counts that must be at least 1 / at least 0 (None, where allowed, means "the default").
_AT_LEAST_ONE = {
    "train": ("per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size", "logging_steps",
              "eval_max_new_tokens"),
    "data": ("max_pixels", "min_pixels", "video_min_pixels", "video_max_pixels", "video_min_frames", "video_max_frames",
             "num_eval_samples"),
}
_AT_LEAST_ZERO = {
    "train": ("save_steps", "early_stopping_patience", "max_bad_steps", "eval_steps", "warmup_steps", "num_threads"),
    "data": ("dataloader_prefetch", "dataloader_num_workers"),
}


def _count_problems(cfg: RecipeConfig) -> list[str]:
    """Counts and pixel bounds: their ranges and lower <= upper; caught here, not after training (a zero
    eval_max_new_tokens used to fail in the final evaluation, after the whole run)."""
    problems = []
    for floor, table in ((1, _AT_LEAST_ONE), (0, _AT_LEAST_ZERO)):
        for section, keys in table.items():
            for key in keys:
                value = getattr(getattr(cfg, section), key)
                if value is not None and value < floor:
                    nullable = SECTIONS[section].__dataclass_fields__[key].default is None
                    problems.append(f"{key}: {value} must be >= {floor}" + (" (or null for the default)" if nullable else ""))
    d = cfg.data
    if d.base_interval is not None and not d.base_interval > 0:
        problems.append(f"base_interval: {d.base_interval} must be > 0 seconds (or null for the video preprocessor's fps)")
    for low, high in (("min_pixels", "max_pixels"), ("video_min_pixels", "video_max_pixels"), ("video_min_frames", "video_max_frames")):
        lo, hi = getattr(d, low), getattr(d, high)
        if lo is not None and hi is not None and 0 < hi < lo:
            problems.append(f"{low} {lo} > {high} {hi}: the lower bound must not exceed the upper one")
    return problems


# Blocks of a DeepSpeed JSON that vltune owns: the optimizer (per-module learning-rate groups) and the
# schedule come from the recipe, so a JSON that sets them would silently train something else.
DEEPSPEED_OWNED_BLOCKS = {
    "optimizer": "vltune builds AdamW with per-module groups from learning_rate / vision_tower_lr / mm_projector_lr",
    "scheduler": "vltune applies lr_scheduler_type / warmup_ratio / warmup_steps itself",
}


def resolve_deepspeed_config(value: str) -> Path:
    """A DeepSpeed JSON path as given, else relative to the package root (so a bundled recipe's
    `recipes/deepspeed/zero3.json` works from any directory), else a bundled name (`zero3`)."""
    for candidate in (Path(value), RECIPE_DIR.parent / value, RECIPE_DIR / "deepspeed" / f"{value}.json"):
        if candidate.is_file():
            return candidate
    bundled = ", ".join(sorted(p.stem for p in (RECIPE_DIR / "deepspeed").glob("*.json")))
    raise ConfigError(f"deepspeed: {value!r} is neither a JSON file nor a bundled config ({bundled})")


OPTIMIZERS = ("adamw_torch", "adamw_torch_8bit")


def precision_problems(t: TrainArgs, train_type: str) -> list[str]:
    """optim / pure_bf16: known names, and the combinations that train (or fit) as the user expects.
    (Several DDP ranks with adamw_torch_8bit are refused where the world size is known: backends/torch/parallel.py.)"""
    problems = []
    if t.optim not in OPTIMIZERS:
        problems.append(f"optim: {t.optim!r} is not one of {', '.join(OPTIMIZERS)}")
    sharded = "deepspeed" if t.deepspeed else "fsdp" if t.fsdp else None
    if sharded and t.optim != "adamw_torch":
        problems.append(f"optim: {t.optim} is for one process; {sharded} shards torch AdamW's state instead")
    if sharded and t.pure_bf16:
        problems.append(f"pure_bf16 is for one process; {sharded} keeps bf16 compute with fp32 master weights itself")
    if t.bf16_master_weights:
        if sharded:
            problems.append(f"bf16_master_weights is for one process; {sharded} keeps bf16 compute with fp32 master weights itself")
        if not t.bf16:
            problems.append("bf16_master_weights needs bf16: true (it computes in bf16)")
        if t.pure_bf16:
            problems.append("bf16_master_weights and pure_bf16 are both set: pure_bf16 keeps no fp32 copy; pick one")
        if train_type != "full":
            problems.append("bf16_master_weights is for train_type full: LoRA's adapters already train in fp32 (pure_bf16 puts the base in bf16)")
        if t.optim != "adamw_torch":
            problems.append("bf16_master_weights updates fp32 masters with adamw_torch; adamw_torch_8bit is for pure_bf16")
    if t.pure_bf16 and not t.bf16:
        problems.append("pure_bf16 needs bf16: true (it holds the weights in bf16 and computes in bf16)")
    if t.pure_bf16 and train_type == "full" and t.optim != "adamw_torch_8bit":
        # A bf16 weight of magnitude w moves only in steps of ~w/256: plain AdamW's 1e-5-sized updates round to zero.
        problems.append("pure_bf16 with train_type full needs optim: adamw_torch_8bit (its stochastic rounding keeps "
                        "updates smaller than bf16's resolution; plain AdamW would round them away)")
    return problems


def _parallel_problems(t: TrainArgs) -> list[str]:
    """deepspeed / fsdp: one sharding engine at a time, and a DeepSpeed JSON that leaves the optimizer to the recipe."""
    problems = []
    if t.deepspeed and t.fsdp:
        problems.append("deepspeed and fsdp are both set: pick one sharding engine")
    if not t.deepspeed:
        return problems
    try:
        path = resolve_deepspeed_config(t.deepspeed)
    except ConfigError as e:
        return problems + [str(e)]
    try:
        ds = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return problems + [f"deepspeed: {path} is not valid JSON ({e})"]
    for block, owner in DEEPSPEED_OWNED_BLOCKS.items():
        if block in ds:
            problems.append(f"deepspeed: {path} has a {block!r} block; remove it ({owner})")
    if (ds.get("fp16") or {}).get("enabled") not in (None, False, "auto"):
        problems.append(f"deepspeed: {path} enables fp16; use bf16: true in the recipe (fp16 loss scaling is not supported)")
    return problems


def _packing_problems(cfg: RecipeConfig) -> list[str]:
    """data_flatten / data_packing / max_tokens_per_batch: which combinations mean something."""
    d, problems = cfg.data, []
    if d.max_tokens_per_batch < 0:
        problems.append(f"max_tokens_per_batch: {d.max_tokens_per_batch} must be >= 0 (0 = off)")
    if d.max_tokens_per_batch and not d.data_flatten:
        problems.append("max_tokens_per_batch packs rows online: it needs data_flatten: true")
    if d.max_tokens_per_batch and d.data_packing:
        problems.append("max_tokens_per_batch and data_packing both set: the packed files already fix the rows; pick one")
    if (d.data_flatten or d.data_packing) and cfg.train.objective == "mdlm":
        problems.append("data_flatten / data_packing: objective mdlm trains on padded batches only (bidirectional packed attention is not wired)")
    return problems


def _mdlm_problems(cfg: RecipeConfig) -> list[str]:
    """Problems of the mdlm section (value ranges always; what only matters for training under mdlm)."""
    k, problems = cfg.mdlm, []
    if k.noise_schedule not in ("linear", "cosine"):
        problems.append(f"noise_schedule: {k.noise_schedule!r} is not one of linear, cosine")
    if k.loss_normalization not in ("token", "sequence", "batch"):
        problems.append(f"loss_normalization: {k.loss_normalization!r} is not one of token, sequence, batch")
    if k.mdlm_remasking not in ("low_confidence", "random"):
        problems.append(f"mdlm_remasking: {k.mdlm_remasking!r} is not one of low_confidence, random")
    if not 0.0 < k.mdlm_eps < 1.0:
        problems.append(f"mdlm_eps: {k.mdlm_eps} must be in (0, 1)")
    if k.mdlm_steps < 0 or k.mdlm_block_length < 1 or k.mdlm_temperature < 0:
        problems.append(
            f"mdlm sampler: mdlm_steps {k.mdlm_steps} must be >= 0, mdlm_block_length {k.mdlm_block_length} >= 1, "
            f"mdlm_temperature {k.mdlm_temperature} >= 0"
        )
    if not k.mask_token:
        problems.append("mask_token is empty: give the token string, e.g. <|mask|>")
    if cfg.train.objective == "mdlm" and not cfg.model.tune_mm_llm:
        problems.append("objective mdlm needs tune_mm_llm: true (the language model must learn to denoise bidirectionally)")
    if cfg.train.objective == "mdlm" and cfg.data.eval_dataset and not problems:
        from .mdlm_sampler import SamplerSettings

        try:  # the evaluation samples eval_max_new_tokens tokens with the recipe's sampler settings
            SamplerSettings(cfg.train.eval_max_new_tokens, k.mdlm_block_length, k.mdlm_steps).resolved()
        except ValueError as e:
            problems.append(f"{e}: fit eval_max_new_tokens, mdlm_block_length and mdlm_steps together")
    return problems
