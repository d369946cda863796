"""The two engines that implement core.contracts.TrainBackend: torch/ (transformers models, torchrun,
DDP / DeepSpeed ZeRO / FSDP2) and mindspore/ (native MindSpore models, msrun). Each has one model
entry per family under models/ (core/families holds the specs)."""
