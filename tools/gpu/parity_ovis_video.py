"""Ovis2.5 video pixels: vltune.data.video against transformers' ``Ovis2_5VideoProcessor``, bit for bit.

Run on the lent GPU machine (its image has torchvision, which the processor imports; the CPU test
machine has none, so ``tests/unit/data/test_video_ovis.py`` can only check the pieces). The processor
runs on CPU, as it does unless given a ``device``. torchvision resizes uint8 bilinear through ATen's
integer kernel only where ``torch.backends.cpu.get_cpu_capability()`` is "AVX2", and through float32
+ round everywhere else, so each case is compared with both of our paths (``VideoConfig.bilinear_path``
"uint8" and "float") and the script repeats itself under ``ATEN_CPU_CAPABILITY`` = each of
``--capabilities`` (the host's own first). Prints one JSON summary; exits 1 when the path torchvision
took under a capability is not bit-identical.

Usage (repo root, vltune importable as a package, e.g. after ``source tools/gpu/env.sh``):
    python3 tools/gpu/parity_ovis_video.py [--capabilities native,avx2,default] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np

# (frames, height, width): Ovis's 8 frames, up- and downscales, a side below the factor, a tall clip,
# odd sizes, HD. Three budgets: the processor's defaults, Ovis's training video budget, a small one.
CASES = [(8, 48, 64), (8, 360, 640), (3, 240, 320), (1, 20, 100), (2, 700, 90), (5, 33, 47), (2, 720, 1280)]
BUDGETS = {"processor_default": None, "ovis_train_448": (448 * 448, 448 * 448), "small": (32 * 32 * 4, 32 * 32 * 24)}


def _frames(t: int, h: int, w: int, seed: int) -> np.ndarray:
    """A moving gradient plus noise: smooth areas and hard edges, like decoded video."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, w)[None, None, :, None] + 9 * np.arange(t)[:, None, None, None]
    return (ramp + rng.integers(0, 56, (t, h, w, 3))).clip(0, 255).astype(np.uint8)


def _compare(ours: np.ndarray, ref: np.ndarray) -> dict:
    if ours.shape != ref.shape:
        return {"exact": False, "shape": [list(ours.shape), list(ref.shape)]}
    diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    return {"exact": bool(np.array_equal(ours, ref)), "mismatch_fraction": float((diff > 0).mean()),
            "max_abs": float(diff.max())}


def run_once() -> dict:
    """Every case under this process's torch CPU capability."""
    import torch
    import torchvision
    import transformers

    from vltune.data.video import VideoClip, VideoConfig, preprocess_video

    torch.set_num_threads(min(8, os.cpu_count() or 1))
    capability = torch.backends.cpu.get_cpu_capability()
    native_uint8 = "AVX2" in capability  # torchvision's _do_native_uint8_resize_on_cpu(BILINEAR)
    taken = "uint8" if native_uint8 else "float"
    cases, config_ok = [], True
    for budget_name, budget in BUDGETS.items():
        kwargs = {} if budget is None else {"size": {"shortest_edge": budget[0], "longest_edge": budget[1]}}
        proc = transformers.Ovis2_5VideoProcessor(**kwargs)
        cfg = VideoConfig.from_preprocessor_config(proc.to_dict())  # the saved form's keys pick the Ovis rule
        config_ok &= cfg.is_ovis and (cfg.min_pixels, cfg.max_pixels) == (proc.size["shortest_edge"], proc.size["longest_edge"])
        for seed, (t, h, w) in enumerate(CASES):
            frames = _frames(t, h, w, seed)
            out = proc(videos=[frames], return_tensors="np")
            ref_pv, ref_grid = np.asarray(out["pixel_values_videos"]), np.asarray(out["video_grid_thw"])[0]
            row = {"budget": budget_name, "frames": t, "height": h, "width": w, "grid": ref_grid.tolist()}
            for path in ("uint8", "float"):
                pv, grid, _, _ = preprocess_video(VideoClip(frames, np.arange(t), 25.0, t), replace(cfg, bilinear_path=path))
                row[path] = {**_compare(pv, ref_pv), "grid_equal": grid.tolist() == ref_grid.tolist()}
            cases.append(row)
    return {
        "capability": capability, "torchvision_path": taken, "config_from_processor_ok": bool(config_ok),
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__, "transformers": transformers.__version__},
        "all_grids_equal": all(c[p]["grid_equal"] for c in cases for p in ("uint8", "float")),
        "taken_path_exact_cases": sum(c[taken]["exact"] for c in cases),
        "other_path_exact_cases": sum(c["float" if taken == "uint8" else "uint8"]["exact"] for c in cases),
        "cases_total": len(cases),
        "taken_path_worst_mismatch_fraction": max(c[taken].get("mismatch_fraction", 1.0) for c in cases),
        "cases": cases,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capabilities", default="native,avx2,default",
                        help="comma list: native (the host's own) and/or ATEN_CPU_CAPABILITY values")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--once", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.once:
        print(json.dumps(run_once()))
        return 0
    runs = []
    for cap in args.capabilities.split(","):
        env = dict(os.environ)
        env.pop("ATEN_CPU_CAPABILITY", None)
        if cap != "native":
            env["ATEN_CPU_CAPABILITY"] = cap
        done = subprocess.run([sys.executable, __file__, "--once"], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            runs.append({"requested": cap, "error": done.stderr[-3000:]})
            continue
        runs.append({"requested": cap, **json.loads(done.stdout.strip().splitlines()[-1])})
    ok = all("error" not in r and r["all_grids_equal"] and r["config_from_processor_ok"]
             and r["taken_path_exact_cases"] == r["cases_total"] for r in runs)
    summary = {"ok": ok, "runs": [{k: v for k, v in r.items() if k != "cases"} for r in runs], "details": runs}
    text = json.dumps(summary, indent=1)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    print(json.dumps({"ok": ok, "runs": summary["runs"]}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
