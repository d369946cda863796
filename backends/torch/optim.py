"""The optimizer: AdamW over parameter groups of component (llm / vision / merger) x weight decay.

Two implementations, picked by the recipe's `optim`:
- adamw_torch: torch AdamW (fused on GPU), fp32 state of 8 bytes per trained weight;
- adamw_torch_8bit: torchao's AdamW8bit (the implementation behind transformers' optim of the same
  name), block-quantised 8-bit moments, 2 bytes per weight. With bf16 weights (pure_bf16) it rounds
  each update stochastically, so updates far below a bf16 weight's resolution still move it on average.
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
"""

from __future__ import annotations

import torch

from vltune.core.config import ModelArgs, TrainArgs
from vltune.core.param_groups import COMPONENTS, component_lrs, component_of, decays


def build_optimizer(groups: list[dict], args: TrainArgs, device: torch.device) -> torch.optim.Optimizer:
    """The recipe's `optim` over `groups` (build_param_groups)."""
    betas, eps = (args.adam_beta1, args.adam_beta2), args.adam_epsilon
    if args.optim == "adamw_torch_8bit":
        from torchao.optim import AdamW8bit

        # torchao compiles its update once per parameter shape; a VL model has more shapes than dynamo's
        # default 8 graphs per function, and the shapes past it would run eager, several times slower.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        return AdamW8bit(groups, lr=args.learning_rate, betas=betas, eps=eps, bf16_stochastic_round=True)
    if args.optim != "adamw_torch":
        raise ValueError(f"optim: {args.optim!r} is not one of adamw_torch, adamw_torch_8bit")
    return torch.optim.AdamW(groups, betas=betas, eps=eps, fused=device.type == "cuda")


def set_learning_rates(optimizer: torch.optim.Optimizer, lr_factor: float) -> None:
    """Every group's lr = its base_lr x the schedule's factor; in place where the lr is a tensor (torchao)."""
    for group in optimizer.param_groups:
        lr = group["base_lr"] * lr_factor
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def upcast_trainable(model: torch.nn.Module) -> None:
    """Trained parameters to fp32, frozen ones left as they are (pure_bf16 with LoRA: bf16 base, fp32 training)."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def build_param_groups(model: torch.nn.Module, model_args: ModelArgs, train_args: TrainArgs) -> list[dict]:
    """AdamW groups for the trainable parameters of `model`, named llm, llm_no_decay, vision, ...

    `model_args` is accepted so that callers pass the full recipe; the grouping itself only needs
    the names, because freezing (apply_freeze / apply_lora) has already decided what trains.
    Each trainable parameter lands in exactly one group; frozen ones in none; empty groups are dropped.
    """
    del model_args  # the split is by name; see the docstring
    lrs = component_lrs(train_args)
    buckets: dict[tuple[str, bool], list[torch.nn.Parameter]] = {(c, d): [] for c in COMPONENTS for d in (True, False)}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue  # named_parameters already drops tied duplicates; `seen` guards custom modules
        seen.add(id(param))
        buckets[(component_of(name), decays(name, param.shape))].append(param)

    groups = []
    for (component, decay), params in buckets.items():
        if not params:
            continue
        lr = lrs[component]
        groups.append(
            {
                "params": params,
                "weight_decay": train_args.weight_decay if decay else 0.0,
                "lr": lr,
                "base_lr": lr,
                "name": component if decay else f"{component}_no_decay",
            }
        )
    return groups
