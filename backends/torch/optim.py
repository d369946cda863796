"""The optimizer: AdamW over parameter groups of component (llm / vision / merger) x weight decay.

Two implementations, picked by the recipe's `optim`:
- adamw_torch: torch AdamW (fused on GPU), fp32 state of 8 bytes per trained weight;
- adamw_torch_8bit: torchao's AdamW8bit (the implementation behind transformers' optim of the same
  name), block-quantised 8-bit moments, 2 bytes per weight. With bf16 weights (pure_bf16) it rounds
  each update stochastically, so updates far below a bf16 weight's resolution still move it on average;
  the state of the small tensors it does not quantise is kept in fp32 (_adamw_8bit_class).
  This is what lets a 7B full fine-tune fit one 80 GB GPU: bf16 weights + bf16 gradients + 8-bit state
  = 6 bytes per weight, against 16 for fp32 weights with fp32 AdamW.
torchao is chosen over bitsandbytes because it is plain torch (so it runs and is tested on CPU) and a
3 MB wheel; torchao wants each group's learning rate as a tensor, so schedules go through
`set_learning_rates`.

Each component has its own learning rate, and each rate is independent of the others:
llm -> learning_rate, vision -> vision_tower_lr (or learning_rate), merger -> mm_projector_lr (or
learning_rate). The official qwen-vl-finetune trainer only looks at vision_tower_lr when
mm_projector_lr is also set, so a recipe with only vision_tower_lr silently trains the vision
tower at learning_rate; here every rate that is set is used.

Components are read from parameter names, so the same code serves a plain transformers model and
a peft-wrapped one (`base_model.model.` prefix, `lora_A` / `lora_B` / `modules_to_save` inside):
  merger: the name contains `visual.merger` or `visual.deepstack_merger_list`
  vision: any other name containing `visual.`
  llm:    everything else (language model, embeddings, lm_head, the LLM's LoRA weights)
Decay: matrices (ndim >= 2) whose name has no "norm" get weight_decay; norms, biases and other
1-D parameters get 0.0. LoRA A/B are matrices, so they are decayed.

Every group carries `base_lr` (= its `lr`): a schedule sets `lr = base_lr * multiplier` so that
the per-component ratios survive warmup and decay.

With `train_modules` (the Ovis recipe's selection, core/train_modules.py) the groups are instead one per
(selected module, decay), named by the module as the recipe wrote it (`vte`, `vte_no_decay`, `llm`, ...),
each at that module's own rate or learning_rate; trained parameters outside every listed module (LoRA's
lora_modules_to_save) join `unlisted` at learning_rate. Freezing leaves the resolved selection on the model
(`train_modules_selection`), where this reads it.
"""

from __future__ import annotations

import functools

import torch

from vltune.core.config import OPTIMIZERS, TrainArgs
from vltune.core.families import ModuleMap
from vltune.core.param_groups import COMPONENTS, decays, group_label, group_lrs
from vltune.core.train_modules import Selection


def build_optimizer(groups: list[dict], args: TrainArgs, device: torch.device) -> torch.optim.Optimizer:
    """The recipe's `optim` over `groups` (build_param_groups)."""
    betas, eps = (args.adam_beta1, args.adam_beta2), args.adam_epsilon
    if args.optim == "adamw_torch_8bit":
        return _adamw_8bit_class()(groups, lr=args.learning_rate, betas=betas, eps=eps, bf16_stochastic_round=True)
    if args.optim != "adamw_torch":
        raise ValueError(f"optim: {args.optim!r} is not one of {', '.join(OPTIMIZERS)}")
    return torch.optim.AdamW(groups, betas=betas, eps=eps, fused=device.type == "cuda")


