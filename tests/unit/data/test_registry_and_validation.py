"""dataset_use resolution, every record format, the validation pass, length control and `vltune data check`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vltune.core.recipe import load_recipe
from vltune.data.chat import ChatTokenizer
from vltune.data.dataset import SFTDataset
from vltune.data.formats import SampleError, load_samples, read_annotation, record_to_sample
from vltune.data.prepare import DataValidationError, build_dataset
from vltune.data.registry import DatasetSpecError, load_registry, parse_entry, read_dataset_use, split_entries
from vltune.data.validate import check_dataset


def _qa(i, image=None, question="What colour?", answer="red"):
    rec = {"id": f"s{i}", "conversations": [{"from": "human", "value": ("<image>\n" if image else "") + question}, {"from": "gpt", "value": answer}]}
    if image:
        rec["image"] = image
    return rec


@pytest.fixture()
def corpus(tmp_path):
    """A folder with two images and a JSONL of 10 samples."""
    for name, size in (("a.png", (64, 48)), ("b.jpg", (40, 90))):
        Image.new("RGB", size, (200, 30, 30)).save(tmp_path / name)
    rows = [_qa(i, image="a.png" if i % 2 else None) for i in range(10)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


# -- dataset_use syntax -------------------------------------------------------------------------


def test_entries_split_on_commas_outside_brackets():
    assert split_entries("a%50, dir[train:10,test:5],b") == ["a%50", "dir[train:10,test:5]", "b"]
    use = parse_entry("dir[train:10,test]%25")
    assert (use.name, use.rate, use.slices) == ("dir", 0.25, (("train", 10), ("test", None)))
    for bad in ("a%0", "a%150", "d[train:x]"):
        with pytest.raises(DatasetSpecError):
            parse_entry(bad)


def test_registry_names_paths_and_seeded_sampling(corpus, tmp_path_factory):
    reg_dir = tmp_path_factory.mktemp("reg")
    (reg_dir / "registry.yaml").write_text(f"mine:\n  annotation_path: {corpus / 'train.jsonl'}\n  data_path: {corpus}\n")
    registry = load_registry({"inline": {"annotation_path": str(corpus / "train.jsonl")}}, str(reg_dir / "registry.yaml"))
    assert registry["mine"]["data_path"] == str(corpus)
    assert registry["inline"]["data_path"] == str(corpus)  # defaults to the annotation's folder

    half = read_dataset_use("mine%50", registry, seed=3)
    assert len(half.samples) == 5 and not half.problems
    assert [s.id for s in read_dataset_use("mine%50", registry, seed=3).samples] == [s.id for s in half.samples]
    assert [s.id for s in read_dataset_use("mine%50", registry, seed=4).samples] != [s.id for s in half.samples]
    mixed = read_dataset_use(f"mine%50,{corpus / 'train.jsonl'}", registry, seed=3)
    assert len(mixed.samples) == 15
    with pytest.raises(DatasetSpecError, match="not a registered name .*registered: inline, mine"):
        read_dataset_use("nope", registry)
    with pytest.raises(DatasetSpecError, match="unknown key"):
        load_registry({"x": {"annotation_path": "a.json", "datapath": "b"}}, None)


def test_hf_datasets_directory_with_split_slices(tmp_path, corpus):
    datasets = pytest.importorskip("datasets")
    png = (corpus / "a.png").read_bytes()
    rows = [{"id": f"h{i}", "messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}],
             "images": [{"bytes": png, "path": None}]} for i in range(6)]
    features = datasets.Features({
        "id": datasets.Value("string"),
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
        "images": datasets.List(datasets.Image()),
    })
    table = datasets.Dataset.from_list(rows, features=features)
    datasets.DatasetDict({"train": table, "test": table.select(range(3))}).save_to_disk(str(tmp_path / "hf"))

    result = read_dataset_use(f"{tmp_path / 'hf'}[train:4,test:2]")
    assert [s.id for s in result.samples] == ["h0", "h1", "h2", "h3"]  # test rows repeat ids: duplicates are problems
    assert [p.kind for p in result.problems] == ["duplicated_id", "duplicated_id"]
    assert isinstance(result.samples[0].images[0], bytes)
    with pytest.raises(DatasetSpecError, match="no split 'dev'"):
        read_dataset_use(f"{tmp_path / 'hf'}[dev]")


# -- record formats -----------------------------------------------------------------------------


def test_openai_parts_with_inline_media_and_videos(tmp_path):
    rec = {"id": "o", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": "file://a.png"}, {"type": "video", "video": "v.mp4"}, {"type": "text", "text": "What happens?"}]},
        {"role": "assistant", "content": "<think>\nLook first.\n</think>\n\nA ball rolls."},
    ]}
    sample = record_to_sample(rec, "f:1", tmp_path)
    assert sample.images == [tmp_path / "a.png"] and sample.videos == [tmp_path / "v.mp4"]
    assert sample.messages[1]["content"][:2] == [{"type": "image"}, {"type": "video"}]
    llava_video = {"id": "v", "video": "v.mp4", "conversations": [{"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "x"}]}
    assert record_to_sample(llava_video, "f:2", tmp_path).videos == [tmp_path / "v.mp4"]
    with pytest.raises(SampleError, match=r"0 <video> tag\(s\) but 1 video") as err:
        record_to_sample({**llava_video, "conversations": [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "x"}]}, "f:3", tmp_path)
    assert err.value.kind == "tag_count_mismatch"
    with pytest.raises(SampleError, match="both in the record"):
        record_to_sample({**rec, "image": "b.png"}, "f:4", tmp_path)


def test_packed_files_keep_their_packs(tmp_path):
    path = tmp_path / "packed.json"
    path.write_text(json.dumps([[_qa(0), _qa(1)], [_qa(2)]]))
    samples = load_samples(path)
    assert [(s.id, s.pack) for s in samples] == [("s0", 0), ("s1", 0), ("s2", 1)]
    assert samples[1].source.endswith("packed.json:[0][1]")


def test_problem_kinds_are_counted_not_fatal(tmp_path):
    rows = [_qa(0), {"id": "u", "conversations": [{"from": "human", "value": "q"}]}, {"id": "r", "messages": [{"role": "bot", "content": "x"}]},
            {"id": "e", "conversations": []}, {"id": "k"}, _qa(0)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    result = read_annotation(path)
    assert [s.id for s in result.samples] == ["s0"]
    assert sorted(p.kind for p in result.problems) == sorted(
        ["ends_on_user", "unknown_role", "empty_conversation", "missing_key", "duplicated_id", "malformed_json"]
    )


# -- labels: thinking answers -------------------------------------------------------------------


def test_thinking_answers_train_their_reasoning_and_empty_think_blocks_are_masked(tiny_qwen2_5_vl, tmp_path):
    chat = ChatTokenizer(tiny_qwen2_5_vl)
    answer = "<think>\nIt is red.\n</think>\n\nred"
    messages = [{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": answer}]
    ids, labels = chat.encode_chat(messages, [])
    assert chat.decode(ids[labels != -100], skip_special_tokens=False) == answer + "<|im_end|>\n"

    # A template that gives answers without reasoning an empty think block (as Qwen3's thinking
    # templates do): the block is rendered but not trained.
    model_dir = tmp_path / "think"
    model_dir.mkdir()
    for f in tiny_qwen2_5_vl.iterdir():
        if f.is_file() and f.name != "chat_template.jinja" and f.suffix == ".json":
            (model_dir / f.name).write_bytes(f.read_bytes())
    (model_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and '<think>' not in m.content %}"
        "<think>\n\n</think>\n\n{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    think = ChatTokenizer(model_dir)
    plain = [{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "red"}]
    ids, labels = think.encode_chat(plain, [])
    assert "<think>\n\n</think>" in think.decode(ids, skip_special_tokens=False)
    assert think.decode(ids[labels != -100], skip_special_tokens=False) == "red<|im_end|>\n"
    ids, labels = think.encode_chat(messages, [])
    assert think.decode(ids[labels != -100], skip_special_tokens=False) == answer + "<|im_end|>\n"


# -- validation and length control --------------------------------------------------------------


def _recipe(model_dir, data, **extra):
    return load_recipe({"model_name_or_path": str(model_dir), "dataset_use": str(data), **extra})


def test_bad_media_are_reported_per_class(tiny_qwen2_5_vl, tmp_path):
    (tmp_path / "ok.png").write_bytes(b"")  # zero bytes
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.new("RGB", (6000, 6000), (1, 2, 3)).save(tmp_path / "huge.png")
    rows = [_qa(0, image="missing.png"), _qa(1, image="ok.png"), _qa(2, image="corrupt.jpg"), _qa(3, image="huge.png"), _qa(4)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _recipe(tiny_qwen2_5_vl, tmp_path / "d.jsonl", model_max_length=4096, max_pixels=200704)
    with pytest.raises(DataValidationError, match="3 bad sample") as err:
        build_dataset(cfg, cfg.data.dataset_use, decode=True)
    text = str(err.value)
    for kind, sample in (("missing_file", "s0"), ("empty_file", "s1"), ("corrupt_media", "s2")):
        assert f"errors / {kind}: 1" in text and f"id {sample}" in text

    dataset, report = build_dataset(_recipe(tiny_qwen2_5_vl, tmp_path / "d.jsonl", model_max_length=4096, max_pixels=200704, skip_bad_samples=True), cfg.data.dataset_use, decode=True)
    assert [s.id for s in dataset.samples] == ["s3", "s4"] and report.n_errors == 3
    big = dataset[0]  # 6000x6000 resized under max_pixels
    assert int(big.image_grid_thw.prod()) * 14 * 14 <= 200704


def test_truncation_strategies(tiny_qwen2_5_vl, tmp_path):
    Image.new("RGB", (112, 112), (9, 9, 9)).save(tmp_path / "i.png")
    long_answer = " ".join(["word"] * 200)
    rows = [_qa(0, image="i.png", answer=long_answer), _qa(1, answer="short"), _qa(2, image="i.png", question="x " * 300)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "d.jsonl"

    dataset, report = build_dataset(_recipe(tiny_qwen2_5_vl, path, model_max_length=120), str(path))
    assert [s.id for s in dataset.samples] == ["s1"] and report.n_dropped == 2 and report.n_errors == 0

    with pytest.raises(DataValidationError, match="too_long"):
        build_dataset(_recipe(tiny_qwen2_5_vl, path, model_max_length=120, truncation_strategy="error"), str(path))

    dataset, report = build_dataset(_recipe(tiny_qwen2_5_vl, path, model_max_length=120, truncation_strategy="right"), str(path))
    assert [s.id for s in dataset.samples] == ["s0", "s1"] and report.truncated == 1
    cut = dataset[0]
    assert len(cut.input_ids) == 120 and (cut.labels != -100).any()
    full_ids, _ = dataset.tokens(0)
    assert np.array_equal(cut.input_ids, full_ids[:120])
    # s2's prompt runs past the limit: cutting would leave no answer, so it is dropped, counted
    assert any("no answer token" in m for m in report.dropped["too_long"])


def test_cut_never_splits_a_vision_span(tiny_qwen2_5_vl, tmp_path):
    Image.new("RGB", (224, 224), (9, 9, 9)).save(tmp_path / "i.png")
    (tmp_path / "d.jsonl").write_text(json.dumps(_qa(0, image="i.png")) + "\n")
    samples = load_samples(tmp_path / "d.jsonl")
    dataset = SFTDataset(samples, tiny_qwen2_5_vl, max_length=40, truncation="right")
    with pytest.raises(SampleError, match="split an image/video span"):
        dataset[0]


def test_header_measure_equals_decoded_length(tiny_qwen2_5_vl, vqa_data):
    dataset = SFTDataset(load_samples(vqa_data["train_file"])[:6], tiny_qwen2_5_vl, max_length=4096)
    report, keep = check_dataset(dataset)
    assert keep == list(range(6))
    assert report.lengths == [len(dataset[i].input_ids) for i in range(6)]


def test_data_check_cli(tiny_qwen2_5_vl, tmp_path, capsys):
    from vltune.cli import main

    Image.new("RGB", (56, 56)).save(tmp_path / "a.png")
    rows = [_qa(0, image="a.png"), _qa(1, image="gone.png"), _qa(2)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model_name_or_path: {tiny_qwen2_5_vl}\ndataset_use: {tmp_path / 'd.jsonl'}\n")
    assert main(["data", "check", str(recipe)]) == 1
    out = capsys.readouterr().out
    assert "errors / missing_file: 1" in out and "id s1" in out
    assert "errors / malformed_json: 1" in out and "d.jsonl:4" in out
    assert "tokens per sample" in out and "images per sample: 0: 1, 1: 1" in out
    assert json.loads(out.strip().splitlines()[-1]) == {"errors": 2}
    (tmp_path / "d.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert main(["data", "check", str(recipe)]) == 0


def test_short_and_corrupt_videos_are_reported(tiny_qwen2_5_vl, tmp_path):
    av = pytest.importorskip("av")
    with av.open(str(tmp_path / "short.mp4"), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(2):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")))
        container.mux(stream.encode())
    (tmp_path / "junk.mp4").write_bytes(b"\x00\x01 not a video" * 10)
    video = lambda i, name: {"id": f"v{i}", "video": name, "conversations": [{"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "x"}]}  # noqa: E731
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (video(0, "short.mp4"), video(1, "junk.mp4"), _qa(2))))
    cfg = _recipe(tiny_qwen2_5_vl, tmp_path / "d.jsonl", video_min_frames=4, skip_bad_samples=True)
    dataset, report = build_dataset(cfg, cfg.data.dataset_use)
    assert [s.id for s in dataset.samples] == ["s2"]
    assert dict(report.summary()["errors_by_kind"]) == {"video_too_short": 1, "corrupt_media": 1}


def test_parquet_folder_reads_as_hf_dataset(tmp_path, corpus):
    datasets = pytest.importorskip("datasets")
    rows = [{"id": f"p{i}", "conversations": [{"from": "human", "value": "<image>Q"}, {"from": "gpt", "value": "A"}], "image": "a.png"} for i in range(5)]
    (tmp_path / "pq").mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "pq" / "train-00000-of-00001.parquet"))
    (tmp_path / "pq" / "a.png").write_bytes((corpus / "a.png").read_bytes())
    result = read_dataset_use(f"{tmp_path / 'pq'}[train:3]")
    assert [s.id for s in result.samples] == ["p0", "p1", "p2"] and not result.problems
    assert result.samples[0].images == [tmp_path / "pq" / "a.png"]
