"""train.py end to end (in this process) on the datasets other trainers use (examples/byo_data.py writes them):
an EasyR1-style Parquet file with image bytes, a `datasets` save_to_disk directory and a
TRL-style JSONL with two images per prompt each run StepGRPO on a --model checkpoint."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("byo_data", ROOT / "examples" / "byo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_all(tmp_path_factory.mktemp("byo"), n=8)


@pytest.mark.parametrize("form,extra", [("easyr1", []), ("saved", []), ("trl", ["--max_images", "2"])])
def test_grpo_runs_on_each_form(written, tmp_path, capsys, form, extra):
    import train

    run_dir = tmp_path / "run"
    results = train.main([
        "--model", str(written["ckpt"]), "--data", str(written[form]), "--num_steps", "2", "--eval_prompts", "0",
        "--max_pixels", "3136", "--max_prompt_length", "128", "--max_completion_length", "8",
        "--micro_batch_tokens", "512", "--save_every", "0", "--save_final", "false", "--progress", "false",
        "--dtype", "float32", "--device", "cpu", "--run_dir", str(run_dir), *extra])
    assert f"data: {written[form]}" in capsys.readouterr().out and results["weight_digests"]
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["stage"] == "grpo"] == [1, 2]
    # Every prompt sampled (none over --max_prompt_length), every completion non-empty.
    assert all(r["skipped_prompts"] == 0 and r["completion_len"] > 0 for r in steps if r["stage"] == "grpo"), steps


def test_two_image_data_without_max_images_is_refused_at_start_up(written, tmp_path, capsys):
    import train

    with pytest.raises(SystemExit) as info:
        train.main(["--model", str(written["ckpt"]), "--data", str(written["trl"]), "--run_dir", str(tmp_path / "run")])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {written['trl']}: record 0: 2 images, more than --max_images 1"]
    assert not (tmp_path / "run").exists()
