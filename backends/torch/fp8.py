"""`fp8: true`: the language model's decoder linears train in float8 through torchao.

torchao's float8 training (`convert_to_float8_training`) swaps chosen `nn.Linear` modules for its
`Float8Linear`, which keeps the weight as the same high-precision parameter and casts the input, the
weight and the output gradient to float8 on the fly, each with one dynamic scale per tensor (the default
"tensorwise" recipe: e4m3 forward, e5m2 gradients), for `torch._scaled_mm`. Nothing else changes: the
state dict, the optimizer, the master weights and the checkpoint see the same parameters.

What is converted (`fp8_filter`): the `nn.Linear` leaves inside the family's decoder layers
(`ModuleMap.decoder_layers`), whose matmuls are most of a step's FLOPs. Not converted:

* the vision tower and the merger (a frozen tower's short matmuls gain little and its activations'
  outliers are what float8's 3-bit mantissa handles worst), the embeddings and the LM head (the head's
  logits feed the loss directly), the norms (not linears);
* LoRA adapters (peft's `lora_A` / `lora_B`): low-rank and trained; only their frozen `base_layer` is;
* an MoE router (`ModuleMap.moe_router`): its logits pick the experts;
* a linear whose in or out features is not a multiple of 16 (`torch._scaled_mm` requires it; e.g.
  Qwen3.5's per-head `in_proj_b` / `in_proj_a` in small shapes): skipped and counted.

Order in the engine (engine.Engine): the model is loaded, frozen or wrapped by peft, then converted here,
then moved to the device, given master weights, compiled (torch.compile traces Float8Linear), and only
then sharded by FSDP2 (torchao converts before `fully_shard`). The FSDP all-gather stays in bf16
(`enable_fsdp_float8_all_gather` off): each rank casts the gathered weight with its own full-tensor scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from vltune.core.config import ConfigError
from vltune.core.families import ModuleMap, get_family

MIN_CAPABILITY = (8, 9)
"""float8 tensor cores: Ada (SM 8.9) and Hopper (SM 9.0) onwards."""

MULTIPLE = 16
"""`torch._scaled_mm` needs both dimensions of each float8 operand to be multiples of 16."""

ADAPTER_PREFIX = "lora_"
"""peft's adapter containers inside a LoRA layer (lora_A, lora_B, lora_embedding_A, ...)."""


def fp8_device_problem(device: torch.device) -> str | None:
    """Why `fp8: true` cannot run on `device` (one line naming the key and the fix), or None."""
    if device.type != "cuda":
        return (f"fp8: true needs a CUDA GPU of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer "
                f"(Ada, Hopper); this run is on {device.type}; set fp8: false")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        return (f"fp8: true needs a GPU of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (Ada, Hopper); "
                f"{torch.cuda.get_device_name(device)} is {major}.{minor}, without float8 tensor cores; set fp8: false")
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return "fp8: true needs torchao (pip install torchao); set fp8: false or install it"
    return None


def check_fp8_device(device: torch.device) -> None:
    """Raise a ConfigError (no traceback from inside a library) when `fp8: true` cannot run on `device`."""
    problem = fp8_device_problem(device)
    if problem is not None:
        raise ConfigError(problem)


@dataclass
class Fp8Counts:
    """What `apply_fp8` did: linears converted, and decoder linears left in bf16 for their size."""

    converted: int = 0
    skipped_size: int = 0


def fp8_filter(modules: ModuleMap, counts: Fp8Counts | None = None) -> Callable[[torch.nn.Module, str], bool]:
    """torchao's `module_filter_fn(module, fqn)` for a model whose names are the family's (`fqn` from the HF
    model root, peft's wrappers included): True for the linears of the decoder layers described above."""
    prefix = modules.decoder_layers + "."
    router = modules.moe_router

    def pick(module: torch.nn.Module, fqn: str) -> bool:
        if not isinstance(module, torch.nn.Linear) or not fqn.startswith(prefix):
            return False
        inside = fqn[len(prefix):].split(".")[1:]  # the path inside decoder layer N
        if any(part.startswith(ADAPTER_PREFIX) for part in inside):
            return False
        path = ".".join(inside)
        if router is not None and (path == router or path.startswith(router + ".")):
            return False
        if module.in_features % MULTIPLE or module.out_features % MULTIPLE:
            if counts is not None:
                counts.skipped_size += 1
            return False
        if counts is not None:
            counts.converted += 1
        return True

    return pick


def apply_fp8(model: torch.nn.Module) -> Fp8Counts:
    """Swap the decoder layers' linears of a transformers model (the plain model under any peft wrapper) for
    torchao's Float8Linear in place; returns the counts and prints them once."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    counts = Fp8Counts()
    convert_to_float8_training(model, module_filter_fn=fp8_filter(get_family(model.config.model_type).modules, counts),
                               config=Float8LinearConfig())  # tensorwise dynamic scaling
    print(f"[vltune] fp8: {counts.converted} decoder linear layers compute in float8 (torchao, tensorwise scaling); "
          f"{counts.skipped_size} left in bf16 (a size not a multiple of {MULTIPLE})", flush=True)
    return counts
