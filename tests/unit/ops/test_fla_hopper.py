"""vltune's torch port of fla's gated `chunk_bwd_dqkwg` (ops/torch/fla_hopper.py) against fla's own Triton
kernel, run on the CPU by Triton's interpreter (TRITON_INTERPRET=1).

The port replaces that kernel on Hopper GPUs with Triton >= 3.4 and < 3.7.1, where fla refuses it (a
miscompile, fla #640). Triton and fla-core live beside the venv (`make setup`, .venv/fla-interpret) so
that nothing else in the suite sees a Triton without a GPU; the comparison runs in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

INTERPRET_DIR = Path(sys.prefix) / "fla-interpret"

CHECK = r'''
import json, sys
import torch
import fla.ops.common.chunk_o as chunk_o
from fla.ops.utils import prepare_chunk_indices
from vltune.ops.torch.fla_hopper import chunk_bwd_dqkwg_torch

# the interpreter has no device to benchmark autotuning candidates on: keep the first
tuner = chunk_o.chunk_bwd_kernel_dqkwg
while not hasattr(tuner, "configs"):
    tuner = tuner.fn
tuner.configs = tuner.configs[:1]

torch.manual_seed(0)
B, T, H, HV, K, V, BT = 1, 150, 2, 4, 32, 16, 64
q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
v, do, dv, w = torch.randn(B, T, HV, V), torch.randn(B, T, HV, V), torch.randn(B, T, HV, V), torch.randn(B, T, HV, K)
g = -torch.rand(B, T, HV).cumsum(1) * 0.1
results = {}
for name, cu in (("fixed", None), ("varlen", torch.tensor([0, 40, 150]))):
    chunks = -(-T // BT) if cu is None else len(prepare_chunk_indices(cu, BT))
    h, dh = torch.randn(B, chunks, HV, K, V), torch.randn(B, chunks, HV, K, V)
    for state_v_first in (False, True):
        kw = dict(q=q, k=k, v=v, do=do, h=h, dh=dh, w=w, g=g, dv=dv, scale=K ** -0.5, cu_seqlens=cu, chunk_size=BT,
                  state_v_first=state_v_first)
        ref, got = chunk_o.chunk_bwd_dqkwg(**kw), chunk_bwd_dqkwg_torch(**kw)
        for label, a, b in zip(("dq", "dk", "dw", "dg"), ref, got):
            assert a.shape == b.shape, (label, a.shape, b.shape)
            results[f"{name}-{'vk' if state_v_first else 'kv'}-{label}"] = [float((a - b).abs().max()), float(a.abs().max())]
print(json.dumps(results))
'''


def test_port_equals_the_triton_kernel():
    if not (INTERPRET_DIR / "fla").is_dir():
        pytest.skip(f"{INTERPRET_DIR} has no fla-core (make setup installs it)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(INTERPRET_DIR), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(errors) == 16
    for key, (error, scale) in errors.items():
        assert scale > 1.0 and error <= 1e-5 * scale, (key, error, scale)


def test_port_refuses_the_ungated_case():
    import torch

    from vltune.ops.torch.fla_hopper import chunk_bwd_dqkwg_torch

    x = torch.zeros(1, 4, 1, 8)
    with pytest.raises(NotImplementedError, match="gated case"):
        chunk_bwd_dqkwg_torch(x, x, x, x, torch.zeros(1, 1, 1, 8, 8), torch.zeros(1, 1, 1, 8, 8), g=None)
