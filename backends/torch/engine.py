"""The torch engine behind the backend-neutral loop: a transformers Qwen VL model, AdamW, autograd.

It implements core.contracts.TrainBackend; the loop in core/loop.py decides when each method runs.
"""

from __future__ import annotations

import resource
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from vltune.core.config import ModelArgs, TrainArgs, mdlm_model_args
from vltune.core.contracts import Batch, loss_denominator
from vltune.core.families import get_family
from vltune.core.flops import gpu_peak_flops
from vltune.core.mdlm import MdlmObjective
from vltune.core.mdlm_sampler import SamplerSettings
from vltune.core.train_modules import Selection
from vltune.data.mdlm_tokens import write_mdlm_files
from vltune.data.model_info import ModelInfo

from . import sequence_parallel
from .batch import pin_batch, to_model_inputs, to_tensor, vision_tower_kwargs
from .device import current_device
from .fp8 import apply_fp8, check_fp8_device
from .checkpoint import OPTIMIZER_FILE, RNG_FILE, load_weights, rng_state, save_hf_model, saved_state, set_rng_state
from .generate import generate_greedy, generate_with_positions
from .lora import apply_lora, keep_adapter_inputs_in_compute_dtype
from .speed import align_vision_mlp, apply_liger_kernels, checkpoint_every, compile_blocks
from .loss import head_loss_sum, kept_token_loss_sum, trained_positions, weighted_loss_sum
from .mdlm import bidirectional_logits, diffusion_sample
from .models import model_entry, part
from .models.bidirectional import make_bidirectional
from .models.circle_rope import CircleRopeAdapter
from .attention import enable_varlen
from .optim import (MasterWeights, bf16_weights, build_optimizer, build_param_groups, set_learning_rates, train_modules_selection,
                    upcast_trainable)

def apply_freeze(model: torch.nn.Module, model_args: ModelArgs) -> Selection | None:
    """Set requires_grad from tune_mm_llm / tune_mm_vision / tune_mm_mlp, or from train_modules.

    The LM head follows tune_mm_llm whether or not it is tied to the embedding (the official
    scripts leave an untied head trainable with tune_mm_llm=False).
    train_modules (core/train_modules.py): only the listed modules train (a tied weight when any of its
    names is listed); returns the resolved selection, whose per-module rates build_param_groups takes.
    Modules the forward never reaches (`ModuleMap.unreached`) stay frozen: DDP would wait for their gradients.
    """
    selection = None
    if model_args.train_modules is not None:
        from vltune.core.config import ConfigError

        selection = train_modules_selection(model, model_args.train_modules)
        chosen = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if selection.entry_of(name) is not None}
        for param in model.parameters():
            param.requires_grad_(id(param) in chosen)
        if not chosen:
            raise ConfigError(f"train_modules: {model_args.train_modules!r} selects no parameter of the model")
    else:
        modules = get_family(model.config.model_type).modules
        train = {"vision": model_args.tune_mm_vision, "merger": model_args.tune_mm_mlp, "llm": model_args.tune_mm_llm}
        for name, param in model.named_parameters():
            param.requires_grad_(train[modules.component_of(name)])
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("tune_mm_llm, tune_mm_vision and tune_mm_mlp are all false: nothing to train")
    for path in get_family(model.config.model_type).modules.unreached:
        model.get_submodule(path).requires_grad_(False)
    return selection


