"""A LoRA run end to end: its adapter answers through `vltune infer --adapter`, and `merge-lora` folds it in."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _vltune(*args, cwd):
    return subprocess.run([sys.executable, "-m", "vltune.cli", *args], cwd=cwd, capture_output=True, text=True)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_qwen2_5_vl, vqa_data):
    import vltune

    out = tmp_path_factory.mktemp("lora") / "out"
    summary = vltune.train({
        "model_name_or_path": str(tiny_qwen2_5_vl), "dataset_use": vqa_data["train_file"],
        "eval_dataset": vqa_data["eval_file"], "num_eval_samples": 6, "train_type": "lora", "lora_r": 8,
        "lora_alpha": 16, "tune_mm_mlp": True, "learning_rate": 1e-3, "max_steps": 12,
        "per_device_train_batch_size": 4, "max_pixels": 12544, "output_dir": str(out), "eval_max_new_tokens": 4,
    }, show_progress=False)
    return out, summary


def test_lora_output_is_an_adapter_that_infer_uses(lora_run, tiny_qwen2_5_vl, vqa_data):
    out, summary = lora_run
    assert summary["train_type"] == "lora"
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    prediction = json.loads((out / "eval_predictions.jsonl").read_text().splitlines()[0])
    sample = json.loads(open(vqa_data["eval_file"]).readline())
    image = f"{vqa_data['data_path']}/{sample['image']}"
    prompt = sample["conversations"][0]["value"].replace("<image>", "")
    proc = _vltune("infer", "--model", str(tiny_qwen2_5_vl), "--adapter", str(out), "--image", image,
                   "--prompt", prompt, "--max-new-tokens", "4", "--max-pixels", "12544", cwd=out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1:] == ([prediction["prediction"].strip()] if prediction["prediction"].strip() else [])
    wrong = _vltune("infer", "--model", str(out), "--image", image, "--prompt", prompt, cwd=out)
    assert wrong.returncode == 1 and "--adapter" in wrong.stderr and "Traceback" not in wrong.stderr


def test_merged_model_equals_base_plus_adapter(lora_run, tiny_qwen2_5_vl, vqa_data, tmp_path):
    from vltune.backends.torch.batch import to_model_inputs
    from vltune.backends.torch.models import load_model
    from vltune.data.collate import Collator
    from vltune.data.dataset import SFTDataset
    from vltune.data.formats import load_samples

    out, _ = lora_run
    merged_dir = tmp_path / "merged"
    proc = _vltune("merge-lora", "--model", str(tiny_qwen2_5_vl), "--adapter", str(out), "--out", str(merged_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dataset = SFTDataset(load_samples(vqa_data["eval_file"])[:3], tiny_qwen2_5_vl, max_length=512, max_pixels=12544)
    batch = Collator(dataset.info, dataset.tokenizer.pad_token_id)([dataset[i] for i in range(3)])
    inputs = to_model_inputs(batch, torch.device("cpu"))
    with torch.no_grad():
        with_adapter = load_model(tiny_qwen2_5_vl, adapter=out).eval()(**inputs).logits
        merged = transformers.AutoModelForImageTextToText.from_pretrained(merged_dir).eval()(**inputs).logits
        base = load_model(tiny_qwen2_5_vl).eval()(**inputs).logits
    assert not torch.allclose(with_adapter, base, atol=1e-4)  # the adapter changes the model
    assert torch.allclose(merged, with_adapter, atol=1e-5, rtol=0), (merged - with_adapter).abs().max()
