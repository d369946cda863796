"""vltune's data pipeline vs transformers' own AutoProcessor on a 200-sample corpus of every format.

The full comparison needs torchvision (transformers' Qwen VL processors cannot be built without it),
so it runs where torchvision is installed (the GPU image: tools/gpu/parity.sh); CI runs the
torchvision-free part: every sample of the corpus reads and builds on both families.
"""

from __future__ import annotations

import numpy as np
import pytest

from vltune.data.dataset import SFTDataset
from vltune.data.formats import read_annotation
from vltune.data.synthetic_corpus import KINDS, write_format_corpus

N_SAMPLES = 200


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    files = write_format_corpus(tmp_path_factory.mktemp("corpus"), N_SAMPLES, seed=0)
    samples, problems = [], []
    for f in files:
        result = read_annotation(f)
        samples += result.samples
        problems += result.problems
    assert not problems, problems
    return samples


def test_corpus_covers_every_format_and_builds(corpus, tiny_model_dirs):
    assert len(corpus) == N_SAMPLES
    assert {s.id.split("-")[0] for s in corpus} == set(KINDS)
    assert sum(bool(s.videos) for s in corpus) >= 30 and sum(len(s.images) > 1 for s in corpus) >= 30
    for model_type, model_dir in tiny_model_dirs.items():
        dataset = SFTDataset(corpus, model_dir, max_length=1 << 20)
        for i, sample in enumerate(corpus):
            f = dataset[i]
            assert (f.labels != -100).any(), sample.id
            n_image_pads = int((f.input_ids == dataset.info.image_token_id).sum())
            expected = 0 if f.image_grid_thw is None else int(f.image_grid_thw.prod(axis=1).sum()) // 4
            assert n_image_pads == expected, (model_type, sample.id)
            assert (f.video_grid_thw is None) == (not sample.videos), (model_type, sample.id)


def _theirs(processor, dataset: SFTDataset, sample):
    from PIL import Image, ImageOps
    from transformers.video_utils import VideoMetadata

    from vltune.data.video import load_video

    text = processor.apply_chat_template(sample.messages, tokenize=False)
    # Opened as transformers' load_image does (EXIF orientation applied) but without its
    # `convert("RGB")`, which drops alpha: the processor itself composites transparency onto white,
    # as qwen-vl-utils does and as vltune does.
    images = [ImageOps.exif_transpose(Image.open(p)) for p in sample.images] or None
    videos, metadata = [], []
    for path in sample.videos:  # the frames vltune sampled (sampling itself: tests/unit/data/test_video.py)
        clip = load_video(path, dataset.video_config)
        videos.append(clip.frames)
        metadata.append(VideoMetadata(total_num_frames=clip.total_frames, fps=clip.fps, frames_indices=list(clip.frame_indices)))
    kwargs = {"videos": videos, "video_metadata": metadata, "do_sample_frames": False} if videos else {}
    return processor(text=[text], images=images, return_tensors="np", **kwargs)


def test_equals_transformers_auto_processor(corpus, tiny_model_dirs):
    pytest.importorskip("torchvision", reason="transformers' Qwen VL processors need torchvision")
    import transformers

    mismatches = []
    for model_type, model_dir in tiny_model_dirs.items():
        processor = transformers.AutoProcessor.from_pretrained(model_dir)
        # The PIL image backend is the reference vltune reproduces bit for bit (the torchvision image
        # backend rounds its resize differently: a few uint8 levels, test_tiny_model.py).
        processor.image_processor = transformers.AutoImageProcessor.from_pretrained(model_dir, backend="pil")
        dataset = SFTDataset(corpus, model_dir, max_length=1 << 20)
        for i, sample in enumerate(corpus):
            ours, theirs = dataset[i], _theirs(processor, dataset, sample)
            pairs = {
                "input_ids": (ours.input_ids, theirs["input_ids"][0]),
                "pixel_values": (ours.pixel_values, theirs.get("pixel_values")),
                "image_grid_thw": (ours.image_grid_thw, theirs.get("image_grid_thw")),
                "pixel_values_videos": (ours.pixel_values_videos, theirs.get("pixel_values_videos")),
                "video_grid_thw": (ours.video_grid_thw, theirs.get("video_grid_thw")),
            }
            if "second_per_grid_ts" in theirs and ours.second_per_grid_ts is not None:
                pairs["second_per_grid_ts"] = (ours.second_per_grid_ts, np.asarray(theirs["second_per_grid_ts"], dtype=np.float32))
            for key, (a, b) in pairs.items():
                if (a is None) != (b is None) or (a is not None and not np.array_equal(np.asarray(a), np.asarray(b))):
                    mismatches.append(f"{model_type} {sample.id} {key}")
    assert not mismatches, (len(mismatches), mismatches[:20])


