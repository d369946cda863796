"""`vltune train` itself, timed on a GPU: the 3B recipe's layout on real JPEG files, with each data loader.

`vltune bench` times prebuilt batches, so it leaves out what a training run also does between two GPU
steps: read and decode the images, resize and normalise them, tokenise, pack and copy to the GPU. This
tool measures that with the trainer as users run it (training.train on recipes/qwen2_5_vl_3b_full_1gpu.yaml),
so the data loaders (dataloader_prefetch, dataloader_num_workers) can be compared on the same machine.

    python tools/gpu/train_speed.py assets --dir /tmp/ts            # the model and the data, once
    python tools/gpu/train_speed.py run --dir /tmp/ts --name thread dataloader_prefetch=2

`assets` writes a random-init model of a released shape (`--shape`, core/flops.py SHAPES; the
Qwen2.5-VL-3B by default; `--tiny`: the tiny model, for CPU dry runs of tools/peers/), with the
tiny model's tokenizer (its token ids go into the config), and a JSONL set of the bench's mixed workload
(data/synthetic_workload.py's sizes: texts of 64-1024 tokens, 80% of the samples with one 448-1280 px
JPEG). `run` trains with the recipe (`--recipe`, the 3B one by default) plus the given keys, then writes $OUT/train_speed_NAME.json: the
tokens/s, MFU and data wait of the logged windows after the warm-up steps (compilation), and the peak
memory. `run --prebuilt` makes every micro-batch of the run before step 1 and serves them from memory:
the trainer without any data work, the ceiling that a data loader can reach (and `vltune bench`'s setting).
The final model is not written (15 GB of fp32 masters would dominate the run); nothing else is changed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

SHAPE = "qwen2_5_vl-3b"
RECIPE = "qwen2_5_vl_3b_full_1gpu"


def _model(out: Path, seed: int, shape: str, tiny_only: bool = False, device: str = "cuda") -> None:
    """A random-init model of `shape` with the tiny model's tokenizer; `tiny_only` keeps the tiny model
    itself (a CPU dry run of the tools that read this directory, tools/peers/). `device`: where the weights
    are made (cpu for a model whose bf16 weights do not fit one GPU, e.g. a 35B MoE on an 80 GB card)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vltune.backends.torch.bench import hf_config
    from vltune.backends.torch.tiny import make_tiny
    from vltune.core.flops import SHAPES

    tiny = out.parent / "tiny"
    make_tiny(SHAPES[shape].model_type, tiny, seed=seed)
    if tiny_only:
        shutil.copytree(tiny, out, dirs_exist_ok=True)
        return
    shutil.copytree(tiny, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    ids = json.loads((tiny / "config.json").read_text())
    config = hf_config(SHAPES[shape])
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        config[key] = ids[key]
    text_ids = ids.get("text_config", ids)
    config["text_config"].update({k: text_ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in text_ids})
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(**config), dtype=torch.bfloat16)
    model.save_pretrained(out)


def _image(job: tuple[int, int, int, str]) -> None:
    """A smooth random JPEG (8-px blocks, blurred by the codec): decodes like a photo, unlike pure noise."""
    from PIL import Image

    seed, h, w, path = job
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    Image.fromarray(np.kron(blocks, np.ones((8, 8, 1), np.uint8))[:h, :w]).save(path, quality=90)


def _data(out: Path, model_dir: Path, n: int, seed: int) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    # Tokens that decode to printable text of their own (no partial UTF-8, no tag brackets), so that the
    # decoded text tokenises back to about as many tokens.
    words = [i for i in tokenizer.get_vocab().values()
             if (s := tokenizer.decode([i])).isprintable() and s.strip() and not set(s) & {"\ufffd", "<", ">"}]
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    jobs, records = [], []
    for k in range(n):
        n_text = int(np.clip(rng.lognormal(np.log(256), 0.7), 64, 1024))
        text = tokenizer.decode(rng.choice(words, size=n_text).tolist())
        cut = int(len(text) * 0.7)
        prompt, answer = text[:cut], text[cut:]
        record = {"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]}
        if rng.random() < 0.8:
            h, w = (int(x) for x in rng.integers(448, 1281, size=2))
            jobs.append((seed * 100003 + k, h, w, str(out / f"{k}.jpg")))
            record = {"image": f"{k}.jpg", "conversations": [{"from": "human", "value": "<image>\n" + prompt},
                                                               {"from": "gpt", "value": answer}]}
        records.append(record)
    with Pool(os.cpu_count()) as pool:
        pool.map(_image, jobs)
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _summary(out_dir: Path, name: str, warmup_steps: int, keys: dict, seconds: float, shape: str, recipe: str) -> dict:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r]
    timed = [r for r in rows if r["step"] > warmup_steps]
    return {
        "name": name, "model": shape, "recipe": recipe, "keys": keys,
        "tokens_per_s": round(float(np.mean([r["tokens_per_s"] for r in timed])), 1),
        "mfu": round(float(np.mean([r["mfu"] for r in timed])), 4) if all("mfu" in r for r in timed) else None,
        "data_wait_s_per_step": round(sum(r["data_wait_s"] for r in timed) / (rows[-1]["step"] - warmup_steps), 4),
        "peak_mem_gib": max(r.get("peak_mem_gib", 0) for r in rows),
        "windows": [{k: r[k] for k in ("step", "loss", "tokens_per_s", "mfu", "data_wait_s") if k in r} for r in rows],
        "timed_after_step": warmup_steps, "wall_s": round(seconds, 1),
    }