@functools.cache
def _adamw_8bit_class() -> type:
    """torchao's AdamW8bit, with fp32 (not the weight's dtype) for the state it does not quantise.

    torchao quantises the moments of tensors of >= 4096 values; smaller ones (norm weights, q/k/v
    biases) get plain state in the weight's dtype. With bf16 weights that state cannot decay:
    0.999 * v rounds back to v in bf16, so the second moment only grows and those weights' updates
    shrink for good once gradients do. Their state is tiny; here it is fp32, which torchao's update
    (computed in fp32, copied back into the state) takes as it is.
    """
    from torchao.optim import AdamW8bit

    class AdamW8bitFp32SmallState(AdamW8bit):
        def _new_buffer(self, p: torch.Tensor, signed: bool) -> torch.Tensor:
            out = super()._new_buffer(p, signed)
            return out if hasattr(out, "codes") else out.float()  # `codes`: torchao's quantised state

        def step(self, closure=None):
            # torchao compiles its per-tensor update once per weight shape (dynamic=False). On the GPU that is its
            # speed; on the CPU (tests, the demo) it is a C++ build per shape, about 30 s per run with a cold
            # compile cache, for updates that run eagerly in milliseconds. The same update; not bit-identical to
            # the compiled one (fused rounding, the stochastic rounding's random draws).
            if self.param_groups[0]["params"][0].device.type == "cpu":
                with torch.compiler.set_stance("force_eager"):
                    return super().step(closure)
            return super().step(closure)

        def load_state_dict(self, state_dict: dict) -> None:
            # torch casts floating-point state to its parameter's dtype on load; put the fp32 state of the
            # small tensors back as saved, so that a resumed run continues exactly.
            saved = state_dict["state"]
            super().load_state_dict(state_dict)
            params = [p for group in self.param_groups for p in group["params"]]
            for index, entry in saved.items():
                for key, value in entry.items():
                    if key != "step" and not hasattr(value, "codes") and torch.is_tensor(value) and value.dtype == torch.float32:
                        self.state[params[index]][key] = value.to(params[index].device)

    return AdamW8bitFp32SmallState


def set_learning_rates(optimizer: torch.optim.Optimizer, lr_factor: float) -> None:
    """Every group's lr = its base_lr x the schedule's factor; in place where the lr is a tensor (torchao)."""
    for group in optimizer.param_groups:
        lr = group["base_lr"] * lr_factor
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def bf16_weights(model: torch.nn.Module) -> None:
    """Every parameter to bf16 (pure_bf16), buffers left as they are.

    Not `model.to(torch.bfloat16)`: that also rounds the rotary embeddings' fp32 `inv_freq` buffers,
    shifting the rotation angle by radians at long positions; training would then see positions
    that inference (which loads the checkpoint with fp32 `inv_freq`) does not.
    """
    for param in model.parameters():
        if param.dtype.is_floating_point and param.dtype != torch.bfloat16:
            param.data = param.data.to(torch.bfloat16)


