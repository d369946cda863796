"""Hostile data (issue 25): inputs a careless or adversarial user gives, and the errors or behaviour they get."""

from __future__ import annotations

import codecs
import hashlib
import http.server
import io
import json
import socket
import sys
import threading
import unicodedata

import pytest
from PIL import Image

from vltune.core.recipe import load_recipe
from vltune.data import pack_annotation, vision
from vltune.data.chat import _COMPOSING_NORMALIZERS, ChatTokenizer
from vltune.data.dataset import SFTDataset
from vltune.data.formats import SampleError, load_samples, read_annotation, read_records, record_to_sample
from vltune.data.loader import BatchIterator
from vltune.data.prepare import DataValidationError, build_dataset
from vltune.data.registry import DatasetSpecError, read_dataset_use
from vltune.evaluation import Evaluator


def _qa(i, image=None, question="What colour?", answer="red", **extra):
    rec = {"id": f"s{i}", "conversations": [{"from": "human", "value": ("<image>\n" if image else "") + question}, {"from": "gpt", "value": answer}]}
    if image:
        rec["image"] = image
    return {**rec, **extra}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(model_dir, data, **extra):
    return load_recipe({"model_name_or_path": str(model_dir), "dataset_use": str(data), **extra})


# -- whole datasets: nothing left, a missing file, a percentage of a small one -----------------------


def test_nothing_left_after_validation_says_why_for_eval_and_training(tiny_qwen2_5_vl, tmp_path):
    long_eval = _jsonl(tmp_path / "eval.jsonl", [_qa(0, answer="word " * 300), _qa(1, answer="word " * 300)])
    cfg = _recipe(tiny_qwen2_5_vl, long_eval, model_max_length=64)
    with pytest.raises(DataValidationError) as err:  # was: an empty eval set, then eval_loss 0.0 as the best metric
        build_dataset(cfg, str(long_eval), key="eval_dataset")
    first = str(err.value).splitlines()[0]
    assert first.startswith(f"eval_dataset {long_eval}: no sample left of 2: 2 dropped as too_long")
    assert "raise model_max_length" in first

    bad_eval = _jsonl(tmp_path / "bad_eval.jsonl", [_qa(0, image="gone.png"), _qa(1)])
    with pytest.raises(DataValidationError, match=rf"^eval_dataset {bad_eval}: 1 bad sample\(s\); fix them"):
        build_dataset(_recipe(tiny_qwen2_5_vl, bad_eval), str(bad_eval), key="eval_dataset")

    bad_train = _jsonl(tmp_path / "train.jsonl", [_qa(0, image="gone.png"), _qa(1, image="gone.png")])
    cfg = _recipe(tiny_qwen2_5_vl, bad_train, skip_bad_samples=True)
    with pytest.raises(DataValidationError, match=r"dataset_use .*train.jsonl: no sample left of 2: 2 skipped for missing_file; fix the samples"):
        build_dataset(cfg, str(bad_train))
    with pytest.raises(ValueError, match="no samples to evaluate"):  # the evaluator refuses too, whoever builds it
        Evaluator(SFTDataset([], tiny_qwen2_5_vl, max_length=64), backend=None, collate=None, batch_size=1, max_new_tokens=1)


def test_missing_dataset_file_is_an_error_naming_it_even_with_skipping(tmp_path):
    good = _jsonl(tmp_path / "good.jsonl", [_qa(0)])
    with pytest.raises(DatasetSpecError, match=r"missing\.jsonl: annotation file does not exist; fix the path"):
        read_dataset_use(f"{good},{tmp_path / 'missing.jsonl'}")
    (tmp_path / "list.json").write_text('{"not": "a list"}')
    with pytest.raises(DatasetSpecError, match=r"list\.json: expected a JSON list"):
        read_dataset_use(f"{good},{tmp_path / 'list.json'}")


