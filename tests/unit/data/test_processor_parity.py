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
