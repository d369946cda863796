"""HF safetensors -> MindSpore -> HF: bit-exact, in the source's layout and dtypes, and loadable by transformers."""

from __future__ import annotations

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from vltune.backends.mindspore import checkpoint  # noqa: E402
from vltune.backends.mindspore.models import load_model  # noqa: E402


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_round_trip_is_bit_exact_in_the_source_layout(tiny_model_dirs, tmp_path, model_type):
    src = tiny_model_dirs[model_type]
    model = load_model(src)
    checkpoint.save_hf_model(model, src, tmp_path)
    from safetensors.numpy import load_file  # the reference reader

    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert before.keys() == after.keys()  # legacy `model.layers.*` for the tiny Qwen2.5-VL, transformers-5 names for Qwen3-VL
    for name, array in before.items():
        assert array.dtype == after[name].dtype and array.tobytes() == after[name].tobytes(), name
    for name in ("config.json", "tokenizer.json", "chat_template.jinja"):
        assert (tmp_path / name).exists()


def test_bf16_files_round_trip_exactly(tiny_model_dirs, tmp_path):
    """numpy has no bf16: widened to fp32 on load, narrowed back on save, bits unchanged."""
    src = tiny_model_dirs["qwen2_5_vl"]
    tensors, _ = checkpoint.read_safetensors(src / "model.safetensors")
    bf16_dir = tmp_path / "bf16"
    bf16_dir.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (bf16_dir / f.name).write_bytes(f.read_bytes())
    checkpoint.write_safetensors(bf16_dir / "model.safetensors", tensors, {k: "BF16" for k in tensors})
    model = load_model(bf16_dir)
    checkpoint.save_hf_model(model, bf16_dir, tmp_path / "out")
    a = (bf16_dir / "model.safetensors").read_bytes()
    b = (tmp_path / "out" / "model.safetensors").read_bytes()
    assert a == b
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    reference = load_file(bf16_dir / "model.safetensors")  # safetensors' own bf16 decoding
    ours, dtypes = checkpoint.read_safetensors(bf16_dir / "model.safetensors")
    for name, t in reference.items():
        assert dtypes[name] == "BF16" and np.array_equal(t.float().numpy(), ours[name]), name
    assert torch.bfloat16 == reference[name].dtype


def test_a_mindspore_saved_model_loads_in_transformers(tiny_model_dirs, tmp_path):
    torch = pytest.importorskip("torch")
    from vltune.backends.mindspore.models import ModelInputs
    from vltune.backends.torch.models import load_model as load_torch_model

    src = tiny_model_dirs["qwen3_vl"]
    model = load_model(src)
    for param in model.get_parameters():  # a "trained" model: every weight moved
        param.set_data(param + 0.01)
    checkpoint.save_hf_model(model, src, tmp_path)
    reloaded = load_torch_model(tmp_path).eval()
    ids = np.arange(10, 30, dtype=np.int64)[None]
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.broadcast_to(np.arange(20), (3, 1, 20)).copy()}
    with torch.no_grad():
        ref = reloaded(input_ids=torch.as_tensor(ids), attention_mask=torch.ones(1, 20, dtype=torch.long)).logits.numpy()
    got = model(ModelInputs.from_batch(batch, model.cfg)).asnumpy()
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_missing_or_unexpected_tensors_are_named(tiny_model_dirs, tmp_path):
    src = tiny_model_dirs["qwen2_5_vl"]
    tensors, _ = checkpoint.read_safetensors(src / "model.safetensors")
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors.pop("model.norm.weight")
    tensors["extra.weight"] = np.zeros(3, np.float32)
    checkpoint.write_safetensors(tmp_path / "model.safetensors", tensors)
    with pytest.raises(ValueError, match=r"missing \['model.language_model.norm.weight'\], unexpected \['extra.weight'\]"):
        load_model(tmp_path)
