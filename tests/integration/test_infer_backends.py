"""`vltune infer --backend mindspore` against `--backend torch`: the same greedy answers.

The tiny models are random, which makes this a strict test: their top logits are close together and
never end a sentence, so every prompt compares `max_new_tokens` decisions, each of which a small
numerical slip in either backend could flip. Sampling is compared only where it is deterministic
(repetition penalty here; top_k 1 in tests/unit/backends/test_ms_generation.py): temperature sampling
on MindSpore draws from its own seeded generator, not torch's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mindspore")
torch = pytest.importorskip("torch")

from vltune.cli import main  # noqa: E402
from vltune.core.generation import THINKING_CLOSE, GenerationSettings  # noqa: E402
from vltune.data.collate import Collator  # noqa: E402
from vltune.data.dataset import SFTDataset  # noqa: E402
from vltune.data.formats import load_samples  # noqa: E402
from vltune.inference import Predictor, answer_prompt  # noqa: E402
from vltune.inference_batch import run_batch  # noqa: E402

MAX_PIXELS = 12544
GREEDY = GenerationSettings(max_new_tokens=8)


@pytest.fixture(scope="module")
def vqa20(tmp_path_factory) -> dict:
    """20 held-out VQA prompts with images (colour and shape questions)."""
    from vltune.data.synthetic import SyntheticVQAConfig, generate_vqa_dataset

    out = generate_vqa_dataset(tmp_path_factory.mktemp("vqa20"), SyntheticVQAConfig(num_train=1, num_eval=20, tasks=("color", "shape"), seed=3))
    samples = load_samples(out["eval_file"])
    assert len(samples) == 20 and all(len(s.images) == 1 for s in samples)
    return {**out, "samples": samples}


def _torch_ids(model_dir: Path, samples: list) -> tuple[list[list[int]], SFTDataset]:
    """Greedy ids of each prompt, one at a time, as `vltune infer --backend torch` decodes them."""
    from vltune.backends.torch.generate import generate

    predictor = Predictor(model_dir, max_pixels=MAX_PIXELS, settings=GREEDY)
    dataset = predictor.dataset(samples)
    collate = Collator(dataset.info, dataset.tokenizer.pad_token_id)
    ids = []
    for i in range(len(samples)):
        (row,) = generate(predictor.model, collate([dataset.prompt(i)[0]], padding_side="left"), dataset.info, GREEDY)
        ids.append(row)
    return ids, dataset


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", pytest.param("qwen2_vl", marks=pytest.mark.slow),
                                        pytest.param("qwen3_vl", marks=pytest.mark.slow),
                                        pytest.param("ovis2_5", marks=pytest.mark.slow)])
def test_greedy_ids_are_identical_on_both_backends_for_20_image_prompts(tiny_models, vqa20, model_type):
    """The must-show: torch one prompt at a time; MindSpore all 20 in one left-padded batch with the KV
    cache (left padding, per-row positions and cached decoding all exercised at once)."""
    from vltune.backends.mindspore.generate import end_token_ids, generate
    from vltune.backends.mindspore.models import load_model

    model_dir = tiny_models[model_type]
    want, dataset = _torch_ids(model_dir, vqa20["samples"])
    model = load_model(model_dir)
    batch = Collator(dataset.info, dataset.tokenizer.pad_token_id)([dataset.prompt(i)[0] for i in range(20)], padding_side="left")
    got = generate(model, batch, end_token_ids(model_dir, model.cfg), GREEDY)
    differing = [i for i in range(20) if got[i] != want[i]]
    assert not differing, [(i, want[i], got[i]) for i in differing]
    assert sum(len(row) for row in want) == 20 * 8  # the random model never stops: 160 decisions compared
    assert len({tuple(row) for row in want}) >= 5  # and they depend on the image


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_batch_mode_writes_the_same_predictions_on_both_backends(tiny_model_dirs, vqa20, tmp_path, model_type):
    """The user's path end to end: `run_batch` (Predictor, one prompt at a time) over 6 of the prompts
    (all 20 are compared id by id in the test above; MindSpore's pynative decoding is the slow part here)."""
    prompts = Path(vqa20["eval_file"]).with_name(f"first6_{model_type}.jsonl")  # beside it: same image paths
    prompts.write_text("".join(Path(vqa20["eval_file"]).read_text().splitlines(keepends=True)[:6]))
    rows = {}
    for backend in ("torch", "ms"):
        out = tmp_path / f"{backend}.jsonl"
        predictor = Predictor(tiny_model_dirs[model_type], backend=backend, max_pixels=MAX_PIXELS, settings=GREEDY)
        summary = run_batch(predictor, prompts, out, show_progress=False)
        assert summary["written"] == 6 and summary["errors"] == 0
        rows[backend] = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prediction"] for r in rows["ms"]] == [r["prediction"] for r in rows["torch"]]


@pytest.mark.slow
def test_repetition_penalty_decodes_alike(tiny_qwen2_5_vl, vqa20):
    """Greedy with a penalty on repeated tokens is deterministic too: the same ids on both engines."""
    texts = {}
    for backend, penalty in (("torch", 1.8), ("ms", 1.8), ("torch", None)):
        settings = GenerationSettings(max_new_tokens=8, repetition_penalty=penalty)
        predictor = Predictor(tiny_qwen2_5_vl, backend=backend, max_pixels=MAX_PIXELS, settings=settings)
        dataset = predictor.dataset(vqa20["samples"][:2])
        texts[backend, penalty] = [predictor.answer(dataset, i).text for i in range(2)]
    assert texts["ms", 1.8] == texts["torch", 1.8] != texts["torch", None]


def test_cli_streams_the_same_answer_with_backend_ms(tiny_qwen2_5_vl, vqa20, capsys):
    image = str(Path(vqa20["data_path"]) / json.loads(Path(vqa20["eval_file"]).read_text().splitlines()[0])["image"])
    outputs = {}
    for backend in ("torch", "ms"):
        code = main(["infer", "--model", str(tiny_qwen2_5_vl), "--image", image, "--prompt", "What color is the shape?",
                     "--max-new-tokens", "8", "--max-pixels", str(MAX_PIXELS), "--backend", backend])
        assert code == 0
        outputs[backend] = capsys.readouterr().out
    assert outputs["ms"] == outputs["torch"] and len(outputs["torch"]) > 1  # streamed piece by piece, then "\n"


class _Recorder:
    """The raw next-token logits each backend's decoding loop sees, step by step (read, not changed)."""

    def __init__(self, monkeypatch):
        from transformers import LogitsProcessor

        import vltune.backends.mindspore.generate as ms_infer
        import vltune.backends.torch.generate as torch_infer

        self.scores: dict[str, list[np.ndarray]] = {"torch": [], "ms": []}
        process, processors = ms_infer.process_logits, torch_infer.logits_processors
        recorder = self

        def ms_process(scores, seen, settings):
            recorder.scores["ms"].append(np.array(scores))
            return process(scores, seen, settings)

        class Record(LogitsProcessor):
            def __call__(self, input_ids, scores):
                recorder.scores["torch"].append(scores.numpy().copy())
                return scores

        def torch_processors(settings, attention_mask):
            found = processors(settings, attention_mask)
            found.insert(0, Record())
            return found

        monkeypatch.setattr(ms_infer, "process_logits", ms_process)
        monkeypatch.setattr(torch_infer, "logits_processors", torch_processors)


def test_circle_rope_model_decodes_alike(tiny_qwen2_5_vl, vqa20, tmp_path, monkeypatch):
    """A model with circle_rope.json beside it (AGE strategy 4: layers alternate Circle-RoPE and M-RoPE).

    The random model's argmax hardly depends on positions, so equal answers alone would not show that
    the decoding steps used the right ids: the logits of every step are compared too (the torch loop
    here is vltune's own, generate_with_positions), and they are far from the plain model's."""
    from vltune.core.config import CIRCLE_ROPE_DEFAULTS

    model_dir = tmp_path / "circle"
    shutil.copytree(tiny_qwen2_5_vl, model_dir)
    (model_dir / "circle_rope.json").write_text(json.dumps({**CIRCLE_ROPE_DEFAULTS, "AGE_mode": "strategy_4"}))
    recorder = _Recorder(monkeypatch)
    sample = vqa20["samples"][:1]
    texts = {}
    for backend in ("torch", "ms"):
        predictor = Predictor(model_dir, backend=backend, max_pixels=MAX_PIXELS, settings=GREEDY)
        texts[backend] = predictor.answer(predictor.dataset(sample), 0).text
    assert texts["ms"] == texts["torch"]
    assert predictor.model.model.language_model.layer_uses_main == [True, False]
    got, want = np.concatenate(recorder.scores["ms"]), np.concatenate(recorder.scores["torch"])
    assert got.shape == want.shape == (8, got.shape[1])
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-4 * scale
    plain = Predictor(tiny_qwen2_5_vl, backend="ms", max_pixels=MAX_PIXELS, settings=GREEDY)
    plain.answer(plain.dataset(sample), 0)
    plain_scores = np.concatenate(recorder.scores["ms"][8:])
    assert np.abs(plain_scores - got).max(axis=1).min() > 1e-3 * scale  # every step: circle ids moved the logits


@pytest.mark.slow
def test_lora_adapter_is_merged_on_mindspore_and_answers_as_peft(tiny_qwen2_5_vl, vqa20, tmp_path):
    """A PEFT adapter with non-zero B (and a fully trained merger, modules_to_save): MindSpore folds it into
    the weights, torch runs peft's unmerged forward; the greedy answers agree and differ from the base's."""
    from peft import LoraConfig, get_peft_model

    from vltune.backends.torch.models import load_model

    torch.manual_seed(0)
    base = load_model(tiny_qwen2_5_vl)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model\.layers\.\d+\.(self_attn\.(q|v)_proj|mlp\.up_proj)",
                        modules_to_save=["model.visual.merger"], init_lora_weights=False)
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.05)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    samples = vqa20["samples"][:3]
    texts = {}
    for backend in ("torch", "ms"):
        predictor = Predictor(tiny_qwen2_5_vl, adapter=adapter, backend=backend, max_pixels=MAX_PIXELS, settings=GREEDY)
        dataset = predictor.dataset(samples)
        texts[backend] = [predictor.answer(dataset, i).text for i in range(3)]
    assert texts["ms"] == texts["torch"]
    plain = Predictor(tiny_qwen2_5_vl, backend="ms", max_pixels=MAX_PIXELS, settings=GREEDY)
    assert texts["ms"] != [plain.answer(plain.dataset(samples), i).text for i in range(3)]


