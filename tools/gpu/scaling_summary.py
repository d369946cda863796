"""Issue 28's scaling runs (tools/gpu/scaling.sh): one JSON line per run, and the summary of all of them.

    python3 tools/gpu/scaling_summary.py record --metrics OUT_DIR/metrics.jsonl --item dp3b --engine fsdp --nproc 2 ...
    python3 tools/gpu/scaling_summary.py summary RESULTS_DIR OUT.json

`record` reads a run's metrics.jsonl (vltune's rows, or tools/gpu/stock_fsdp.py's in the same format:
step, loss, tokens_per_s over all ranks, peak_mem_gib = the largest over ranks, mfu) and prints one JSON
line: tokens/s (mean over the logged steps after `--warmup` steps), tokens/s per GPU (/ nproc), MFU, peak
memory per GPU, every step's loss, the command, GPU name and count, exit status and, on failure, the log tail.
`summary` groups the lines of RESULTS_DIR/*.jsonl by item: scaling efficiency (dp3b), loss difference
against the one-GPU run of the same global batch (big) or the unsharded row (sp), vltune / stock (moe).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    """The logged training rows (those with tokens/s) of a metrics.jsonl; [] when it is missing."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "tokens_per_s" in r and "loss" in r]


def run_figures(rows: list[dict], nproc: int, warmup: int) -> dict:
    """Throughput and memory of one run from its logged rows; steps <= `warmup` are left out of the
    averages (compilation, allocator warm-up) unless nothing else was logged."""
    if not rows:
        return {"steps": 0}
    timed = [r for r in rows if r["step"] > warmup] or rows
    total = statistics.mean(r["tokens_per_s"] for r in timed)
    mfus = [r["mfu"] for r in timed if r.get("mfu") is not None]
    return {
        "steps": rows[-1]["step"], "timed_steps": [timed[0]["step"], timed[-1]["step"]],
        "tokens_per_s": round(total, 1), "tokens_per_s_per_gpu": round(total / nproc, 1),
        "mfu": round(statistics.mean(mfus), 4) if mfus else None,
        "peak_mem_gib_per_gpu": max((r.get("peak_mem_gib") or 0) for r in rows) or None,
        "losses": {str(r["step"]): r["loss"] for r in rows},
    }


def efficiency(per_gpu: float, per_gpu_at_1: float) -> float:
    """Scaling efficiency: tokens/s per GPU at N over tokens/s of one GPU (same engine)."""
    return per_gpu / per_gpu_at_1


def max_rel_loss_diff(losses: dict, reference: dict) -> tuple[float | None, int]:
    """The largest |loss - reference| / |reference| over the steps both logged, and how many steps those are."""
    common = sorted(set(losses) & set(reference), key=int)
    if not common:
        return None, 0
    return max(abs(losses[s] - reference[s]) / abs(reference[s]) for s in common), len(common)


def _ok(r: dict) -> bool:
    return r.get("exit") == 0 and r.get("tokens_per_s") is not None


def _brief(r: dict) -> dict:
    keys = ("run", "engine", "nproc", "tokens_per_s", "tokens_per_s_per_gpu", "mfu", "peak_mem_gib_per_gpu", "exit")
    return {k: r.get(k) for k in keys}


def summarize_dp(records: list[dict]) -> dict:
    """Per engine and GPU count: tokens/s per GPU, peak memory, efficiency against that engine's 1-GPU run."""
    out: dict = {}
    for r in records:
        out.setdefault(r["engine"], {})[str(r["nproc"])] = _brief(r)
    for engine, by_n in out.items():
        base = by_n.get("1")
        for n, r in by_n.items():
            ok = base is not None and base["exit"] == 0 and base["tokens_per_s_per_gpu"] and r["exit"] == 0 and r["tokens_per_s_per_gpu"]
            r["efficiency"] = round(efficiency(r["tokens_per_s_per_gpu"], base["tokens_per_s_per_gpu"]), 4) if ok else None
    best = {}
    for engine, by_n in out.items():
        top = max((int(n) for n, r in by_n.items() if r.get("efficiency") is not None), default=None)
        if top is not None:
            best[engine] = {"nproc": top, "efficiency": by_n[str(top)]["efficiency"]}
    return {"by_engine": out, "efficiency_at_most_gpus": best}


