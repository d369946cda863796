"""Recipe configuration: one dataclass per section, flat keys on the command line.

Users of qwen-vl-finetune and ms-swift type `--learning_rate 1e-5`, not `--train.lr`, so recipe
keys are flat. Each key belongs to exactly one section dataclass, and its docstring here is its
documentation (core/recipe_keys.py renders it for `vltune keys` and docs/recipe-keys.md).

This file is the schema only. core/recipe.py reads a recipe into these sections (`load_recipe`);
core/recipe_rules.py holds the rules a recipe must satisfy, alone and for its model's family.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

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
    train_modules: str | None = None
    """The Ovis recipe's selection, instead of tune_mm_* / vision_tower_lr / mm_projector_lr: `all`, or
    `|`-separated module names each with an optional learning rate, e.g. `llm|vte:1e-5`. Only the listed
    modules train, each at its own rate (or learning_rate). Names: the family's (Ovis2.5: all, llm,
    visual_tokenizer, visual_tokenizer.vit, visual_tokenizer.head, visual_tokenizer.vit.last_block, vte;
    other families: all, llm, vision, merger), a name plus a path inside it (`llm.layers.27`), or a module
    path from the HF model root (`model.language_model.layers.3`; `-1` = the last layer). LoRA: modules in
    the LLM's decoder layers or the vision blocks get adapters, projectors train in full."""
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
    """Steps with a NaN/inf loss are skipped (the weights untouched); the run stops once more than this many
    were. A NaN/inf gradient norm stops it at once, without saving the non-finite weights (core/loop.py)."""
    bf16: bool = False
    """bf16 autocast on GPU; CPU runs fp32."""
    gradient_checkpointing: bool = False
    """Recompute decoder and vision blocks in the backward pass: less activation memory, ~30% more compute."""
    gradient_checkpointing_every_n_layers: int = 1
    """With gradient_checkpointing: recompute only the first and then every N-th decoder layer and vision
    block, counted in each stack (transformers' own `every_n_layers` counts both as one); the others keep
    their activations. 2 halves the recompute for about half the activation memory that full checkpointing
    saves: for a model that fits with full checkpointing and leaves memory unused."""
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
    fp8: bool = False
    """torch on a CUDA GPU of compute capability 8.9+ (Ada, Hopper): the linear layers of the language model's
    decoder layers compute in float8 (torchao's float8 training, dynamic tensorwise scaling); the vision
    tower, merger, embeddings, LM head, norms and LoRA adapters stay bf16. Needs bf16: true and torchao."""
    num_threads: int = 0
    """torch intra-op threads on CPU (0 = library default)."""
    deepspeed: str | None = None
    """DeepSpeed ZeRO config: a JSON path, or a bundled one (zero0..zero3, zero3_offload = recipes/deepspeed/NAME.json).
    Its "auto" values come from this recipe; the optimizer and schedule always do (per-module learning rates)."""
    fsdp: bool = False
    """Shard parameters, gradients and optimizer state with torch FSDP2 (`fully_shard`); bf16 follows `bf16`."""
    sequence_parallel_size: int = 1
    """torch, packed rows: split each row's tokens over this many ranks (Ulysses sequence parallelism, an
    all-to-all around attention); data parallelism runs over world size / N groups. 1 = off."""


# The configuration released with the Circle-RoPE paper's code.
CIRCLE_ROPE_DEFAULTS = {"alpha": 0.5, "radius": 10, "method": "circle", "move_to_origin": True, "AGE_mode": "strategy_4"}
CIRCLE_ROPE_SUFFIX = "_circle_rope"


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

KEY_ALIASES = {
    "model_path": "model_name_or_path",
    "data_path": "dataset_use",
    "eval_data_path": "eval_dataset",
    "multimodal_max_length": "model_max_length",
    "single_image_max_pixels": "max_pixels",
    "single_image_min_pixels": "min_pixels",
}
"""Other recipes' names for vltune's keys (the Ovis training recipe's: AIDC-AI/Ovis ovis/train/arguments.py),
alias -> key. A recipe may use either name of a key, not both."""


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


def base_model_type(model_type: str) -> str:
    """The family of a recipe `model_type` (the Circle-RoPE suffix dropped)."""
    return model_type[: -len(CIRCLE_ROPE_SUFFIX)] if model_type.endswith(CIRCLE_ROPE_SUFFIX) else model_type


OPTIMIZERS = ("adamw_torch", "adamw_torch_8bit")
