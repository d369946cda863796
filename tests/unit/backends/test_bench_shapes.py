"""The bench's model shapes build real transformers models whose weights the FLOP formula counts."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from vltune.backends.torch.bench import _batches, _packed_rows, _packed_steps, _row_steps, hf_config, step_flops  # noqa: E402
from vltune.core.flops import SHAPES, llm_flops, llm_params, vision_flops  # noqa: E402


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shapes_match_the_formula(name):
    from transformers import AutoConfig, AutoModelForImageTextToText

    shape = SHAPES[name]
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(**hf_config(shape)))
    lm = model.model.language_model
    routed = shape.experts_per_token / shape.experts if shape.experts else 1.0  # MoE: the experts a token reaches
    # 3-D: fused experts (a token reaches `routed` of them) or a Gated DeltaNet's depthwise conv [C, 1, W] (whole)
    matrices = sum(p.numel() * (routed if ".experts." in f".{n}" else 1) for n, p in lm.layers.named_parameters() if p.dim() in (2, 3))
    assert matrices + model.lm_head.weight.numel() == llm_params(shape)
    total = sum(p.numel() for p in model.parameters())  # a tied head shares the embedding's tensor: counted once
    expected_billions = {"qwen2_5_vl-3b": 3.75, "qwen2_5_vl-7b": 8.29, "qwen3_vl-2b": 2.13, "qwen3_vl-8b": 8.77,
                         "qwen3_vl-30b-a3b": 31.07, "qwen3_5-2b": 2.21, "qwen3_5-9b": 9.41, "qwen3_5-35b-a3b": 35.11,
                         "ovis2_5-2b": 2.57, "ovis2_5-9b": 9.17}[name]
    assert abs(total / 1e9 - expected_billions) < 0.05, total


def test_step_flops_adds_llm_and_vision():
    shape = SHAPES["qwen2_5_vl-3b"]
    batch = _batches(shape, steps=1, batch_size=3, seed=1, per_step=3)[0][0]
    lengths = [int(n) for n in batch["attention_mask"].sum(axis=1)]
    patches = [int(g.prod()) for g in batch["image_grid_thw"]]
    assert step_flops(shape, batch) == llm_flops(shape, lengths) + vision_flops(shape, patches, 2)
    # 6N per token dominates: the attention term is a few percent at these lengths
    assert 1.0 < llm_flops(shape, lengths) / (6 * llm_params(shape) * sum(lengths)) < 1.2


def test_packed_rows_hold_the_same_samples_and_flops():
    shape = SHAPES["qwen2_5_vl-3b"]
    padded = [b for step in _batches(shape, steps=4, batch_size=2, seed=3, per_step=2) for b in step]
    packed = _packed_rows(shape, 8, 4096, seed=3)
    assert len(packed) < len(padded)
    assert sum(int(b["attention_mask"].sum()) for b in padded) == sum(b["input_ids"].shape[1] for b in packed)
    assert all(b["input_ids"].shape[1] <= 4096 for b in packed)
    assert abs(sum(step_flops(shape, b) for b in padded) / sum(step_flops(shape, b) for b in packed) - 1) < 1e-12


@pytest.mark.parametrize("per_step, pack_length", [(3, 2048), (12, 4096)])
def test_each_packed_step_holds_the_stock_step_samples(per_step, pack_length):
    """--match-steps (3 = the batch size) and --samples-per-step 12: vltune's step k holds exactly the
    samples of the stock path's step k (one micro-batch, or four accumulated ones)."""
    shape = SHAPES["qwen2_5_vl-3b"]
    padded = _batches(shape, steps=5, batch_size=3, seed=4, per_step=per_step)
    steps = _packed_steps(shape, steps=5, per_step=per_step, pack_length=pack_length, seed=4)
    assert len(steps) == len(padded) == 5
    for micro_batches, rows in zip(padded, steps):
        assert len(micro_batches) == per_step // 3 and all(b["input_ids"].shape[0] == 3 for b in micro_batches)
        lengths = sorted(int(n) for b in micro_batches for n in b["attention_mask"].sum(axis=1))
        packed = sorted(int(n) for row in rows for n in (row["cu_seqlens"][1:] - row["cu_seqlens"][:-1]))
        assert packed == lengths
        assert all(row["input_ids"].shape[1] <= pack_length for row in rows)
        trained = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
        assert sum(int((r["labels"][:, 1:] != -100).sum()) for r in rows) == trained
    assert any(len(rows) > 1 for rows in steps)  # some steps need two rows at 2048: gradients accumulate


