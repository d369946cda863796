"""LoRA for Qwen VL models through peft: which modules get adapters, which are trained in full.

Semantics of `apply_lora(model, model_args)` (train_type: lora):

- Every base weight is frozen; only what the flags below name is trained.
- `tune_mm_llm` puts LoRA adapters on the language model's modules named in `lora_target_modules`
  (comma-separated; default q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj), and only
  inside the language model's decoder layers. peft matches a plain name list by suffix, so
  "gate_proj" would also catch Qwen2.5-VL's vision MLP; the target is therefore a regex that
  peft full-matches against `model.language_model.layers.<N>.(...).<name>`.
- `tune_mm_vision` puts adapters on every linear layer of the vision blocks (Qwen2.5-VL:
  attn.qkv, attn.proj, mlp.gate_proj/up_proj/down_proj; Qwen3-VL: attn.qkv, attn.proj,
  mlp.linear_fc1/linear_fc2), read from the model itself. The patch embedding, the learned
  position embedding (Qwen3-VL) and the block norms stay frozen.
- `tune_mm_mlp` trains the merger in full: `visual.merger` and, for Qwen3-VL, each entry of
  `visual.deepstack_merger_list` (one entry at a time: peft's wrapper has to sit on a module that
  is called, and the list itself is only indexed). They go through peft's `modules_to_save`, so
  the trained copies are written into the adapter file and restored on load. peft keeps the
  original weights next to the trained copy (`original_module` / `modules_to_save.default`).
- `lora_modules_to_save` (comma-separated, e.g. embed_tokens,lm_head) names further modules
  trained in full, also through `modules_to_save`. A name matches a module whose full name is it
  or ends in ".<name>"; a name that matches nothing is an error rather than a silent no-op.
- lora_r, lora_alpha and lora_dropout go to peft unchanged: dropout 0.0 gives nn.Identity, and the
  adapter scale is lora_alpha / lora_r.
- Nothing trainable (all three flags off and no lora_modules_to_save) is a ValueError.
- `train_modules` (instead of the three flags; core/train_modules.py): each listed module gets what the
  flags would give its parts. Linear layers of the LLM's decoder layers that `lora_target_modules` names
  and every linear layer of the vision blocks get adapters when they lie in a listed module; a listed
  projector (or a listed module inside one, e.g. Ovis2.5's `vte`) trains in full through `modules_to_save`.
  Anything else a listed module holds (norms, embeddings, the LM head, the patch embedding) stays frozen,
  as under the flags; a listed module that keeps nothing to train is an error naming it. The family's
  fused target parameters (MoE experts) are adapted when the whole decoder stack is listed, and a listing
  of some layers only is refused for such a family (peft matches those parameters by name suffix alone).
- objective mdlm: the `<|mask|>` embedding row trains through peft's `trainable_token_indices`
  (a per-row delta saved in the adapter; see lora_config), not the whole embedding.

Saving and loading: `checkpoint.save_hf_model` on the PeftModel writes adapter_config.json and
adapter_model.safetensors (adapters plus the modules_to_save copies, not the frozen base) with the
tokenizer files beside them. To use it, load the same base model and wrap it:

    base = load_model(model_dir)
    model = PeftModel.from_pretrained(base, out_dir)   # is_trainable=True to train on
    merged = model.merge_and_unload()                  # optional: plain transformers model

Do not call trainer.apply_freeze after apply_lora: it would unfreeze the frozen base weights.
"""

from __future__ import annotations

import re

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.constants import DUMMY_TARGET_MODULES

from vltune.core.config import ConfigError, ModelArgs
from vltune.core.train_modules import Selection
from vltune.core.recipe_rules import lora_target_parameters
from vltune.core.families import FamilySpec, ModuleMap, get_family

DEFAULT_LLM_TARGETS = ModuleMap().lora_targets


def _split_csv(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def _module_name(model: torch.nn.Module, target: torch.nn.Module) -> str:
    """The dotted name of `target` inside `model` (so the regexes follow the real layout)."""
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ValueError(f"{type(target).__name__} is not a submodule of {type(model).__name__}")


def _family(model: torch.nn.Module) -> FamilySpec:
    """The model's family; its module map names the parts LoRA treats differently."""
    if isinstance(model, PeftModel):
        raise ValueError("apply_lora expects a transformers ...ForConditionalGeneration model, not one already wrapped by peft")
    spec = get_family(getattr(getattr(model, "config", None), "model_type", None), "apply_lora: the model's config model_type")
    for role, path in spec.modules.all_paths().items():
        try:
            model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"apply_lora: {type(model).__name__} has no {path} (the {role} of {spec.name})") from None
    return spec


def _linear_suffixes(model: torch.nn.Module, prefix: str) -> list[str]:
    """Names of the nn.Linear modules under the regex `prefix`, with the prefix cut off."""
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return sorted({re.sub(prefix, "", n, count=1) for n in linears if re.match(prefix, n)})