class Engine:
    """One model on one device: full fine-tuning or LoRA, with Circle-RoPE when the recipe asks, and
    the masked-diffusion objective (bidirectional text attention, weighted loss, diffusion sampler)
    when given an `mdlm` objective."""

    head_loss_after_forward = True
    """Apply the LM head inside the loss, in checkpointed chunks, after the model's forward returned
    hidden states. The data-parallel engines turn it off: their forward must go through the DDP / DeepSpeed /
    FSDP wrapper, and ZeRO-3 / FSDP2 hold the head's weight gathered only inside its own forward, so
    they keep the stock head on the kept positions (`logits_to_keep`)."""

    def __init__(
        self,
        model: torch.nn.Module,
        model_dir: Path,
        info: ModelInfo,
        model_args: ModelArgs,
        args: TrainArgs,
        circle_rope: dict | None = None,
        mdlm: MdlmObjective | None = None,
    ):
        # The current GPU or NPU: a torchrun worker has set its own (backends/torch/distributed.py).
        self.device = current_device()
        if args.fp8:  # before any work: a GPU without float8 tensor cores (or the CPU) is a one-line refusal
            check_fp8_device(self.device)
        self.model_dir = Path(model_dir)
        self.info = info
        self.mdlm = mdlm
        self.lora = model_args.train_type == "lora"
        if mdlm is not None:
            model_args = mdlm_model_args(model_args, mdlm.args)  # freeze_vision / freeze_merger
            make_bidirectional(model)
        if args.pure_bf16:
            bf16_weights(model)  # before the adapters: peft then creates them in fp32 (autocast_adapter_dtype)
        if self.lora:
            # Freezes the base, adds adapters per tune_mm_* flags; MDLM's mask row trains as well.
            mask_row = (mdlm.mask_token_id,) if mdlm is not None else ()
            # train_modules' per-module rates, by the plain model's names (the selection reads peft's too)
            self.selection = train_modules_selection(model, model_args.train_modules) if model_args.train_modules else None
            model = apply_lora(model, model_args, trainable_token_ids=mask_row)
            if args.pure_bf16:
                upcast_trainable(model)  # modules_to_save copies (the merger) and token deltas train in fp32 too
        else:
            self.selection = apply_freeze(model, model_args)
        if args.use_liger_kernel:
            apply_liger_kernels(model.get_base_model() if self.lora else model)
        if args.fp8:
            # After freezing / peft (LoRA's frozen base_layer converts, its adapters do not), before the
            # master weights (Float8Linear keeps the same weight parameter), torch.compile and FSDP2.
            apply_fp8(model.get_base_model() if self.lora else model)
        if args.gradient_checkpointing:
            # Non-reentrant checkpointing needs no input grads, so it works with frozen embeddings (LoRA).
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            checkpoint_every(model.get_base_model() if self.lora else model, args.gradient_checkpointing_every_n_layers)
        self.model = model.to(self.device)
        # What a training micro-step calls: the model itself here; a data-parallel engine puts its wrapper
        # (DDP, DeepSpeed) here, so gradients sync, while evaluation, generation and saving use self.model.
        self.train_forward = self.model
        # The plain transformers model under any PEFT wrapper: layers, config, save_pretrained.
        self.base = model.get_base_model() if self.lora else model
        # bf16 weights for compute, fp32 masters for AdamW; on the device already, so the masters are there too.
        self.masters = MasterWeights(self.base) if args.bf16_master_weights else None
        if not args.deepspeed:  # ZeRO-3 gathers each linear's weight only inside that linear's own forward
            align_vision_mlp(self.base)
        if args.torch_compile:
            compile_blocks(self.base)
        # Circle-RoPE changes positions only; the adapter gives AGE's M-RoPE layers their own cos/sin.
        self.circle = CircleRopeAdapter(self.base, circle_rope) if circle_rope else None
        # CPU runs fp32, except with bf16 weights (pure_bf16, bf16_master_weights), which need bf16 compute on any device.
        bf16_held = args.pure_bf16 or args.bf16_master_weights
        self.autocast_dtype = torch.bfloat16 if args.bf16 and (self.device.type != "cpu" or bf16_held) else None
        if self.lora and self.autocast_dtype is not None:
            keep_adapter_inputs_in_compute_dtype(self.model)
        self.model_args, self.args = model_args, args
        # Every module in training mode from the start. train_mode() later switches only from the root's
        # flag, and a PeftModel is created in training mode around a base that from_pretrained left in
        # eval mode: without this the base's layers ran as in evaluation under LoRA (transformers then
        # skips their gradient checkpointing, which it applies only to modules in training mode).
        self.model.train()
        # MoE families: the router's load-balancing loss joins the training loss, as transformers' own
        # `outputs.loss` has it (coef * aux per sample-mean loss; here coef * aux * trained tokens per sum).
        text = self.base.config.get_text_config()
        self.router_aux_coef = float(getattr(text, "router_aux_loss_coef", 0.0) or 0.0) if getattr(text, "num_experts", 0) else 0.0
        self._router_aux: torch.Tensor | None = None
        self._balancing_loss_func = self._load_balancing_loss_func() if self.router_aux_coef else None
        self.entry = model_entry(self.info.model_type)
        self._router_aux_log: list[tuple[torch.Tensor, int]] = []
        self.optimizer = self._build_optimizer()

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the per-component groups; a sharding engine calls it again once parameters are sharded."""
        groups = build_param_groups(self.model, self.info.family.modules, self.args, self.selection)
        if self.masters is not None:
            groups = self.masters.groups(groups)
        self.trainable = [p for group in groups for p in group["params"]]
        return build_optimizer(groups, self.args, self.device)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def _forward(self, batch: Batch, keep: torch.Tensor | None = None, hidden: bool = False, model=None) -> torch.Tensor:
        """Logits [B, L, V]; [B, K, V] at the sequence positions `keep` only (the LM head skips the rest);
        or with `hidden` the final hidden states [B, L, H], the LM head left to the loss. `model`: what the
        forward goes through (`train_forward` in a training micro-step; default the plain model)."""
        model = self.model if model is None else model
        if "cu_seqlens" in batch:  # a packed row: varlen text attention, one varlen call per vision layer
            enable_varlen(self.base)
        alt = batch.get("position_ids_alt")
        alt = to_tensor(alt, self.device, torch.long) if alt is not None else None
        group = sequence_parallel.active()
        if alt is not None and group is not None:  # the AGE layers' plain ids, this rank's shard of them
            alt = group.shard(alt)
        layers = self.circle.alt_positions(alt) if self.circle is not None else nullcontext()
        inputs = to_model_inputs(batch, self.device, model=model)
        router = {"output_router_logits": True} if self.router_aux_coef else {}
        with layers, self._autocast():
            if hidden:  # the inner model: the stock forward would apply the LM head to every position
                out = self.base.model(**self._encode_vision(batch, inputs), use_cache=False, **router)
                self._router_aux = self._balancing_loss(out.router_logits, inputs.get("attention_mask")) if router else None
                return out.last_hidden_state
            extra = {} if keep is None else {"logits_to_keep": keep}
            out = model(**inputs, use_cache=False, **extra, **router)
            self._router_aux = out.aux_loss if router else None
            return out.logits

    def _load_balancing_loss_func(self):
        """transformers' load-balancing loss of the model's own modeling file (what its forward adds), bound
        to the model's expert counts; looked up once, not per micro-batch."""
        import functools
        import importlib

        text = self.base.config.get_text_config()
        modeling = importlib.import_module(type(self.base).__module__)
        return functools.partial(modeling.load_balancing_loss_func, num_experts=text.num_experts, top_k=text.num_experts_per_tok)

    def _balancing_loss(self, router_logits, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self._balancing_loss_func(router_logits, attention_mask=attention_mask)

    def _plus_router_aux(self, loss_sum: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The summed loss plus the router's load-balancing loss weighted by this batch's loss denominator,
        so that the loop's division by the accumulated denominator gives CE mean + coef * aux, as transformers."""
        if self._router_aux is None:
            return loss_sum
        n = self._router_aux_weight(batch)
        aux = self._router_aux.to(loss_sum.dtype)
        if self.base.training:
            self._router_aux_log.append((aux.detach(), n))
        return loss_sum + self.router_aux_coef * aux * n

    def _router_aux_weight(self, batch: Batch) -> float:
        """What the router's load-balancing loss is multiplied by in this batch's summed loss."""
        return loss_denominator(batch)

    def step_metrics(self) -> dict[str, float]:
        """The router's load-balancing loss (unscaled, trained-token-weighted mean over the micro-batches
        since the last call; this rank's), for MoE models."""
        if not self._router_aux_log:
            return {}
        total = sum(float(aux) * n for aux, n in self._router_aux_log)
        count = sum(n for _, n in self._router_aux_log)
        self._router_aux_log.clear()
        return {"aux_loss": round(total / max(count, 1), 6)}

    def _encode_vision(self, batch: Batch, inputs: dict) -> dict:
        """`inputs` with the images and videos run through the vision tower here, its grid-derived
        inputs computed on the host (batch.vision_tower_kwargs). The one-process path only: a
        data-parallel engine's forward must enter through its wrapper with the pixels.

        Qwen2-VL / Qwen2.5-VL: the features replace the placeholder embeddings here (`inputs_embeds`), as
        the stock forward does, with the count check on the host; the stock forward's own check reads
        two values back from the GPU per modality. Qwen3-VL's features also feed its deepstack layers,
        so they go to the stock forward as `mm_encoder_outputs`."""
        inner = self.base.model
        entry = self.entry
        if entry.vision_inputs is None:  # a tower vltune does not precompute for: transformers' own path
            return inputs
        encoders = (("image", "pixel_values", "image_grid_thw", inner.get_image_features),
                    ("video", "pixel_values_videos", "video_grid_thw", inner.get_video_features))
        encoded = {}
        for modality, pixels, grid, encode in encoders:
            if pixels not in inputs:
                continue
            host_grid = torch.as_tensor(batch[grid])
            kwargs = vision_tower_kwargs(part(self.base, "vision_tower"), entry.vision_inputs, host_grid, self.device)
            encoded[modality] = encode(inputs[pixels], host_grid, return_dict=True, **kwargs)
        if not encoded:
            return inputs
        rest = {k: v for k, v in inputs.items() if not k.startswith("pixel_values")}
        if entry.features_to_forward:
            return {**rest, "mm_encoder_outputs": encoded}
        embeds = inner.get_input_embeddings()(rest.pop("input_ids"))
        for modality, output in encoded.items():
            token = self.info.image_token_id if modality == "image" else self.info.video_token_id
            features = torch.cat(output.pooler_output).to(embeds.dtype)
            # The placeholders' positions from the host's ids: `masked_scatter` (the stock forward's) has a
            # backward that reads its mask's count back from the GPU; indexing at known positions does not.
            where = np.nonzero(np.asarray(batch["input_ids"]) == token)
            if len(where[0]) != features.shape[0]:
                raise ValueError(f"{modality} placeholders and features disagree: {len(where[0])} tokens, "
                                 f"{features.shape[0]} features from the tower")
            embeds = embeds.index_put(tuple(to_tensor(w, self.device, torch.long) for w in where), features)
        return {**rest, "inputs_embeds": embeds}

    def _logits(self, batch: Batch, model=None) -> torch.Tensor:
        model = self.model if model is None else model
        if self.mdlm is not None:
            routers = [] if self.router_aux_coef else None
            logits = bidirectional_logits(model, batch, self.device, circle=self.circle,
                                          autocast_dtype=self.autocast_dtype, router_logits=routers)
            if routers is not None:  # the 2-D padding mask: the forward's own mask is 4-D under MDLM
                mask = to_tensor(batch["attention_mask"], self.device, torch.long)
                self._router_aux = self._balancing_loss(tuple(routers), mask)
            return logits
        return self._forward(batch, model=model)

    def _loss_sum(self, batch: Batch, model=None) -> torch.Tensor:
        """Summed loss of a batch: next-token CE (ar) or weighted masked CE (a core.mdlm masked batch), plus
        an MoE router's load-balancing loss (its forward sets `_router_aux`). `model`: as in _forward."""
        self._router_aux = None
        if "loss_weights" in batch:
            labels = torch.as_tensor(batch["labels"]).to(self.device)
            weights = torch.as_tensor(batch["loss_weights"]).to(self.device)
            return self._plus_router_aux(weighted_loss_sum(self._logits(batch, model), labels, weights), batch)
        if self.mdlm is not None:
            raise ValueError("objective mdlm: the batch is not masked (wrap the batch source in core.mdlm.MaskedBatches)")
        # The LM head runs on trained positions only (backends/torch/loss.py).
        positions, targets = self._trained_targets(batch["labels"])
        keep = to_tensor(positions, self.device, torch.long)
        targets = to_tensor(targets, self.device, torch.long).reshape(-1)
        if not self.head_loss_after_forward:
            logits = self._forward(batch, keep, model=model)
            return self._plus_router_aux(kept_token_loss_sum(logits.reshape(-1, logits.shape[-1]), targets), batch)
        hidden = self._forward(batch, hidden=True)[:, keep]
        with self._autocast():  # the LM head in checkpointed chunks
            loss_sum = head_loss_sum(self.base.lm_head, hidden.reshape(-1, hidden.shape[-1]), targets)
        return self._plus_router_aux(loss_sum, batch)

    def _trained_targets(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The positions whose next token is trained (where the LM head runs) and those tokens [B, K]."""
        positions = trained_positions(labels)
        return positions, labels[:, positions + 1]

    def train_mode(self) -> None:
        """The model in training mode. `Module.train()` visits every submodule: 839 per call on the 3B
        model, 14 ms of host time per row under cProfile on an H100
        (docs/bench/h100-2026-11-23-s2/host_profile_compile_master.txt), in a step whose host work
        is nearly as long as its GPU work. Every switch to eval mode here goes through the root
        (`eval_loss`, generation), so its flag says whether the walk is needed; the walk then goes through
        `train_forward`, whose wrapper (DDP, DeepSpeed) switches itself and the model."""
        if not self.model.training:
            self.train_forward.train()

    def forward_backward(self, batch: Batch, loss_scale: float) -> torch.Tensor:
        """The summed loss stays on the device (core.contracts): reading it here would make the host
        wait for this backward before it could queue the next micro-batch's forward."""
        self.train_mode()
        loss_sum = self._loss_sum(batch, self.train_forward)
        (loss_sum * loss_scale).backward()
        if self.masters is not None:
            self.masters.fold()
        return loss_sum.detach()

    def reduce_sum(self, values: list[float]) -> list[float]:
        return [float(v) for v in values]  # one process: its sums are the global ones

    def optimizer_step(self, lr_factor: float, max_grad_norm: float) -> float:
        set_learning_rates(self.optimizer, lr_factor)
        if max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.trainable if p.grad is not None]))
        self.optimizer.step()
        if self.masters is not None:
            self.masters.copy_to_model()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def learning_rates(self) -> dict[str, float]:
        # torchao keeps each rate as a float32 tensor: 7 significant digits, not 0.0005000000237...
        return {group["name"]: float(f"{float(group['lr']):.7g}") for group in self.optimizer.param_groups}

    def peak_flops(self) -> float | None:
        """bf16 dense peak of this GPU (core/flops.py's table), None on CPU or an unlisted GPU: the `mfu` metric's denominator."""
        if self.device.type != "cuda":
            return None
        return gpu_peak_flops(torch.cuda.get_device_name(self.device))

    def stage_batch(self, batch: Batch) -> Batch:
        """On a GPU: the batch in pinned host memory, made on the data loader's thread (batch.pin_batch)."""
        if self.device.type != "cuda":
            return batch
        torch.cuda.set_device(self.device)  # the thread's own current device: else it opens a context on GPU 0
        return pin_batch(batch)

    def memory_stats(self) -> dict[str, float]:
        if self.device.type == "cuda":
            return {"peak_mem_gib": round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)}
        # On CPU the process' peak resident set (Linux reports KiB) is the honest figure.
        return {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}

    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> tuple[float, int]:
        self.model.eval()
        if self.mdlm is not None and "loss_weights" not in batch:
            batch = self.mdlm.mask_for_eval(batch)  # the same mask at every evaluation
        return float(self._loss_sum(batch)), loss_denominator(batch)

    def generate(self, batch: Batch, max_new_tokens: int) -> list[list[int]]:
        if self.mdlm is not None:
            a = self.mdlm.args
            settings = SamplerSettings(
                gen_length=max_new_tokens, block_length=a.mdlm_block_length, steps=a.mdlm_steps,
                remasking=a.mdlm_remasking, temperature=a.mdlm_temperature, schedule=a.noise_schedule,
            )
            return diffusion_sample(
                self.model, batch, settings, mask_token_id=self.mdlm.mask_token_id, end_token_ids=self.mdlm.end_token_ids,
                seed=self.mdlm.seed, circle=self.circle, autocast_dtype=self.autocast_dtype,
            )
        if self.circle is not None:
            return generate_with_positions(self.model, batch, max_new_tokens, self.circle, autocast_dtype=self.autocast_dtype)
        return generate_greedy(self.model, batch, self.info, max_new_tokens, self.autocast_dtype)

    def save_model(self, out_dir: Path) -> None:
        self._write_model(out_dir)

    def _write_model(self, out_dir: Path, state_dict: dict | None = None) -> None:
        """The model files; `state_dict`: weights a sharding engine gathered (else the live module's)."""
        # A PeftModel's save_pretrained writes the adapter (adapter_config.json + safetensors).
        circle = self.circle.config if self.circle else None
        if state_dict is None and self.masters is not None:
            state_dict = self.masters.full_precision_state(self.model)
        save_hf_model(self.model, self.model_dir, out_dir, circle_rope=circle, state_dict=state_dict)
        if self.mdlm is not None:  # <|mask|> in the tokenizer files and mdlm.json, for vltune infer
            write_mdlm_files(out_dir, self.mdlm.args.mask_token, self.mdlm.mask_token_id, self.mdlm.saved_settings())

    def save_checkpoint(self, directory: Path) -> None:
        self.save_model(directory)
        torch.save(self.optimizer.state_dict(), directory / OPTIMIZER_FILE)
        torch.save(rng_state(), directory / RNG_FILE)

    def load_checkpoint(self, directory: Path) -> None:
        if self.masters is not None:  # the fp32 masters exactly, the model's bf16 weights rounded from them
            self.masters.load(self.model, saved_state(self.model, directory, torch.float32))
        else:
            load_weights(self.model, directory, lora=self.lora)
        self.optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILE, map_location=self.device))
        set_rng_state(torch.load(directory / RNG_FILE, weights_only=False))
