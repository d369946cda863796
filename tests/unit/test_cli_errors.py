"""What `vltune` prints when the input is wrong: one line naming the key or file, the reason and the fix;
a traceback only with --debug / VLTUNE_DEBUG=1; Ctrl-C gives the resume command and status 130."""

from __future__ import annotations

import errno
import importlib.util
import json
import shutil

import pytest

from vltune.cli import main


def _fails(capsys, argv: list[str], status: int = 1) -> str:
    """The error report: from the `vltune <command>:` line on (a recipe's problems follow it, one per line)."""
    assert main(argv) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"\nvltune {argv[0]}" in "\n" + err, err
    return err[("\n" + err).index(f"\nvltune {argv[0]}"):].strip()


@pytest.mark.parametrize(("overrides", "expected"), [
    (["--max_pixels", "0"], "max_pixels: 0 must be >= 1"),
    (["--min_pixels", "5000", "--max_pixels", "4000"], "min_pixels 5000 > max_pixels 4000"),
    (["--eval_max_new_tokens", "0"], "eval_max_new_tokens: 0 must be >= 1"),
    (["--learning_rate", "nan"], "learning_rate: nan is not a finite number"),
    (["--per_device_batch_size", "4"], "did you mean 'per_device_train_batch_size'?"),
    (["--model_type", "llava"], "is not a supported family (one of "),
    (["--gradient_checkpointing", "true", "--gradient_checkpointing_every_n_layers", "0"],
     "gradient_checkpointing_every_n_layers: 0 must be >= 1"),
    (["--gradient_checkpointing_every_n_layers", "2"], "gradient_checkpointing is false: set gradient_checkpointing: true"),
    (["--nproc", "0", "--print-launch"], "--nproc 0 must be >= 1"),
    (["--nproc", "-1", "--print-launch"], "--nproc -1 must be >= 1"),
])
def test_bad_values_fail_in_one_line(capsys, overrides, expected):
    err = _fails(capsys, ["train", "demo", *overrides])
    assert err.startswith("vltune train: ") and expected in err