def _llm_target_regex(model: torch.nn.Module, layers: str, targets: list[str]) -> str:
    """Regex for the LLM decoder layers' modules named in `targets`; unknown names are an error."""
    layer_prefix = rf"{re.escape(layers)}\.\d+\."
    known = _linear_suffixes(model, layer_prefix)  # e.g. self_attn.q_proj, mlp.gate_proj
    for target in targets:
        if not any(re.fullmatch(rf"(?:[^.]+\.)*{re.escape(target)}", k) for k in known):
            raise ValueError(f"lora_target_modules: {target!r} is no linear layer of the language model's decoder layers {known}")
    return rf"{layer_prefix}(?:[^.]+\.)*(?:{'|'.join(re.escape(t) for t in targets)})"


def _vision_target_regex(model: torch.nn.Module, blocks: str) -> str:
    """Regex for every linear layer inside the vision blocks, with the suffixes read off the model."""
    block_prefix = rf"{re.escape(blocks)}\.\d+\."
    suffixes = _linear_suffixes(model, block_prefix)
    if not suffixes:
        raise ValueError(f"tune_mm_vision: found no linear layers under {blocks}")
    return rf"{block_prefix}(?:{'|'.join(re.escape(s) for s in suffixes)})"


def _merger_modules(model: torch.nn.Module, projectors: tuple[str, ...]) -> list[str]:
    """Full names of the projectors, a module list (Qwen3-VL's DeepStack mergers) entry by entry."""
    names = []
    for path in projectors:
        module = model.get_submodule(path)
        if isinstance(module, torch.nn.ModuleList):
            names += [f"{path}.{i}" for i in range(len(module))]
        else:
            names.append(path)
    return names


def _resolve_target_parameters(model: torch.nn.Module, layers: str, names: list[str]) -> list[str]:
    """peft's `target_parameters` (matched by name suffix) for the decoder layers' fused weights; a name
    no decoder-layer parameter ends in is an error, not a silent no-op."""
    params = [n for n, _ in model.named_parameters() if n.startswith(layers + ".")]
    for name in names:
        if not any(p.endswith("." + name) for p in params):
            raise ValueError(f"lora_target_parameters: no parameter of the decoder layers ({layers}) is named {name!r}")
    return names


def _resolve_modules_to_save(model: torch.nn.Module, names: list[str]) -> list[str]:
    """Full module names for the user's lora_modules_to_save (`lm_head` -> `lm_head`, `embed_tokens` ->
    `model.language_model.embed_tokens`). peft matches by bare `str.endswith`, where "head" would also
    catch "lm_head"; resolving to full names here makes the match exact and catches typos."""
    all_names = [n for n, _ in model.named_modules() if n]
    resolved = []
    for name in names:
        hits = [n for n in all_names if n == name or n.endswith("." + name)]
        if not hits:
            raise ValueError(f"lora_modules_to_save: no module of the model is named {name!r} (or ends in '.{name}')")
        resolved.extend(hits)
    return resolved


def lora_config(model: torch.nn.Module, model_args: ModelArgs, trainable_token_ids: tuple[int, ...] = ()) -> LoraConfig:
    """The peft LoraConfig that implements the module docstring's semantics for this model.

    `trainable_token_ids` (MDLM's `<|mask|>`) become trainable embedding rows through peft's
    `trainable_token_indices`: only those rows' deltas train and are saved in the adapter, and peft ties
    them into the LM head when the embeddings are tied. A fully trained embedding (embed_tokens in
    lora_modules_to_save) already covers them.
    """
    spec = _family(model)
    modules = spec.modules
    patterns, parameters = [], []
    if model_args.train_modules is not None:
        patterns, parameters, modules_to_save = _selected_targets(model, model_args, spec)
    if model_args.train_modules is None and model_args.tune_mm_llm:
        targets = _split_csv(model_args.lora_target_modules) or list(modules.lora_targets)
        patterns.append(_llm_target_regex(model, modules.decoder_layers, targets))
        parameters = _resolve_target_parameters(model, modules.decoder_layers, lora_target_parameters(model_args, spec))
        if parameters and model_args.lora_dropout != 0:
            raise ValueError(f"lora_dropout {model_args.lora_dropout}: peft adapts fused parameters ({', '.join(parameters)}) "
                             "only with lora_dropout: 0; set it, or lora_target_parameters: none")
    if model_args.train_modules is None:
        if model_args.tune_mm_vision:
            patterns.append(_vision_target_regex(model, modules.vision_blocks))
        modules_to_save = _merger_modules(model, modules.projectors) if model_args.tune_mm_mlp else []
    modules_to_save += _resolve_modules_to_save(model, _split_csv(model_args.lora_modules_to_save))
    modules_to_save = list(dict.fromkeys(modules_to_save))
    if not patterns and not modules_to_save:
        raise ValueError(
            "LoRA has nothing to train: tune_mm_llm, tune_mm_vision and tune_mm_mlp are all false and "
            "lora_modules_to_save is empty; set tune_mm_llm: true (LLM adapters), tune_mm_vision: true "
            "(vision adapters), tune_mm_mlp: true (train the merger) or name modules in lora_modules_to_save"
        )
    # peft raises NoMatchingPeftModuleError for a config that adapts no module. Its own dummy target
    # (peft.utils.constants.DUMMY_TARGET_MODULES, used by X-LoRA) is exempt from that check, so the
    # merger-only case still gets a PeftModel whose adapter file holds the merger. Not public API:
    # the test of that case guards it.
    target_modules = "|".join(f"(?:{p})" for p in patterns) if patterns else DUMMY_TARGET_MODULES
    embedding = _module_name(model, model.get_input_embeddings())
    train_rows = list(trainable_token_ids) if embedding not in modules_to_save else []
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=target_modules,
        target_parameters=parameters or None,
        modules_to_save=modules_to_save or None,
        trainable_token_indices={embedding: train_rows} if train_rows else None,
        bias="none",
    )