def test_thinking_budget_cuts_and_answers_on_mindspore(tiny_model_dirs, tmp_path):
    """The rewired Qwen3-VL that never stops thinking (tests/integration/test_infer_thinking.py): cut
    at N tokens, closing phrase, answer -- streamed, and the same Answer as the torch backend's."""
    from test_infer_thinking import ANSWER_WORD, THINK_WORD, _edit_into_a_thinker
    from vltune.core.families.chat_templates import QWEN3_VL_THINKING_CHAT_TEMPLATE

    thinker = _edit_into_a_thinker(tiny_model_dirs["qwen3_vl"], tmp_path / "m", QWEN3_VL_THINKING_CHAT_TEMPLATE)
    answers, streamed = {}, {}
    for backend in ("torch", "ms"):
        pieces: list[str] = []
        answers[backend] = answer_prompt(thinker, "What shape?", stream=pieces.append, thinking=True, thinking_budget=6,
                                         settings=GenerationSettings(max_new_tokens=16), backend=backend)
        streamed[backend] = "".join(pieces)
    ms = answers["ms"]
    assert (ms.thinking, ms.prediction, ms.thinking_cut, ms.generated_tokens) == (THINK_WORD * 6, ANSWER_WORD, True, 7)
    assert ms.text == streamed["ms"] == THINK_WORD * 6 + THINKING_CLOSE + ANSWER_WORD
    assert answers["ms"] == answers["torch"] and streamed["ms"] == streamed["torch"]


