"""The MindSpore engine behind the backend-neutral loop: a native Qwen VL model, value_and_grad, AdamW.

It implements core.contracts.TrainBackend as backends/torch/engine.py does, on the very same numpy
batches, so a recipe trains the same way on either engine (tests compare the two step for step).
MindSpore runs in PyNative mode: the models build their attention layouts and vision indices on the
host per batch, which graph mode would have to trace as static shapes.
"""

from __future__ import annotations

import json
import resource
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from vltune.core.config import ModelArgs, TrainArgs, mdlm_model_args
from vltune.core.contracts import Batch, loss_denominator
from vltune.core.families import get_family
from vltune.core.mdlm import MdlmObjective
from vltune.core.train_modules import Selection
from vltune.data.mdlm_tokens import write_mdlm_files
from vltune.data.model_info import ModelInfo

from .checkpoint import (
    CIRCLE_ROPE_FILE,
    OPTIMIZER_FILE,
    RNG_FILE,
    _copy_processor_files,
    load_hf_weights,
    read_safetensors,
    rng_state,
    save_hf_model,
    set_rng_state,
    write_safetensors,
)
from .generate import end_token_ids, generate_greedy
from .lora import LoraState
from .loss import load_balancing_loss, router_logits, token_loss_sum, weighted_loss_sum
from .mdlm import diffusion_sample
from .models import ModelInputs
from .optim import AdamW, build_param_groups, clip_grads, global_norm


def apply_freeze(model: nn.Cell, model_args: ModelArgs) -> Selection | None:
    """requires_grad from tune_mm_llm / tune_mm_vision / tune_mm_mlp (the torch backend's rule: the LM
    head follows tune_mm_llm, tied or not), or from train_modules (core/train_modules.py; the cells carry
    the HF names). Returns the resolved train_modules selection, whose per-module rates build_param_groups takes."""
    from vltune.core.config import ConfigError

    spec = get_family(model.cfg.model_type)
    selection = None
    if model_args.train_modules is not None:
        names = [n for n, _ in model.cells_and_names()] + [n for n, _ in model.parameters_and_names()]
        selection = Selection.resolve(model_args.train_modules, spec.train_modules_table, names)
    train = {"vision": model_args.tune_mm_vision, "merger": model_args.tune_mm_mlp, "llm": model_args.tune_mm_llm}
    unreached = tuple(path + "." for path in spec.modules.unreached)  # never used by the forward: frozen, as on torch
    for name, param in model.parameters_and_names():
        if selection is not None:
            param.requires_grad = selection.entry_of(name) is not None
        else:
            param.requires_grad = train[spec.modules.component_of(name)]
        if unreached and name.startswith(unreached):
            param.requires_grad = False
    if not any(p.requires_grad for p in model.get_parameters()):
        if selection is not None:
            raise ConfigError(f"train_modules: {model_args.train_modules!r} selects no parameter of the model")
        raise ValueError("tune_mm_llm, tune_mm_vision and tune_mm_mlp are all false: nothing to train")
    return selection


def set_recompute(model: nn.Cell, args: TrainArgs) -> None:
    """gradient_checkpointing: recompute the first and every `gradient_checkpointing_every_n_layers`-th decoder
    layer and vision block (counted in each stack, as the torch engine does) in the backward pass."""
    every = args.gradient_checkpointing_every_n_layers if args.gradient_checkpointing else 0
    model.model.language_model.recompute_every = every
    model.model.visual.recompute_every = every


