"""`vltune convert`: HF <-> MindSpeed-MM round trips, the shards of every mp_rank file, and bad inputs.

Expected shapes and shard contents are derived here from config.json and the HF tensors alone (per
head, per rank, by slicing), not from the converter's own plan, so a layout mistake made the same
way in both directions still fails.
"""

from __future__ import annotations

import argparse
import ast
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vltune.backends.torch.convert import ConvertError, hf_to_mindspeed, mindspeed_to_hf
from vltune.backends.torch.convert import layout
from vltune.backends.torch.convert.layout import glu_split_order, qkv_interleave_order
from vltune.cli import main

# name -> (tp, text layers per stage, vision layers per stage, vpp); the tiny model has 8 text and 2 vision layers.
LAYOUTS = {
    "tp1-pp1": (1, [8], [2], 1),
    "tp2-pp2": (2, [3, 5], [2, 0], 1),
    # 4 ranks x 2 virtual chunks: the vision tower spans stages 0-1, text starts on stage 1 (rank 1, chunk 0).
    "tp2-pp4-vpp2": (2, [0, 1, 1, 1, 1, 1, 1, 2], [1, 1, 0, 0, 0, 0, 0, 0], 2),
}
HEADS = {"untied": False, "tied": True}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    from vltune.backends.torch.tiny import TinySize, make_tiny

    root = tmp_path_factory.mktemp("convert-tiny")
    return {name: make_tiny("qwen2_5_vl", root / name, size=TinySize(text_layers=8, tie_word_embeddings=tied))
            for name, tied in HEADS.items()}


@pytest.fixture(scope="module")
def converted(tiny_dirs, tmp_path_factory):
    """(layout, head) -> (hf dir, MindSpeed-MM dir, HF dir converted back), each conversion made once."""
    cache: dict[tuple[str, str], tuple[Path, Path, Path]] = {}
    root = tmp_path_factory.mktemp("convert-out")

    def get(layout: str, head: str) -> tuple[Path, Path, Path]:
        if (layout, head) not in cache:
            tp, llm, vit, vpp = LAYOUTS[layout]
            mm = hf_to_mindspeed(tiny_dirs[head], root / f"mm-{layout}-{head}", tp=tp, llm_pp_layers=llm,
                                 vit_pp_layers=vit, vpp=vpp)
            back = mindspeed_to_hf(mm, tiny_dirs[head], root / f"hf-{layout}-{head}")
            cache[(layout, head)] = (tiny_dirs[head], mm, back)
        return cache[(layout, head)]

    return get


def _rank_file(mm: Path, tp_rank: int, pp_rank: int, pp: int) -> Path:
    name = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")
    return mm / "release" / name / "model_optim_rng.pt"


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert sorted(wa) == sorted(wb)
    for name in wa:
        assert wa[name].dtype == wb[name].dtype and torch.equal(wa[name], wb[name]), name


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_is_bit_exact(converted, layout, head):
    hf, _, back = converted(layout, head)
    _assert_same_weights(hf, back)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        assert (back / name).read_bytes() == (hf / name).read_bytes(), name
    if head == "tied":  # still tied: no head of its own
        assert "lm_head.weight" not in load_file(str(back / "model.safetensors"))


# ---------------------------------------------------------------------- shapes, computed independently


