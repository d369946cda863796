"""`vltune infer --input IN --output OUT`: an annotation file through one loaded model, resumable.

IN is any file the training reader takes (JSONL, a JSON list, a packed JSON file; LLaVA
`conversations` or OpenAI `messages`). A record's last assistant turn, if it has one, is its
reference answer: it is left out of the prompt and scored (exact match) at the end. OUT gets one JSON
line per sample: the input record plus `prediction` (and `thinking`, `thinking_cut` when the model
reasoned in a think block), or plus `error` when that sample failed, so one bad image does not stop
a long run.

Lines are keyed by the sample id (the record's `id`, else its position in IN, written into the line
as `id`). A run that finds OUT already there keeps its complete lines, cuts off a torn last line (a
kill in the middle of a write) and runs only the samples not written yet, so every id appears in OUT
exactly once however often the run is interrupted. Sampling seeds are per sample id, so a resumed
sampled run writes what an uninterrupted one would have.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vltune.core.generation import sample_seed
from vltune.core.metrics import normalize_answer
from vltune.data.formats import Sample, SampleError, read_records, record_to_sample
from vltune.inference import Predictor

# Roles that mark an answer turn, in both record layouts (data/formats.py reads the same names).
_ANSWER_ROLES = ("gpt", "assistant")


@dataclass
class Job:
    """One input sample: its key, the record as read, and the sample to run or the reason it cannot run."""

    key: str
    record: dict | None
    sample: Sample | None = None
    error: str | None = None
    reference: str | None = None


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def prompt_record(record: Any) -> tuple[Any, str | None]:
    """(the record with an empty answer slot, the reference answer or None).

    The last assistant turn is emptied (SFTDataset.prompt drops the last turn); a record that ends on
    a user turn gets an empty assistant turn appended, so unanswered questions are valid input too.
    Records without a readable turn list are returned unchanged for record_to_sample to report.
    """
    if not isinstance(record, dict):
        return record, None
    key, role_key, text_key = (
        ("conversations", "from", "value") if "conversations" in record else ("messages", "role", "content")
    )
    turns = record.get(key)
    if not isinstance(turns, list) or not turns or not isinstance(turns[-1], dict):
        return record, None
    last = turns[-1]
    if last.get(role_key) in _ANSWER_ROLES:
        return {**record, key: [*turns[:-1], {**last, text_key: ""}]}, _text(last.get(text_key))
    answer_role = "gpt" if key == "conversations" else "assistant"
    return {**record, key: [*turns, {role_key: answer_role, text_key: ""}]}, None


def read_jobs(input_path: str | Path, data_path: str | Path | None = None) -> list[Job]:
    """Every sample of `input_path` as a Job, in file order; unreadable lines become Jobs with an error.

    Raises SampleError when two samples share a key (the output could not tell them apart).
    """
    path = Path(input_path)
    records = read_records(path)
    base = Path(data_path) if data_path is not None else path.parent
    prefix = f"{path}:"
    jobs = []
    for where, record, pack in records.items:
        position = where[len(prefix) :]
        key = str(record["id"]) if isinstance(record, dict) and "id" in record else position
        prompt, reference = prompt_record(record)
        try:
            jobs.append(Job(key, record, record_to_sample(prompt, where, base, pack), reference=reference))
        except SampleError as e:
            jobs.append(Job(key, record if isinstance(record, dict) else None, error=str(e), reference=reference))
    for problem in records.problems:  # lines that are not JSON / not UTF-8: keyed by their line number
        message = str(problem)
        position = message[len(prefix) :].split(":", 1)[0] if message.startswith(prefix) else message
        jobs.append(Job(position, None, error=message))
    seen: dict[str, int] = {}
    duplicated = []
    for job in jobs:
        seen[job.key] = seen.get(job.key, 0) + 1
        if seen[job.key] == 2:
            duplicated.append(job.key)
    if duplicated:
        shown = ", ".join(repr(k) for k in duplicated[:5]) + (" ..." if len(duplicated) > 5 else "")
        raise SampleError(f"{path}: {len(duplicated)} id(s) used by more than one sample ({shown}); "
                          "batch mode keys output lines by id, so ids must be unique", "duplicated_id")
    return jobs


def read_finished(output_path: Path, keys: set[str]) -> dict[str, dict]:
    """The complete lines already in `output_path`, by id. A torn last line is cut off the file.

    A damaged line elsewhere, an id written twice, or a file whose ids are none of the input's is an
    error: resuming over it would write a file that says something untrue.
    """
    if not output_path.exists():
        return {}
    raw = output_path.read_bytes()
    lines = raw.split(b"\n")
    rows: dict[str, dict] = {}
    offset = 0
    for number, line in enumerate(lines, start=1):
        is_last = number == len(lines)
        if line.strip():
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or "id" not in row:
                    raise ValueError("not a JSON object with an id")
            except (ValueError, UnicodeDecodeError) as e:
                if not is_last:
                    raise SampleError(f"{output_path}:{number}: not an output line ({e}); fix or remove it to resume") from None
                # Written when the run was killed: drop it, its sample runs again.
                with open(output_path, "r+b") as f:
                    f.truncate(offset)
                break
            key = str(row["id"])
            if key in rows:
                raise SampleError(f"{output_path}:{number}: id {key!r} is written twice")
            rows[key] = row
        offset += len(line) + 1
    else:
        if lines[-1].strip():  # complete, but killed before its newline
            with open(output_path, "ab") as f:
                f.write(b"\n")
    if rows and not keys & set(rows):
        raise SampleError(f"{output_path}: none of its ids are in the input; is it the output of another file?")
    return rows


def _append(f, row: dict) -> None:
    """One line, flushed to disk before the next sample starts, so a kill loses at most this line."""
    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def run_batch(
    predictor: Predictor | Callable[[], Predictor],
    input_path: str | Path,
    output_path: str | Path,
    *,
    data_path: str | Path | None = None,
    show_progress: bool = True,
) -> dict:
    """Answer every sample of `input_path` not yet in `output_path`; returns the summary of the whole file.

    `predictor` may be a function making one: it is called after both files have been read, so a
    mistyped path or a foreign output file is reported before a large model is loaded.
    Summary: `samples`, `already_done` (lines found at start), `written` (this run), `errors` (lines
    with an error, all runs), `scored` (samples with a reference) and `exact_match` over those (a
    failed sample counts as wrong; None when no sample has a reference).
    """
    from tqdm import tqdm

    output_path = Path(output_path)
    jobs = read_jobs(input_path, data_path)
    done = read_finished(output_path, {job.key for job in jobs})
    pending = [job for job in jobs if job.key not in done]
    if not isinstance(predictor, Predictor):
        predictor = predictor()
    runnable = [job for job in pending if job.sample is not None]
    dataset = predictor.dataset([job.sample for job in runnable])
    index = {id(job): i for i, job in enumerate(runnable)}
    rows = dict(done)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with open(output_path, "a", encoding="utf-8") as f, tqdm(
        total=len(jobs), initial=len(done), desc="infer", unit="sample", disable=not show_progress, file=sys.stderr
    ) as bar:
        for job in pending:
            row = {"id": job.key, **(job.record or {})}
            if job.error is None:
                try:
                    seed = sample_seed(predictor.settings.seed, job.key)
                    answer = predictor.answer(dataset, index[id(job)], seed=seed)
                    row["prediction"] = answer.prediction
                    if answer.thinking is not None:
                        row["thinking"], row["thinking_cut"] = answer.thinking, answer.thinking_cut
                except Exception as e:  # noqa: BLE001 -- one failing sample must not end a long run
                    job.error = f"{type(e).__name__}: {e}"
            if job.error is not None:
                row["error"] = job.error
                bar.write(f"vltune infer: {job.key}: {job.error}", file=sys.stderr)
            _append(f, row)
            rows[job.key] = row
            bar.update(1)

    scored = [job for job in jobs if job.reference is not None]
    hits = sum(
        normalize_answer(rows[job.key].get("prediction", "")) == normalize_answer(job.reference)
        for job in scored if "error" not in rows[job.key]
    )
    return {
        "input": str(input_path),
        "output": str(output_path),
        "samples": len(jobs),
        "already_done": len(done),
        "written": len(pending),
        "errors": sum("error" in rows[job.key] for job in jobs),
        "scored": len(scored),
        "exact_match": hits / len(scored) if scored else None,
    }
