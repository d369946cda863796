"""Shared fixtures: the tiny model directories and a small synthetic VQA set, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    from vltune.backends.torch.tiny import make_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {mt: make_tiny(mt, root / mt, seed=0) for mt in ("qwen2_5_vl", "qwen3_vl")}


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl(tiny_model_dirs) -> Path:
    return tiny_model_dirs["qwen2_5_vl"]


@pytest.fixture(scope="session")
def vqa_data(tmp_path_factory) -> dict:
    from vltune.data.synthetic import SyntheticVQAConfig, generate_vqa_dataset

    out = tmp_path_factory.mktemp("vqa")
    return generate_vqa_dataset(out, SyntheticVQAConfig(num_train=48, num_eval=16, tasks=("color", "shape"), seed=1))


@pytest.fixture(scope="session")
def tiny_qwen2_vl(tmp_path_factory) -> Path:
    """Qwen2-VL (plain ViT): kept out of `tiny_model_dirs` so tests opt into the third family."""
    from vltune.backends.torch.tiny import make_tiny

    return make_tiny("qwen2_vl", tmp_path_factory.mktemp("tiny") / "qwen2_vl", seed=0)


@pytest.fixture(scope="session")
def mixed_jsonl(tmp_path_factory, vqa_data):
    """Factory: a JSONL of `n` VQA image samples (absolute image paths) interleaved with `n` text-only
    ones, so that data-parallel ranks meet micro-steps without any image."""
    import json

    def write(n: int) -> Path:
        root = tmp_path_factory.mktemp("mixed")
        data_dir = Path(vqa_data["data_path"])
        rows = []
        for i, line in enumerate(Path(vqa_data["train_file"]).read_text().splitlines()[:n]):
            sample = json.loads(line)
            sample["image"] = str(data_dir / sample["image"])
            rows.append(sample)
            question, answer = [("What is two plus two?", "four"), ("Name a primary color.", "red"), ("Say hello.", "hello")][i % 3]
            rows.append({"id": f"text_{i:03d}", "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]})
        (root / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return root / "mixed.jsonl"

    return write
