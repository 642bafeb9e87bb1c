"""train.py with the user's reward functions, end to end on the built-in tiny model (one short
StepGRPO step each): the columns and images reach the function, each function's mean is logged
and drawn, its rewards move the loss; a function that raises stops the run with one `error:`
line naming it, the record and the message; a bad function is refused before the model loads."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "reward_functions.py"
PROBE = '''
import json

def probe(prompts, completions, completion_ids, images, **kwargs):
    """Writes down what it received; rewards the sum of the token ids mod 3 (varies in a group)."""
    with open("probe.json", "a") as f:
        f.write(json.dumps({"columns": sorted(kwargs), "n": len(completions),
                            "image": list(images[0][0].size),
                            "prompt_image": list(prompts[0][0]["content"][0]["image"].size),
                            "completion": completions[0][0]["role"], "step": kwargs["trainer_state"].global_step}))
    return [float(sum(ids) % 3) for ids in completion_ids]

def boom(completions, problem, **kwargs):
    if any("colour" in q for q in problem):
        raise ValueError("cannot judge colours")
    return [0.0] * len(completions)
'''
SHORT = ["--stage", "grpo", "--num_steps", "1", "--eval_prompts", "0", "--save_final", "false", "--save_every", "0",
         "--max_completion_length", "24"]


def _train(args, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels")]), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, str(ROOT / "train.py"), "--progress", "false", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def probe_dir(tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    return tmp_path


@pytest.mark.timeout(900)
def test_user_functions_train_and_are_logged(probe_dir):
    funcs = ["steprar", "steprvr", f"{EXAMPLE}:sections_in_order", f"{EXAMPLE}:colour_check", "probe.py:probe"]
    result = _train([*SHORT, "--run_dir", "run", "--reward_funcs", *funcs, "--reward_weights", "1", "1", "0.5", "1",
                     "1"], probe_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    received = json.loads((probe_dir / "probe.json").read_text())
    assert received["columns"] == ["image", "image_path", "key_steps", "log_extra", "log_metric", "problem",
                                   "solution", "task", "trainer_state"]  # task: a column of the synthetic data
    assert received["n"] == 32 and received["image"] == received["prompt_image"] == [56, 56]
    assert received["completion"] == "assistant" and received["step"] == 0
    record = [json.loads(line) for line in (probe_dir / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    for name in ("steprar", "steprvr", "sections_in_order", "colour_check", "probe"):
        assert f"rewards/{name}" in record, name
    assert record["rewards/steprar"] == pytest.approx(record["step_rar"])  # the built-in is the paper's column
    # The probe's rewards reached the advantages: the paper's are all 0 for the untrained model,
    # so without them there would be no gradient.
    assert record["reward"] == 0 and 0 < record["rewards/probe"] < 2 and record["grad_norm"] > 0
    assert (probe_dir / "run" / "metrics.png").stat().st_size > 10_000


@pytest.mark.timeout(900)
def test_a_raising_function_stops_the_run_with_one_error_line(probe_dir):
    result = _train([*SHORT, "--run_dir", "run", "--reward_funcs", "steprar", "probe.py:boom"], probe_dir)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: reward function boom (probe.py:boom) raised on record ")
    assert last.endswith("data.jsonl:" + last.split("data.jsonl:")[1].split(":")[0] +
                         ": ValueError: cannot judge colours (probe.py line 15)")


def test_a_bad_function_is_refused_before_the_model_loads(probe_dir):
    result = _train(["--reward_funcs", "steprar", "probe.py:nope"], probe_dir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: --reward_funcs: probe.py has no attribute 'nope'"
    assert "r1vl: " not in result.stdout  # nothing loaded
