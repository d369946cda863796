"""Qwen3.5's chat template (thinking on unless `enable_thinking=False`) through vltune's data path.

An answer without reasoning gets the empty think block the template writes, not trained; an answer with
`<think>` is trained whole after the `<think>` the generation prompt opened. Evaluation prompts the model
the way training showed it the answer; inference follows `--thinking`.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vltune.core.config import ConfigError
from vltune.core.recipe import load_recipe
from vltune.data.chat import ChatTokenizer
from vltune.data.dataset import SFTDataset
from vltune.data.formats import Sample
from vltune.evaluation import Evaluator
from vltune.inference import Predictor, build_prompt_sample

QUESTION = {"role": "user", "content": "What color?"}


@pytest.fixture(scope="module")
def chat(tiny_models) -> ChatTokenizer:
    return ChatTokenizer(tiny_models["qwen3_5"])


def _trained(chat: ChatTokenizer, messages) -> str:
    ids, labels = chat.encode_chat(messages, [], [])
    return chat.decode([i for i, label in zip(ids, labels) if label != -100], skip_special_tokens=False)


def test_an_answer_without_reasoning_trains_the_answer_alone(chat):
    messages = [QUESTION, {"role": "assistant", "content": "red"}]
    assert chat.render(messages).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nred<|im_end|>\n")
    assert _trained(chat, messages) == "red<|im_end|>\n"


def test_an_answer_with_reasoning_is_trained_whole(chat):
    messages = [QUESTION, {"role": "assistant", "content": "<think>\nthe shape is red\n</think>\n\nred"}]
    assert _trained(chat, messages) == "the shape is red\n</think>\n\nred<|im_end|>\n"


def test_evaluation_prompt_is_what_training_showed(chat):
    answer = {"role": "assistant", "content": "red"}
    as_trained = chat.decode(chat.encode_prompt([QUESTION], [], [], answer=answer), skip_special_tokens=False)
    assert as_trained.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    full = chat.render([QUESTION, answer])
    assert full.startswith(as_trained) and full[len(as_trained):] == "red<|im_end|>\n"
    thinking = {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nred"}
    opened = chat.decode(chat.encode_prompt([QUESTION], [], [], answer=thinking), skip_special_tokens=False)
    assert opened.endswith("<|im_start|>assistant\n<think>\n")


class _RecordingBackend:
    """Stands in for a trained model: scores a token, generates nothing, keeps the prompts it was given."""

    def __init__(self):
        self.prompts = []

    def eval_loss(self, batch):
        return 1.0, 1

    def generate(self, batch, max_new_tokens):
        self.prompts += batch
        return [[] for _ in batch]


def test_the_evaluator_prompts_as_training_showed(tiny_models):
    """Through Evaluator: dropping its as_trained would prompt with an open <think> the model never saw."""
    sample = Sample(id="s0", messages=[QUESTION, {"role": "assistant", "content": "red"}], images=[], videos=[], source="t")
    dataset = SFTDataset([sample], tiny_models["qwen3_5"], max_length=256)
    backend = _RecordingBackend()
    Evaluator(dataset, backend, lambda features, padding_side="right": features, batch_size=1, max_new_tokens=4)()
    prompt = dataset.tokenizer.decode(backend.prompts[0].input_ids, skip_special_tokens=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parametrize("thinking, ending", [(True, "assistant\n<think>\n"), (False, "assistant\n<think>\n\n</think>\n\n")])
def test_predictor_prompt_follows_thinking(tiny_models, thinking, ending):
    """Through Predictor.dataset (no model loaded): its `thinking` must reach the template."""
    predictor = SimpleNamespace(model_dir=tiny_models["qwen3_5"], min_pixels=None, max_pixels=None, video_overrides={},
                                thinking=thinking)
    dataset = Predictor.dataset(predictor, [build_prompt_sample("What color?", [])])
    features, _ = dataset.prompt(0)
    assert dataset.tokenizer.decode(features.input_ids, skip_special_tokens=False).endswith(ending)


@pytest.mark.parametrize("thinking, ending", [(True, "assistant\n<think>\n"), (False, "assistant\n<think>\n\n</think>\n\n")])
def test_inference_prompt_follows_enable_thinking(tiny_models, thinking, ending):
    chat = ChatTokenizer(tiny_models["qwen3_5"], {"enable_thinking": thinking})
    assert chat.render([QUESTION], add_generation_prompt=True).endswith(ending)


def test_templates_without_thinking_are_unchanged(tiny_models):
    chat = ChatTokenizer(tiny_models["qwen2_5_vl"])
    answer = {"role": "assistant", "content": "red"}
    assert (chat.encode_prompt([QUESTION], [], [], answer=answer) == chat.encode_prompt([QUESTION], [], [])).all()
    assert _trained(chat, [QUESTION, answer]) == "red<|im_end|>\n"


def test_mdlm_is_refused_with_the_reason(tiny_models):
    with pytest.raises(ConfigError, match="objective: mdlm: vltune does not support it for qwen3_5: its Gated DeltaNet layers are a causal recurrence"):
        load_recipe({"model_name_or_path": str(tiny_models["qwen3_5"]), "dataset_use": "x.jsonl", "model_type": "qwen3_5",
                     "objective": "mdlm"})
