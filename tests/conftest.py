"""Shared fixtures: the tiny model directories and a small synthetic VQA set, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


class TinyModels:
    """Tiny model directories of any registered family, each built once per session on first use."""

    def __init__(self, root: Path):
        self.root, self.dirs = root, {}

    def __getitem__(self, model_type: str) -> Path:
        if model_type not in self.dirs:
            from vltune.backends.torch.tiny import make_tiny

            self.dirs[model_type] = make_tiny(model_type, self.root / model_type, seed=0)
        return self.dirs[model_type]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    return TinyModels(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_model_dirs(tiny_models) -> dict[str, Path]:
    return {mt: tiny_models[mt] for mt in ("qwen2_5_vl", "qwen3_vl")}


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl(tiny_model_dirs) -> Path:
    return tiny_model_dirs["qwen2_5_vl"]


@pytest.fixture(scope="session")
def vqa_data(tmp_path_factory) -> dict:
    from vltune.data.synthetic import SyntheticVQAConfig, generate_vqa_dataset

    out = tmp_path_factory.mktemp("vqa")
    return generate_vqa_dataset(out, SyntheticVQAConfig(num_train=48, num_eval=16, tasks=("color", "shape"), seed=1))


@pytest.fixture(scope="session")
def tiny_qwen2_vl(tiny_models) -> Path:
    """Qwen2-VL (plain ViT): kept out of `tiny_model_dirs` so tests opt into the third family."""
    return tiny_models["qwen2_vl"]


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
