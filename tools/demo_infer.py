"""After `vltune train demo`: ask the trained model one held-out question through `vltune infer`.

Usage: python tools/demo_infer.py RUN_DIR [INDEX]
Prints the question, the model's answer (from the real `vltune infer` command) and the reference.
"""

import json
import subprocess
import sys
from pathlib import Path


def main() -> int:
    run_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")
    index = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    summary = json.loads((run_dir / "run_summary.json").read_text())
    recipe = json.loads((run_dir / "recipe.json").read_text())
    eval_file = Path(summary["eval_file"])
    sample = json.loads(eval_file.read_text().splitlines()[index])
    # Keep the text after the tag byte for byte ("\nWhat ..."), as training saw it.
    question = sample["conversations"][0]["value"].replace("<image>", "")
    reference = sample["conversations"][1]["value"]
    image = eval_file.parent / sample["image"]
    cmd = [sys.executable, "-m", "vltune.cli", "infer", "--model", str(run_dir), "--image", str(image),
           "--prompt", question, "--max-new-tokens", "8"]
    for key in ("min_pixels", "max_pixels"):
        if recipe.get(key):
            cmd += [f"--{key.replace('_', '-')}", str(recipe[key])]
    answer = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    print(f"image:     {image}")
    print(f"question:  {question.strip()}")
    print(f"answer:    {answer}")
    print(f"reference: {reference}")
    print(f"held-out eval_accuracy of the run: {summary.get('eval_accuracy')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