def test_percentage_that_rounds_to_zero_keeps_one_sample_and_says_so(tmp_path, capsys):
    small = _jsonl(tmp_path / "small.jsonl", [_qa(i) for i in range(5)])
    assert len(read_dataset_use(f"{small}%10").samples) == 1
    assert "10% of 5 sample(s) rounds down to 0; keeping 1" in capsys.readouterr().out
    hundred = _jsonl(tmp_path / "hundred.jsonl", [_qa(i) for i in range(100)])
    assert len(read_dataset_use(f"{hundred}%29").samples) == 29  # 100 * 0.29 is 28.999999999999996 in floats


# -- records and files ---------------------------------------------------------------------------------


def test_null_ids_are_no_ids_not_duplicates(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [_qa(0, id=None), _qa(1, id=None)])
    result = read_annotation(path)
    assert not result.problems
    assert [s.id for s in result.samples] == [f"{path}:1", f"{path}:2"]


def test_bom_and_content_decides_json_or_jsonl(tmp_path):
    rows = [_qa(0), _qa(1)]
    bom = codecs.BOM_UTF8
    (tmp_path / "bom.jsonl").write_bytes(bom + "".join(json.dumps(r) + "\n" for r in rows).encode())
    (tmp_path / "bom.json").write_bytes(bom + json.dumps(rows).encode())
    (tmp_path / "array.jsonl").write_text(json.dumps(rows, indent=2))  # a JSON list saved as .jsonl
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))  # JSONL saved as .json
    for name in ("bom.jsonl", "bom.json", "array.jsonl", "lines.json"):
        assert [s.id for s in load_samples(tmp_path / name)] == ["s0", "s1"], name
    # JSONL as .json still reports its bad lines one by one
    (tmp_path / "lines.json").write_text(json.dumps(rows[0]) + "\n{oops\n" + json.dumps(rows[1]) + "\n")
    result = read_annotation(tmp_path / "lines.json")
    assert [s.id for s in result.samples] == ["s0", "s1"] and [p.kind for p in result.problems] == ["malformed_json"]


def test_openai_image_url_parts_and_data_urls(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="PNG")
    data_url = "data:image/png;base64," + __import__("base64").b64encode(buf.getvalue()).decode()
    rec = {"id": "o", "messages": [
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "a.png"}},
            {"type": "image_url", "image_url": {"url": data_url}},
            {"type": "image_url", "image_url": "https://example.com/c.png"},
            {"type": "text", "text": "Which?"},
        ]},
        {"role": "assistant", "content": "b"},
    ]}
    sample = record_to_sample(rec, "f:1", tmp_path)
    assert sample.images == [tmp_path / "a.png", buf.getvalue(), "https://example.com/c.png"]
    assert sample.messages[0]["content"][:3] == [{"type": "image"}] * 3
    with pytest.raises(SampleError, match="video must be a file path, got a URL"):
        record_to_sample({**_qa(0), "video": "https://example.com/v.mp4",
                          "conversations": [{"from": "human", "value": "<video>x"}, {"from": "gpt", "value": "y"}]}, "f:2", tmp_path)