def test_unknown_backend_is_a_clear_error(tiny_qwen2_5_vl):
    from vltune.core.config import ConfigError
    from vltune.inference import backend_name, infer

    assert backend_name("ms") == backend_name("mindspore") == "mindspore"
    with pytest.raises(ConfigError, match="expected one of torch, mindspore"):
        Predictor(tiny_qwen2_5_vl, backend="jax")
    with pytest.raises(ConfigError, match="expected one of torch, mindspore"):
        infer(tiny_qwen2_5_vl, "Hi", objective="mdlm", backend="jax")


def test_mdlm_sampler_answers_alike_on_both_backends(tiny_qwen2_5_vl, vqa20):
    """`vltune infer --objective mdlm`: at temperature 0 the sampler's choices depend on the logits only,
    so the two backends' bidirectional forwards must give the same canvas (tokens chosen and order)."""
    from vltune.inference import infer

    sample = vqa20["samples"][0]
    prompt = sample.messages[0]["content"][-1]["text"]
    kwargs = dict(objective="mdlm", max_new_tokens=8, block_length=4, steps=8, temperature=0.0, max_pixels=MAX_PIXELS)
    answers = {b: infer(tiny_qwen2_5_vl, prompt, [str(sample.images[0])], backend=b, **kwargs) for b in ("torch", "ms")}
    assert answers["torch"] == answers["ms"] and answers["torch"], answers
