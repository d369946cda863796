"""Data-parallel engines of the torch backend: DDP, FSDP2 (`fully_shard`) and DeepSpeed ZeRO 0-3.

Each is an Engine (engine.py) that keeps the single-process model code untouched and changes only how
gradients are reduced, where parameters and optimizer state live, and how weights are gathered to be
saved. What they share:

* The loop hands every rank `loss_scale = 1 / (trained tokens of the global batch)`. DDP, FSDP2 and
  DeepSpeed all *average* gradients over ranks, so each rank scales its loss by `world_size` as well:
  the result is the gradient of the loss normalised over the global batch, as one process with the
  whole batch would compute it.
* `VisionSync` makes every rank run the vision tower equally often per micro-batch (no hang on
  text-only micro-batches under ZeRO-3 / FSDP2, no missing gradients under DDP).
* Only rank 0 writes the model, the optimizer file (when there is one file) and the logs; each rank
  saves its own RNG streams, and ZeRO writes its optimizer shards per rank (they exist only there).
* The optimizer is always vltune's AdamW with per-component groups, and the learning rate of each
  group is set from the recipe's schedule every step, also under DeepSpeed.

Parallelism is applied by functions (`apply_ddp`, `apply_fsdp`, `apply_deepspeed`), FSDP's units in a
commented order; the engine classes only keep what differs in stepping, saving and loading. A training
micro-step goes through `train_forward` (the wrapper that syncs gradients), never by swapping
`self.model`: evaluation, generation and saving use the plain model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from vltune.core.config import ConfigError, ModelArgs, TrainArgs
from vltune.core.recipe_rules import resolve_deepspeed_config
from vltune.core.contracts import Batch
from vltune.core.sequence_parallel import pad_row, shard_trained_positions

from .checkpoint import OPTIMIZER_FILE, RNG_FILE, rng_state, set_rng_state
from .device import deepspeed_accelerator
from . import sequence_parallel
from .distributed import DistContext, VisionSync
from .sequence_parallel import SequenceParallel
from .models import part
from .optim import set_learning_rates
from .engine import Engine


def _rank_rng_file(rank: int) -> str:
    return RNG_FILE if rank == 0 else f"rng_state_rank{rank}.pt"


def apply_ddp(model: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """Replicate the model; DDP all-reduces gradients during backward. No buffers to broadcast (the rotary
    tables are constants), so the forward needs no collective."""
    device_ids = [device.index] if device.type in ("cuda", "npu") else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def apply_fsdp(model: torch.nn.Module, mesh: Any, param_dtype: torch.dtype | None) -> None:
    """Shard the model in place with FSDP2 (`fully_shard`), units in torchtitan's order:

    1. each vision block (the family's module map names them);
    2. the rest of the vision tower (patch embedding, projectors);
    3. each decoder layer;
    4. the root (embeddings, final norm, LM head), whose inputs stay as given: float position ids
       (Circle-RoPE) must not be cast to bf16.
    With `param_dtype` (bf16 runs) the gathered parameters compute in it and gradients reduce in fp32,
    the sharded parameters and optimizer state staying fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    recordable = _recordable_outputs(model)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    for block in part(model, "vision_blocks"):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(part(model, "vision_tower"), mesh=mesh, mp_policy=policy)
    for layer in part(model, "decoder_layers"):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    root = MixedPrecisionPolicy(param_dtype=policy.param_dtype, reduce_dtype=policy.reduce_dtype, cast_forward_inputs=False)
    fully_shard(model, mesh=mesh, mp_policy=root)
    _restore_recordable_outputs(recordable)


def _recordable_outputs(model: torch.nn.Module) -> list[tuple[torch.nn.Module, dict]]:
    """transformers' output capturing (which layer outputs a forward collects: Ovis2.5's visual tokenizer
    reads its tower's last layer this way) is registered per model *class*, and fully_shard replaces
    each sharded module's class with an FSDP subclass: the registrations, taken before sharding."""
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

    return [(m, _CAN_RECORD_REGISTRY.get(m)) for m in model.modules() if _CAN_RECORD_REGISTRY.get(m)]


def _restore_recordable_outputs(recordable: list[tuple[torch.nn.Module, dict]]) -> None:
    """Register each model's outputs again under its new (FSDP) class."""
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

    for module, flags in recordable:
        _CAN_RECORD_REGISTRY[module] = flags


def apply_deepspeed(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict, moe_block: str | None):
    """Wrap the model and vltune's optimizer in a DeepSpeed engine; returns the engine and its optimizer."""
    deepspeed_accelerator()  # DeepSpeed on the same kind of device as this process (its npu accelerator on Ascend)
    import deepspeed

    if int(config.get("zero_optimization", {}).get("stage", 0)) == 3 and moe_block:
        # ZeRO-3 gathers parameters module by module as forward hooks fire. Where experts are modules
        # of their own, a router sends each rank's tokens to different experts and the ranks' gathers
        # disagree (the hang DeepSpeed documents for MoE, and the reason the official qwen-vl-finetune
        # scripts call their MoE unsupported under ZeRO-3). DeepSpeed's remedy: the MoE block is one
        # leaf, gathered whole on every rank whichever experts its tokens use.
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, [moe_block])
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    return engine, optimizer


