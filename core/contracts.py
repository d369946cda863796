"""What the backend-neutral loop needs from an engine, and the batch it hands over.

A batch is a dict of numpy arrays laid out as DESIGN.md's batch contract says (`input_ids`,
`labels`, `attention_mask`, `position_ids`, `pixel_values`, `image_grid_thw`, ...). data/ builds it;
a backend turns it into tensors on its device. Keeping the contract in numpy is what lets the
torch and MindSpore engines train on byte-identical inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, SupportsFloat

import numpy as np

Batch = dict[str, np.ndarray]

IGNORE_INDEX = -100


def count_trained_tokens(batch: Batch) -> int:
    """Number of next-token targets in a batch: labels shifted left by one, minus ignored ones."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def loss_denominator(batch: Batch) -> int:
    """This micro-batch's share of the loss denominator of the accumulated batch.

    AR: its next-token targets. A masked-diffusion batch (core.mdlm) carries its own, because its
    normalisation (per token, per sequence or per batch) is the recipe's choice.
    """
    if "loss_denominator" in batch:
        return int(batch["loss_denominator"])
    return count_trained_tokens(batch)


class TrainBackend(Protocol):
    """The engine side of the training loop: tensors, autograd, optimizer, weights on disk."""

    def forward_backward(self, batch: Batch, loss_scale: float) -> SupportsFloat:
        """Run forward + backward on one micro-batch and return its *summed* token loss.

        Gradients of `summed_loss * loss_scale` are accumulated, so the loop can normalise by the
        number of trained tokens of the whole accumulated batch, not per micro-batch. The value may
        still live on the device (anything `float()` and `+` accept): the loop sums the micro-batches'
        losses and reads the sum once per step, so a GPU engine need not wait for each micro-batch's
        backward before it queues the next forward.
        """
        ...

    def reduce_sum(self, values: list[float]) -> list[float]:
        """Each value summed over the data-parallel ranks (the values themselves on one process).

        The loop normalises the loss by the trained tokens of the *global* accumulated batch and
        logs global token/sample counts; every rank calls this at the same points, so it may be a
        collective.
        """
        ...

    def optimizer_step(self, lr_factor: float, max_grad_norm: float) -> float | None:
        """Clip, step with each parameter group's base learning rate times `lr_factor` (the
        schedule's multiplier), zero the grads; return the pre-clip global grad norm (None where the
        engine cannot know it; a NaN/inf norm stops the run: the update made the weights non-finite)."""
        ...

    def zero_grad(self) -> None:
        """Drop the accumulated gradients without stepping (a skipped NaN/inf step)."""
        ...

    def learning_rates(self) -> dict[str, float]:
        """Current learning rate per parameter group name, for the logs."""
        ...

    def stage_batch(self, batch: Batch) -> Batch:
        """Host-side preparation of a micro-batch before the step takes it (a GPU engine: copy it into
        pinned memory). The data loader's thread calls it (data/prefetch.py), so it must not launch
        device work or touch the model."""
        ...

    # Optional: `step_metrics() -> dict[str, float]`, values the engine measured over the micro-batches
    # since the last logged row (an MoE router's `aux_loss`); the loop adds them to the row.

    def memory_stats(self) -> dict[str, float]:
        """Peak memory figures for the logs (e.g. {"peak_mem_gib": ...}); may be empty."""
        ...

    def eval_loss(self, batch: Batch) -> tuple[float, int]:
        """(summed token loss, trained token count) of a batch, without gradients."""
        ...

    def generate(self, batch: Batch, max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation token ids for each (left-padded) prompt row of `batch`."""
        ...

    def save_model(self, out_dir: Path) -> None:
        """Write the model in HF format (config.json + safetensors) or its PEFT adapter to `out_dir`."""
        ...

    def save_checkpoint(self, directory: Path) -> None:
        """Write what resuming needs besides the loop state: model or adapter, optimizer, RNG."""
        ...

    def load_checkpoint(self, directory: Path) -> None:
        """Restore what save_checkpoint wrote, so the next step is the one the saved run would take."""
        ...
