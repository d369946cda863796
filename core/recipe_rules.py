"""The rules a recipe must satisfy: each key's range, the combinations that train as the user expects,
and what the model's family can do; plus what a recipe resolves to for that family (Circle-RoPE
settings, LoRA's fused target parameters, the DeepSpeed JSON).

`validate` collects every problem at once and raises a single error that lists each with the key, the
value and a fix (litgpt's `validate_args` habit). Rules that need the model directory's family run
again once it is read (`check_family`).
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import fields
from pathlib import Path

from .circle_rope import resolve_config
from .config import (
    CIRCLE_ROPE_DEFAULTS, CIRCLE_ROPE_SUFFIX, OPTIMIZERS, RECIPE_DIR, SECTIONS, ConfigError, ModelArgs, RecipeConfig,
    TrainArgs, base_model_type,
)
from .families import FAMILIES, FamilySpec, family_names, get_family
from . import train_modules as tm


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
        ("sequence_parallel", t.sequence_parallel_size > 1, "sequence_parallel_size > 1"),
    )
    problems = [
        f"{what}: vltune does not support it for {spec.name}"
        + (f": {spec.capability_reasons[flag]}" if flag in spec.capability_reasons else "")
        + f" (families that have it: {', '.join(family_names(flag)) or 'none'})"
        for flag, asked, what in asks
        if asked and not getattr(spec.capabilities, flag)
    ]
    m = cfg.model
    if m.train_modules is not None:
        roots = {path.split(".")[0] for path in spec.modules.all_paths().values()}
        problems += tm.name_problems(m.train_modules, spec.train_modules_table, roots, spec.name)
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


def validate(cfg: RecipeConfig, given: frozenset[str] = frozenset()) -> None:
    """Collect every semantic problem of a recipe and raise once. `given`: the keys the recipe set itself
    (rules about keys set together need it: a default value is not a choice)."""
    m, d, t = cfg.model, cfg.data, cfg.train
    problems = _non_finite_problems(cfg)
    if problems:  # alone: every range rule below would report the same NaN / inf once more
        raise ConfigError("invalid recipe:\n  - " + "\n  - ".join(problems))
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
    problems += _train_modules_problems(cfg, given)
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
    if t.gradient_checkpointing_every_n_layers < 1:
        problems.append(f"gradient_checkpointing_every_n_layers: {t.gradient_checkpointing_every_n_layers} must be >= 1")
    elif t.gradient_checkpointing_every_n_layers > 1 and not t.gradient_checkpointing:
        problems.append("gradient_checkpointing_every_n_layers is set but gradient_checkpointing is false: "
                        "set gradient_checkpointing: true (or remove the key)")
    if t.max_steps == 0 or t.max_steps < -1:
        problems.append(f"max_steps: {t.max_steps} must be -1 (use num_train_epochs) or >= 1")
    if t.max_steps == -1 and t.num_train_epochs <= 0:
        problems.append(f"num_train_epochs: {t.num_train_epochs} must be > 0 when max_steps is -1")
    problems += _packing_problems(cfg)
    problems += _parallel_problems(t)
    problems += _sequence_parallel_problems(cfg)
    problems += precision_problems(t, m.train_type)
    if t.use_liger_kernel and t.backend == "torch" and importlib.util.find_spec("liger_kernel") is None:
        problems.append("use_liger_kernel: the liger-kernel package is not installed: pip install liger-kernel "
                        "(or set use_liger_kernel: false)")
    if t.use_liger_kernel and t.torch_compile:
        # Liger's Triton autograd functions inside compiled decoder layers fail in dynamo (torch 2.11).
        problems.append("use_liger_kernel and torch_compile are both set: pick one (compile fuses the same norms and gating)")
    if problems:
        raise ConfigError("invalid recipe:\n  - " + "\n  - ".join(problems))


# The keys train_modules replaces: a recipe sets one or the other.
TRAIN_MODULES_REPLACES = ("tune_mm_llm", "tune_mm_vision", "tune_mm_mlp", "vision_tower_lr", "mm_projector_lr")


def _train_modules_problems(cfg: RecipeConfig, given: frozenset[str]) -> list[str]:
    """train_modules: its syntax (names are checked against the family in family_problems), and what it
    cannot be combined with."""
    m, t = cfg.model, cfg.train
    if m.train_modules is None:
        return []
    try:
        tm.parse(m.train_modules)
    except ValueError as e:
        return [str(e)]
    problems = []
    both = [k for k in TRAIN_MODULES_REPLACES if k in given or getattr(t, k, None) is not None and k.endswith("_lr")]
    if both:
        problems.append(f"train_modules and {', '.join(both)} are both set: train_modules picks the trained modules and "
                        "their learning rates itself (e.g. llm|merger:1e-4); use one or the other")
    if t.objective == "mdlm":
        problems.append("train_modules with objective mdlm: mdlm trains the language model (freeze_vision / freeze_merger "
                        "decide the rest); use tune_mm_* instead")
    if m.train_type == "lora" and t.backend == "mindspore":
        problems.append("train_modules with train_type lora on backend mindspore is not wired (its LoRA follows tune_mm_*); "
                        "use tune_mm_* there, or backend: torch")
    return problems


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
    problems += fp8_problems(t)
    if t.pure_bf16 and train_type == "full" and t.optim != "adamw_torch_8bit":
        # A bf16 weight of magnitude w moves only in steps of ~w/256: plain AdamW's 1e-5-sized updates round to zero.
        problems.append("pure_bf16 with train_type full needs optim: adamw_torch_8bit (its stochastic rounding keeps "
                        "updates smaller than bf16's resolution; plain AdamW would round them away)")
    return problems


def fp8_problems(t: TrainArgs) -> list[str]:
    """fp8: what it combines with. The GPU's compute capability (8.9+) is checked where the device is known
    (backends/torch/fp8.py, at engine setup)."""
    if not t.fp8:
        return []
    problems = []
    if t.backend != "torch":
        problems.append(f"fp8: true is for backend: torch (torchao's float8 training); backend {t.backend!r} has no fp8 path; "
                        "set fp8: false")
    if not t.bf16:
        problems.append("fp8 needs bf16: true (only the decoder layers' linears run in float8; the rest computes in bf16)")
    if t.deepspeed:
        # ZeRO-3 swaps each weight for an empty placeholder outside its module's forward and patches F.linear;
        # torchao's float8 linear has not been run under it. FSDP2 is the sharding engine torchao supports.
        problems.append("fp8 with deepspeed has not been run (torchao's float8 linears under ZeRO); use fsdp: true to shard, "
                        "or set fp8: false")
    return problems


def _sequence_parallel_problems(cfg: RecipeConfig) -> list[str]:
    """sequence_parallel_size: what sharding a row's tokens needs (the world size and the model's heads are
    checked where they are known: training.py)."""
    t, d = cfg.train, cfg.data
    n = t.sequence_parallel_size
    if n == 1:
        return []
    if n < 1:
        return [f"sequence_parallel_size: {n} must be >= 1 (1 = off)"]
    problems = []
    if t.backend != "torch":
        problems.append(f"sequence_parallel_size: {n} is for backend: torch (the MindSpore engine has no sequence parallelism)")
    if not (d.data_packing or d.data_flatten):
        problems.append(f"sequence_parallel_size: {n} shards packed rows: set data_packing: true (or data_flatten: true)")
    if t.objective != "ar":
        problems.append(f"sequence_parallel_size: {n} is for objective: ar (MDLM's bidirectional batches are padded, not packed)")
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
