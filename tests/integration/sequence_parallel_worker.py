"""torchrun worker of test_sequence_parallel.py: one packed row (images, a video, text) through one
training micro-step of each family's tiny model, `sequence_parallel_size` = the world size, DDP; rank 0
saves the row's loss and every gradient for the test to compare with one process on the whole row.

    torchrun --nproc_per_node 2 sequence_parallel_worker.py OUT_DIR RECIPE_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from vltune.backends.torch.distributed import init_distributed
from vltune.backends.torch.models import part
from vltune.backends.torch.parallel import build_backend
from vltune.core.recipe import load_recipe
from vltune.data.model_info import read_model_info


def packed_row(cfg, ids: list[str]):
    """The packed row of the samples `ids` (training.py's pipeline: dataset, PackedCollator)."""
    from vltune.data.packing import PackedCollator
    from vltune.data.prepare import build_dataset

    info = read_model_info(cfg.model.model_name_or_path)
    dataset, _ = build_dataset(cfg, cfg.data.dataset_use)
    chosen = [i for i, sample in enumerate(dataset.samples) if sample.id in ids]
    return info, PackedCollator(info, None)([dataset[i] for i in chosen])


def main(out_dir: Path, recipes: list[dict]) -> None:
    ctx = init_distributed(need_group=True)
    for overrides in recipes:
        cfg = load_recipe(overrides["recipe"], {k: v for k, v in overrides.items() if k not in ("recipe", "ids", "name")})
        info, batch = packed_row(cfg, overrides["ids"])
        torch.manual_seed(0)
        engine = build_backend(cfg, info, None, None, ctx)
        seen = []  # the token count the language model runs on: the shard, if sharding happened
        hook = part(engine.base, "llm").register_forward_pre_hook(
            lambda m, a, kw: seen.append(kw["inputs_embeds"].shape[1]), with_kwargs=True)
        loss = engine.forward_backward(batch, 1.0)
        hook.remove()
        grads = {name: p.grad.detach().clone() for name, p in engine.base.named_parameters() if p.grad is not None}
        if ctx.is_main:
            torch.save({"loss": float(loss), "grads": grads, "llm_tokens": seen}, out_dir / f"{overrides['name']}.pt")
        ctx.barrier()
    ctx.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()))
