"""Sampling and streaming in the torch backend (backends/torch/generate.py): both decoding loops agree."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from vltune.backends.torch.generate import TextStream, generate, generate_with_positions  # noqa: E402
from vltune.backends.torch.models import load_model  # noqa: E402
from vltune.core.generation import GenerationSettings  # noqa: E402
from vltune.data.chat import ChatTokenizer  # noqa: E402
from vltune.data.collate import Collator  # noqa: E402
from vltune.data.dataset import SFTDataset  # noqa: E402
from vltune.data.formats import load_samples  # noqa: E402


def test_text_stream_writes_whole_characters_and_exactly_the_decoded_text(tiny_qwen2_5_vl):
    tok = ChatTokenizer(tiny_qwen2_5_vl)
    text = "A smile 🙂, an é\nsecond line ✓ done"
    ids = tok.tokenizer.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text
    pieces: list[str] = []
    stream = TextStream(tok.decode, pieces.append)
    stream.put(torch.tensor([[1, 2, 3]]))  # generate() hands over the prompt first: not shown
    for i in ids:
        stream.put(torch.tensor([i]))
    stream.end()
    assert "".join(pieces) == text == stream.text
    assert not any("\ufffd" in p for p in pieces), pieces  # a split character waits for its last byte
    assert len(pieces) > 10  # token by token, not all at the end


@pytest.fixture(scope="module")
def prompt_batch(tiny_qwen2_5_vl, vqa_data):
    dataset = SFTDataset(load_samples(vqa_data["eval_file"])[:1], tiny_qwen2_5_vl, max_length=512, max_pixels=12544)
    features, _ = dataset.prompt(0)
    batch = Collator(dataset.info, dataset.tokenizer.pad_token_id)([features], padding_side="left")
    return load_model(tiny_qwen2_5_vl), batch, dataset.info


def test_sampling_settings_mean_the_same_in_generate_and_in_our_own_loop(prompt_batch):
    """generate() (transformers' loop) and generate_with_positions (Circle-RoPE's loop) on a plain
    model: the same ids for greedy, top_k=1 sampling, repetition penalty and seeded sampling."""
    model, batch, info = prompt_batch

    def both(**kw) -> tuple[list[int], list[int]]:
        settings = GenerationSettings(max_new_tokens=12, **kw)
        (hf,) = generate(model, batch, info, settings)
        (ours,) = generate_with_positions(model, batch, 12, None, settings=settings)
        return hf, ours

    greedy, ours = both()
    assert greedy == ours and len(greedy) == 12
    assert len(set(greedy)) < len(greedy), "the random tiny model repeats tokens; the penalty test needs that"
    assert both(temperature=0.7, top_k=1) == (greedy, greedy)  # k = 1 leaves only the argmax
    penalised, ours = both(repetition_penalty=2.0)
    assert penalised == ours and penalised != greedy
    sampled, ours = both(temperature=1.5, seed=0)
    assert sampled == ours and sampled != greedy
    assert both(temperature=1.5, seed=0)[0] == sampled  # seeded: reproducible
    assert both(temperature=1.5, seed=1)[0] != sampled
    nucleus, ours = both(temperature=1.5, top_p=0.5, seed=0)
    assert nucleus == ours and nucleus != sampled


def test_streamer_sees_every_generated_token_in_both_loops(prompt_batch):
    model, batch, info = prompt_batch
    for run in (
        lambda s: generate(model, batch, info, GenerationSettings(max_new_tokens=8), streamer=s),
        lambda s: generate_with_positions(model, batch, 8, None, settings=GenerationSettings(max_new_tokens=8), streamer=s),
    ):
        seen: list[int] = []
        stream = TextStream(lambda ids: "".join(f"<{i}>" for i in ids), lambda piece: None)
        stream.add = seen.extend  # record the ids the loop hands over, after the skipped prompt
        (ids,) = run(stream)
        assert seen == ids


def _write_clip(path, frames: int = 40, width: int = 64, height: int = 48, fps: int = 20):
    """A moving gradient, mpeg4 (PyAV ships the encoder)."""
    from fractions import Fraction

    import numpy as np

    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        ramp = np.linspace(0, 200, width)[None, :, None]
        for i in range(frames):
            img = (ramp + 5 * i + np.zeros((height, width, 3))).clip(0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_video_prompt_decodes_alike_with_transformers_and_vltune_positions(tiny_model_dirs, tmp_path, model_type):
    """`vltune infer --video`: the clip reaches the model, and transformers' own M-RoPE ids for it
    (generate) and vltune's rope2d ids (our loop) give the same greedy answer."""
    from vltune.inference import Predictor, build_prompt_sample

    clip = _write_clip(tmp_path / "clip.mp4")
    settings = GenerationSettings(max_new_tokens=10)
    predictor = Predictor(tiny_model_dirs[model_type], settings=settings)
    dataset = predictor.dataset([build_prompt_sample("What happens?", [], [str(clip)])])
    features, _ = dataset.prompt(0)
    batch = Collator(dataset.info, dataset.tokenizer.pad_token_id)([features], padding_side="left")
    assert batch["pixel_values_videos"].shape[0] > 0 and (batch["input_ids"] == dataset.info.video_token_id).sum() > 0
    (hf,) = generate(predictor.model, batch, dataset.info, settings)
    (ours,) = generate_with_positions(predictor.model, batch, 10, None, settings=settings)
    assert hf == ours and len(hf) > 0
    assert predictor.answer(dataset, 0).prediction == dataset.tokenizer.decode(hf)
