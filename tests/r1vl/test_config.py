"""Options: the paper's defaults, the tiny demo's, the CLI and file layers, refusals, and the
stages they are nested in."""
import dataclasses
import json
import subprocess
import sys

import pytest

from r1vl.config import (
    FAMILY_TYPES,
    OPTION_FIELDS,
    STAGE_CLASSES,
    TINY_DEFAULTS,
    TINY_FAMILY_DEFAULTS,
    Config,
    make_config,
    parse_config,
    to_dict,
)


def test_defaults_are_the_papers_for_a_real_model():
    cfg = parse_config(["--model", "some/dir", "--data", "train.jsonl"])
    assert (cfg.sampling.num_generations, cfg.objective.beta, cfg.optimizer.lr, cfg.sampling.temperature) \
        == (4, 0.04, 1e-6, 1.2)
    assert (cfg.sampling.max_prompt_length, cfg.sampling.max_completion_length, cfg.dataset.max_pixels) \
        == (512, 1024, 400000)
    assert cfg.policy.dtype == "auto" and cfg.objective.num_iterations == 1 and cfg.objective.loss_type == "grpo"


def test_tiny_defaults_apply_under_explicit_options():
    cfg = parse_config([])
    assert cfg.policy.model == "tiny" and cfg.run.stage == "sft+grpo" and cfg.optimizer.lr == TINY_DEFAULTS["lr"]
    assert parse_config(["--lr", "0.5"]).optimizer.lr == 0.5  # the command line wins over the preset


def test_file_then_command_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: ckpt\ndata: d.jsonl\nbeta: 0\nlr: 2.0e-6\ntop_p: 0.9\n")
    cfg = parse_config(["--config", str(path), "--lr", "3e-6"])
    assert (cfg.objective.beta, cfg.sampling.top_p, cfg.optimizer.lr) == (0.0, 0.9, 3e-6)
    as_json = tmp_path / "run.json"
    as_json.write_text(json.dumps({"model": "ckpt", "data": "d.jsonl", "num_generations": 8, "batch_size": 16}))
    assert parse_config(["--config", str(as_json)]).sampling.num_generations == 8


def test_list_options_from_the_command_line_and_a_file(tmp_path):
    """--reward_funcs / --reward_weights take several values (nargs="+"); a file gives lists
    (or one value); the command line still wins; config.json holds them as lists."""
    from r1vl.config import to_dict

    (tmp_path / "fmt.py").write_text("def fmt(completions, **kwargs):\n    return [0.0] * len(completions)\n")
    cfg = parse_config(["--reward_funcs", "steprar", "steprvr", f"{tmp_path}/fmt.py:fmt", "--reward_weights", "1",
                        "1", "0.5", "--lr", "1e-3"])
    assert cfg.reward.reward_funcs == ("steprar", "steprvr", f"{tmp_path}/fmt.py:fmt")
    assert cfg.reward.reward_weights == (1, 1, 0.5)
    path = tmp_path / "run.yaml"
    path.write_text("reward_funcs: [accuracy, steprvr]\nreward_weights: [2, 1]\n")
    assert parse_config(["--config", str(path)]).reward.reward_weights == (2.0, 1.0)
    assert parse_config(["--config", str(path), "--reward_weights", "3", "4"]).reward.reward_weights == (3.0, 4.0)
    path.write_text("reward_funcs: accuracy\n")
    assert parse_config(["--config", str(path)]).reward.reward_funcs == ("accuracy",)
    assert json.loads(json.dumps(to_dict(cfg))) == to_dict(cfg)  # what config.json reads back
    path.write_text("reward_weights: [one]\n")
    with pytest.raises(ValueError, match="option reward_weights must be a list of float"):
        parse_config(["--config", str(path)])
    with pytest.raises(SystemExit):
        parse_config(["--reward_weights", "one"])


def test_bool_options_parse_words():
    cfg = parse_config(["--reward_normalize", "true", "--progress", "off"])
    assert cfg.reward.reward_normalize is True and cfg.run.progress is False
    with pytest.raises(SystemExit):
        parse_config(["--progress", "maybe"])


def test_ignore_eos_is_off_unless_asked():
    assert parse_config([]).sampling.ignore_eos is False  # training stops at EOS; only benchmarks turn it off
    assert parse_config(["--ignore_eos", "true"]).sampling.ignore_eos is True


def test_unknown_options_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_config(["--learning_rate", "1e-6"])
    assert "unrecognized arguments" in capsys.readouterr().err
    path = tmp_path / "bad.yaml"
    path.write_text("lr: 1e-6\ngroup_size: 4\n")
    with pytest.raises(ValueError, match="unknown option"):
        parse_config(["--config", str(path)])


