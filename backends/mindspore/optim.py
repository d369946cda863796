"""AdamW with per-component parameter groups for the MindSpore models, step for step as torch.optim.AdamW.

Groups are the torch backend's (backends/torch/optim.py): component (llm / vision / merger, read from
the parameter name, which is the same HF name in both backends) x decay (matrices without "norm" in
their name decay, everything else does not), each with its own base learning rate that the schedule
multiplies. The update is torch's single-tensor AdamW, operation by operation:

    p *= 1 - lr * wd;  m += (1 - b1) * (g - m);  v = b2 * v + (1 - b2) * g * g
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

Written here rather than taken from `mindspore.experimental.optim.AdamW` because its kernels are not
all registered on CPU (REFERENCE.md s5) and because exact agreement with torch is a tested property.
State (step, m, v) is exported as numpy for the checkpoint, so a resumed run takes the same step.

With `train_modules` the groups are the torch backend's too: one per (listed module, decay), named as the
recipe wrote the module, at its own rate (apply_freeze leaves the resolved selection on each parameter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, ops

from vltune.core.config import TrainArgs
from vltune.core.families import ModuleMap
from vltune.core.param_groups import COMPONENTS, decays, group_label, group_lrs
from vltune.core.train_modules import Selection


@dataclass
class ParamGroup:
    name: str
    params: list[Parameter]
    base_lr: float
    weight_decay: float
    lr: float = 0.0

    def __post_init__(self) -> None:
        self.lr = self.base_lr


def build_param_groups(named_params: list[tuple[str, Parameter]], modules: ModuleMap, args: TrainArgs,
                       selection: Selection | None = None) -> list[ParamGroup]:
    """Groups named llm, llm_no_decay, vision, ... over the trainable parameters (with `selection`, the
    resolved train_modules that apply_freeze returns: one per listed module); empty ones dropped."""
    lrs = group_lrs(args, selection)
    # the components in a fixed order (llm, vision, merger); listed modules in first-seen order
    buckets: dict[tuple[str, bool], list[Parameter]] = (
        {(c, d): [] for c in COMPONENTS for d in (True, False)} if selection is None else {})
    for name, param in named_params:
        buckets.setdefault((group_label(name, modules, selection), decays(name, param.shape)), []).append(param)
    return [
        ParamGroup(c if d else f"{c}_no_decay", params, lrs[c], args.weight_decay if d else 0.0)
        for (c, d), params in buckets.items()
        if params
    ]


@dataclass
class AdamW:
    """torch.optim.AdamW (decoupled weight decay, bias correction, non-amsgrad) over ParamGroups."""

    groups: list[ParamGroup]
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    step_count: int = 0
    exp_avg: dict[str, Tensor] = field(default_factory=dict)
    exp_avg_sq: dict[str, Tensor] = field(default_factory=dict)

    @property
    def params(self) -> list[Parameter]:
        return [p for g in self.groups for p in g.params]

    def step(self, grads: list[Tensor]) -> None:
        """One update with `grads` in the order of `self.params`."""
        b1, b2 = self.betas
        self.step_count += 1
        bias1 = 1 - b1**self.step_count
        bias2_sqrt = math.sqrt(1 - b2**self.step_count)
        it = iter(grads)
        for group in self.groups:
            step_size = group.lr / bias1
            for param in group.params:
                grad = next(it).astype(ms.float32)
                m = self.exp_avg.get(param.name)
                v = self.exp_avg_sq.get(param.name)
                if m is None:
                    m, v = ops.zeros_like(grad), ops.zeros_like(grad)
                m = m + (grad - m) * (1 - b1)
                v = v * b2 + grad * grad * (1 - b2)
                self.exp_avg[param.name], self.exp_avg_sq[param.name] = m, v
                value = param.astype(ms.float32)
                if group.weight_decay:
                    value = value * (1 - group.lr * group.weight_decay)
                value = value - m / (ops.sqrt(v) / bias2_sqrt + self.eps) * step_size
                param.set_data(value.astype(param.dtype))

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Everything a resumed run needs, as numpy (saved with the checkpoint)."""
        out = {"step": np.array([self.step_count], dtype=np.int64)}
        for name, m in self.exp_avg.items():
            out[f"exp_avg/{name}"] = m.asnumpy()
            out[f"exp_avg_sq/{name}"] = self.exp_avg_sq[name].asnumpy()
        return out

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        known = {p.name for p in self.params}
        self.step_count = int(arrays["step"][0])
        self.exp_avg, self.exp_avg_sq = {}, {}
        for key, value in arrays.items():
            if key == "step":
                continue
            kind, name = key.split("/", 1)
            if name not in known:
                raise ValueError(f"optimizer state names parameter {name!r}, which this model does not train")
            (self.exp_avg if kind == "exp_avg" else self.exp_avg_sq)[name] = Tensor(value)


def global_norm(grads: list[Tensor]) -> float:
    """The 2-norm of all gradients together, as torch's clip_grad_norm_ computes it (norm of norms)."""
    norms = ops.stack([ops.norm(g.astype(ms.float32)) for g in grads])
    return float(ops.norm(norms).asnumpy())


def clip_grads(grads: list[Tensor], max_norm: float) -> tuple[list[Tensor], float]:
    """torch.nn.utils.clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6)); return the pre-clip norm."""
    norm = global_norm(grads)
    coef = min(1.0, max_norm / (norm + 1e-6))
    return [g * coef for g in grads], norm
