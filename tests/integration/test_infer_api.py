"""`vltune.load(model_dir, adapter).chat(...)`: the answers of `vltune infer`, thinking apart, clear errors."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import vltune  # noqa: E402
from vltune.cli import main  # noqa: E402

MAX_PIXELS = 12544


@pytest.fixture(scope="module")
def image_prompt(vqa_data) -> tuple[str, str]:
    sample = json.loads(Path(vqa_data["eval_file"]).read_text().splitlines()[0])
    return f"{vqa_data['data_path']}/{sample['image']}", sample["conversations"][0]["value"].replace("<image>", "").strip()


@pytest.fixture(scope="module")
def base_model(tiny_qwen2_5_vl):
    return vltune.load(tiny_qwen2_5_vl, max_pixels=MAX_PIXELS)


def _cli_answer(capsys, *args: str) -> str:
    """`vltune infer ... --no-stream` in-process, 8 greedy tokens: what it prints."""
    capsys.readouterr()
    assert main(["infer", *args, "--max-new-tokens", "8", "--max-pixels", str(MAX_PIXELS), "--no-stream"]) == 0
    return capsys.readouterr().out


def _write_clip(path: Path, frames: int = 8, size: int = 32) -> Path:
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(8))
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        for t in range(frames):
            frame = np.full((size, size, 3), 30 * t, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def test_greedy_chat_answers_as_vltune_infer_for_an_image_and_a_video(base_model, tiny_qwen2_5_vl, image_prompt, tmp_path, capsys):
    image, prompt = image_prompt
    answer = base_model.chat(prompt, images=[image], max_new_tokens=8)
    assert answer.thinking is None and str(answer) == answer.prediction == answer.text != ""
    assert _cli_answer(capsys, "--model", str(tiny_qwen2_5_vl), "--image", image, "--prompt", prompt) == answer.text + "\n"
    assert base_model.chat(prompt, images=Path(image), max_new_tokens=8) == answer  # loaded once, asked again

    clip = _write_clip(tmp_path / "clip.mp4")
    video = base_model.chat("What happens?", videos=clip, max_new_tokens=8)
    assert _cli_answer(capsys, "--model", str(tiny_qwen2_5_vl), "--video", str(clip), "--prompt", "What happens?") == video.text + "\n"


def test_thinking_comes_apart_from_the_answer_and_is_chosen_per_call(tiny_model_dirs, tmp_path):
    """The rewired Qwen3-VL of test_infer_thinking.py (thinks "x" for ever, answers "circle" after
    </think>), with a template that opens <think> only under enable_thinking: one load, both modes."""
    from test_infer_thinking import ANSWER_WORD, THINK_WORD, _edit_into_a_thinker
    from vltune.core.families.chat_templates import QWEN3_VL_THINKING_CHAT_TEMPLATE
    from vltune.core.generation import THINKING_CLOSE

    opened = "'<|im_start|>assistant\\n<think>\\n'"
    hybrid = QWEN3_VL_THINKING_CHAT_TEMPLATE.replace(opened, "'<|im_start|>assistant\\n' + ('<think>\\n' if enable_thinking else '')")
    model = vltune.load(_edit_into_a_thinker(tiny_model_dirs["qwen3_vl"], tmp_path / "m", hybrid))
    pieces: list[str] = []
    thought = model.chat("What shape?", thinking=True, thinking_budget=4, max_new_tokens=12, stream=pieces.append)
    assert (thought.thinking, thought.prediction, thought.thinking_cut) == (THINK_WORD * 4, ANSWER_WORD, True)
    assert "".join(pieces) == thought.text == THINK_WORD * 4 + THINKING_CLOSE + ANSWER_WORD
    plain = model.chat("What shape?", max_new_tokens=12)
    assert (plain.thinking, plain.prediction) == (None, THINK_WORD * 12)  # no block opened: all answer


def test_base_model_plus_lora_adapter_answers_as_vltune_infer_with_adapter(base_model, tiny_qwen2_5_vl, image_prompt, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    from vltune.backends.torch.models import load_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model\.layers\.\d+\.self_attn\.(q|v)_proj", init_lora_weights=False)
    adapter = tmp_path / "adapter"
    get_peft_model(load_model(tiny_qwen2_5_vl), config).save_pretrained(adapter)
    image, prompt = image_prompt

    answer = vltune.load(tiny_qwen2_5_vl, adapter, max_pixels=MAX_PIXELS).chat(prompt, images=image, max_new_tokens=8)
    cli = _cli_answer(capsys, "--model", str(tiny_qwen2_5_vl), "--adapter", str(adapter), "--image", image, "--prompt", prompt)
    assert cli == answer.text + "\n"
    assert answer.text != base_model.chat(prompt, images=image, max_new_tokens=8).text  # the adapter is in use
    with pytest.raises(FileNotFoundError, match=r"holds a LoRA adapter, not a model.*vltune\.load\(BASE_MODEL_DIR, adapter="):
        vltune.load(adapter)


def test_bad_input_is_a_clear_error(base_model, image_prompt, tmp_path):
    from PIL import Image

    from vltune.core.config import ConfigError
    from vltune.data.formats import SampleError

    with pytest.raises(FileNotFoundError, match="model_dir: '.*/nowhere' is not a directory"):
        vltune.load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="has no config.json: give an HF-format model directory"):
        vltune.load(tmp_path)
    missing = tmp_path / "missing.png"
    with pytest.raises(SampleError, match=f"cannot load image '{missing}': file not found"):
        base_model.chat("What color?", images=[missing])
    with pytest.raises(TypeError, match=r"got a PIL image \(PngImageFile\); save it to a file and pass the path"):
        base_model.chat("What color?", images=[Image.open(image_prompt[0])])
    with pytest.raises(ConfigError, match="max-new-tokens 0: must be >= 1"):
        base_model.chat("What color?", max_new_tokens=0)


def test_every_way_in_refuses_a_directory_that_is_no_model_before_loading(tmp_path):
    """The checks live in one place, so `vltune infer`, batch inference and Predictor say it as vltune.load does."""
    from vltune.inference import Predictor, infer

    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="adapter: '.*/gone' is not a directory"):
        Predictor(tmp_path, adapter=tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match=r"has no config.json: give an HF-format model directory"):
        Predictor(tmp_path, adapter=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"has no config.json"):
        infer(tmp_path / "..", "hi", objective="mdlm")
