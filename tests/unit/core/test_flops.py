"""FLOPs of a batch (padded or packed), shapes from config.json, GPU peaks, and the loop's `mfu` row."""

from __future__ import annotations

import numpy as np
import pytest

from vltune.core.flops import SHAPES, batch_flops, gpu_peak_flops, llm_flops, shape_from_config, vision_flops


def test_gpu_peaks_by_name():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == gpu_peak_flops("NVIDIA H200") == 989e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_peak_flops("Some Other GPU") is None


def test_padded_and_packed_batches_of_the_same_samples_have_the_same_flops():
    shape = SHAPES["qwen3_vl-2b"]
    grids = np.array([[1, 32, 32], [1, 16, 24]])
    padded = {"attention_mask": np.array([[1] * 700 + [0] * 100, [1] * 800]), "image_grid_thw": grids}
    packed = {"cu_seqlens": np.array([0, 700, 1500], dtype=np.int32), "image_grid_thw": grids}
    expected = llm_flops(shape, [700, 800], 6) + vision_flops(shape, [1024, 384], 2)
    assert batch_flops(shape, padded) == batch_flops(shape, packed) == expected
    video = {**packed, "video_grid_thw": np.array([[4, 8, 8]])}
    assert batch_flops(shape, video) == expected + vision_flops(shape, [1024, 384, 256], 2) - vision_flops(shape, [1024, 384], 2)


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_shape_from_the_tiny_configs(model_type, tiny_model_dirs, request):
    import json

    model_dir = tiny_model_dirs.get(model_type) or request.getfixturevalue("tiny_qwen2_vl")
    config = json.loads((model_dir / "config.json").read_text())
    shape = shape_from_config(config)
    assert (shape.hidden, shape.layers, shape.vocab) == (config["text_config"]["hidden_size"], 2, config["text_config"]["vocab_size"])
    assert shape.vision_depth == 2 and shape.text_head_dim == 32


def test_released_shape_round_trips_through_its_config():
    pytest.importorskip("torch")
    from vltune.backends.torch.bench import hf_config

    for shape in SHAPES.values():
        again = shape_from_config(hf_config(shape))
        assert (again.hidden, again.intermediate, again.layers, again.heads, again.kv_heads, again.vocab) == (
            shape.hidden, shape.intermediate, shape.layers, shape.heads, shape.kv_heads, shape.vocab)
        assert (again.vision_hidden, again.vision_intermediate, again.vision_depth, again.fullatt_blocks, again.deepstack) == (
            shape.vision_hidden, shape.vision_intermediate, shape.vision_depth, shape.fullatt_blocks, shape.deepstack)