class Engine:
    """One native model in one process: full fine-tuning or LoRA, Circle-RoPE,
    and the masked-diffusion objective when given an `mdlm` objective."""

    def __init__(
        self,
        model: nn.Cell,
        model_dir: Path,
        info: ModelInfo,
        model_args: ModelArgs,
        args: TrainArgs,
        circle_rope: dict | None = None,
        mdlm: MdlmObjective | None = None,
    ):
        self.model, self.model_dir, self.info = model, Path(model_dir), info
        self.mdlm = mdlm
        self.args = args
        if mdlm is not None:
            model_args = mdlm_model_args(model_args, mdlm.args)  # freeze_vision / freeze_merger
        self.lora = LoraState(model, model_args, seed=args.seed) if model_args.train_type == "lora" else None
        selection = apply_freeze(model, model_args) if self.lora is None else None
        set_recompute(model, args)
        self.circle = dict(circle_rope) if circle_rope else None
        if self.circle:
            model.model.language_model.set_age_mode(self.circle.get("AGE_mode", "strategy_1"))
        trainable = [(n, p) for n, p in model.parameters_and_names() if p.requires_grad]
        groups = build_param_groups(trainable, get_family(model.cfg.model_type).modules, args, selection)
        self.optimizer = AdamW(groups, (args.adam_beta1, args.adam_beta2), args.adam_epsilon)
        self.params = self.optimizer.params
        self.grads: list[Tensor] | None = None
        self._router_aux_log: list[tuple[float, int]] = []
        self.micro_steps = 0
        self.eos = end_token_ids(model_dir, model.cfg)

    # -- forward ------------------------------------------------------------------------------------

    def _inputs(self, batch: Batch) -> ModelInputs:
        return ModelInputs.from_batch(batch, self.model.cfg, causal=self.mdlm is None)

    def _loss_fn(self, batch: Batch):
        """A closure computing this batch's summed loss: next-token CE (ar) or weighted masked CE (mdlm)."""
        inputs = self._inputs(batch)
        labels = Tensor(np.asarray(batch["labels"]).astype(np.int32))
        if "loss_weights" in batch:
            weights = Tensor(np.asarray(batch["loss_weights"], dtype=np.float32))
            loss_fn = lambda: weighted_loss_sum(self.model(inputs), labels, weights)  # noqa: E731
        elif self.mdlm is not None:
            raise ValueError("objective mdlm: the batch is not masked (wrap the batch source in core.mdlm.MaskedBatches)")
        else:
            loss_fn = lambda: token_loss_sum(self.model(inputs), labels)  # noqa: E731
        text = self.model.cfg.text
        if not (text.num_experts and text.router_aux_loss_coef):
            return loss_fn
        # MoE: plus the router's load-balancing loss, weighted so that the loop's division by the loss
        # denominator gives loss mean + coef * aux (transformers' outputs.loss); padding left out of it.
        n = loss_denominator(batch)
        mask = Tensor(np.asarray(batch["attention_mask"])) if "attention_mask" in batch else None

        def with_router_aux():
            loss = loss_fn()
            aux = load_balancing_loss(router_logits(self.model), text.num_experts, text.num_experts_per_tok, mask)
            if self.model.training:
                self._router_aux_log.append((float(ops.stop_gradient(aux).asnumpy()), n))
            return loss + text.router_aux_loss_coef * aux * n

        return with_router_aux

    def _dropout(self, batch: Batch) -> None:
        if self.lora is not None:
            rng = np.random.default_rng([self.args.seed, 2, self.micro_steps])
            self.lora.set_dropout_masks(rng, tuple(np.asarray(batch["input_ids"]).shape))

    def forward_backward(self, batch: Batch, loss_scale: float) -> float:
        self.model.set_train(True)
        self._dropout(batch)
        self.micro_steps += 1
        loss_fn = self._loss_fn(batch)

        def scaled():
            loss = loss_fn()
            return loss * loss_scale, loss

        (_, loss), grads = ms.value_and_grad(scaled, None, self.params, has_aux=True)()
        grads = list(grads)
        self.grads = grads if self.grads is None else [a + b for a, b in zip(self.grads, grads)]
        return float(loss.asnumpy())

    def reduce_sum(self, values: list[float]) -> list[float]:
        return [float(v) for v in values]  # one process; distributed.DataParallelBackend sums over msrun workers

    def optimizer_step(self, lr_factor: float, max_grad_norm: float) -> float:
        if self.grads is None:
            raise RuntimeError("optimizer_step before any forward_backward")
        grads = self.grads
        for group in self.optimizer.groups:
            group.lr = group.base_lr * lr_factor
        if max_grad_norm > 0:
            grads, norm = clip_grads(grads, max_grad_norm)
        else:
            norm = global_norm(grads)
        self.optimizer.step(grads)
        self.grads = None
        return norm

    def zero_grad(self) -> None:
        self.grads = None

    def learning_rates(self) -> dict[str, float]:
        return {group.name: group.lr for group in self.optimizer.groups}

    def stage_batch(self, batch: Batch) -> Batch:
        """Nothing to prepare ahead: MindSpore copies each numpy input to the device when the step takes it."""
        return batch

    def step_metrics(self) -> dict[str, float]:
        """The router's load-balancing loss (unscaled, trained-token-weighted mean since the last call), MoE models."""
        if not self._router_aux_log:
            return {}
        total = sum(aux * n for aux, n in self._router_aux_log)
        count = sum(n for _, n in self._router_aux_log)
        self._router_aux_log.clear()
        return {"aux_loss": round(total / max(count, 1), 6)}

    def memory_stats(self) -> dict[str, float]:
        # CPU: the process' peak resident set (Linux reports KiB), as the torch backend reports.
        return {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}

    def eval_loss(self, batch: Batch) -> tuple[float, int]:
        self.model.set_train(False)
        if self.lora is not None:
            self.lora.set_dropout_masks(None, ())
        if self.mdlm is not None and "loss_weights" not in batch:
            batch = self.mdlm.mask_for_eval(batch)  # the same mask at every evaluation
        return float(self._loss_fn(batch)().asnumpy()), loss_denominator(batch)

    def generate(self, batch: Batch, max_new_tokens: int) -> list[list[int]]:
        if self.lora is not None:
            self.lora.set_dropout_masks(None, ())
        if self.mdlm is not None:
            return diffusion_sample(self.model, batch, self.mdlm, max_new_tokens)
        return generate_greedy(self.model, batch, max_new_tokens, self.eos)

    # -- files --------------------------------------------------------------------------------------

    def save_model(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        if self.lora is not None:

            def extra(tmp: Path) -> None:
                _copy_processor_files(self.model_dir, tmp)
                if self.circle:
                    (tmp / CIRCLE_ROPE_FILE).write_text(json.dumps(self.circle, indent=2) + "\n")

            self.lora.save(out_dir, self.model_dir, extra)
        else:
            save_hf_model(self.model, self.model_dir, out_dir, circle_rope=self.circle)
        if self.mdlm is not None:  # <|mask|> in the tokenizer files and mdlm.json, for vltune infer
            write_mdlm_files(out_dir, self.mdlm.args.mask_token, self.mdlm.mask_token_id, self.mdlm.saved_settings())

    def save_checkpoint(self, directory: Path) -> None:
        directory = Path(directory)
        self.save_model(directory)
        write_safetensors(directory / OPTIMIZER_FILE, self.optimizer.state_arrays())
        state = {**rng_state(), "micro_steps": self.micro_steps}
        (directory / RNG_FILE).write_text(json.dumps(state))

    def load_checkpoint(self, directory: Path) -> None:
        directory = Path(directory)
        if self.lora is not None:
            self.lora.load(directory)
        else:
            load_hf_weights(self.model, directory)
        self.optimizer.load_state_arrays(read_safetensors(directory / OPTIMIZER_FILE)[0])
        state = json.loads((directory / RNG_FILE).read_text())
        set_rng_state(state)
        self.micro_steps = int(state["micro_steps"])
