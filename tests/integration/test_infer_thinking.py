"""Thinking mode and its budget on a model that never stops thinking (built by editing real weights).

The tiny Qwen3-VL is rewired, weights only, into a small program:

* every decoder layer's MLP and layer 1's attention write nothing (down_proj, o_proj = 0), so the
  last hidden state is the current token's embedding plus what layer 0's attention adds;
* layer 0's attention has q = 0, so each position averages its whole prefix; its values carry one
  "`</think>` seen" direction, non-zero only for the `</think>` embedding;
* the LM head reads three directions: shared by every token -> "x" (keep thinking), `</think>` seen ->
  "circle" (the answer), the "circle" embedding -> `<|im_end|>`.

So the model thinks "x x x ..." for ever, and answers "circle" and stops once `</think>` is in its
context: exactly the model the budget exists for. The generation code under test is the real one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from vltune.core.families.chat_templates import QWEN3_VL_THINKING_CHAT_TEMPLATE  # noqa: E402
from vltune.cli import main  # noqa: E402
from vltune.core.generation import THINKING_CLOSE, GenerationSettings  # noqa: E402
from vltune.inference import Predictor, answer_prompt  # noqa: E402

THINK_WORD, ANSWER_WORD = "x", "circle"
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors")


def _edit_into_a_thinker(base: Path, out: Path, template: str, close_at_once: bool = False) -> Path:
    """A copy of `base` rewired as the module docstring says; `close_at_once`: "</think>" instead of "x"."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(base)
    vocab = Tokenizer.from_file(str(base / "tokenizer.json"))
    ids = {w: vocab.token_to_id(w) for w in (THINK_WORD, ANSWER_WORD, "</think>", "<|im_end|>")}
    assert None not in ids.values(), ids
    lm = model.model.language_model
    shared, seen_end, answered = 0, 1, 2  # residual-stream directions
    with torch.no_grad():
        for layer in lm.layers:
            layer.mlp.down_proj.weight.zero_()
            layer.self_attn.o_proj.weight.zero_()
        emb = lm.embed_tokens.weight
        emb[:, :3] = 0
        emb[:, shared] = 1.0
        emb[ids["</think>"], seen_end] = 100.0
        emb[ids[ANSWER_WORD], answered] = 1e4
        attn = lm.layers[0].self_attn
        attn.q_proj.weight.zero_()  # uniform attention over the prefix
        attn.v_proj.weight.zero_()
        attn.v_proj.weight[0, seen_end] = 1000.0  # kv head 0, channel 0: how much </think> is in the prefix
        attn.o_proj.weight[seen_end, 0] = 1.0
        head = model.lm_head.weight
        head.zero_()
        head[ids["</think>" if close_at_once else THINK_WORD], shared] = 100.0
        head[ids[ANSWER_WORD], seen_end] = 100.0
        head[ids["<|im_end|>"], answered] = 100.0
    out.mkdir(parents=True)
    model.save_pretrained(out)
    for f in base.iterdir():
        if f.name not in _MODEL_FILES and f.is_file():
            shutil.copy(f, out / f.name)
    (out / "chat_template.jinja").write_text(template)
    return out


@pytest.fixture(scope="module")
def thinker(tiny_model_dirs, tmp_path_factory) -> Path:
    return _edit_into_a_thinker(tiny_model_dirs["qwen3_vl"], tmp_path_factory.mktemp("thinker") / "m", QWEN3_VL_THINKING_CHAT_TEMPLATE)


def test_budget_cuts_the_thinking_at_n_tokens_and_the_model_answers_after_the_closing_phrase(thinker):
    pieces: list[str] = []
    answer = answer_prompt(
        thinker, "What shape?", stream=pieces.append, thinking=True, thinking_budget=8,
        settings=GenerationSettings(max_new_tokens=20),
    )
    assert answer.thinking == THINK_WORD * 8  # exactly N tokens of reasoning, then the cut
    assert answer.thinking_cut
    assert answer.prediction == ANSWER_WORD  # generated after THINKING_CLOSE, then the end token
    assert answer.generated_tokens == 9
    assert answer.text == THINK_WORD * 8 + THINKING_CLOSE + ANSWER_WORD == "".join(pieces)


def test_without_a_budget_the_same_model_thinks_until_max_new_tokens(thinker):
    answer = answer_prompt(thinker, "What shape?", thinking=True, settings=GenerationSettings(max_new_tokens=20))
    assert (answer.thinking, answer.prediction, answer.thinking_cut) == (THINK_WORD * 20, "", False)


def test_a_model_that_closes_its_thinking_itself_is_not_cut(tiny_model_dirs, tmp_path):
    model = _edit_into_a_thinker(tiny_model_dirs["qwen3_vl"], tmp_path / "m", QWEN3_VL_THINKING_CHAT_TEMPLATE, close_at_once=True)
    answer = answer_prompt(model, "What shape?", thinking=True, thinking_budget=8, settings=GenerationSettings(max_new_tokens=20))
    assert (answer.thinking, answer.prediction, answer.thinking_cut, answer.generated_tokens) == ("", ANSWER_WORD, False, 2)


def test_thinking_flag_reaches_the_chat_template(tiny_model_dirs, tmp_path):
    """A template whose generation prompt opens <think> only under enable_thinking (as hybrid models do)."""
    opened = "'<|im_start|>assistant\\n<think>\\n'"
    assert opened in QWEN3_VL_THINKING_CHAT_TEMPLATE
    hybrid = QWEN3_VL_THINKING_CHAT_TEMPLATE.replace(opened, "'<|im_start|>assistant\\n' + ('<think>\\n' if enable_thinking else '')")
    model = _edit_into_a_thinker(tiny_model_dirs["qwen3_vl"], tmp_path / "m", hybrid)
    plain = answer_prompt(model, "Hi?", settings=GenerationSettings(max_new_tokens=12), thinking_budget=4)
    assert (plain.thinking, plain.prediction) == (None, THINK_WORD * 12)  # no block opened: all answer, no cut
    thinking = answer_prompt(model, "Hi?", settings=GenerationSettings(max_new_tokens=12), thinking=True, thinking_budget=4)
    assert (thinking.thinking, thinking.prediction, thinking.thinking_cut) == (THINK_WORD * 4, ANSWER_WORD, True)
    # Every render of a thinking Predictor's dataset passes the flag (the conversation's too, not only the prompt).
    tokenizer = Predictor(model, thinking=True).dataset([]).tokenizer
    assert tokenizer.render([{"role": "user", "content": "Hi?"}], add_generation_prompt=True).endswith("<think>\n")


def test_cli_streams_the_whole_generation(thinker, capsys):
    code = main(["infer", "--model", str(thinker), "--prompt", "What shape?", "--thinking", "--thinking-budget", "5",
                 "--max-new-tokens", "16"])
    assert code == 0
    assert capsys.readouterr().out == THINK_WORD * 5 + THINKING_CLOSE + ANSWER_WORD + "\n"
    code = main(["infer", "--model", str(thinker), "--prompt", "What shape?", "--thinking-budget", "5",
                 "--max-new-tokens", "16", "--no-stream"])
    assert code == 0 and capsys.readouterr().out == THINK_WORD * 5 + THINKING_CLOSE + ANSWER_WORD + "\n"
