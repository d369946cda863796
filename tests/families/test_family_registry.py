"""The registry itself: names, unknown families, capability flags that agree with the backends."""

from __future__ import annotations

import importlib.util
import json

import pytest

from vltune.core.families import FAMILIES, UnknownFamilyError, family_names, get_family, read_model_info


def test_spec_is_named_after_its_file_and_complete(family, spec):
    assert spec.name == family
    assert spec.architecture.endswith("ForConditionalGeneration")
    assert spec.position.video_time in ("frame_index", "seconds", "per_frame")
    assert spec.media.video_placeholder in ("pads", "timestamped_frames")
    assert "preprocessor_config.json" in spec.processor_configs()
    for name, shape in spec.shapes.items():
        assert shape.model_type == family and shape.name == name, name


def test_shape_names_are_unique_across_families():
    from vltune.core.families import all_shapes

    assert len(all_shapes()) == sum(len(s.shapes) for s in FAMILIES.values())


def test_unknown_model_type_lists_the_families(tmp_path):
    with pytest.raises(UnknownFamilyError) as e:
        get_family("llava")
    assert all(name in str(e.value) for name in FAMILIES)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl_text"}))
    with pytest.raises(UnknownFamilyError, match="qwen2_vl_text.*supported"):
        read_model_info(tmp_path)


def test_broken_config_json_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        read_model_info(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_model_info(tmp_path / "missing")


def test_every_family_has_a_torch_entry(family):
    pytest.importorskip("torch")
    from vltune.backends.torch.models import model_entry

    assert model_entry(family) is not None


def test_mindspore_flag_agrees_with_the_mindspore_entries(family, spec):
    has_file = importlib.util.find_spec(f"vltune.backends.mindspore.models.{family}") is not None
    assert has_file == spec.capabilities.mindspore, (family, has_file)
    assert (family in family_names("mindspore")) == spec.capabilities.mindspore


def test_mindspeed_flag_agrees_with_the_name_table(spec):
    assert (spec.mindspeed_rules is not None) == spec.capabilities.mindspeed
