"""Runs that meet a hostile world: every image body corrupt, a second run into the same output_dir, a
SIGKILL in the middle of training, a truncated newest checkpoint and a torn metrics.jsonl afterwards.

The killed run is a real process (its worker processes must die with it, its lock must die with it); the
runs that meet what it left are in-process, which is cheaper and is what `vltune train` does."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")

from vltune.core.checkpointing import complete_checkpoints  # noqa: E402
from vltune.core.config import ConfigError  # noqa: E402
from vltune.training import train  # noqa: E402


def _recipe(tiny: Path, data: Path, out: Path, **extra) -> dict:
    return {
        "model_name_or_path": str(tiny), "dataset_use": str(data), "max_pixels": 12544, "max_steps": 4,
        "per_device_train_batch_size": 2, "logging_steps": 1, "output_dir": str(out), "seed": 11, **extra,
    }


def _header_only_jpeg(png: Path, out: Path) -> None:
    """A JPEG whose header parses (size, components) and whose body is garbage: validation passes, decoding fails."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.open(png).convert("RGB").save(buf, format="JPEG")
    data = buf.getvalue()
    sos = data.index(b"\xff\xda")  # start of scan: the entropy-coded body follows its header
    out.write_bytes(data[: sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")] + b"\x13\x37" * 32)


@pytest.mark.timeout(120)
def test_every_image_body_corrupt_with_skipping_stops_with_the_counts(tmp_path, tiny_qwen2_5_vl, vqa_data):
    source = Path(vqa_data["data_path"])
    rows = [json.loads(line) for line in Path(vqa_data["train_file"]).read_text().splitlines()[:6]]
    for i, row in enumerate(rows):
        _header_only_jpeg(source / row["image"], tmp_path / f"{i}.jpg")
        row["image"] = f"{i}.jpg"
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match=r"no usable samples: every one of the 6 training samples failed while being built "
                       r"\(6 skips so far; the last: .*cannot decode image"):
        train(_recipe(tiny_qwen2_5_vl, tmp_path / "train.jsonl", tmp_path / "out", skip_bad_samples=True), show_progress=False)


def _children() -> dict[int, list[int]]:
    """ppid -> pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return tree


def _descendants(pid: int) -> list[int]:
    tree, found, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(300)
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="lists processes through /proc (Linux)")
def test_a_run_killed_mid_training_leaves_nothing_running_and_resumes(tmp_path, tiny_qwen2_5_vl, vqa_data, capsys):
    out, data = tmp_path / "out", tmp_path / "train.jsonl"
    rows = [json.loads(line) for line in Path(vqa_data["train_file"]).read_text().splitlines()]
    for row in rows:
        row["image"] = str(Path(vqa_data["data_path"]) / row["image"])
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = _recipe(tiny_qwen2_5_vl, data, out, max_steps=1000, save_steps=2, dataloader_num_workers=2)
    code = "import json, sys\nfrom vltune.training import train\ntrain(json.loads(sys.argv[1]), show_progress=False)\n"
    run = subprocess.Popen([sys.executable, "-c", code, json.dumps(recipe)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while not (out / "checkpoint-4").is_dir():
            assert run.poll() is None, run.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the run did not reach checkpoint-4"
            time.sleep(0.2)
        # Two runs into one output_dir: the second is refused and told who holds it.
        with pytest.raises(ConfigError, match=f"another run is writing there \\(pid {run.pid} on host {socket.gethostname()}"):
            train({**recipe, "resume_from_checkpoint": "auto"}, show_progress=False)
        workers = _descendants(run.pid)
        assert len(workers) >= 2  # the data loader's workers (and multiprocessing's resource tracker)
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    deadline = time.monotonic() + 5
    while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if _running(pid)], "worker processes outlived the killed run"

    # What a killed run leaves: a shared-memory block one of its workers had filled (named after the run),
    # the row it was writing, and a newest checkpoint that a crash truncated.
    from multiprocessing import resource_tracker
    from multiprocessing.shared_memory import SharedMemory

    from vltune.data.workers import _NAMESPACE, SHARED_PREFIX

    block = SharedMemory(create=True, size=1 << 20, name=f"{SHARED_PREFIX}{run.pid}_{_NAMESPACE}_5ca1ab1e")
    resource_tracker.unregister(block._name, "shared_memory")
    block.close()
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 99, "loss": 0.')
    *_, previous, newest = complete_checkpoints(out)
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    step = int(previous.name.split("-")[1])

    capsys.readouterr()
    summary = train({**recipe, "resume_from_checkpoint": "auto", "max_steps": step + 1, "dataloader_num_workers": 1}, show_progress=False)
    said = capsys.readouterr().out
    assert summary["resumed_from"] == str(previous) and summary["steps"] == step + 1
    assert f"skipping {newest.name}: {weights} is truncated" in said
    assert "dropped 1 torn line(s)" in said
    assert "removed 1 shared-memory blocks" in said and not Path(f"/dev/shm/{block.name}").exists()
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == list(range(1, step + 2))

    # A fresh run over these checkpoints is refused; so is resuming them under another seed, or other data.
    with pytest.raises(ConfigError, match=r"holds checkpoints of an earlier run \(checkpoint-2, .*overwrite_output_dir"):
        train({**recipe, "max_steps": 1}, show_progress=False)
    with pytest.raises(ConfigError, match=r"trained with another recipe \(seed: 11 -> 12\)"):
        train({**recipe, "resume_from_checkpoint": "auto", "seed": 12}, show_progress=False)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:40]))
    with pytest.raises(ConfigError, match=r"checkpoint-\d+: cannot resume the data position: the training data changed since "
                       r"the checkpoint \(training samples \(or packed rows\) 48 then, 40 now\)"):
        train({**recipe, "resume_from_checkpoint": "auto", "max_steps": step + 3}, show_progress=False)
