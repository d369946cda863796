"""MindSpore kernels (Ascend flash attention with a CPU path); they arrive with the MindSpore backend."""