def _selected_targets(model: torch.nn.Module, model_args: ModelArgs, spec: FamilySpec) -> tuple[list[str], list[str], list[str]]:
    """train_modules under LoRA: (target regexes, fused target parameters, modules_to_save), by the rule in the
    module docstring."""
    from .optim import train_modules_selection

    modules = spec.modules
    selection: Selection = train_modules_selection(model, model_args.train_modules)
    targets = _split_csv(model_args.lora_target_modules) or list(modules.lora_targets)
    llm_regex = _llm_target_regex(model, modules.decoder_layers, targets)
    vision_regex = rf"{re.escape(modules.vision_blocks)}\.\d+\."
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    adapted = [n for n in linears if (re.fullmatch(llm_regex, n) or re.match(vision_regex, n)) and selection.entry_of(n)]
    saved = []
    for projector in _merger_modules(model, modules.projectors):
        if selection.entry_of(projector) is not None:
            saved.append(projector)
        else:  # a listed module inside the projector (Ovis2.5's vte) trains alone
            saved += [p for p in selection.paths() if p.startswith(projector + ".")]
    served = {selection.entry_of(n).label for n in adapted + saved if selection.entry_of(n) is not None}
    idle = [e.label for e in selection.entries if e.label not in served]
    if idle:
        raise ConfigError(
            f"train_modules: {', '.join(repr(label) for label in idle)} has nothing LoRA can train (no linear layer of the "
            "LLM's decoder layers in lora_target_modules or of the vision blocks, and no projector); use train_type: full "
            "for it, or name its modules in lora_modules_to_save"
        )
    parameters = []
    fused = lora_target_parameters(model_args, spec)
    llm_layers = [n for n in adapted if re.fullmatch(llm_regex, n)]
    if fused and llm_layers:
        if selection.entry_of(modules.decoder_layers) is None:
            raise ConfigError(f"train_modules: some decoder layers of {spec.name} are listed, and its fused parameters "
                              f"({', '.join(fused)}) can only be adapted in every layer; list the whole LLM, or set "
                              "lora_target_parameters: none")
        parameters = _resolve_target_parameters(model, modules.decoder_layers, fused)
        if model_args.lora_dropout != 0:
            raise ValueError(f"lora_dropout {model_args.lora_dropout}: peft adapts fused parameters ({', '.join(parameters)}) "
                             "only with lora_dropout: 0; set it, or lora_target_parameters: none")
    patterns = ["|".join(re.escape(n) for n in adapted)] if adapted else []
    return patterns, parameters, saved


def apply_lora(model: torch.nn.Module, model_args: ModelArgs, trainable_token_ids: tuple[int, ...] = ()) -> PeftModel:
    """Wrap a transformers Qwen VL model in peft LoRA as the module docstring describes."""
    config = lora_config(model, model_args, trainable_token_ids)
    for param in model.parameters():
        param.requires_grad_(False)  # peft freezes too; doing it first makes the contract independent of peft's
    return get_peft_model(model, config)


def keep_adapter_inputs_in_compute_dtype(model: PeftModel) -> None:
    """Stop peft casting each LoRA layer's input to the adapter's fp32 before the adapter runs.

    Under bf16 autocast that cast is pure cost: autocast casts the input straight back to bf16 for the
    adapter's matmul, so every adapted linear made two full-size copies of its input (and their
    gradients in the backward). peft documents the switch (`cast_input_dtype_enabled`, the flag behind
    peft.helpers.disable_input_dtype_casting). Only for runs under autocast: without it the input has
    to match the adapter's dtype.
    """
    from peft.tuners.lora import LoraLayer

    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            layer.cast_input_dtype_enabled = False
