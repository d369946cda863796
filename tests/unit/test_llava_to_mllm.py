"""tools/llava_to_mllm.py: LLaVA-Instruct records with COCO names -> vltune annotations, left-outs reported."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from vltune.data.formats import load_samples

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("llava_to_mllm", ROOT / "tools" / "llava_to_mllm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def _turns(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture
def llava(tmp_path) -> tuple[Path, Path]:
    """A COCO-like folder with two images and a 150K-style file (repeated ids, a missing image, a bad record)."""
    coco = tmp_path / "coco" / "train2017"
    coco.mkdir(parents=True)
    for name, colour in (("000000000009.jpg", "red"), ("000000000025.jpg", "blue")):
        Image.new("RGB", (32, 24), colour).save(coco / name)
    records = [
        {"id": "000000000009", "image": "000000000009.jpg", "conversations": _turns("<image>\nWhat colour?", "Red.")},
        {"id": "000000000009", "image": "000000000009.jpg", "conversations": _turns("Describe it.\n<image>", "A red square.")},
        {"id": "000000000025", "image": "000000000025.jpg",
         "conversations": _turns("<image>\nWhat is it?", "Blue.") + _turns("Sure?", "Yes.")},
        {"id": "000000000030", "image": "000000000030.jpg", "conversations": _turns("<image>\nAnd this?", "Grey.")},
        {"id": "000000000042", "image": "000000000025.jpg", "conversations": _turns("No tag here.", "Blue.")},
        {"id": "text-only", "conversations": _turns("Say hi.", "Hi.")},
    ]
    src = tmp_path / "llava_instruct_150k.json"
    src.write_text(json.dumps(records))
    return src, coco


def test_converts_reports_and_registers(tool, llava, tmp_path, capsys):
    src, coco = llava
    out, registry, problems = tmp_path / "out" / "llava.jsonl", tmp_path / "datasets.json", tmp_path / "problems.jsonl"
    registry.write_text(json.dumps({"other": {"annotation_path": "x.jsonl"}}))

    rc = tool.main(["--input", str(src), "--image-dir", str(coco), "--out", str(out), "--name", "llava_instruct",
                    "--registry", str(registry), "--report", str(problems)])
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])

    assert rc == 0
    assert summary == {"name": "llava_instruct", "annotation_path": str(out.resolve()), "data_path": str(coco.resolve()),
                       "written": 4, "missing_images": 1, "invalid": 1, "renamed_ids": 1}
    assert "000000000030" in captured.err and "image not found" in captured.err
    assert "000000000042" in captured.err and "tag" in captured.err
    reported = [json.loads(line) for line in problems.read_text().splitlines()]
    assert [(r["id"], r["image"]) for r in reported] == [("000000000030", ["000000000030.jpg"]),
                                                           ("000000000042", ["000000000025.jpg"])]
    assert json.loads(registry.read_text()) == {
        "other": {"annotation_path": "x.jsonl"},
        "llava_instruct": {"annotation_path": str(out.resolve()), "data_path": str(coco.resolve())},
    }
    # vltune's own reader takes the file with the data path: ids unique, images resolved under the COCO folder.
    samples = load_samples(out, coco)
    assert [s.id for s in samples] == ["000000000009", "000000000009-1", "000000000025", "text-only"]
    assert [[Path(p).name for p in s.images] for s in samples] == [
        ["000000000009.jpg"], ["000000000009.jpg"], ["000000000025.jpg"], []]
    assert all(Path(p).is_file() for s in samples for p in s.images)
    assert samples[2].messages[-1] == {"role": "assistant", "content": "Yes."}


def test_strict_fails_on_left_out_records(tool, llava, tmp_path, capsys):
    src, coco = llava
    assert tool.main(["--input", str(src), "--image-dir", str(coco), "--out", str(tmp_path / "a.jsonl"), "--strict"]) == 1
    assert "missing_images" in capsys.readouterr().out


def test_wrong_image_dir_is_explained(tool, llava, tmp_path, capsys):
    src, coco = llava
    rc = tool.main(["--input", str(src), "--image-dir", str(coco.parent), "--out", str(tmp_path / "a.jsonl")])
    captured = capsys.readouterr()
    assert rc == 0 and "point --image-dir at the train2017 folder" in captured.err
    assert json.loads(captured.out.splitlines()[-1])["missing_images"] == 4  # only the text-only record is left


def test_nothing_convertible_writes_nothing(tool, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "1", "image": "gone.jpg", "conversations": _turns("<image>", "x")}) + "\n")
    rc = tool.main(["--input", str(src), "--image-dir", str(tmp_path), "--out", str(tmp_path / "a.jsonl")])
    assert rc == 1 and "nothing written" in capsys.readouterr().err
    assert not (tmp_path / "a.jsonl").exists()


def test_unique_ids_never_collide(tool):
    seen = Counter()
    assert [tool._unique_id(i, seen) for i in ("a", "a", "a-1", "a", "b")] == ["a", "a-1", "a-1-1", "a-2", "b"]
