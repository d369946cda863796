"""LoRA on the MindSpore models, saved as a PEFT adapter that peft loads onto the transformers model.

What trains under `train_type: lora` is what backends/torch/lora.py trains, for the part built here:

- every base weight frozen;
- `tune_mm_llm`: adapters on the language model's decoder-layer linears named in
  `lora_target_modules` (default q,k,v,o,gate,up,down_proj), confined to
  `model.language_model.layers.N.` (the vision MLP reuses the names gate/up/down_proj);
- `tune_mm_mlp`: the merger (and Qwen3-VL's DeepStack mergers) trained in full and saved in the
  adapter, as peft's `modules_to_save`;
- `tune_mm_vision` (adapters on the vision blocks) and `lora_modules_to_save` are not supported by
  the MindSpore backend yet and are refused with an error rather than silently ignored.

A wrapped linear keeps peft's names: `q_proj.base_layer.weight`, `q_proj.lora_A.weight` [r, in],
`q_proj.lora_B.weight` [out, r]; y = base(x) + B(A(dropout(x))) * lora_alpha / r. A is initialised
as peft does (kaiming-uniform, bound 1/sqrt(in)), B as zeros, from a numpy generator seeded by the
recipe's seed. Dropout masks come from a numpy generator too (seeded by seed and step), so a resumed
run draws the same masks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn

from vltune.core.checkpointing import write_atomically
from vltune.core.config import ModelArgs
from vltune.core.recipe_rules import lora_target_parameters
from vltune.core.families import get_family

from .checkpoint import read_safetensors, write_safetensors
from .models.layers import Linear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class LoraLinear(nn.Cell):
    def __init__(self, base: Linear, r: int, alpha: float, dropout: float, rng: np.random.Generator):
        super().__init__()
        self.base_layer = base
        self.lora_A = Linear(base.in_features, r, bias=False)
        self.lora_B = Linear(r, base.out_features, bias=False)
        bound = 1.0 / np.sqrt(base.in_features)
        self.lora_A.weight.set_data(Tensor(rng.uniform(-bound, bound, (r, base.in_features)).astype(np.float32)))
        self.scaling = alpha / r
        self.dropout = dropout
        self.keep_mask: Tensor | None = None
        """Set per micro-batch by LoraState when dropout > 0 and training (inverted-dropout mask)."""

    def construct(self, x: Tensor) -> Tensor:
        h = x
        if self.dropout > 0 and self.training and self.keep_mask is not None:
            h = x * self.keep_mask.astype(x.dtype)
        return self.base_layer(x) + self.lora_B(self.lora_A(h)) * self.scaling


def _split_csv(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def llm_target_regex(targets: list[str], layers: str) -> str:
    """The peft target_modules regex (the torch backend writes the same one for the same recipe)."""
    return rf"(?:{re.escape(layers)}\.\d+\.(?:[^.]+\.)*(?:{'|'.join(re.escape(t) for t in targets)}))"


def merger_modules(model: nn.Cell, projectors: tuple[str, ...]) -> list[str]:
    """Full names of the projectors, a cell list (Qwen3-VL's DeepStack mergers) entry by entry."""
    names = []
    for path in projectors:
        cell = _sub_cell(model, path)
        names += [f"{path}.{i}" for i in range(len(cell))] if isinstance(cell, nn.CellList) else [path]
    return names


class LoraState:
    """The adapters applied to one model, the parameters that train, and the PEFT files."""

    def __init__(self, model: nn.Cell, model_args: ModelArgs, seed: int = 0):
        if model_args.tune_mm_vision:
            raise NotImplementedError("train_type lora with tune_mm_vision: vision-block adapters are not implemented in the MindSpore backend yet")
        if _split_csv(model_args.lora_modules_to_save):
            raise NotImplementedError("lora_modules_to_save is not implemented in the MindSpore backend yet")
        if not (model_args.tune_mm_llm or model_args.tune_mm_mlp):
            raise ValueError("LoRA has nothing to train: set tune_mm_llm: true (LLM adapters) or tune_mm_mlp: true (the merger)")
        self.model, self.args = model, model_args
        spec = get_family(model.cfg.model_type)
        self.modules = spec.modules
        fused = lora_target_parameters(model_args, spec)
        if model_args.tune_mm_llm and fused:
            raise NotImplementedError(
                f"train_type lora on {spec.name}'s fused parameters ({', '.join(fused)}) is not implemented in the "
                "MindSpore backend yet; set lora_target_parameters: none to adapt the attention only, or use backend: torch"
            )
        self.targets = _split_csv(model_args.lora_target_modules) or list(self.modules.lora_targets)
        self.layers: list[LoraLinear] = []
        rng = np.random.default_rng(seed)
        for param in model.get_parameters():
            param.requires_grad = False
        if model_args.tune_mm_llm:
            self._wrap(rng)
        self.modules_to_save = merger_modules(model, self.modules.projectors) if model_args.tune_mm_mlp else []
        for name, param in model.parameters_and_names():
            param.name = name  # wrapped cells got new paths
            if any(name.startswith(m + ".") for m in self.modules_to_save):
                param.requires_grad = True
        for layer in self.layers:
            layer.lora_A.weight.requires_grad = layer.lora_B.weight.requires_grad = True

    def _wrap(self, rng: np.random.Generator) -> None:
        pattern = re.compile(llm_target_regex(self.targets, self.modules.decoder_layers))
        found = set()
        for name, cell in list(self.model.cells_and_names()):
            if isinstance(cell, Linear) and pattern.fullmatch(name):
                parent_name, attr = name.rsplit(".", 1)
                parent = _sub_cell(self.model, parent_name)
                wrapped = LoraLinear(cell, self.args.lora_r, self.args.lora_alpha, self.args.lora_dropout, rng)
                setattr(parent, attr, wrapped)
                self.layers.append(wrapped)
                found.add(attr)
        unknown = set(self.targets) - found
        if unknown:
            raise ValueError(f"lora_target_modules: {sorted(unknown)} name no linear layer of the language model's decoder layers")

    def set_dropout_masks(self, rng: np.random.Generator | None, shape_prefix: tuple[int, ...]) -> None:
        """Draw every adapter's dropout keep-mask for the next forward (inverted dropout), or clear them."""
        for layer in self.layers:
            if rng is None or layer.dropout == 0:
                layer.keep_mask = None
                continue
            p = layer.dropout
            keep = rng.random((*shape_prefix, layer.base_layer.in_features)) >= p
            layer.keep_mask = Tensor((keep / (1 - p)).astype(np.float32))

    def adapter_arrays(self) -> dict[str, np.ndarray]:
        """PEFT's saved names: base_model.model.<name>.lora_A.weight, modules_to_save in full."""
        out = {}
        for name, param in self.model.parameters_and_names():
            is_lora = ".lora_A." in name or ".lora_B." in name
            if is_lora or any(name.startswith(m + ".") for m in self.modules_to_save):
                out[PEFT_PREFIX + name] = param.asnumpy() if param.dtype == ms.float32 else param.astype(ms.float32).asnumpy()
        return out

    def adapter_config(self, base_dir: str | Path) -> dict:
        return {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": str(base_dir),
            "r": self.args.lora_r,
            "lora_alpha": self.args.lora_alpha,
            "lora_dropout": self.args.lora_dropout,
            "target_modules": llm_target_regex(self.targets, self.modules.decoder_layers) if self.layers else "dummy-target-modules",
            "modules_to_save": self.modules_to_save or None,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "use_dora": False,
            "use_rslora": False,
        }

    def save(self, out_dir: Path, base_dir: str | Path, extra_files=None) -> None:
        """adapter_config.json + adapter_model.safetensors (and `extra_files(tmp)`), atomically."""

        def write(tmp: Path) -> None:
            write_safetensors(tmp / ADAPTER_WEIGHTS, self.adapter_arrays())
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(self.adapter_config(base_dir), indent=2) + "\n")
            if extra_files is not None:
                extra_files(tmp)

        write_atomically(Path(out_dir), write)

    def load(self, directory: Path) -> None:
        """Restore adapter (and modules_to_save) weights written by `save` (or by peft for the same recipe)."""
        tensors, _ = read_safetensors(Path(directory) / ADAPTER_WEIGHTS)
        params = dict(self.model.parameters_and_names())
        for key, value in tensors.items():
            name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            name = name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
            if name not in params:
                raise ValueError(f"{directory}: adapter tensor {key} matches no parameter of the model")
            params[name].set_data(Tensor(value).astype(params[name].dtype))