def test_broken_recipe_files_are_named(capsys, tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("model_name_or_path: m\ndataset_use: x.jsonl\n  max_steps: 1\n")
    assert f"{recipe}, line 3" in _fails(capsys, ["train", str(recipe)])
    assert "is a directory" in _fails(capsys, ["train", str(tmp_path)])
    assert "output_dir" in _fails(capsys, ["train", "demo", "--output_dir", str(recipe)])


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed here")
def test_liger_without_the_package_says_what_to_install(capsys):
    assert "pip install liger-kernel" in _fails(capsys, ["train", "demo", "--use_liger_kernel", "true"])


def test_an_unwritable_output_dir_is_named(capsys, monkeypatch, tmp_path):
    def deny(path, *args):  # what the lock file's creation raises there (root, as in CI, can write anywhere)
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr("os.open", deny)  # the lock file is the run's first write into output_dir
    err = _fails(capsys, ["train", "demo", "--output_dir", str(tmp_path / "ro")])
    assert f"output_dir: {tmp_path / 'ro'} is not writable (Permission denied" in err


def test_unexpected_errors_show_type_and_message_and_debug_gives_the_traceback(capsys, monkeypatch):
    def train(cfg, **kw):
        raise TypeError("boom")

    monkeypatch.setattr("vltune.training.train", train)
    err = _fails(capsys, ["train", "demo"])
    assert err == "vltune train: TypeError: boom (run with --debug (or VLTUNE_DEBUG=1) for the traceback)"
    with pytest.raises(TypeError, match="boom"):
        main(["--debug", "train", "demo"])
    with pytest.raises(TypeError, match="boom"):
        main(["train", "demo", "--debug"])
    monkeypatch.setenv("VLTUNE_DEBUG", "1")
    with pytest.raises(TypeError, match="boom"):
        main(["train", "demo"])


def test_ctrl_c_prints_the_resume_command(capsys, monkeypatch, tmp_path):
    def train(cfg, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr("vltune.training.train", train)
    err = _fails(capsys, ["train", "demo", "--output_dir", str(tmp_path), "--max_steps", "50"], status=130)
    assert "no checkpoint was saved" in err and f"vltune train demo --output_dir {tmp_path} --max_steps 50" in err
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    err = _fails(capsys, ["train", "demo", "--output_dir", str(tmp_path), "--resume_from_checkpoint", "x"], status=130)
    assert err == (f"vltune train: interrupted; resume from {tmp_path / 'checkpoint-4'} with: "
                   f"vltune train demo --output_dir {tmp_path} --resume_from_checkpoint auto")


def test_make_tiny_refuses_a_file_and_a_model_directory(capsys, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("x")
    assert "is a file" in _fails(capsys, ["make-tiny", "--model-type", "qwen2_5_vl", "--out", str(taken)])
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert "--overwrite" in _fails(capsys, ["make-tiny", "--model-type", "qwen2_5_vl", "--out", str(tmp_path / "model")])
    assert (tmp_path / "model" / "config.json").read_text() == "{}"


@pytest.fixture
def broken_models(tiny_models, tmp_path):
    """Copies of the tiny Qwen2.5-VL directory, each broken in one way a download or an edit breaks it."""
    pytest.importorskip("torch")
    source = tiny_models["qwen2_5_vl"]

    def copy(name):
        shutil.copytree(source, tmp_path / name)
        return tmp_path / name

    # neutral directory names: the messages must say what is wrong, not echo a path that says it
    no_weights, truncated, bad_config, other_family = (copy(n) for n in ("m1", "m2", "m3", "m4"))
    (no_weights / "model.safetensors").unlink()
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    (bad_config / "config.json").write_text((source / "config.json").read_text()[:100])
    config = json.loads((source / "config.json").read_text())
    (other_family / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    return {"no_weights": no_weights, "truncated": truncated, "bad_config": bad_config, "other": other_family}


def test_broken_model_directories_are_named(capsys, broken_models):
    def infer(name):
        return _fails(capsys, ["infer", "--model", str(broken_models[name]), "--prompt", "hi"])

    assert f"{broken_models['no_weights'] / 'model.safetensors'}: missing" in infer("no_weights")
    assert f"{broken_models['truncated'] / 'model.safetensors'} is truncated (" in infer("truncated")
    bad_config = infer("bad_config")
    assert f"{broken_models['bad_config'] / 'config.json'}: not valid JSON" in bad_config
    assert "copy it again" in bad_config and "--debug" not in bad_config  # a user error with its fix, not a crash
    assert "'llava' is not a model family vltune supports (supported: " in infer("other")


def test_merge_lora_refuses_to_replace_a_model_directory(capsys, tiny_models, tmp_path):
    pytest.importorskip("torch")
    from vltune.backends.torch.lora import apply_lora
    from vltune.backends.torch.models import load_model
    from vltune.core.config import ModelArgs

    base = tiny_models["qwen2_5_vl"]
    adapter = tmp_path / "adapter"
    model = apply_lora(load_model(base), ModelArgs(train_type="lora", lora_r=2, lora_dropout=0.0))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: a merge would change nothing
            param.data.fill_(0.01)
    model.save_pretrained(adapter)
    existing = tmp_path / "existing"
    shutil.copytree(base, existing)
    before = (existing / "model.safetensors").read_bytes()
    args = ["merge-lora", "--model", str(base), "--adapter", str(adapter), "--out"]
    assert "already exists and is not empty" in _fails(capsys, [*args, str(existing)])
    assert (existing / "model.safetensors").read_bytes() == before
    assert "base model's own directory" in _fails(capsys, [*args, str(base)])
    assert main([*args, str(existing), "--overwrite"]) == 0
    assert (existing / "model.safetensors").read_bytes() != before


def test_a_failing_final_evaluation_keeps_the_trained_model(capsys, monkeypatch, tiny_models, vqa_data, tmp_path):
    pytest.importorskip("torch")

    class FailingEvaluator:
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self):
            raise ValueError("`max_new_tokens` must be greater than 0, but is 0.")

    monkeypatch.setattr("vltune.training.Evaluator", FailingEvaluator)
    out = tmp_path / "run"
    recipe = {"model_name_or_path": str(tiny_models["qwen2_5_vl"]), "dataset_use": vqa_data["train_file"] + "%10",
              "eval_dataset": vqa_data["eval_file"], "num_eval_samples": 2, "max_pixels": 12544, "max_steps": 1,
              "per_device_train_batch_size": 2, "output_dir": str(out)}
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    err = _fails(capsys, ["train", str(tmp_path / "r.yaml"), "--no-progress"])
    assert f"training finished and the model is saved in {out}, but the final evaluation failed: ValueError" in err
    assert "--debug" in err and (out / "model.safetensors").is_file()
    assert json.loads((out / "run_summary.json").read_text())["eval_error"].startswith("ValueError: `max_new_tokens`")
