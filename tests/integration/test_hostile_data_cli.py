"""The serious data items of issue 25 through the command line, as a user meets them: an eval set that
validation empties, a missing annotation file, a percentage that rounds to nothing, null ids. Each stops
(or warns) before any model loads, so these runs take a second each."""

from __future__ import annotations

import json

import pytest

from vltune.cli import main


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _qa(i, answer="red", **extra):
    return {"conversations": [{"from": "human", "value": f"Question {i}?"}, {"from": "gpt", "value": answer}], **extra}


@pytest.fixture
def run(tiny_qwen2_5_vl, tmp_path, capsys):
    def run(command: str, data: str, *overrides: str) -> tuple[int, str, str]:
        recipe = tmp_path / "recipe.json"
        recipe.write_text(json.dumps({"model_name_or_path": str(tiny_qwen2_5_vl), "dataset_use": data,
                                      "output_dir": str(tmp_path / "out")}))
        status = main([*command.split(), str(recipe), *overrides])
        out, err = capsys.readouterr()
        return status, out, err
    return run


def test_an_eval_set_that_validation_empties_stops_the_run_before_training(run, tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", [_qa(i) for i in range(4)])
    evals = _jsonl(tmp_path / "eval.jsonl", [_qa(i, answer="word " * 300) for i in range(2)])
    status, out, err = run("train", train, "--eval_dataset", evals, "--model_max_length", "128", "--max_steps", "1")
    assert status == 1 and "Traceback" not in err
    assert f"eval_dataset {evals}: no sample left of 2: 2 dropped as too_long" in err  # was: eval_loss 0.0, the best
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_missing_annotation_file_is_named_even_with_skipping(run, tmp_path):
    good = _jsonl(tmp_path / "good.jsonl", [_qa(i) for i in range(4)])
    missing = tmp_path / "missing.jsonl"
    status, _, err = run("train", f"{good},{missing}", "--skip_bad_samples", "true", "--max_steps", "1")
    assert status == 1 and "Traceback" not in err
    assert f"{missing}: annotation file does not exist" in err  # was: counted as one bad sample, path never shown


def test_a_percentage_rounding_to_nothing_and_null_ids_in_data_check(run, tmp_path):
    small = _jsonl(tmp_path / "small.jsonl", [_qa(i) for i in range(5)])
    status, out, _ = run("data check", f"{small}%10")
    assert status == 0 and "10% of 5 sample(s) rounds down to 0; keeping 1" in out
    nulls = _jsonl(tmp_path / "nulls.jsonl", [_qa(i, id=None) for i in range(3)])
    status, out, _ = run("data check", nulls)
    assert status == 0 and "duplicate" not in out.lower()  # was: ids "None", two of three dropped as duplicates
    assert "checked 3 sample(s): 3 ok" in out, out