def _shape_name(model_dir: Path) -> str:
    """The released shape (core/flops.py SHAPES) that the model's config.json has, else its family's name."""
    from vltune.core.flops import SHAPES, shape_from_config

    shape = shape_from_config(json.loads((model_dir / "config.json").read_text()))
    return next((name for name, ref in SHAPES.items() if dataclasses.replace(ref, name=shape.name) == shape), shape.name)


def _prebuild(micro_batches: int) -> None:
    """Make training.py's batch iterator draw `micro_batches` batches when built and serve them from memory."""
    import vltune.training
    from vltune.data.loader import BatchIterator

    class Prebuilt(BatchIterator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.made = [super(Prebuilt, self).__next__() for _ in range(micro_batches)]
            self.served = 0

        def __next__(self):
            self.served += 1
            return self.made[(self.served - 1) % len(self.made)]

    vltune.training.BatchIterator = Prebuilt


def _run(args: argparse.Namespace) -> None:
    from vltune.backends.torch.engine import Engine as TorchBackend
    from vltune.core.recipe import load_recipe
    from vltune.training import train

    TorchBackend.save_model = lambda self, out_dir: print("[train_speed] final model not written")
    keys = dict(kv.split("=", 1) for kv in args.keys)
    out_dir = Path(args.dir) / "runs" / args.name
    shutil.rmtree(out_dir, ignore_errors=True)
    overrides = {
        "model_name_or_path": str(Path(args.dir) / "model"), "dataset_use": str(Path(args.dir) / "data" / "train.jsonl"),
        "max_pixels": 1280 * 28 * 28, "max_steps": args.steps, "logging_steps": args.log_every, "save_steps": 0,
        "output_dir": str(out_dir), "warmup_ratio": 0.0, **keys,
    }
    if args.prebuilt:
        _prebuild(args.steps * load_recipe(args.recipe, overrides).train.gradient_accumulation_steps)
    start = time.perf_counter()
    train(args.recipe, overrides, show_progress=False)
    recipe = json.loads((out_dir / "recipe.json").read_text())  # the effective settings, recipe and overrides
    loader = {k: recipe[k] for k in ("dataloader_prefetch", "dataloader_num_workers")}
    shape = _shape_name(Path(args.dir) / "model")
    summary = {**_summary(out_dir, args.name, args.warmup_steps, keys, time.perf_counter() - start, shape, args.recipe),
               "prebuilt": args.prebuilt, "loader": loader, "overrides": overrides}
    print(json.dumps({k: v for k, v in summary.items() if k != "windows"}), flush=True)
    target = Path(os.environ.get("OUT", "/tmp")) / f"train_speed_{args.name}.json"
    target.write_text(json.dumps(summary, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    assets = sub.add_parser("assets")
    assets.add_argument("--dir", required=True)
    assets.add_argument("--samples", type=int, default=400)
    assets.add_argument("--seed", type=int, default=0)
    assets.add_argument("--shape", default=SHAPE, help="a released shape of core/flops.py SHAPES")
    assets.add_argument("--tiny", action="store_true", help="the tiny model instead (a CPU dry run)")
    assets.add_argument("--device", default="cuda", help="where the random weights are made (cuda, cpu)")
    run = sub.add_parser("run")
    run.add_argument("--dir", required=True)
    run.add_argument("--name", required=True)
    run.add_argument("--steps", type=int, default=20)
    run.add_argument("--log-every", type=int, default=4)
    run.add_argument("--warmup-steps", type=int, default=8, help="steps left out of the averages (compilation)")
    run.add_argument("--recipe", default=RECIPE, help="the recipe the keys override (recipes/NAME.yaml)")
    run.add_argument("--prebuilt", action="store_true", help="every micro-batch made before step 1 (no data work while timed)")
    run.add_argument("keys", nargs="*", help="recipe keys, KEY=VALUE")
    args = parser.parse_args()
    if args.command == "assets":
        root = Path(args.dir)
        _model(root / "model", args.seed, args.shape, args.tiny, args.device)
        _data(root / "data", root / "model", args.samples, args.seed)
    else:
        _run(args)


if __name__ == "__main__":
    main()