def _sub_cell(root: nn.Cell, dotted: str) -> nn.Cell:
    cell = root
    for part in dotted.split("."):
        cell = cell._cells[part]
    return cell


def merge_lora_adapter(model: nn.Cell, adapter_dir: str | Path) -> None:
    """Fold a PEFT LoRA adapter into `model`'s base weights for inference: W += scaling * B @ A
    (scaling = lora_alpha / r, or / sqrt(r) with rslora), and `modules_to_save` tensors replace theirs.

    This backend has no peft, so inference merges instead of wrapping layers; merged and unmerged
    logits agree to fp32 rounding. Adapter features that would change the forward in other ways
    (DoRA, bias training, per-module ranks, trainable token rows) are refused, naming the key.
    """
    from .checkpoint import hf_to_native

    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / ADAPTER_CONFIG
    if not config_path.exists():
        raise FileNotFoundError(f"adapter directory {adapter_dir} has no {ADAPTER_CONFIG}")
    config = json.loads(config_path.read_text())
    unsupported = {
        "peft_type": config.get("peft_type", "LORA") != "LORA",
        "use_dora": bool(config.get("use_dora")),
        "bias": config.get("bias", "none") != "none",
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "trainable_token_indices": bool(config.get("trainable_token_indices")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
    }
    refused = [f"{key}={config.get(key)!r}" for key, bad in unsupported.items() if bad]
    if refused:
        raise NotImplementedError(f"{config_path}: {', '.join(refused)} is not supported by the MindSpore backend's adapter merge")
    r = int(config["r"])
    scaling = float(config["lora_alpha"]) / (np.sqrt(r) if config.get("use_rslora") else r)
    tensors, _ = read_safetensors(adapter_dir / ADAPTER_WEIGHTS)
    params = dict(model.parameters_and_names())
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        match = re.fullmatch(r"(.+)\.lora_([AB])(?:\.default)?\.weight", name)
        if match:
            pairs.setdefault(hf_to_native(match.group(1)), {})[match.group(2)] = value
            continue
        name = hf_to_native(name)
        if name not in params:
            raise ValueError(f"{adapter_dir}: adapter tensor {key} matches no parameter of the model")
        if tuple(value.shape) != tuple(params[name].shape):
            raise ValueError(f"{adapter_dir}: {key} has shape {value.shape}, the model's {name} {tuple(params[name].shape)}")
        params[name].set_data(Tensor(value.astype(np.float32)).astype(params[name].dtype))
    for module, ab in pairs.items():
        weight = params.get(module + ".weight")
        if weight is None or set(ab) != {"A", "B"}:
            raise ValueError(f"{adapter_dir}: LoRA tensors of {module} ({sorted(ab)}) do not match a linear layer of the model")
        delta = (ab["B"].astype(np.float32) @ ab["A"].astype(np.float32)) * np.float32(scaling)
        if delta.shape != tuple(weight.shape):
            raise ValueError(f"{adapter_dir}: LoRA of {module} gives {delta.shape}, the weight is {tuple(weight.shape)}")
        base = weight.astype(ms.float32).asnumpy()
        weight.set_data(Tensor(base + delta).astype(weight.dtype))
