"""The native MindSpore Ovis2.5 (backends/mindspore/models/ovis2_5.py, siglip2.py) against transformers' on
the tiny model, fp32 on the CPU: videos and several images per sample (each with its indicator start / end
embeddings), window-ordered tower features, the original-layout checkpoint, and train_modules' names."""

from __future__ import annotations

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
torch = pytest.importorskip("torch")

from vltune.backends.mindspore.models import ModelInputs, load_model  # noqa: E402
from vltune.data.formats import load_samples  # noqa: E402

OVIS = "ovis2_5"


@pytest.fixture(scope="module")
def ovis_dir(tiny_models):
    return tiny_models[OVIS]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from vltune.data.synthetic_corpus import write_format_corpus

    files = write_format_corpus(tmp_path_factory.mktemp("ovis_corpus"), num_samples=17, seed=0)
    first = {}
    for s in (s for f in files for s in load_samples(f)):
        first.setdefault(s.id.split("-")[0], s)
    return first


@pytest.mark.parametrize("kinds", [["single", "video", "text", "multi"], ["image_video"]])
def test_media_batches_match_transformers(ovis_dir, corpus, kinds):
    """Images of several sizes (window order differs from raster order above 3 x 3 merged tokens), videos
    (their own indicator rows), text-only rows in the same padded batch."""
    from vltune.backends.mindspore.loss import token_loss_sum
    from vltune.backends.torch.batch import to_model_inputs
    from vltune.backends.torch.loss import token_loss_sum as torch_token_loss_sum
    from vltune.backends.torch.models import load_model as load_torch_model
    from vltune.data.collate import Collator
    from vltune.data.dataset import SFTDataset

    samples = [corpus[k] for k in kinds]
    dataset = SFTDataset(samples, ovis_dir, max_length=4096, max_pixels=50176, min_pixels=3136)
    batch = Collator(dataset.info, dataset.tokenizer.pad_token_id)([dataset[i] for i in range(len(samples))])
    grids = np.concatenate([batch.get(k, np.zeros((0, 3), int)) for k in ("image_grid_thw", "video_grid_thw")])
    assert (grids[:, 1:] // 2 > 3).any()  # some image is wider or taller than one window
    model = load_model(ovis_dir)
    logits = model(ModelInputs.from_batch(batch, model.cfg))
    loss = float(token_loss_sum(logits, ms.Tensor(batch["labels"].astype(np.int32))).asnumpy())
    reference = load_torch_model(ovis_dir).eval()
    with torch.no_grad():
        ref = reference(**to_model_inputs(batch, torch.device("cpu"), model=reference), use_cache=False).logits
        ref_loss = float(torch_token_loss_sum(ref, torch.as_tensor(batch["labels"]))[0])
    real = batch["attention_mask"].astype(bool)
    got, want = logits.asnumpy()[real], ref.numpy()[real]
    n = int((batch["labels"][:, 1:] != -100).sum())
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert abs(loss - ref_loss) / n <= 1e-5


def test_indicator_tokens_take_the_table_rows(ovis_dir, corpus):
    """The start / end tokens of an image read the visual embedding table's indicator columns: changing
    those columns changes the logits, changing the text embedding rows of those tokens does not."""
    from vltune.data.collate import Collator
    from vltune.data.dataset import SFTDataset

    dataset = SFTDataset([corpus["single"]], ovis_dir, max_length=4096, max_pixels=12544)
    batch = Collator(dataset.info, dataset.tokenizer.pad_token_id)([dataset[0]])
    model = load_model(ovis_dir)
    cfg = model.cfg
    base = model(ModelInputs.from_batch(batch, cfg)).asnumpy()
    embed = model.model.language_model.embed_tokens.weight
    rows = np.asarray([cfg.image_start_token_id, cfg.image_end_token_id])
    changed = embed.asnumpy().copy()
    changed[rows] += 1.0
    embed.set_data(ms.Tensor(changed))
    assert np.array_equal(model(ModelInputs.from_batch(batch, cfg)).asnumpy(), base)
    table = model.model.multi_modal_projector.visual_embeddings_table.weight
    columns = table.asnumpy().copy()
    columns[:, -4] += 1.0  # the image-start indicator
    table.set_data(ms.Tensor(columns))
    assert not np.allclose(model(ModelInputs.from_batch(batch, cfg)).asnumpy(), base)


def test_original_layout_is_read_and_written_back(ovis_dir, tmp_path):
    """The tiny model is saved in the original Ovis layout (`llm.*`, `vte.weight` [vocab, hidden]); the
    native model carries transformers' names and the table transposed, and saves the original layout."""
    from safetensors.numpy import load_file

    from vltune.backends.mindspore import checkpoint
    from vltune.backends.torch.models import load_model as load_torch_model

    source = load_file(ovis_dir / "model.safetensors")
    assert "vte.weight" in source and any(k.startswith("llm.model.") for k in source)
    model = load_model(ovis_dir)
    names = dict(model.parameters_and_names())
    table = names["model.multi_modal_projector.visual_embeddings_table.weight"].asnumpy()
    assert np.array_equal(table, source["vte.weight"].T)
    reference = dict(load_torch_model(ovis_dir).named_parameters())
    assert set(names) == set(reference)  # transformers' own parameter names, one for one
    for param in model.get_parameters():  # a "trained" model: every weight moved
        param.set_data(param + 0.5)
    checkpoint.save_hf_model(model, ovis_dir, tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert saved.keys() == source.keys() and np.array_equal(saved["vte.weight"], source["vte.weight"] + np.float32(0.5))
    reloaded = dict(load_torch_model(tmp_path).named_parameters())
    for name, param in names.items():
        assert np.array_equal(reloaded[name].detach().numpy(), param.asnumpy()), name


@pytest.mark.parametrize(
    ("modules", "trained_prefixes"),
    [
        ("vte", ["model.multi_modal_projector.visual_embeddings_table."]),
        ("llm", ["model.language_model.", "lm_head."]),
        ("visual_tokenizer.vit.last_block|visual_tokenizer.head:2e-5",
         ["model.vision_tower.layers.1.", "model.multi_modal_projector.visual_tokenizer."]),
    ],
)
def test_train_modules_select_the_ovis_modules(ovis_dir, modules, trained_prefixes):
    from vltune.backends.mindspore.engine import apply_freeze
    from vltune.core.config import ModelArgs

    model = load_model(ovis_dir)
    apply_freeze(model, ModelArgs(model_name_or_path=str(ovis_dir), train_modules=modules))
    trained = sorted(n for n, p in model.parameters_and_names() if p.requires_grad)
    assert trained and all(n.startswith(tuple(trained_prefixes)) for n in trained), trained
    assert all(any(n.startswith(p) for n in trained) for p in trained_prefixes)


def test_window_attention_layers_match_transformers(ovis_dir, corpus, tmp_path):
    """The tower's `window_attention` layer type (no released checkpoint uses it, the config allows it):
    the first layer attends within windows of 3 x 3 merged tokens, the second within its image."""
    import json
    import shutil

    from vltune.backends.torch.batch import to_model_inputs
    from vltune.backends.torch.models import load_model as load_torch_model
    from vltune.data.collate import Collator
    from vltune.data.dataset import SFTDataset

    windowed = tmp_path / "windowed"
    shutil.copytree(ovis_dir, windowed)
    config = json.loads((windowed / "config.json").read_text())
    config["vision_config"]["layer_types"] = ["window_attention", "full_attention"]
    (windowed / "config.json").write_text(json.dumps(config))
    dataset = SFTDataset([corpus["single"], corpus["multi"]], windowed, max_length=4096, max_pixels=50176, min_pixels=3136)
    batch = Collator(dataset.info, dataset.tokenizer.pad_token_id)([dataset[0], dataset[1]])
    model = load_model(windowed)
    got = model(ModelInputs.from_batch(batch, model.cfg)).asnumpy()
    reference = load_torch_model(windowed).eval()
    assert reference.config.vision_config.layer_types[0] == "window_attention"
    with torch.no_grad():
        want = reference(**to_model_inputs(batch, torch.device("cpu"), model=reference), use_cache=False).logits.numpy()
    real = batch["attention_mask"].astype(bool)
    assert np.abs(got[real] - want[real]).max() <= 1e-4 * np.abs(want[real]).max()
    full = load_model(ovis_dir)  # the same weights without windows give other logits: the windows mattered
    assert not np.allclose(full(ModelInputs.from_batch(batch, full.cfg)).asnumpy()[real], got[real], atol=1e-4)


@pytest.mark.parametrize(
    "settings", [{"tune_mm_vision": True}, {"train_modules": "all"}, {"train_modules": "visual_tokenizer|vte:1e-5"}]
)
def test_trainable_parameters_are_torchs(ovis_dir, settings):
    """Both engines freeze the same parameters, the tower's never-reached post-norm included."""
    from vltune.backends.mindspore.engine import apply_freeze
    from vltune.backends.torch.engine import apply_freeze as torch_apply_freeze
    from vltune.backends.torch.models import load_model as load_torch_model
    from vltune.core.config import ModelArgs

    args = ModelArgs(model_name_or_path=str(ovis_dir), **settings)
    model, reference = load_model(ovis_dir), load_torch_model(ovis_dir)
    apply_freeze(model, args)
    torch_apply_freeze(reference, args)
    trained = {n for n, p in model.parameters_and_names() if p.requires_grad}
    assert trained == {n for n, p in reference.named_parameters() if p.requires_grad}
    assert not any(n.startswith("model.vision_tower.post_layernorm.") for n in trained)