def test_row_steps_pack_every_stock_sample_once_into_full_rows():
    """--rows-per-step 4: vltune's steps hold all the stock path's samples once, packed together into
    rows of at most pack_length, 4 rows per step (the last step may hold fewer), fuller than rows
    packed one stock step at a time."""
    shape = SHAPES["qwen2_5_vl-3b"]
    padded = [b for step in _batches(shape, steps=6, batch_size=1, seed=5, per_step=16) for b in step]
    steps = _row_steps(shape, 96, 4096, seed=5, rows_per_step=4)
    assert all(len(rows) == 4 for rows in steps[:-1]) and 1 <= len(steps[-1]) <= 4
    rows = [row for step in steps for row in step]
    lengths = sorted(int(n) for b in padded for n in b["attention_mask"].sum(axis=1))
    assert sorted(int(n) for row in rows for n in np.diff(row["cu_seqlens"])) == lengths
    assert all(row["input_ids"].shape[1] <= 4096 for row in rows)
    per_step_rows = [row for step in _packed_steps(shape, steps=6, per_step=16, pack_length=4096, seed=5) for row in step]
    assert len(rows) < len(per_step_rows)


def test_lora_counts_no_weight_gradient_flops():
    shape = SHAPES["qwen2_5_vl-7b"]
    batch = _batches(shape, steps=1, batch_size=2, seed=1, per_step=2)[0][0]
    lengths = [int(n) for n in batch["attention_mask"].sum(axis=1)]
    patches = [int(g.prod()) for g in batch["image_grid_thw"]]
    assert step_flops(shape, batch, "lora") == llm_flops(shape, lengths, 4) + vision_flops(shape, patches, 2)


def test_bench_refuses_what_the_recipe_refuses_before_it_needs_a_gpu():
    from vltune.backends.torch.bench import run_bench

    with pytest.raises(ValueError, match="pure_bf16 with train_type full needs optim: adamw_torch_8bit"):
        run_bench("qwen2_5_vl-3b", train_options={"pure_bf16": True})
    with pytest.raises(ValueError, match="unknown --train-type"):
        run_bench("qwen2_5_vl-3b", train_type="qlora")
    with pytest.raises(ValueError, match="must be a multiple of the batch size 2"):
        run_bench("qwen2_5_vl-3b", samples_per_step=5)
    with pytest.raises(ValueError, match="--rows-per-step N .* goes with --samples-per-step"):
        run_bench("qwen2_5_vl-3b", rows_per_step=4)


def test_bench_cli_passes_the_step_layout_through(monkeypatch, tmp_path):
    """`vltune bench` hands --samples-per-step, --rows-per-step and the speed flags to run_bench as given."""
    import vltune.backends.torch.bench as bench
    from vltune.cli import main

    seen = {}

    def fake_run_bench(model_shape, **kwargs):
        seen.update(kwargs, model_shape=model_shape)
        return {"name": "x", "model": model_shape}

    monkeypatch.setattr(bench, "run_bench", fake_run_bench)
    monkeypatch.setattr(bench, "write_report", lambda result, out: None)
    assert main(["bench", "--model-shape", "qwen2_5_vl-3b", "--samples-per-step", "16", "--rows-per-step", "4", "--batch-size", "1",
                 "--torch-compile", "--bf16-master-weights", "--out", str(tmp_path)]) in (0, None)
    assert (seen["model_shape"], seen["samples_per_step"], seen["rows_per_step"], seen["batch_size"]) == ("qwen2_5_vl-3b", 16, 4, 1)
    assert seen["train_options"]["torch_compile"] and seen["train_options"]["bf16_master_weights"]
    assert not seen["train_options"]["gradient_checkpointing"]


@pytest.mark.parametrize(("flag", "on", "every"), [([], False, 1), (["--gradient-checkpointing"], True, 1),
                                                   (["--gradient-checkpointing", "2"], True, 2)])
def test_bench_gradient_checkpointing_takes_every_n_layers(monkeypatch, tmp_path, flag, on, every):
    """`--gradient-checkpointing [N]`: the recipe's gradient_checkpointing and gradient_checkpointing_every_n_layers."""
    import vltune.backends.torch.bench as bench
    from vltune.cli import main

    seen = {}
    monkeypatch.setattr(bench, "run_bench", lambda model_shape, **kwargs: seen.update(kwargs) or {"name": "x", "model": model_shape})
    monkeypatch.setattr(bench, "write_report", lambda result, out: None)
    assert main(["bench", "--model-shape", "qwen3_5-9b", *flag, "--out", str(tmp_path)]) in (0, None)
    options = seen["train_options"]
    assert (options["gradient_checkpointing"], options["gradient_checkpointing_every_n_layers"]) == (on, every)


def test_bench_refuses_gradient_checkpointing_below_one(tmp_path):
    from vltune.cli import main

    with pytest.raises(SystemExit, match="--gradient-checkpointing 0 must be >= 1"):
        main(["bench", "--model-shape", "qwen3_5-9b", "--gradient-checkpointing", "0", "--out", str(tmp_path)])
