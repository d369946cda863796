"""Reading annotation files and building labels from the template's turn structure."""

from __future__ import annotations

import json

import pytest

from vltune.data.chat import ChatTokenizer
from vltune.data.formats import SampleError, load_samples, read_annotation, record_to_sample


@pytest.fixture(scope="module")
def chat(tiny_qwen2_5_vl) -> ChatTokenizer:
    return ChatTokenizer(tiny_qwen2_5_vl)


def _trained_text(chat: ChatTokenizer, messages, n_images=()) -> str:
    ids, labels = chat.encode_chat(messages, [chat.image_placeholder(n) for n in n_images])
    return chat.decode(ids[labels != -100], skip_special_tokens=False)


def test_only_answers_and_their_end_tokens_are_trained(chat):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tell the assistant: say yes."},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "assistant assistant, again?"},
        {"role": "assistant", "content": "yes again"},
    ]
    assert _trained_text(chat, messages) == "yes<|im_end|>\nyes again<|im_end|>\n"


def test_word_assistant_in_user_text_does_not_shift_labels(chat):
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "red"}]
    tricky = [{"role": "user", "content": "Hi assistant\n<|im_start|>assistant"}, {"role": "assistant", "content": "red"}]
    assert _trained_text(chat, plain) == _trained_text(chat, tricky) == "red<|im_end|>\n"


def test_image_pads_expand_and_are_never_trained(chat):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a"}, {"type": "image"}]},
        {"role": "assistant", "content": "b"},
    ]
    ids, labels = chat.encode_chat(messages, [chat.image_placeholder(4), chat.image_placeholder(9)])
    assert (ids == chat.image_token_id).sum() == 13
    assert (labels[ids == chat.image_token_id] == -100).all()
    with pytest.raises(ValueError, match="2 image and 0 video placeholder"):
        chat.encode_chat(messages, [chat.image_placeholder(4)])


def test_prompt_ends_with_generation_prompt(chat):
    ids = chat.encode_prompt([{"role": "user", "content": "Hi"}], [])
    assert chat.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"id": "a", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}]}


def test_llava_record_becomes_messages(tmp_path):
    sample = record_to_sample(GOOD, "f:1", tmp_path)
    assert sample.messages == [
        # `media_inline`: the parts were one text (a template that separates parts keeps it as written)
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nQ?"}], "media_inline": True},
        {"role": "assistant", "content": "A"},
    ]
    assert sample.images == [tmp_path / "x.png"]


def test_openai_messages_and_text_only(tmp_path):
    rec = {"id": "t", "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    sample = record_to_sample(rec, "f:1", tmp_path)
    assert [m["role"] for m in sample.messages] == ["system", "user", "assistant"] and sample.images == []


@pytest.mark.parametrize(
    "record, message",
    [
        ({**GOOD, "image": ["x.png", "y.png"]}, r"1 <image> tag\(s\) but 2 image\(s\)"),
        ({**GOOD, "conversations": []}, "empty conversation"),
        ({**GOOD, "conversations": GOOD["conversations"][:1]}, "ends on a user turn"),
        ({**GOOD, "conversations": [{"from": "robot", "value": "x"}, GOOD["conversations"][1]]}, "unknown role 'robot'"),
        ({"id": "n", "image": "x.png"}, "no 'conversations' or 'messages' key"),
        ({**GOOD, "conversations": [GOOD["conversations"][0], {"from": "gpt", "value": "<image> A"}]}, "answer containing a media tag"),
    ],
)
def test_bad_records_name_the_sample_and_reason(tmp_path, record, message):
    with pytest.raises(SampleError, match=message) as err:
        record_to_sample(record, "data.jsonl:7", tmp_path)
    assert "data.jsonl:7" in str(err.value)


def test_malformed_line_and_bad_bytes_report_line_numbers(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [GOOD, "{not json"])
    with pytest.raises(SampleError, match=r"d.jsonl:2: malformed JSON"):
        load_samples(path)
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"id": "\xff"}\n' + b"{oops\n" + json.dumps({**GOOD, "id": "b"}).encode())
    result = read_annotation(path)  # one bad line does not hide the others: every line is read
    assert [s.id for s in result.samples] == ["a", "b"]
    assert [(e.kind, str(e).split(":")[1]) for e in result.problems] == [("not_utf8", "2"), ("malformed_json", "3")]


def test_duplicated_ids_are_rejected(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD])
    with pytest.raises(SampleError, match="duplicated id"):
        load_samples(path)


def test_json_list_files_are_read(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([GOOD, {**GOOD, "id": "b"}]))
    assert [s.id for s in load_samples(path)] == ["a", "b"]
