"""run_summary.json's `stop_reason`: why a run ended (training.stop_reason)."""

from __future__ import annotations

from vltune.core.config import TrainArgs
from vltune.core.loop import LoopResult
from vltune.training import stop_reason


def _result(**kw) -> LoopResult:
    return LoopResult(steps=kw.pop("steps", 10), train_loss=1.0, last_loss=1.0, tokens_per_s=1.0, samples_per_s=1.0, **kw)


def test_stop_reason():
    assert stop_reason(TrainArgs(max_steps=10), _result(), 10) == "finished: step 10 of the 10 planned (max_steps)"
    assert stop_reason(TrainArgs(num_train_epochs=2.0), _result(), 10) == "finished: step 10 of the 10 planned (num_train_epochs 2.0)"
    early = stop_reason(TrainArgs(early_stopping_patience=3, early_stopping_threshold=0.01, metric_for_best_model="eval_accuracy"),
                        _result(steps=6, stopped_early_at=6, best_metric=0.5), 10)
    assert early == ("early stopping at step 6: eval_accuracy did not improve on its best (0.5) by more than "
                     "early_stopping_threshold 0.01 for early_stopping_patience 3 evaluations in a row")