OVIS = "ovis2_5"
ONE_LEVEL = 2 / 255 + 1e-6
"""One uint8 level after Ovis2.5's normalisation (mean 0.5, std 0.5): torchvision resizes uint8 video frames
on one of two CPU paths, integer or float, chosen by the host's CPU (data/video.py `bilinear_path`)."""


def _ovis_text(spec, processor_or_tokenizer, sample, image_token: str, video_token: str) -> str:
    """The sample rendered as vltune trains it (the Ovis recipe's template), with the image / video tags
    the template writes turned into the processor's placeholder tokens."""
    text = processor_or_tokenizer.apply_chat_template(sample.messages, tokenize=False, chat_template=spec.training_chat_template)
    return text.replace(spec.media.image_tag, image_token).replace(spec.media.video_tag, video_token)


def test_ovis_tokens_and_images_equal_transformers_on_the_corpus(corpus, tiny_models):
    """CI's part (no torchvision): every sample's tokens against transformers' tokenizer with the
    processor's expansion (indicator tokens around one pad per merged patch), and every image's pixels
    and grid against Ovis2_5ImageProcessorPil."""
    import transformers
    from PIL import Image, ImageOps

    from vltune.core.families import get_family

    spec, model_dir = get_family(OVIS), tiny_models[OVIS]
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    image_processor = transformers.AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    dataset = SFTDataset(corpus, model_dir, max_length=1 << 20)
    (image_open, image_pad, image_close), (video_open, video_pad, video_close) = spec.media.image_tokens, spec.media.video_tokens
    mismatches = []
    for i, sample in enumerate(corpus):
        ours = dataset[i]
        text = _ovis_text(spec, tokenizer, sample, "\0I", "\0V")
        grids = []
        if sample.images:
            theirs = image_processor(images=[ImageOps.exif_transpose(Image.open(p)) for p in sample.images], return_tensors="np")
            if not (np.array_equal(theirs["pixel_values"], ours.pixel_values) and np.array_equal(theirs["image_grid_thw"], ours.image_grid_thw)):
                mismatches.append(f"{sample.id} pixels")
            grids = theirs["image_grid_thw"]
        for grid in grids:
            text = text.replace("\0I", image_open + image_pad * (int(np.prod(grid)) // 4) + image_close, 1)
        for grid in ([] if ours.video_grid_thw is None else ours.video_grid_thw):  # video pixels: the GPU test below
            text = text.replace("\0V", video_open + video_pad * (int(np.prod(grid)) // 4) + video_close, 1)
        if tokenizer(text, add_special_tokens=False)["input_ids"] != ours.input_ids.tolist():
            mismatches.append(f"{sample.id} input_ids")
    assert not mismatches, (len(mismatches), mismatches[:20])


def test_ovis_equals_its_transformers_processor(corpus, tiny_models):
    """The whole Ovis2_5Processor (its video processor needs torchvision: the GPU image) on the corpus:
    tokens, image pixels and grids exact; video grids exact, video pixels within one uint8 level."""
    pytest.importorskip("torchvision", reason="transformers' Ovis2_5Processor needs torchvision (its video processor)")
    import transformers
    from PIL import Image, ImageOps

    from vltune.core.families import get_family
    from vltune.data.video import load_video

    spec, model_dir = get_family(OVIS), tiny_models[OVIS]
    processor = transformers.AutoProcessor.from_pretrained(model_dir)
    processor.image_processor = transformers.AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    dataset = SFTDataset(corpus, model_dir, max_length=1 << 20)
    mismatches, video_exact, videos_seen = [], 0, 0
    for i, sample in enumerate(corpus):
        ours = dataset[i]
        text = _ovis_text(spec, processor, sample, processor.image_token, processor.video_token)
        images = [ImageOps.exif_transpose(Image.open(p)) for p in sample.images] or None
        videos = [load_video(p, dataset.video_config).frames for p in sample.videos] or None
        kwargs = {"videos": videos, "do_sample_frames": False} if videos else {}
        theirs = processor(text=[text], images=images, return_tensors="np", **kwargs)
        exact = {"input_ids": (ours.input_ids, theirs["input_ids"][0]), "pixel_values": (ours.pixel_values, theirs.get("pixel_values")),
                 "image_grid_thw": (ours.image_grid_thw, theirs.get("image_grid_thw")),
                 "video_grid_thw": (ours.video_grid_thw, theirs.get("video_grid_thw"))}
        for key, (a, b) in exact.items():
            if (a is None) != (b is None) or (a is not None and not np.array_equal(np.asarray(a), np.asarray(b))):
                mismatches.append(f"{sample.id} {key}")
        if videos:
            videos_seen += 1
            diff = np.abs(ours.pixel_values_videos - theirs["pixel_values_videos"]).max()
            video_exact += int(diff == 0)
            if diff > ONE_LEVEL:
                mismatches.append(f"{sample.id} pixel_values_videos {diff}")
    print(f"ovis2_5: {videos_seen} videos, {video_exact} bit-identical")
    assert not mismatches, (len(mismatches), mismatches[:20])