def _expected_stage_shapes(cfg: dict, tp: int, llm: list[int], vit: list[int]) -> list[dict[str, tuple]]:
    """Per stage in pipeline order, {name: shape} of one tensor-parallel rank's state dict."""
    t, v = cfg["text_config"], cfg["vision_config"]
    H, nh, nkv, inter, vocab = (t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"],
                                t["intermediate_size"], t["vocab_size"])
    hd = H // nh
    vh, vi, patch, tpatch = v["hidden_size"], v["intermediate_size"], v["patch_size"], v["temporal_patch_size"]
    merger = vh * v["spatial_merge_size"] ** 2
    vision_layer = {
        "input_layernorm.weight": (vh,),
        "self_attention.linear_qkv.weight": (3 * vh // tp, vh), "self_attention.linear_qkv.bias": (3 * vh // tp,),
        "self_attention.linear_proj.weight": (vh, vh // tp), "self_attention.linear_proj.bias": (vh,),
        "pre_mlp_layernorm.weight": (vh,),
        "mlp.linear_fc1.weight": (2 * vi // tp, vh), "mlp.linear_fc1.bias": (2 * vi // tp,),
        "mlp.linear_fc2.weight": (vh, vi // tp), "mlp.linear_fc2.bias": (vh,),
    }
    text_layer = {
        "input_layernorm.weight": (H,),
        "self_attention.linear_qkv.weight": ((nh + 2 * nkv) * hd // tp, H),
        "self_attention.linear_qkv.bias": ((nh + 2 * nkv) * hd // tp,),
        "self_attention.linear_proj.weight": (H, nh * hd // tp),
        "pre_mlp_layernorm.weight": (H,),
        "mlp.linear_fc1.weight": (2 * inter // tp, H),
        "mlp.linear_fc2.weight": (H, inter // tp),
    }
    vit_stages = [s for s, n in enumerate(vit) if n]
    llm_stages = [s for s, n in enumerate(llm) if n]
    untied = not cfg["tie_word_embeddings"]
    stages = []
    for s in range(len(llm)):
        shapes: dict[str, tuple] = {}
        if s == vit_stages[0]:
            shapes["image_encoder.encoder.patch_embed.proj.weight"] = (vh, 3, tpatch, patch, patch)
        for i in range(vit[s]):
            shapes.update({f"image_encoder.encoder.blocks.layers.{i}.{k}": shape for k, shape in vision_layer.items()})
        if s == vit_stages[-1]:
            shapes.update({
                "image_encoder.projector.layernorm.weight": (vh,),
                "image_encoder.projector.encoder.linear_fc1.weight": (merger // tp, merger),
                "image_encoder.projector.encoder.linear_fc1.bias": (merger // tp,),
                "image_encoder.projector.encoder.linear_fc2.weight": (H, merger // tp),
                "image_encoder.projector.encoder.linear_fc2.bias": (H,),
            })
        if s == llm_stages[0]:
            shapes["text_decoder.embedding.word_embeddings.weight"] = (vocab // tp, H)
        for i in range(llm[s]):
            shapes.update({f"text_decoder.decoder.layers.{i}.{k}": shape for k, shape in text_layer.items()})
        if s == llm_stages[-1]:
            shapes["text_decoder.decoder.final_layernorm.weight"] = (H,)
            # Megatron: a tied head has no output layer unless the embedding lives on another stage.
            if untied or llm_stages[0] != llm_stages[-1]:
                shapes["text_decoder.output_layer.weight"] = (vocab // tp, H)
        stages.append(shapes)
    return stages


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_rank_file_holds_the_expected_shards(converted, layout, head):
    hf, mm, _ = converted(layout, head)
    tp, llm, vit, vpp = LAYOUTS[layout]
    pp = len(llm) // vpp
    expected = _expected_stage_shapes(json.loads((hf / "config.json").read_text()), tp, llm, vit)

    assert (mm / "latest_checkpointed_iteration.txt").read_text() == "release"
    dirs = {f"mp_rank_{r:02d}" + (f"_{p:03d}" if pp > 1 else "") for r in range(tp) for p in range(pp)}
    assert {d.name for d in (mm / "release").iterdir()} == dirs
    for tp_rank in range(tp):
        for pp_rank in range(pp):
            payload = torch.load(_rank_file(mm, tp_rank, pp_rank, pp), weights_only=True)
            assert payload["checkpoint_version"] == 3.0
            chunk_keys = ["model"] if vpp == 1 else [f"model{c}" for c in range(vpp)]
            assert sorted(payload) == sorted(chunk_keys + ["checkpoint_version"])
            for chunk, key in enumerate(chunk_keys):
                got = {name: tuple(t.shape) for name, t in payload[key].items()}
                assert got == expected[chunk * pp + pp_rank], (tp_rank, pp_rank, key)


# ------------------------------------------------------------------------- shard contents, by hand


def _text_qkv_shard(hf: dict, layer: int, cfg: dict, tp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s rows of the fused text qkv: its KV groups, each [its q heads, k head, v head]."""
    t = cfg["text_config"]
    hd = t["hidden_size"] // t["num_attention_heads"]
    q_per_group = t["num_attention_heads"] // t["num_key_value_heads"]
    q, k, v = (hf[f"model.layers.{layer}.self_attn.{p}_proj.weight"] for p in "qkv")
    groups_per_rank = t["num_key_value_heads"] // tp
    rows = []
    for g in range(rank * groups_per_rank, (rank + 1) * groups_per_rank):
        rows += [q[g * q_per_group * hd:(g + 1) * q_per_group * hd], k[g * hd:(g + 1) * hd], v[g * hd:(g + 1) * hd]]
    return torch.cat(rows)


def _vision_qkv_shard(hf: dict, layer: int, cfg: dict, tp: int, rank: int) -> torch.Tensor:
    v = cfg["vision_config"]
    vh, heads = v["hidden_size"], v["num_heads"]
    hd = vh // heads
    qkv = hf[f"visual.blocks.{layer}.attn.qkv.weight"]
    q, k, val = qkv[:vh], qkv[vh:2 * vh], qkv[2 * vh:]
    per_rank = heads // tp
    return torch.cat([x[h * hd:(h + 1) * hd] for h in range(rank * per_rank, (rank + 1) * per_rank) for x in (q, k, val)])


def test_shards_follow_the_megatron_layout(converted):
    hf_dir, mm, _ = converted("tp2-pp2", "untied")
    cfg = json.loads((hf_dir / "config.json").read_text())
    hf = load_file(str(hf_dir / "model.safetensors"))
    inter, vi = cfg["text_config"]["intermediate_size"], cfg["vision_config"]["intermediate_size"]
    vocab, hidden = cfg["text_config"]["vocab_size"], cfg["text_config"]["hidden_size"]
    for rank in range(2):
        stage0 = torch.load(_rank_file(mm, rank, 0, 2), weights_only=True)["model"]
        stage1 = torch.load(_rank_file(mm, rank, 1, 2), weights_only=True)["model"]
        # text layer 4 is the second layer of stage 1 (stage 0 holds layers 0-2)
        assert torch.equal(stage1["text_decoder.decoder.layers.1.self_attention.linear_qkv.weight"],
                           _text_qkv_shard(hf, 4, cfg, 2, rank))
        assert torch.equal(stage0["image_encoder.encoder.blocks.layers.1.self_attention.linear_qkv.weight"],
                           _vision_qkv_shard(hf, 1, cfg, 2, rank))
        rows = slice(rank * inter // 2, (rank + 1) * inter // 2)
        assert torch.equal(stage0["text_decoder.decoder.layers.0.mlp.linear_fc1.weight"],
                           torch.cat([hf["model.layers.0.mlp.gate_proj.weight"][rows],
                                      hf["model.layers.0.mlp.up_proj.weight"][rows]]))
        vrows = slice(rank * vi // 2, (rank + 1) * vi // 2)
        assert torch.equal(stage0["image_encoder.encoder.blocks.layers.0.mlp.linear_fc1.bias"],
                           torch.cat([hf["visual.blocks.0.mlp.gate_proj.bias"][vrows],
                                      hf["visual.blocks.0.mlp.up_proj.bias"][vrows]]))
        assert torch.equal(stage0["text_decoder.embedding.word_embeddings.weight"],
                           hf["model.embed_tokens.weight"][rank * vocab // 2:(rank + 1) * vocab // 2])
        assert torch.equal(stage1["text_decoder.output_layer.weight"],
                           hf["lm_head.weight"][rank * vocab // 2:(rank + 1) * vocab // 2])
        assert torch.equal(stage0["text_decoder.decoder.layers.2.self_attention.linear_proj.weight"],
                           hf["model.layers.2.self_attn.o_proj.weight"][:, rank * hidden // 2:(rank + 1) * hidden // 2])
        assert torch.equal(stage0["image_encoder.encoder.blocks.layers.0.self_attention.linear_proj.bias"],
                           hf["visual.blocks.0.attn.proj.bias"])  # row-parallel bias: copied, not split
        assert torch.equal(stage1["text_decoder.decoder.final_layernorm.weight"], hf["model.norm.weight"])


def test_tied_head_is_copied_to_the_last_text_stage(converted):
    hf_dir, mm, _ = converted("tp2-pp2", "tied")
    embedding = load_file(str(hf_dir / "model.safetensors"))["model.embed_tokens.weight"]
    for rank in range(2):
        last = torch.load(_rank_file(mm, rank, 1, 2), weights_only=True)["model"]
        assert torch.equal(last["text_decoder.output_layer.weight"], embedding.chunk(2)[rank])


def test_layout_module_is_numpy_only():
    """The plan (names, placement, row orders) stays testable and reusable without torch."""
    tree = ast.parse((Path(layout.__file__)).read_text())
    imported = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert "torch" not in imported and "numpy" in imported


def test_row_orders():
    # 2 KV groups, 2 query rows and 1 key/value row each: [Q0 Q0 Q1 Q1 | K0 K1 | V0 V1] -> per group q,q,k,v
    assert qkv_interleave_order(2, 2, 1).tolist() == [0, 1, 4, 6, 2, 3, 5, 7]
    # [g0 g1 g2 g3 | u0 u1 u2 u3] split 2 ways -> rank 0 [g0 g1 u0 u1], rank 1 [g2 g3 u2 u3]
    assert glu_split_order(8, 2).tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    order = qkv_interleave_order(4, 6, 2)
    assert sorted(order.tolist()) == list(range(order.size))  # a permutation: nothing lost or doubled


# ------------------------------------------------------------------------------- CLI and bad input


@pytest.mark.parametrize("args, message", [
    ("--llm-pp-layers 1,3,3 --vit-pp-layers 2,0,0", "--llm-pp-layers 1,3,3 sums to 7 but the model has 8 layers"),
    ("--llm-pp-layers 8 --vit-pp-layers 3", "--vit-pp-layers 3 sums to 3 but the model has 2 layers (vision_config.depth)"),
    ("--llm-pp-layers 4,4 --vit-pp-layers 1,1", "the vision tower must come before the text layers"),
    ("--llm-pp-layers 4,4 --vit-pp-layers 2,0,0", "--llm-pp-layers has 2 entries but --vit-pp-layers has 3"),
    ("--llm-pp-layers 4,4,0 --vit-pp-layers 2,0,0 --vpp 2", "--vpp 2 does not divide the 3 stages"),
    ("--llm-pp-layers 4,4 --vit-pp-layers 2,0 --vpp 2", "a virtual pipeline needs at least two"),
    ("--llm-pp-layers 4,four --vit-pp-layers 2,0", "expected comma-separated layer counts"),
    ("--llm-pp-layers 9,-1 --vit-pp-layers 2,0", "layer counts cannot be negative"),
    ("--llm-pp-layers 4,4", "give both --llm-pp-layers and --vit-pp-layers"),
    ("--tp 4", "--tp 4 does not divide text_config.num_key_value_heads = 2"),
])
def test_bad_layer_lists_are_one_line_errors(tiny_dirs, tmp_path, capsys, args, message):
    out = tmp_path / "mm"
    rc = main(["convert", "hf-to-mindspeed", "--hf-dir", str(tiny_dirs["untied"]), "--out", str(out), *args.split()])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and message in err and "\n" not in err, err
    assert not out.exists() and not list(tmp_path.glob(".mm.tmp-*"))


def test_cli_round_trip_loads_in_transformers(tiny_dirs, tmp_path, capsys):
    from transformers import AutoModelForImageTextToText

    src = tiny_dirs["tied"]
    assert main(["convert", "hf-to-mindspeed", "--hf-dir", str(src), "--out", str(tmp_path / "mm"), "--tp", "2"]) == 0
    assert main(["convert", "mindspeed-to-hf", "--mm-dir", str(tmp_path / "mm"), "--hf-dir", str(src),
                 "--out", str(tmp_path / "hf")]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "mm"), str(tmp_path / "hf")]
    assert (tmp_path / "mm" / "release" / "mp_rank_01" / "model_optim_rng.pt").is_file()
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf")
    original = AutoModelForImageTextToText.from_pretrained(src)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # still tied
    for (name, a), (_, b) in zip(original.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name


def test_transformers5_names_are_read(tiny_dirs, tmp_path):
    """Checkpoints saved as model.language_model.* / model.visual.* convert like the released names."""
    src = tmp_path / "new-names"
    shutil.copytree(tiny_dirs["untied"], src)
    weights = load_file(str(src / "model.safetensors"))
    renamed = {n.replace("model.", "model.language_model.", 1) if n.startswith("model.") else
               "model." + n if n.startswith("visual.") else n: t for n, t in weights.items()}
    save_file(renamed, str(src / "model.safetensors"), metadata={"format": "pt"})
    back = mindspeed_to_hf(hf_to_mindspeed(src, tmp_path / "mm", tp=2), src, tmp_path / "back")
    _assert_same_weights(tiny_dirs["untied"], back)


def test_shards_like_the_config_dirs_index(converted, tmp_path):
    hf_dir, mm, _ = converted("tp1-pp1", "untied")
    config_dir = tmp_path / "sharded"
    shutil.copytree(hf_dir, config_dir)
    names = sorted(load_file(str(hf_dir / "model.safetensors")))
    weight_map = {n: ("model-00001-of-00002.safetensors" if n.startswith("visual.") else
                      "model-00002-of-00002.safetensors") for n in names}
    (config_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    out = mindspeed_to_hf(mm, config_dir, tmp_path / "out")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map and not (out / "model.safetensors").exists()
    assert sorted(load_file(str(out / "model-00001-of-00002.safetensors"))) == [n for n in names if n.startswith("visual.")]


def _copy_mm(mm: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "mm-copy"
    shutil.copytree(mm, copy)
    return copy


def test_missing_rank_file_is_named(converted, tmp_path):
    hf_dir, mm, _ = converted("tp2-pp2", "untied")
    broken = _copy_mm(mm, tmp_path)
    shutil.rmtree(broken / "release" / "mp_rank_01_001")
    with pytest.raises(ConvertError, match="missing model_optim_rng.pt of mp_rank_01_001"):
        mindspeed_to_hf(broken, hf_dir, tmp_path / "out")


def test_trained_apart_tied_head_is_not_dropped(converted, tmp_path):
    hf_dir, mm, _ = converted("tp2-pp2", "tied")
    broken = _copy_mm(mm, tmp_path)
    path = _rank_file(broken, 0, 1, 2)
    payload = torch.load(path, weights_only=True)
    payload["model"]["text_decoder.output_layer.weight"] += 1
    torch.save(payload, path)
    with pytest.raises(ConvertError, match="differs from the word embeddings"):
        mindspeed_to_hf(broken, hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pickled_objects_need_trust_pickle(converted, tmp_path):
    hf_dir, mm, _ = converted("tp1-pp1", "untied")
    with_args = _copy_mm(mm, tmp_path)
    path = _rank_file(with_args, 0, 0, 1)
    payload = torch.load(path, weights_only=True)
    payload["args"] = argparse.Namespace(tensor_model_parallel_size=1)  # as Megatron training checkpoints carry
    torch.save(payload, path)
    with pytest.raises(ConvertError, match="--trust-pickle"):
        mindspeed_to_hf(with_args, hf_dir, tmp_path / "out")
    _assert_same_weights(hf_dir, mindspeed_to_hf(with_args, hf_dir, tmp_path / "out", trust_pickle=True))
