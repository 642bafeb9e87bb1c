"""Options: the paper's defaults, the tiny demo's, the CLI and file layers, and refusals."""
import json

import pytest

from r1vl.config import TINY_DEFAULTS, Config, make_config, parse_config


def test_defaults_are_the_papers_for_a_real_model():
    cfg = parse_config(["--model", "some/dir", "--data", "train.jsonl"])
    assert (cfg.num_generations, cfg.beta, cfg.lr, cfg.temperature) == (4, 0.04, 1e-6, 1.2)
    assert (cfg.max_prompt_length, cfg.max_completion_length, cfg.max_pixels) == (512, 1024, 400000)
    assert cfg.dtype == "auto" and cfg.num_iterations == 1 and cfg.loss_type == "grpo"


def test_tiny_defaults_apply_under_explicit_options():
    cfg = parse_config([])
    assert cfg.model == "tiny" and cfg.stage == "sft+grpo" and cfg.lr == TINY_DEFAULTS["lr"]
    assert parse_config(["--lr", "0.5"]).lr == 0.5  # the command line wins over the preset


def test_file_then_command_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: ckpt\ndata: d.jsonl\nbeta: 0\nlr: 2.0e-6\ntop_p: 0.9\n")
    cfg = parse_config(["--config", str(path), "--lr", "3e-6"])
    assert (cfg.beta, cfg.top_p, cfg.lr) == (0.0, 0.9, 3e-6)
    as_json = tmp_path / "run.json"
    as_json.write_text(json.dumps({"model": "ckpt", "data": "d.jsonl", "num_generations": 8, "batch_size": 16}))
    assert parse_config(["--config", str(as_json)]).num_generations == 8


def test_list_options_from_the_command_line_and_a_file(tmp_path):
    """--reward_funcs / --reward_weights take several values (nargs="+"); a file gives lists
    (or one value); the command line still wins; config.json holds them as lists."""
    from r1vl.config import to_dict

    (tmp_path / "fmt.py").write_text("def fmt(completions, **kwargs):\n    return [0.0] * len(completions)\n")
    cfg = parse_config(["--reward_funcs", "steprar", "steprvr", f"{tmp_path}/fmt.py:fmt", "--reward_weights", "1",
                        "1", "0.5", "--lr", "1e-3"])
    assert cfg.reward_funcs == ("steprar", "steprvr", f"{tmp_path}/fmt.py:fmt") and cfg.reward_weights == (1, 1, 0.5)
    path = tmp_path / "run.yaml"
    path.write_text("reward_funcs: [accuracy, steprvr]\nreward_weights: [2, 1]\n")
    assert parse_config(["--config", str(path)]).reward_weights == (2.0, 1.0)
    assert parse_config(["--config", str(path), "--reward_weights", "3", "4"]).reward_weights == (3.0, 4.0)
    path.write_text("reward_funcs: accuracy\n")
    assert parse_config(["--config", str(path)]).reward_funcs == ("accuracy",)
    assert json.loads(json.dumps(to_dict(cfg))) == to_dict(cfg)  # what config.json reads back
    path.write_text("reward_weights: [one]\n")
    with pytest.raises(ValueError, match="option reward_weights must be a list of float"):
        parse_config(["--config", str(path)])
    with pytest.raises(SystemExit):
        parse_config(["--reward_weights", "one"])


def test_bool_options_parse_words():
    assert parse_config(["--reward_normalize", "true", "--progress", "off"]).reward_normalize is True
    with pytest.raises(SystemExit):
        parse_config(["--progress", "maybe"])


def test_ignore_eos_is_off_unless_asked():
    assert parse_config([]).ignore_eos is False  # training stops at EOS; only benchmarks turn it off
    assert parse_config(["--ignore_eos", "true"]).ignore_eos is True


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
    (dict(reward_funcs=["missing.py:fn"]), "--reward_funcs missing.py:fn: no such file"),
    (dict(reward_funcs=[]), "--reward_funcs needs at least one function"),
])
def test_contradictions_fail_with_the_option_named(values, message):
    with pytest.raises(ValueError, match=message):
        make_config(**values)


def test_beta_zero_needs_no_reference():
    cfg = make_config(beta=0.0)
    assert cfg.prompts_per_step == cfg.batch_size // cfg.num_generations


def test_every_field_has_a_help_text():
    import dataclasses

    undocumented = [f.name for f in dataclasses.fields(Config) if not f.metadata.get("help")]
    assert undocumented == []


def test_tiny_qwen3_vl_reads_the_pictures_at_64_pixels():
    """Qwen3-VL's image sides are multiples of 32: the 56-pixel synthetic pictures are read at
    64 x 64 (2 x 2 merged tokens, as 56 x 56 gives Qwen2-VL), unless asked otherwise."""
    assert make_config(family="qwen3_vl").max_pixels == 64 * 64
    assert make_config(family="qwen3_vl").num_steps == 250 and make_config().num_steps == 150
    assert make_config(family="qwen3_vl", max_pixels=5000).max_pixels == 5000
    assert make_config().max_pixels == make_config(family="qwen2_vl").max_pixels == 56 * 56
