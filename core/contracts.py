"""What the backend-neutral loop needs from an engine, and the batch it hands over.

A batch is a dict of numpy arrays laid out as DESIGN.md's batch contract says (`input_ids`,
`labels`, `attention_mask`, `position_ids`, `pixel_values`, `image_grid_thw`, ...). data/ builds it;
a backend turns it into tensors on its device. Keeping the contract in numpy is what lets the
torch and MindSpore engines train on byte-identical inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

Batch = dict[str, np.ndarray]

IGNORE_INDEX = -100


def count_trained_tokens(batch: Batch) -> int:
    """Number of next-token targets in a batch: labels shifted left by one, minus ignored ones."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@dataclass
class StepOutput:
    """What one optimizer step reports back to the loop."""

    loss: float
    """Mean loss per trained token over the whole (accumulated) batch."""
    grad_norm: float
    """Global gradient norm before clipping."""


class TrainBackend(Protocol):
    """The engine side of the training loop: tensors, autograd, optimizer, weights on disk."""

    def forward_backward(self, batch: Batch, loss_scale: float) -> float:
        """Run forward + backward on one micro-batch and return its *summed* token loss.

        Gradients of `summed_loss * loss_scale` are accumulated, so the loop can normalise by the
        number of trained tokens of the whole accumulated batch, not per micro-batch.
        """
        ...

    def optimizer_step(self, lr: float, max_grad_norm: float) -> float:
        """Clip, step with learning rate `lr`, zero the grads; return the pre-clip grad norm."""
        ...

    def eval_loss(self, batch: Batch) -> tuple[float, int]:
        """(summed token loss, trained token count) of a batch, without gradients."""
        ...

    def generate(self, batch: Batch, max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation token ids for each (left-padded) prompt row of `batch`."""
        ...

    def save_model(self, out_dir: Path) -> None:
        """Write the model in HF format (config.json + safetensors) to `out_dir`."""
        ...