class _TrainingForward:
    """What `Engine._logits` calls during a training micro-step under DDP or DeepSpeed (`train_forward`).

    It runs the wrapper's forward (DDP registers its gradient hooks there, DeepSpeed its ZeRO
    bookkeeping) but answers `get_base_model()` with the plain transformers model, so the batch is
    filtered against the real forward signature (backends/torch/batch.to_model_inputs).
    """

    def __init__(self, wrapper: torch.nn.Module, base: torch.nn.Module):
        self.wrapper, self.base = wrapper, base

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapper(*args, **kwargs)

    def get_base_model(self) -> torch.nn.Module:
        return self.base

    def train(self, mode: bool = True) -> "_TrainingForward":
        self.wrapper.train(mode)
        return self


class _DistributedBackend(Engine):
    """Rank-aware parts shared by every engine: reductions, per-rank RNG, rank-0-only writing."""

    ctx: DistContext
    head_loss_after_forward = False  # the LM head runs inside the wrapped forward (Engine's note)

    def _setup_distributed(self, ctx: DistContext) -> None:
        self.ctx = ctx
        self.vision = VisionSync(self.base, ctx)
        self.sequence = None
        if self.args.sequence_parallel_size > 1:  # its language-model hook runs after VisionSync's
            self.sequence = SequenceParallel(ctx.rank, ctx.world_size, self.args.sequence_parallel_size)
            self.sequence.install(self.base)

    def forward_backward(self, batch: Batch, loss_scale: float) -> torch.Tensor:
        """One micro-batch through the wrapper. Under sequence parallelism the row is padded to a multiple of
        N and this rank runs its shard; the returned loss is the whole row's (summed over the group), so the
        loop's sums over the data-parallel group see each row once."""
        self.vision.prepare(batch)
        scale = loss_scale * self.ctx.world_size  # the wrappers average gradients over every rank
        if self.sequence is None:
            return self._wrapped_forward_backward(batch, scale)
        padded = pad_row(batch, self.sequence.size, pad_token_id=0)
        with self.sequence.sharding(padded["input_ids"].shape[-1], batch["input_ids"].shape[-1]):
            loss_sum = self._wrapped_forward_backward(padded, scale)
        return self.sequence.row_total(loss_sum)

    def _wrapped_forward_backward(self, batch: Batch, loss_scale: float) -> torch.Tensor:
        return Engine.forward_backward(self, batch, loss_scale)

    def _trained_targets(self, labels):
        """Under sequence parallelism: this shard's positions whose next token is trained, and those tokens."""
        group = sequence_parallel.active()
        if group is None:
            return super()._trained_targets(labels)
        start, stop = group.bounds
        positions = shard_trained_positions(labels, start, stop)
        return positions, labels[:, positions + start + 1]

    def _router_aux_weight(self, batch: Batch) -> float:
        """Every rank of a sequence group adds the row's load-balancing loss: each adds 1 / N of it."""
        weight = super()._router_aux_weight(batch)
        return weight / self.sequence.size if sequence_parallel.active() is not None else weight

    def reduce_sum(self, values: list[float]) -> list[float]:
        if self.sequence is not None:  # a sequence group's ranks hold one row: sum over data-parallel ranks
            return self.sequence.reduce_dp(values)
        return self.ctx.all_reduce(values)

    def memory_stats(self) -> dict[str, float]:
        """The largest peak over ranks: the figure that decides whether a run fits."""
        stats = super().memory_stats()
        peaks = self.ctx.all_reduce(list(stats.values()), op="max")
        return {key: round(value, 3) for key, value in zip(stats, peaks)}

    def _save_rng(self, directory: Path) -> None:
        torch.save(rng_state(), Path(directory) / _rank_rng_file(self.ctx.rank))

    def _load_rng(self, directory: Path) -> None:
        path = Path(directory) / _rank_rng_file(self.ctx.rank)
        if path.exists():  # a checkpoint of a run with fewer ranks has none for this one
            set_rng_state(torch.load(path, weights_only=False))


