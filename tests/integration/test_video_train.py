"""Videos end to end: the loss of mixed video/image/text batches equals the stock transformers model's
(whose own get_rope_index then agrees with vltune's positions, video timing included), and a recipe
on such data trains."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vltune.backends.torch.models import load_model  # noqa: E402
from vltune.backends.torch.engine import Engine as TorchBackend  # noqa: E402
from vltune.core.recipe import load_recipe  # noqa: E402
from vltune.data.collate import collate_padded  # noqa: E402
from vltune.data.dataset import SFTDataset  # noqa: E402
from vltune.data.formats import read_annotation  # noqa: E402
from vltune.data.synthetic_corpus import write_format_corpus  # noqa: E402


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
    return write_format_corpus(tmp_path_factory.mktemp("videos"), num_samples=20, seed=5)


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_video_batch_loss_equals_stock_model(corpus_files, tiny_model_dirs, model_type, request):
    model_dir = tiny_model_dirs.get(model_type) or request.getfixturevalue("tiny_qwen2_vl")
    samples = [s for f in corpus_files for s in read_annotation(f).samples]
    first = {kind: next(s for s in samples if s.id.startswith(kind + "-")) for kind in ("video", "image_video", "single", "text")}
    picked = list(first.values())
    dataset = SFTDataset(picked, model_dir, max_length=1 << 20)
    batch = collate_padded([dataset[i] for i in range(len(picked))], dataset.info, dataset.tokenizer.pad_token_id)
    assert batch["video_grid_thw"].shape[0] == 2 and batch["image_grid_thw"].shape[0] == 2  # one video sample has an image too

    cfg = load_recipe({"model_name_or_path": str(model_dir), "dataset_use": "unused.jsonl"})
    loss_sum, count = TorchBackend(load_model(model_dir), model_dir, dataset.info, cfg.model, cfg.train).eval_loss(batch)

    stock = transformers.AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    ids = torch.as_tensor(batch["input_ids"])
    mm_types = (ids == stock.config.image_token_id).int() + 2 * (ids == stock.config.video_token_id).int()
    extra = {"second_per_grid_ts": torch.as_tensor(batch["second_per_grid_ts"])} if model_type == "qwen2_5_vl" else {}
    with torch.no_grad():
        theirs = stock(
            input_ids=ids, attention_mask=torch.as_tensor(batch["attention_mask"]),
            pixel_values=torch.as_tensor(batch["pixel_values"]), image_grid_thw=torch.as_tensor(batch["image_grid_thw"]),
            pixel_values_videos=torch.as_tensor(batch["pixel_values_videos"]), video_grid_thw=torch.as_tensor(batch["video_grid_thw"]),
            mm_token_type_ids=mm_types, labels=torch.as_tensor(batch["labels"]), **extra,
        ).loss.item()
    assert abs(loss_sum / count - theirs) < 1e-5, (loss_sum / count, theirs)


def test_recipe_with_videos_trains(corpus_files, tiny_qwen2_5_vl, tmp_path):
    from vltune.training import train

    summary = train({
        "model_name_or_path": str(tiny_qwen2_5_vl), "dataset_use": ",".join(str(f) for f in corpus_files),
        "output_dir": str(tmp_path / "out"), "max_steps": 3, "per_device_train_batch_size": 2,
        "learning_rate": 1e-3, "logging_steps": 1, "video_max_frames": 4, "model_max_length": 8192,
    }, show_progress=False)
    assert summary["steps"] == 3 and np.isfinite(summary["train_loss"])
    assert summary["data"]["samples_ok"] == 20 and summary["data"]["samples_with_errors"] == 0
