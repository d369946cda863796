"""The MindSpore engine: native Qwen2.5-VL / Qwen3-VL models (models/), HF-safetensors checkpoints,
the TrainBackend (engine.py), msrun data parallelism (launch.py, distributed.py, parallel.py) and
generation (generate.py), file for file as backends/torch/. Ops are chosen by device target: eager fp32 on CPU, flash attention on Ascend."""