@pytest.mark.parametrize("values, message", [
    (dict(batch_size=6), "multiple of --num_generations"),
    (dict(beta=-0.1), "--beta must be >= 0"),
    (dict(num_generations=1, batch_size=4), "num_generations must be >= 2"),
    (dict(loss_type="ppo"), "--loss_type"),
    (dict(stage="rl"), "--stage"),
    (dict(temperature=0.0), "--temperature"),
    (dict(top_p=1.5), "--top_p"),
    (dict(max_pixels=100, min_pixels=3136), "--max_pixels"),
    (dict(micro_batch_tokens=100), "must hold one whole sequence"),
    (dict(model="ckpt"), "needs --data"),
    (dict(lr=0.0), "--lr"),
    (dict(num_steps="ten"), "must be int"),
    (dict(family="llava"), "--family must be"),
    (dict(model="ckpt", data="d.jsonl", family="qwen3_vl"), "model_type in its config.json"),
    (dict(reward_timeout_s=0.0), "--reward_timeout_s must be > 0"),
])
def test_contradictions_fail_with_the_option_named(values, message):
    with pytest.raises(ValueError, match=message):
        make_config(**values)


@pytest.mark.parametrize("values, message", [
    (dict(reward_funcs=["missing.py:fn"]), "--reward_funcs missing.py:fn: no such file"),
    (dict(reward_funcs=[]), "--reward_funcs needs at least one function"),
])
def test_reward_functions_are_checked_at_start_up(values, message):
    """The functions are read by r1vl.rewards (config.py imports no domain module), at start-up."""
    from r1vl.run.setup import check_inputs

    with pytest.raises(ValueError, match=message):
        check_inputs(make_config(**values))


def test_beta_zero_needs_no_reference():
    cfg = make_config(beta=0.0)
    assert cfg.sampling.prompts_per_step == cfg.sampling.batch_size // cfg.sampling.num_generations


def test_every_field_has_a_help_text():
    undocumented = [f.name for f in OPTION_FIELDS if not f.metadata.get("help")]
    assert undocumented == []


def test_tiny_qwen3_vl_reads_the_pictures_at_64_pixels():
    """Qwen3-VL's image sides are multiples of 32: the 56-pixel synthetic pictures are read at
    64 x 64 (2 x 2 merged tokens, as 56 x 56 gives Qwen2-VL), unless asked otherwise."""
    assert make_config(family="qwen3_vl").dataset.max_pixels == 64 * 64
    assert make_config(family="qwen3_vl").objective.num_steps == 250 and make_config().objective.num_steps == 150
    assert make_config(family="qwen3_vl", max_pixels=5000).dataset.max_pixels == 5000
    assert make_config().dataset.max_pixels == make_config(family="qwen2_vl").dataset.max_pixels == 56 * 56


# -------------------------------------------------------------------------------- the stages


def test_each_option_lives_in_one_small_stage():
    """One dataclass per stage, none over 25 options; names unique across stages (the CLI, a
    --config file and config.json are flat), and every preset names a real option."""
    names = [f.name for f in OPTION_FIELDS]
    assert len(names) == len(set(names))
    assert all(len(dataclasses.fields(kind)) <= 25 for kind in STAGE_CLASSES.values())
    assert not set(names) & set(STAGE_CLASSES)  # cfg.<stage> never shadows a flat name
    for preset in (TINY_DEFAULTS, *TINY_FAMILY_DEFAULTS.values()):
        assert set(preset) <= set(names)


def test_flat_values_round_trip_through_the_stages():
    cfg = parse_config(["--temperature", "0.9", "--lr", "3e-6", "--eval_prompts", "8"])
    assert (cfg.sampling.temperature, cfg.optimizer.lr, cfg.evaluation.eval_prompts) == (0.9, 3e-6, 8)
    flat = to_dict(cfg)
    assert flat["temperature"] == 0.9 and len(flat) == len(OPTION_FIELDS)
    assert make_config(**json.loads(json.dumps(flat))) == cfg  # RUN_DIR/config.json reads back the same
    assert Config.from_flat(flat) == cfg
    changed = cfg.replace(top_p=0.5)
    assert changed.sampling.top_p == 0.5 and cfg.sampling.top_p == 1.0 and changed.optimizer == cfg.optimizer


def test_activation_checkpointing_takes_booleans_too():
    """on / off / auto, and the true / false every other boolean option takes (true = on)."""
    assert parse_config(["--activation_checkpointing", "true"]).policy.activation_checkpointing == "on"
    assert parse_config(["--activation_checkpointing", "False"]).policy.activation_checkpointing == "off"
    assert parse_config(["--activation_checkpointing"]).policy.activation_checkpointing == "on"
    assert parse_config(["--activation_checkpointing", "off"]).policy.activation_checkpointing == "off"
    assert make_config(activation_checkpointing=True).policy.activation_checkpointing == "on"  # YAML: true, on
    assert make_config().policy.activation_checkpointing == "auto"
    with pytest.raises(ValueError, match="--activation_checkpointing must be auto, on or off"):
        make_config(activation_checkpointing="maybe")


def test_yaml_booleans_reach_activation_checkpointing(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("activation_checkpointing: off\n")  # YAML 1.1 reads off as false
    assert parse_config(["--config", str(path)]).policy.activation_checkpointing == "off"


def test_family_choices_are_the_model_families():
    from r1vl.model.families import FAMILIES

    assert FAMILY_TYPES == tuple(FAMILIES)


def test_config_imports_no_other_part_of_r1vl():
    code = "import sys, r1vl.config; print(sorted(m for m in sys.modules if m.startswith('r1vl')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['r1vl', 'r1vl.config']"