def upcast_trainable(model: torch.nn.Module) -> None:
    """Trained parameters to fp32, frozen ones left as they are (pure_bf16 with LoRA: bf16 base, fp32 training)."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


class MasterWeights:
    """bf16 weights in the model, fp32 master copies for the optimizer (bf16_master_weights).

    Under bf16 autocast with fp32 weights, every forward casts each weight to bf16 and the compiled
    backward casts it again, the residual stream runs in fp32, and each micro-batch's bf16 weight
    gradient is cast up before it is added to the fp32 one. Here the model holds bf16 weights, so
    none of that happens; the fp32 masters keep the updates bf16 would round away (a weight of
    magnitude w moves only in steps of ~w/256 in bf16):

    * each trained parameter's fp32 tensor becomes its master (no copy), the parameter itself bf16;
    * after each micro-batch's backward, `fold` adds its bf16 gradients into the masters' fp32 ones
      (two foreach calls, not a Python hook per parameter: 439 hooks cost a 3B step ~17 ms of host
      time per row, docs/design-notes.md) and frees them: gradients accumulate in fp32 across micro-batches;
    * AdamW and clipping run on the masters; `copy_to_model` rounds them back into the model;
    * frozen parameters go to bf16 too when that is exact (released checkpoints are bf16), so a
      saved model still holds the weights it was given.
    """

    def __init__(self, model: torch.nn.Module):
        self.master_of: dict[torch.nn.Parameter, torch.nn.Parameter] = {}
        for param in dict.fromkeys(model.parameters()):  # tied weights once
            if not param.dtype.is_floating_point or param.dtype == torch.bfloat16:
                continue
            if param.requires_grad:
                self.master_of[param] = torch.nn.Parameter(param.data.float())  # the fp32 tensor itself, not a copy
                param.data = param.data.to(torch.bfloat16)
            else:
                rounded = param.data.to(torch.bfloat16)
                if torch.equal(rounded.float(), param.data.float()):
                    param.data = rounded

    @property
    def masters(self) -> list[torch.nn.Parameter]:
        return list(self.master_of.values())

    def groups(self, groups: list[dict]) -> list[dict]:
        """build_param_groups' groups over the model's parameters, as the same groups over their masters."""
        return [{**group, "params": [self.master_of[p] for p in group["params"]]} for group in groups]

    @torch.no_grad()
    def fold(self) -> None:
        """Add the model's bf16 gradients into the masters' fp32 gradients and free them."""
        params = [p for p in self.master_of if p.grad is not None]
        fresh = [p for p in params if self.master_of[p].grad is None]  # the step's first micro-batch: a copy
        seen = [p for p in params if self.master_of[p].grad is not None]
        for param in fresh:
            self.master_of[param].grad = torch.empty_like(self.master_of[param])
        if fresh:
            torch._foreach_copy_([self.master_of[p].grad for p in fresh], [p.grad for p in fresh])
        if seen:  # (compiled, this add measured slower on an H100: 206 against 202 ms per row, docs/performance.md)
            torch._foreach_add_([self.master_of[p].grad for p in seen], [p.grad for p in seen])
        for param in params:
            param.grad = None

    @torch.no_grad()
    def copy_to_model(self) -> None:
        torch._foreach_copy_(list(self.master_of), self.masters)

    def _masters_by_key(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        """The masters under `model`'s state_dict keys (a tied weight under each of its keys)."""
        return {key: self.master_of[value] for key, value in model.state_dict(keep_vars=True).items() if value in self.master_of}

    def full_precision_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """`model`'s state_dict with every trained weight taken from its fp32 master: what is saved."""
        return {**model.state_dict(), **{key: master.detach() for key, master in self._masters_by_key(model).items()}}

    @torch.no_grad()
    def load(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Weights saved by `full_precision_state` into the masters (exactly) and the model (rounded)."""
        model.load_state_dict(state)
        for key, master in self._masters_by_key(model).items():
            master.copy_(state[key])


def train_modules_selection(model: torch.nn.Module, text: str) -> Selection:
    """`train_modules` resolved against a transformers model's module and parameter names (tied ones too), by
    the names of the model's family; a ConfigError names a path the model lacks."""
    from vltune.core.families import get_family

    spec = get_family(model.config.model_type)
    names = [n for n, _ in model.named_modules()] + [n for n, _ in model.named_parameters(remove_duplicate=False)]
    return Selection.resolve(text, spec.train_modules_table, names)


def build_param_groups(model: torch.nn.Module, modules: ModuleMap, train_args: TrainArgs,
                       selection: Selection | None = None) -> list[dict]:
    """AdamW groups for the trainable parameters of `model`, named llm, llm_no_decay, vision, ...
    (with train_modules: one per listed module, see the module docstring).

    The split is by name through the family's module map; freezing (apply_freeze / apply_lora) has
    already decided what trains.
    Each trainable parameter lands in exactly one group; frozen ones in none; empty groups are dropped.
    `selection`: train_modules resolved (apply_freeze returns it): one group per listed module.
    """
    lrs = group_lrs(train_args, selection)
    # the components in a fixed order (llm, vision, merger); listed modules in first-seen order
    buckets: dict[tuple[str, bool], list[torch.nn.Parameter]] = (
        {(c, d): [] for c in COMPONENTS for d in (True, False)} if selection is None else {})
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue  # named_parameters already drops tied duplicates; `seen` guards custom modules
        seen.add(id(param))
        buckets.setdefault((group_label(name, modules, selection), decays(name, param.shape)), []).append(param)

    groups = []
    for (label, decay), params in buckets.items():
        if not params:
            continue
        lr = lrs[label]
        groups.append(
            {
                "params": params,
                "weight_decay": train_args.weight_decay if decay else 0.0,
                "lr": lr,
                "base_lr": lr,
                "name": label if decay else f"{label}_no_decay",
            }
        )
    return groups
