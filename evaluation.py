"""Held-out evaluation: token loss on the full conversations and exact match of generated answers."""

from __future__ import annotations

import json
from pathlib import Path

from vltune.core.contracts import TrainBackend
from vltune.core.metrics import exact_match, normalize_answer
from vltune.data.collate import Collator
from vltune.data.dataset import SFTDataset


class Evaluator:
    """Callable the loop runs on its eval cadence; returns {"eval_loss", "eval_accuracy"}."""

    def __init__(
        self,
        dataset: SFTDataset,
        backend: TrainBackend,
        collate: Collator,
        batch_size: int,
        max_new_tokens: int,
        predictions_file: Path | None = None,
    ):
        if len(dataset) == 0:  # an eval_loss of 0.0 would become the best metric
            raise ValueError("the eval dataset has no samples to evaluate")
        self.dataset = dataset
        self.backend = backend
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.predictions_file = predictions_file
        self.collate = collate

    def __call__(self) -> dict[str, float]:
        loss_sum, count = 0.0, 0
        predictions, references, rows = [], [], []
        for start in range(0, len(self.dataset), self.batch_size):
            indices = range(start, min(start + self.batch_size, len(self.dataset)))
            features = [self.dataset[i] for i in indices]
            s, c = self.backend.eval_loss(self.collate(features))
            loss_sum, count = loss_sum + s, count + c
            prompts, answers = zip(*(self.dataset.prompt(i, f, as_trained=True) for i, f in zip(indices, features)))
            generated = self.backend.generate(self.collate(list(prompts), padding_side="left"), self.max_new_tokens)
            texts = [self.dataset.tokenizer.decode(ids) for ids in generated]
            predictions += texts
            references += answers
            rows += [
                {"id": self.dataset.samples[i].id, "prediction": p, "reference": r, "correct": normalize_answer(p) == normalize_answer(r)}
                for i, p, r in zip(indices, texts, answers)
            ]
        if self.predictions_file is not None:
            self.predictions_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return {"eval_loss": loss_sum / count, "eval_accuracy": exact_match(predictions, references)}
