"""Where a vltune training step of a Qwen3.5 shape spends its GPU time (torch.profiler, one step after
warm-up). Usage (repo root, GPU machine): python3 tools/gpu/gdn_profile.py [SHAPE] [LAYERS]"""

import sys
from pathlib import Path

import torch

from vltune.backends.torch import bench
from vltune.backends.torch.engine import Engine
from vltune.core.config import ModelArgs, TrainArgs
from vltune.core.flops import SHAPES
from vltune.ops.torch.gated_delta import prepare_fla_kernels

name, layers = (sys.argv[1] if len(sys.argv) > 1 else "qwen3_5-9b"), int(sys.argv[2]) if len(sys.argv) > 2 else 4
shape = bench.reduced_depth(SHAPES[name], layers)
prepare_fla_kernels()
torch.backends.cuda.enable_cudnn_sdp(False)
model = bench.build_model(shape, 0, torch.device("cuda"))
engine = Engine(model, Path("."), bench._info(shape), ModelArgs(model_name_or_path="bench"), TrainArgs(bf16=True, learning_rate=1e-5))
rows = bench._packed_rows(shape, 16, 4096, 0)
for row in rows[:1]:
    bench.packed_step(engine, [row])
torch.cuda.synchronize()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
    bench.packed_step(engine, [rows[1]])
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
