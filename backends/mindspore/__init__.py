"""The MindSpore engine: native Qwen2.5-VL / Qwen3-VL models (models/), HF-safetensors checkpoints,
the TrainBackend (trainer.py), msrun data parallelism (launch.py, distributed.py) and generation
(infer.py). Ops are chosen by device target: eager fp32 on CPU, flash attention on Ascend."""