def test_record_level_system_is_the_system_prompt(tmp_path):
    sample = record_to_sample(_qa(0, system="Be brief."), "f:1", tmp_path)
    assert sample.messages[0] == {"role": "system", "content": "Be brief."} and len(sample.messages) == 3
    with_turn = {"id": "m", "system": "Be brief.", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    assert [m["role"] for m in record_to_sample(with_turn, "f:2", tmp_path).messages] == ["system", "user", "assistant"]
    with pytest.raises(SampleError, match="a 'system' key and a system turn in the conversation that differ") as err:
        record_to_sample({**with_turn, "system": "Be long."}, "f:3", tmp_path)
    assert err.value.kind == "invalid_turn"


# -- images: links and URLs ----------------------------------------------------------------------------


def test_symlink_loop_and_dangling_link_are_named(tmp_path):
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(vision.ImageLoadError, match="symlink loop") as err:
        vision.load_image(tmp_path / "a.png")
    assert err.value.kind == "missing_file"
    with pytest.raises(vision.ImageLoadError, match="dangling symlink .*nowhere.png"):
        vision.image_size(tmp_path / "dangling.png")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_http_images_are_fetched_and_failures_say_why(tmp_path, monkeypatch):
    Image.new("RGB", (30, 20), (5, 6, 7)).save(tmp_path / "i.png")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: _Quiet(*a, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    silent = socket.socket()  # listens but never answers: a fetch must time out, not hang
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    monkeypatch.setattr(vision, "URL_TIMEOUT_S", 0.3)
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        sample = record_to_sample(_qa(0, image=f"{base}/i.png"), "f:1", tmp_path / "elsewhere")
        assert sample.images == [f"{base}/i.png"]  # a URL is not joined onto the data path
        assert vision.load_image(sample.images[0]).size == (30, 20)
        assert vision.image_size(sample.images[0]) == (20, 30)
        with pytest.raises(vision.ImageLoadError, match=r"HTTP 404 .*download the file and give its path") as err:
            vision.load_image(f"{base}/gone.png")
        assert err.value.kind == "fetch_failed"
        with pytest.raises(vision.ImageLoadError, match="fetching it failed .*timed out"):
            vision.load_image(f"http://127.0.0.1:{silent.getsockname()[1]}/i.png")
    finally:
        server.shutdown()
        server.server_close()
        silent.close()


def test_a_body_cut_short_is_a_fetch_failure_not_a_traceback(monkeypatch):
    """http.client.HTTPException (IncompleteRead here) is no OSError: it must still become fetch_failed."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def truncated_chunked_body():
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n" + b"x" * 10)
        conn.close()

    threading.Thread(target=truncated_chunked_body, daemon=True).start()
    monkeypatch.setattr(vision, "URL_TIMEOUT_S", 5.0)
    try:
        with pytest.raises(vision.ImageLoadError, match=r"fetching it failed \(IncompleteRead.*download the file") as err:
            vision.load_image(f"http://127.0.0.1:{listener.getsockname()[1]}/i.png")
        assert err.value.kind == "fetch_failed"
    finally:
        listener.close()


class _Counting(_Quiet):
    requests: list[str] = []

    def do_GET(self):
        _Counting.requests.append(self.path)
        super().do_GET()


def test_a_url_is_fetched_once_then_read_from_the_cache(tmp_path):
    Image.new("RGB", (30, 20), (5, 6, 7)).save(tmp_path / "i.png")
    _Counting.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: _Counting(*a, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/i.png"
        assert vision.image_size(url) == (20, 30)  # the length check's header read
        assert vision.load_image(url).size == (30, 20)  # an epoch's read
        assert vision.load_image(url).size == (30, 20)  # the next epoch, an eval, a worker
        assert _Counting.requests == ["/i.png"]
        assert [p.name for p in vision.url_cache_dir().iterdir()] == [hashlib.sha256(url.encode()).hexdigest()]
    finally:
        server.shutdown()
        server.server_close()


def test_a_url_is_keyed_by_itself_for_token_counts(monkeypatch):
    stats = []
    monkeypatch.setattr(pack_annotation.os, "stat", lambda p, *a, **k: stats.append(p) or (_ for _ in ()).throw(OSError()))
    a = pack_annotation._record_key({"id": 1}, ["http://h/a.png"])
    assert a != pack_annotation._record_key({"id": 1}, ["http://h/b.png"]) and stats == []


def test_a_json_file_of_lines_reports_per_line_even_when_the_first_is_bad(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('  {"id": "s0", broken\n' + json.dumps(_qa(1)) + "\n" + json.dumps(_qa(2)) + "\n")
    records = read_records(path)
    assert [where for where, _, _ in records.items] == [f"{path}:2", f"{path}:3"]
    assert len(records.problems) == 1 and str(records.problems[0]).startswith(f"{path}:1: malformed JSON")


def test_chars_per_token_comes_from_the_loaded_tokenizer(tiny_qwen2_5_vl, tmp_path):
    """Not from tokenizer.json read again: a tokenizer set on the ChatTokenizer (or a file since gone) decides."""
    chat = ChatTokenizer(tiny_qwen2_5_vl)
    expected = chat.max_chars_per_token
    fresh = ChatTokenizer(tiny_qwen2_5_vl)
    fresh.model_dir = tmp_path  # holds no tokenizer.json
    assert fresh.max_chars_per_token == expected


# -- lengths: a huge record is refused before tokenisation ---------------------------------------------


class _SpyTokenizer:
    """Delegates to a `tokenizers.Tokenizer`, recording the length of every text it encodes."""

    def __init__(self, inner):
        self.inner, self.encoded = inner, []

    def encode(self, text, *args, **kwargs):
        self.encoded.append(len(text))
        return self.inner.encode(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_huge_record_is_dropped_without_tokenising_it(tiny_qwen2_5_vl, tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [_qa(0, question="x" * 2_000_000), _qa(1), _qa(2, answer="word " * 300)])
    dataset = SFTDataset(load_samples(path), tiny_qwen2_5_vl, max_length=64, truncation="delete")
    spy = dataset.tokenizer.tokenizer = _SpyTokenizer(dataset.tokenizer.tokenizer)
    with pytest.raises(SampleError, match=r"id s0\): 2000\d+ characters, more than model_max_length 64 tokens can hold") as err:
        dataset.check(0)
    assert err.value.kind == "too_long" and spy.encoded == []
    assert "characters); shorten the sample, raise model_max_length" in str(err.value)  # TextTooLong's own words, then the fix
    assert dataset.check(1)[0] < 64 and spy.encoded  # a short one is tokenised as before

    right = SFTDataset(dataset.samples, tiny_qwen2_5_vl, max_length=64, truncation="right")
    assert right.check(2) == (64, True)  # `right` keeps the head of a long sample: never refused early


def test_chars_per_token_bound_is_never_beaten(tiny_qwen2_5_vl):
    """len(text) <= bound * tokens for the worst texts: the longest vocabulary entry repeated, composable
    Unicode that NFC shrinks, and special tokens; and no character decomposes into more than the factor."""
    chat = ChatTokenizer(tiny_qwen2_5_vl)
    bound = chat.max_chars_per_token
    assert bound is not None
    vocab = chat.tokenizer.get_vocab()
    longest = max(vocab, key=len)
    worst = chat.tokenizer.decode([vocab[longest]]) * 50
    composed = "\u03b1\u0313\u0300\u0345" * 200 + "\u1100\u1161\u11a8" * 200  # -> U+1F82 and a Hangul syllable
    for text in (worst, composed, "<|im_start|><|vision_start|>" * 20, "e\u0301 " * 300):
        assert len(text) <= bound * len(chat.tokenizer.encode(text, add_special_tokens=False).ids)
    most = max(len(unicodedata.normalize("NFD", chr(c))) for c in range(sys.maxunicode + 1))
    assert most <= _COMPOSING_NORMALIZERS["NFC"]


# -- a late failure while training ---------------------------------------------------------------------


def test_decode_failure_while_training_names_data_check_and_skipping(tiny_qwen2_5_vl, tmp_path):
    Image.effect_noise((64, 64), 50).convert("RGB").save(tmp_path / "i.jpg")
    whole = (tmp_path / "i.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) // 2])  # the header reads, the body does not
    path = _jsonl(tmp_path / "d.jsonl", [_qa(0, image="cut.jpg")])
    dataset = SFTDataset(load_samples(path), tiny_qwen2_5_vl, max_length=256)
    assert dataset.check(0)[0] > 0  # training's pre-flight reads headers only: it passes
    batches = BatchIterator(dataset, 1, collate=lambda features: features, seed=0)
    with pytest.raises(SampleError, match=r"cut\.jpg.*`vltune data check RECIPE`.*skip_bad_samples: true"):
        next(batches)
