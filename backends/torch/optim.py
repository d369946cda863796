"""AdamW parameter groups: component (llm / vision / merger) x weight decay (decay / no decay).

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