def summarize_reference(records: list[dict], reference_engine: str) -> dict:
    """Each run against the run whose engine is `reference_engine` (big: the 1-GPU run of the same global
    batch; sp: the unsharded row): its figures and the largest relative per-step loss difference."""
    refs = [r for r in records if r["engine"] == reference_engine and _ok(r)]
    ref = refs[-1] if refs else None
    runs = {}
    for r in records:
        entry = _brief(r)
        if r["engine"] != reference_engine and ref is not None and _ok(r):
            diff, steps = max_rel_loss_diff(r.get("losses", {}), ref.get("losses", {}))
            entry.update(max_rel_loss_diff=None if diff is None else float(f"{diff:.4g}"), loss_steps_compared=steps)
        entry["loss_first_last"] = [next(iter(r.get("losses", {}).values()), None), next(reversed(list(r.get("losses", {}).values())), None)]
        runs[r["run"]] = entry
    return {"runs": runs, "reference": ref["run"] if ref else None,
            "reference_missing": None if ref else f"no successful {reference_engine} run"}


def summarize_moe(records: list[dict]) -> dict:
    """vltune's engines against the stock FSDP2 baseline, tokens/s per GPU (real tokens)."""
    stock = [r for r in records if r["engine"] == "stock_fsdp2" and _ok(r)]
    base = stock[-1]["tokens_per_s_per_gpu"] if stock else None
    runs = {}
    for r in records:
        entry = _brief(r)
        if r["engine"] != "stock_fsdp2":
            entry["vs_stock_per_gpu"] = round(r["tokens_per_s_per_gpu"] / base, 3) if base and _ok(r) else None
        runs[r["run"]] = entry
    return {"runs": runs, "stock_tokens_per_s_per_gpu": base}


def summarize(records: list[dict]) -> dict:
    items: dict[str, list[dict]] = {}
    for r in records:
        items.setdefault(r["item"], []).append(r)
    out = {}
    for item, rs in items.items():
        latest = {}
        for r in rs:  # a run repeated (a second call) counts once: its last line
            latest[r["run"]] = r
        rs = list(latest.values())
        if item == "dp3b":
            out[item] = summarize_dp(rs)
        elif item == "big":
            out[item] = summarize_reference(rs, "single")
        elif item == "sp":
            out[item] = summarize_reference(rs, "unsharded")
        elif item == "moe":
            out[item] = summarize_moe(rs)
        out[item]["machine"] = sorted({f"{r.get('gpu_count')} x {r.get('gpu_name')}" for r in rs})
        out[item]["failed"] = [r["run"] for r in rs if r.get("exit") != 0]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    rec = sub.add_parser("record")
    for key in ("metrics", "item", "run", "engine", "command", "gpu-name", "log", "model"):
        rec.add_argument(f"--{key}", required=key not in ("log", "model"))
    for key in ("nproc", "gpu-count", "exit", "wall-s", "warmup"):
        rec.add_argument(f"--{key}", type=int, required=key != "warmup", default=0)
    rec.add_argument("--extra", default="{}", help="a JSON object merged into the line (e.g. the run's keys)")
    summ = sub.add_parser("summary")
    summ.add_argument("results", help="a folder of *.jsonl lines written by `record`")
    summ.add_argument("out")
    args = parser.parse_args()
    if args.action == "record":
        line = {"item": args.item, "run": args.run, "engine": args.engine, "nproc": args.nproc, "model": args.model,
                "command": args.command, "gpu_name": args.gpu_name, "gpu_count": args.gpu_count,
                "exit": args.exit, "wall_s": args.wall_s, **json.loads(args.extra)}
        line.update(run_figures(read_metrics(Path(args.metrics)), args.nproc, args.warmup))
        if args.exit != 0 or not line.get("tokens_per_s"):
            tail = Path(args.log).read_text(errors="replace").splitlines()[-40:] if args.log and Path(args.log).is_file() else []
            line["log_tail"] = "\n".join(tail)
        print(json.dumps(line), flush=True)
    else:
        records = [json.loads(line) for f in sorted(Path(args.results).glob("*.jsonl"))
                   for line in f.read_text().splitlines() if line.strip()]
        summary = summarize(records)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
        print(json.dumps(summary, indent=1), flush=True)


if __name__ == "__main__":
    main()
