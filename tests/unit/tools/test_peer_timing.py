"""tools/peers/: the timing hook that runs inside ms-swift's and LLaMA-Factory's processes, the data
conversion and the summary. The GPU runs themselves are tools/peers/run.sh's; these check on CPU that
the hook counts the real tokens of each batch layout the peers produce and times a real transformers
Trainer without changing what it computes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
HOOK = ROOT / "tools" / "peers" / "hook"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def hook():
    assert "PEER_TIMING" not in os.environ  # importing it then only defines functions
    return _load(HOOK / "sitecustomize.py", "peer_timing_hook")


PAD = 0
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_real_tokens_padded_batch(hook):
    ids = torch.tensor([[5, 6, 7, PAD], [8, 9, PAD, PAD]])
    assert hook.real_tokens({"input_ids": ids, "attention_mask": (ids != PAD).long()}, PAD) == 5


def test_real_tokens_neat_packing_indices(hook):
    ids = torch.tensor([[5, 6, 7, 8, 9, PAD]])
    assert hook.real_tokens({"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 2, 2, 2, 0]])}, PAD) == 5


def test_real_tokens_plain_packing_pads_with_mask_one(hook):
    """LLaMA-Factory's plain packing pads the row to the cutoff with attention mask 1: the pad id decides."""
    ids = torch.tensor([[5, 6, 7, PAD, PAD]])
    assert hook.real_tokens({"input_ids": ids, "attention_mask": torch.ones(1, 5, dtype=torch.long)}, PAD) == 3


def test_real_tokens_padding_free_row(hook):
    assert hook.real_tokens({"input_ids": torch.tensor([[5, 6, 7, 8]]), "position_ids": torch.tensor([[0, 1, 0, 1]])}, PAD) == 4


@pytest.mark.parametrize("as_bool", [False, True])
def test_real_tokens_block_diagonal_4d_mask(hook, as_bool):
    """LLaMA-Factory's 4-D mask for sdpa: a padding position may not attend to itself."""
    index = torch.tensor([[1, 1, 2, 2, 2, 0]])
    allowed = (index[:, None, :, None] == index[:, None, None, :]) & (index != 0)[:, None, None, :] & torch.ones(6, 6).tril().bool()
    mask = allowed if as_bool else torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
    ids = torch.tensor([[5, 6, 7, 8, 9, 3]])  # the padding id differs from PAD: the mask alone tells
    assert hook.real_tokens({"input_ids": ids, "attention_mask": mask}, PAD) == 5


def test_hook_times_a_transformers_trainer(tmp_path):
    """The hook on PYTHONPATH patches `transformers.trainer` when the peer imports it: one line per
    optimizer step with the step's real tokens, a time and the logged loss; the Trainer's own signature
    stays readable (ms-swift picks `processing_class` from it)."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent('''
        import inspect, torch
        from transformers import Trainer, TrainingArguments
        assert "processing_class" in inspect.signature(Trainer.__init__).parameters

        class Tiny(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = torch.nn.Embedding(16, 8)
                self.head = torch.nn.Linear(8, 16)

            def forward(self, input_ids, attention_mask=None, labels=None):
                logits = self.head(self.emb(input_ids))
                return {"loss": torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)}

        rows = [{"input_ids": torch.tensor([3, 4, 5, 0]), "attention_mask": torch.tensor([1, 1, 1, 0]),
                 "labels": torch.tensor([4, 5, -100, -100])}] * 8
        args = TrainingArguments(output_dir="out", per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                 max_steps=2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True)
        Trainer(model=Tiny(), args=args, train_dataset=rows).train()
    '''))
    timing = tmp_path / "timing.jsonl"
    # A peer starts as a fresh process: no launcher variables. An in-process one-rank run earlier in this
    # pytest worker (DeepSpeed / FSDP2) leaves RANK / MASTER_PORT set, and the Trainer would join its port.
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(PEER_TIMING=str(timing), PYTHONPATH=os.pathsep.join([str(HOOK), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in timing.read_text().splitlines()]
    steps = [r for r in lines if "t" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["tokens"] == 12 and r["micro_batches"] == 2 for r in steps)  # 2 micro-batches x 2 rows x 3 real tokens
    assert steps[1]["t"] > steps[0]["t"]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2]


def test_data_conversion(tmp_path):
    data = _load(ROOT / "tools" / "peers" / "data.py", "peer_data")
    (tmp_path / "data").mkdir()
    records = [{"image": "0.jpg", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
               {"conversations": [{"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]}]
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    data.main(tmp_path)
    out = [json.loads(line) for line in (tmp_path / "peers" / "messages.jsonl").read_text().splitlines()]
    assert out[0] == {"messages": [{"role": "user", "content": "<image>\nq"}, {"role": "assistant", "content": "a"}],
                      "images": [str((tmp_path / "data" / "0.jpg").resolve())]}
    assert "images" not in out[1]
    info = json.loads((tmp_path / "peers" / "dataset_info.json").read_text())
    assert info["vltune_bench"]["file_name"] == "messages.jsonl"


def test_summary_peer_row(tmp_path):
    summary = _load(ROOT / "tools" / "peers" / "summary.py", "peer_summary")
    lines = [{"start": 0.0}] + [{"step": s, "t": 10.0 + s, "tokens": 100 * s, "micro_batches": 4, "peak_gib": 1.0 + s} for s in range(1, 5)]
    lines += [{"step": 1, "loss": 12.0}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    row = summary.peer_row(path, warmup=2)
    assert row["tokens_per_s"] == (300 + 400) / 2.0  # steps 3 and 4, from the end of step 2 to the end of step 4
    assert row["peak_mem_gib"] == 5.0 and row["first_losses"] == [12.0]
    with pytest.raises(ValueError, match="warm-up"):
        summary.peer_row(path, warmup=4)