class DDPBackend(_DistributedBackend):
    """Replicated model, gradients all-reduced by torch DDP during backward."""

    def __init__(self, *args: Any, ctx: DistContext, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._setup_distributed(ctx)
        self.ddp = apply_ddp(self.model, self.device)
        self.train_forward = _TrainingForward(self.ddp, self.base)

    def save_model(self, out_dir: Path) -> None:
        if self.ctx.is_main:  # every rank holds the same weights
            super().save_model(out_dir)

    def save_checkpoint(self, directory: Path) -> None:
        if self.ctx.is_main:
            self.save_model(directory)
            torch.save(self.optimizer.state_dict(), Path(directory) / OPTIMIZER_FILE)
        self._save_rng(directory)

    def load_checkpoint(self, directory: Path) -> None:
        super().load_checkpoint(directory)  # the same weights and optimizer state on every rank
        self._load_rng(directory)


class FSDPBackend(_DistributedBackend):
    """torch FSDP2: parameters, gradients and AdamW state sharded over ranks (`fully_shard`).

    Units, in the order torchtitan applies them: each vision block, the rest of the vision tower
    (patch embedding, merger), each decoder layer, then the root (embeddings, final norm, LM head).
    bf16 runs keep fp32 sharded parameters and optimizer state, compute in bf16 and reduce
    gradients in fp32. Activation checkpointing is the recipe's `gradient_checkpointing`.
    """

    def __init__(self, *args: Any, ctx: DistContext, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.lora:
            raise ConfigError("fsdp: true with train_type: lora is not supported; use DDP or deepspeed (zero2)")
        from torch.distributed.device_mesh import init_device_mesh

        self._setup_distributed(ctx)
        apply_fsdp(self.model, init_device_mesh(self.device.type, (ctx.world_size,)), self.autocast_dtype)
        self.autocast_dtype = None  # FSDP casts the gathered parameters itself
        self.optimizer = self._build_optimizer()  # over the sharded (DTensor) parameters

    def optimizer_step(self, lr_factor: float, max_grad_norm: float) -> float:
        from torch.distributed.tensor import DTensor

        set_learning_rates(self.optimizer, lr_factor)
        grads = [p.grad for p in self.trainable if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if isinstance(norm, DTensor):  # a partial norm of this rank's shards: reduce to the global one
            norm = norm.full_tensor()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(self.trainable, max_grad_norm, norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def _full_options(self, **extra: bool):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, **extra)

    def save_model(self, out_dir: Path) -> None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(self.model, options=self._full_options(cpu_offload=True))  # every rank gathers
        if self.ctx.is_main:
            self._write_model(out_dir, state_dict=state)

    def save_checkpoint(self, directory: Path) -> None:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        self.save_model(directory)
        optim = get_optimizer_state_dict(self.model, self.optimizer, options=self._full_options(cpu_offload=True))
        if self.ctx.is_main:
            torch.save(optim, Path(directory) / OPTIMIZER_FILE)
        self._save_rng(directory)

    def load_checkpoint(self, directory: Path) -> None:
        """Rank 0 reads the HF weights and the full optimizer state; FSDP scatters them to the shards."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        from .models import load_model

        model_state: dict = {}
        optim_state: dict = {}
        if self.ctx.is_main:
            if not any(Path(directory).glob("model*.safetensors")):
                raise FileNotFoundError(f"{directory}: no model*.safetensors to resume from")
            model_state = load_model(directory).state_dict()
            optim_state = torch.load(Path(directory) / OPTIMIZER_FILE, map_location="cpu", weights_only=False)
        options = self._full_options(broadcast_from_rank0=True)
        set_model_state_dict(self.model, model_state, options=options)
        set_optimizer_state_dict(self.model, self.optimizer, optim_state, options=options)
        self._load_rng(directory)


# DeepSpeed keys that follow the recipe. "auto" takes the recipe's value; any other value must agree.
def _recipe_values(args: TrainArgs, world_size: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "train_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size,
        "gradient_clipping": args.max_grad_norm,
    }


def deepspeed_config(path: str | Path, args: TrainArgs, world_size: int, hidden_size: int, bf16: bool) -> dict[str, Any]:
    """The recipe's DeepSpeed JSON with every "auto" resolved, as the HF Trainer resolves them.

    Batch sizes and clipping come from the recipe; bucket sizes from the model's hidden size
    (hidden^2 for ZeRO-3's reduce/prefetch buckets, 10*hidden for its persistence threshold; ZeRO-1/2
    reduce in DeepSpeed's default 5e8-element buckets); bf16 from
    the recipe on GPUs (CPU runs fp32). A value that contradicts the recipe is an error naming both.
    A JSON with CPU offload gets `zero_force_ds_cpu_optimizer: false`, so vltune's torch AdamW (and
    its per-component groups) runs on the offloaded fp32 state.
    """
    source = resolve_deepspeed_config(str(path))
    cfg = json.loads(source.read_text())
    problems = []
    for key, value in _recipe_values(args, world_size).items():
        given = cfg.get(key, "auto")
        if given == "auto":
            cfg[key] = value
        elif not math.isclose(float(given), float(value)):
            problems.append(f"{key} is {given} in {source} but the recipe gives {value}")
    for block, enabled in (("bf16", bf16), ("fp16", False)):
        section = cfg.setdefault(block, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = enabled
        elif bool(section["enabled"]) != enabled:
            problems.append(f"{block}.enabled is {section['enabled']} in {source} but the recipe (bf16, on this device) gives {enabled}")
    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    # ZeRO-1/2 reduce gradients in buckets: DeepSpeed's own default of 5e8 elements, not the HF-style
    # hidden^2 (4.2M for a 3B: ~740 buckets a step), which measured 11% slower on 2 x H200 (docs/distributed.md).
    reduce_bucket = hidden_size * hidden_size if int(zero.get("stage", 0)) == 3 else 500_000_000
    for key, value in (
        ("reduce_bucket_size", reduce_bucket),
        ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
        ("stage3_param_persistence_threshold", 10 * hidden_size),
    ):
        if zero.get(key) == "auto":
            zero[key] = value
    if (zero.get("offload_optimizer") or {}).get("device", "none") != "none":
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    cfg.setdefault("steps_per_print", 2**31 - 1)  # vltune logs the steps itself
    if problems:
        raise ConfigError(f"deepspeed: {source} disagrees with the recipe:\n  - " + "\n  - ".join(problems))
    return cfg


class DeepSpeedBackend(_DistributedBackend):
    """DeepSpeed ZeRO 0-3 (+ CPU offload) around vltune's own AdamW and schedule.

    DeepSpeed keeps its own micro-step counter, with `gradient_accumulation_steps` from the recipe:
    every micro-batch runs `engine.backward` and, except the last of a step, `engine.step()` (which
    then only counts); `optimizer_step` sets each group's scheduled rate and takes the boundary step,
    where ZeRO reduces, clips (`gradient_clipping` = max_grad_norm) and updates.
    """

    def __init__(self, *args: Any, ctx: DistContext, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._setup_distributed(ctx)
        train_args: TrainArgs = self.args
        bf16 = self.autocast_dtype is not None
        self.autocast_dtype = None  # DeepSpeed casts the model to bf16 itself when enabled
        config = deepspeed_config(train_args.deepspeed, train_args, ctx.world_size, _hidden_size(self.base), bf16)
        self.zero_stage = int(config.get("zero_optimization", {}).get("stage", 0))
        self.engine, self.optimizer = apply_deepspeed(self.model, self.optimizer, config, self.info.family.modules.moe_block)
        self.train_forward = _TrainingForward(self.engine, self.base)

    def _wrapped_forward_backward(self, batch: Batch, loss_scale: float) -> torch.Tensor:
        self.train_mode()
        loss_sum = self._loss_sum(batch, self.train_forward)
        self.engine.backward(loss_sum * loss_scale, scale_wrt_gas=False)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # counts the micro-step; the update waits for optimizer_step
        return loss_sum.detach()  # read once per step by the loop (core.contracts)

    def optimizer_step(self, lr_factor: float, max_grad_norm: float) -> float | None:
        set_learning_rates(self.optimizer, lr_factor)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else None  # some optimizers' steps report none

    def zero_grad(self) -> None:
        # ZeRO has already reduced (and partitioned) this step's gradients by the time the loss is
        # known, and DeepSpeed offers no way to drop them outside fp16 overflow handling.
        raise RuntimeError(
            "a non-finite loss under DeepSpeed cannot be skipped: its gradients are already reduced into "
            "ZeRO's partitions; lower learning_rate, use bf16 instead of fp16, or check the data"
        )

    def save_model(self, out_dir: Path) -> None:
        # ZeRO-3 holds shards: gather full 16-bit (or fp32) weights layer by layer onto rank 0.
        state = self.engine._zero3_consolidated_16bit_state_dict() if self.zero_stage == 3 else None
        if self.ctx.is_main:
            self._write_model(out_dir, state_dict=state)

    def save_checkpoint(self, directory: Path) -> None:
        self.save_model(directory)
        # Optimizer state and fp32 master weights, one file per rank for the partitioned parts.
        self.engine.save_checkpoint(str(Path(directory) / "deepspeed"), tag="state", save_latest=False)
        self._save_rng(directory)

    def load_checkpoint(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(Path(directory) / "deepspeed"), tag="state", load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise FileNotFoundError(f"{directory}/deepspeed/state: no DeepSpeed checkpoint to resume from")
        self._load_rng(directory)


def _hidden_size(model: torch.nn.Module) -> int:
    config = model.config
    text = getattr(config, "text_config", None) or config
    return int(text.hidden_size)


def build_backend(cfg: Any, info: Any, circle_rope: dict | None, mdlm: Any = None, ctx: Any = None) -> Engine:
    """The torch engine for a recipe (backends.engine's entry): the model loaded from its directory in the
    recipe's dtype and attention, then the engine the recipe and the launcher ask for."""
    from .models import load_model

    torch.manual_seed(cfg.train.seed)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    dtype = torch.bfloat16 if cfg.train.pure_bf16 else torch.float32  # pure_bf16: never an fp32 copy, even on the host
    model = load_model(cfg.model.model_name_or_path, dtype=dtype, attn_implementation=cfg.model.attn_implementation)
    return build_torch_backend(model, Path(cfg.model.model_name_or_path), info, cfg.model, cfg.train, circle_rope, mdlm, ctx)


def build_torch_backend(
    model: torch.nn.Module,
    model_dir: Path,
    info: Any,
    model_args: ModelArgs,
    args: TrainArgs,
    circle_rope: dict | None,
    mdlm: Any,
    ctx: DistContext,
) -> Engine:
    """The engine the recipe and the launcher ask for: DeepSpeed, FSDP2, DDP (several ranks) or one process."""
    common = (model, model_dir, info, model_args, args, circle_rope)
    if ctx.world_size > 1 and args.optim == "adamw_torch_8bit":
        # Stochastic rounding draws random numbers on every rank, and ranks whose batches differ in shape
        # advance their generators differently: the DDP replicas would drift apart without an error.
        raise ConfigError("optim: adamw_torch_8bit is for one process (its stochastic rounding would differ between "
                          "data-parallel ranks); use adamw_torch, or deepspeed / fsdp to shard the optimizer state")
    if ctx.world_size > 1 and args.bf16_master_weights:
        # DDP would all-reduce the bf16 gradients (in bf16) before they are folded into the fp32 masters;
        # that path has not been tested with several ranks, so it is refused rather than left to chance.
        raise ConfigError("bf16_master_weights is for one process; with several ranks use deepspeed or fsdp, "
                          "which keep bf16 compute with fp32 master weights themselves")
    if args.deepspeed:
        return DeepSpeedBackend(*common, mdlm=mdlm, ctx=ctx)
    if args.fsdp:
        return FSDPBackend(*common, mdlm=mdlm, ctx=ctx)
    if ctx.world_size > 1:
        return DDPBackend(*common, mdlm=mdlm, ctx=ctx)
    return Engine(*common, mdlm=mdlm)
