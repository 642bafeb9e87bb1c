"""The model families: each known one maps to its transformers class; Qwen3-VL-MoE and unknown
model types are refused at start-up with the reason."""
import json

import pytest
import transformers

from r1vl.model.families import FAMILIES, family
from r1vl.model.policy import check_checkpoint_dir


def test_every_family_names_a_transformers_class_of_its_model_type():
    for model_type, spec in FAMILIES.items():
        cls = getattr(transformers, spec.model_class)
        assert cls.config_class.model_type == model_type


def test_qwen3_vl_has_no_default_system_turn():
    assert FAMILIES["qwen3_vl"].default_system is None
    assert FAMILIES["qwen2_vl"].default_system == FAMILIES["qwen2_5_vl"].default_system == "You are a helpful assistant."


@pytest.mark.parametrize("model_type,message", [
    ("qwen3_vl_moe", "is not supported: Qwen3-VL-MoE's decoder routes each token to experts"),
    ("llava", r"is not one of \('qwen2_vl', 'qwen2_5_vl', 'qwen3_vl'\)"),
])
def test_other_model_types_are_refused_with_the_reason(tmp_path, model_type, message):
    with pytest.raises(ValueError, match=message):
        family(model_type)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(ValueError, match=f"--model {tmp_path}: model_type '{model_type}' {message}"):
        check_checkpoint_dir(tmp_path)
