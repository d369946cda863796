"""Times a peer's training from inside its own process, the same way for every peer.

Python imports `sitecustomize` at start-up from the first folder on sys.path that has one;
tools/peers/run.sh puts this folder first on PYTHONPATH and sets PEER_TIMING to a JSONL path. Nothing
here changes what the peer computes: when `transformers.trainer` is imported (by the peer, in any of its
processes), `Trainer.training_step` is wrapped to count the micro-batch's real tokens, and a callback
writes one line per optimizer step: the step, its real tokens, the time after a CUDA synchronize, the
peak allocated memory, and the logged loss. tools/peers/summary.py turns the lines into tokens/s.

Real tokens: input ids other than the pad id that the attention mask lets in. The mask: the non-zero
entries of a 2-D one (padding is 0; packing with sample indices is 1, 2, ...); with a 4-D one
(LLaMA-Factory's block-diagonal packing without FlashAttention) the positions that may attend to
themselves; none at all in padding-free rows. The pad id is checked too because LLaMA-Factory's plain
packing pads each row to the cutoff with mask 1.
"""

import functools
import importlib.abc
import importlib.util
import json
import os
import sys
import time

_PATH = os.environ.get("PEER_TIMING")


def real_tokens(inputs, pad_id) -> int:
    ids = inputs["input_ids"]
    real = ids != pad_id if pad_id is not None else ids.new_ones(ids.shape, dtype=bool)
    mask = inputs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        real &= mask != 0
    elif mask is not None and mask.dim() == 4:
        diagonal = mask[:, 0].diagonal(dim1=-2, dim2=-1)
        real &= diagonal if not diagonal.is_floating_point() else diagonal == 0  # bool: True = may attend
    return int(real.sum())


def _pad_id(trainer):
    tokenizer = getattr(trainer, "processing_class", None)
    return getattr(getattr(tokenizer, "tokenizer", tokenizer), "pad_token_id", None)


def _patch(trainer_module) -> None:
    import torch
    from transformers import TrainerCallback

    state = {"tokens": 0, "micro": 0}
    out = open(_PATH, "a", buffering=1)

    class Timing(TrainerCallback):
        def on_step_end(self, args, trainer_state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            row = {"step": trainer_state.global_step, "t": time.perf_counter(), "tokens": state["tokens"],
                   "micro_batches": state["micro"],
                   "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0}
            state["tokens"] = state["micro"] = 0
            out.write(json.dumps(row) + "\n")

        def on_log(self, args, trainer_state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                out.write(json.dumps({"step": trainer_state.global_step, "loss": logs["loss"]}) + "\n")

    trainer_cls = trainer_module.Trainer
    step, init = trainer_cls.training_step, trainer_cls.__init__

    @functools.wraps(step)  # peers read the signature (inspect follows __wrapped__)
    def training_step(self, model, inputs, *args, **kwargs):
        state["tokens"] += real_tokens(inputs, _pad_id(self))
        state["micro"] += 1
        return step(self, model, inputs, *args, **kwargs)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(Timing())

    trainer_cls.training_step, trainer_cls.__init__ = training_step, __init__
    out.write(json.dumps({"start": time.perf_counter(), "pid": os.getpid()}) + "\n")


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Lets `transformers.trainer` import as usual, then patches it."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers.trainer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        self.inner = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        _patch(module)


if _PATH:
    sys.meta_path.insert(0, _AfterImport())
