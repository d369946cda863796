"""One table from one call: vltune's and the peers' runs of tools/peers/run.sh, timed the same way.

    python tools/peers/summary.py DIR [--warmup 8]    # DIR = $OUT/peers/MODE; writes DIR/table.{json,md}
    python tools/peers/summary.py DIR --loss-curve vltune-bf16 vltune-fp8    # writes DIR/loss_curve.json

tokens/s: the real tokens (image and text, no padding) of the optimizer steps after `warmup`, over the
time from the end of step `warmup` to the end of the last step. For vltune the same from its
metrics windows (tools/gpu/train_speed.py: the logged windows after the warm-up steps). MFU: core/flops.py's
count for vltune's run; a peer trains on the same samples, so its MFU is vltune's FLOPs per token times
its tokens/s over the card's peak. Losses: the first logged ones of each tool (a sanity check that all
train the same task: a random-init model starts at about ln(vocabulary)).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PEERS = ("ms-swift", "llamafactory")


def peer_row(path: Path, warmup: int) -> dict:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = {r["step"]: r for r in lines if "t" in r}
    losses = [r["loss"] for r in lines if "loss" in r]
    last = max(steps, default=0)
    if warmup not in steps or last <= warmup:
        raise ValueError(f"{path}: {len(steps)} timed steps, fewer than the {warmup} warm-up steps")
    tokens = sum(steps[s]["tokens"] for s in steps if s > warmup)
    seconds = steps[last]["t"] - steps[warmup]["t"]
    return {"tokens_per_s": round(tokens / seconds, 1), "peak_mem_gib": round(max(r["peak_gib"] for r in steps.values()), 1),
            "steps": last, "timed_tokens": tokens, "first_losses": [round(x, 4) for x in losses[:4]]}


def vltune_row(path: Path) -> dict:
    run = json.loads(path.read_text())
    return {"tokens_per_s": run["tokens_per_s"], "mfu": run["mfu"], "peak_mem_gib": round(run["peak_mem_gib"], 1),
            "steps": run["windows"][-1]["step"], "first_losses": [round(w["loss"], 4) for w in run["windows"][:4]],
            "keys": run["keys"]}


def loss_curves(reference: Path, other: Path) -> dict:
    """Two vltune runs of the same steps from the same init and data (logged every step), e.g. bf16 and fp8:
    the largest per-step relative difference of `other`'s loss from `reference`'s, and their means."""
    ref = {w["step"]: w["loss"] for w in json.loads(reference.read_text())["windows"]}
    got = {w["step"]: w["loss"] for w in json.loads(other.read_text())["windows"]}
    if ref.keys() != got.keys() or not ref:
        raise ValueError(f"{reference.name} and {other.name} logged different steps: {sorted(ref)[:5]}... / {sorted(got)[:5]}...")
    rel = [abs(got[s] - ref[s]) / abs(ref[s]) for s in sorted(ref)]
    return {"steps": len(ref), "max_rel_diff": round(max(rel), 5), "worst_step": sorted(ref)[rel.index(max(rel))],
            "mean_loss": [round(sum(ref.values()) / len(ref), 5), round(sum(got.values()) / len(got), 5)],
            "first_last": [[round(ref[min(ref)], 4), round(ref[max(ref)], 4)], [round(got[min(got)], 4), round(got[max(got)], 4)]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--loss-curve", nargs=2, metavar=("REFERENCE", "OTHER"),
                        help="two runs' names in DIR (e.g. vltune-bf16 vltune-fp8): write DIR/loss_curve.json instead of a table")
    args = parser.parse_args()
    if args.loss_curve:
        a, b = (args.dir / f"train_speed_{name}.json" for name in args.loss_curve)
        result = {"reference": args.loss_curve[0], "other": args.loss_curve[1], **loss_curves(a, b)}
        (args.dir / "loss_curve.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result))
        return
    rows: dict[str, dict] = {}
    for path in sorted(args.dir.glob("train_speed_vltune-*.json")):
        rows[path.stem.removeprefix("train_speed_")] = vltune_row(path)
    base = rows.get("vltune-bf16")
    for name in PEERS:
        meta = args.dir / f"{name}.meta.json"
        if not meta.exists():
            continue
        tries = json.loads(meta.read_text())
        row = {"tries": tries, "setting": None}
        if tries[-1]["rc"] == 0 and (args.dir / f"{name}.jsonl").exists():
            row.update(peer_row(args.dir / f"{name}.jsonl", args.warmup), setting=tries[-1]["setting"])
            if base and base.get("mfu"):
                row["mfu"] = round(base["mfu"] * row["tokens_per_s"] / base["tokens_per_s"], 4)
        rows[name] = row
    best_peer = max((rows[p]["tokens_per_s"] for p in PEERS if rows.get(p, {}).get("tokens_per_s")), default=None)
    for row in rows.values():
        if best_peer and row.get("tokens_per_s"):
            row["vs_faster_peer"] = round(row["tokens_per_s"] / best_peer, 2)
        if base and row.get("tokens_per_s"):
            row["vs_vltune_bf16"] = round(row["tokens_per_s"] / base["tokens_per_s"], 2)
    (args.dir / "table.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| tool | setting | tokens/s | MFU | vs faster peer | vs vltune bf16 | peak GiB | first losses |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        setting = row.get("setting") or (" ".join(f"{k}={v}" for k, v in row.get("keys", {}).items()) or "-")
        if "tokens_per_s" not in row:
            setting = f"failed: {[t['setting'] for t in row['tries']]}"
        lines.append(f"| {name} | {setting} | {row.get('tokens_per_s', '-')} | {row.get('mfu', '-')} | "
                     f"{row.get('vs_faster_peer', '-')} | {row.get('vs_vltune_bf16', '-')} | {row.get('peak_mem_gib', '-')} | {row.get('first_losses', '-')} |")
    (args.dir / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
