"""python -m r1vl.eval end to end on the tiny model: a small file of each layout generated,
scored and tabled; resume, sharding over ranks, score-only, bad images; greedy decoding."""
import json
from pathlib import Path

import pytest
import torch
from evalkit_files import png_b64, write_tsv

from r1vl.eval import benchmarks
from r1vl.eval.__main__ import main
from r1vl.eval.inference import encode_item, generate_benchmark, generate_items, shard
from r1vl.eval.trainer_api import Dist, greedy, load_policy

Q = {"question": "How many red shapes?"}
ROWS = {
    "MathVista": [{"index": "1", **Q, "question_type": "free_form", "answer_type": "integer", "answer": "3"},
                  {"index": "2", **Q, "question_type": "multi_choice", "answer_type": "text",
                   "choices": "['3', '4']", "answer": "4", "answer_option": "B"}],
    "MMStar": [{"index": str(i), **Q, "A": "3", "B": "4", "answer": "AB"[i]} for i in range(2)],
    "MathVision": [{"index": "1", **Q, "choices": "[]", "answer": "3"},
                   {"index": "2", **Q, "choices": "['3', '4']", "answer": "B"}],
    "ChartQA": [{"index": str(i), **Q, "answer": a, "split": "human"} for i, a in enumerate(["3", "blue"])],
    "DynaMath": [{"index": str(i), **Q, "answer_type": t, "answer": a, "qid": "1", "varid": str(i)}
                 for i, (t, a) in enumerate([("float", "3.0"), ("multiple choice", "B")])],
    "HallusionBench": [{"index": f"VS_chart_x_0_0_{i}", **Q, "answer": a} for i, a in enumerate(["Yes", "No"])],
    "MathVerse": [{"index": "1", **Q, "answer": "A", "question_type": "multi-choice", "question_for_eval": "q"},
                  {"index": "2", **Q, "answer": "3", "question_type": "free-form", "question_for_eval": "q"}],
    "MME": [{"index": "1", "image": png_b64((9, 9, 9)), **Q, "answer": "Yes", "category": "count"},
            {"index": "2", "image": "1", **Q, "answer": "No", "category": "count"}],
}
ARGS = ["--max_new_tokens", "4", "--batch_size", "3", "--max_pixels", "3136", "--progress", "false"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from r1vl.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("eval")
    model = write_tiny_checkpoint(root / "model", ["How many red shapes? ### The final answer is: 3 Yes No A B"] * 4)
    benches = [f"{name}={write_tsv(root / f'{name}.tsv', rows)}" for name, rows in ROWS.items()]
    return model, [a for b in benches for a in ("--bench", b)]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_end_to_end_resume_and_score_only(tmp_path, files, capsys):
    model, bench_args = files
    out = tmp_path / "out"
    assert main(["--model", str(model), "--out", str(out), *bench_args, *ARGS]) == 0
    table = capsys.readouterr().out
    assert "| Model | MathVista | MMStar | Math-V | ChartQA | DynaMath | HallBench | MathVerse | MME_sum | AVG |" in table
    assert "| model (this run) |" in table and "| R1-VL-7B (paper, quoted) | 63.5 |" in table
    assert (out / "results.md").read_text() == table
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["results"]) == set(ROWS)
    # No judge: MathVerse's items (all sent to VLMEvalKit's judge) are rule-only, so no AVG.
    assert metrics["results"]["MathVerse"]["counts"]["rule_only"] == 2 and metrics["avg"] is None
    assert all(r["protocol"] == "vlmevalkit" for r in metrics["results"].values())
    for name in ROWS:
        lines = _lines(out / name / "predictions.rank0.jsonl")
        assert [r["index"] for r in lines] == [r["index"] for r in ROWS[name]]
        assert all(1 <= r["tokens"] <= 4 for r in lines)
        assert metrics["results"][name]["counts"]["scored"] == 2

    # A kill after the first line: the rerun generates only the missing item, and greedy
    # decoding gives it the same text.
    path = out / "MMStar" / "predictions.rank0.jsonl"
    before = _lines(path)
    path.write_text(json.dumps(before[0]) + "\n" + json.dumps(before[1])[:15])
    assert main(["--model", str(model), "--out", str(out), *bench_args, *ARGS]) == 0
    assert _lines(path) == before
    capsys.readouterr()

    assert main(["--score-only", "--out", str(out), "--name", "model", *bench_args]) == 0
    assert capsys.readouterr().out == table

    # A predictions file made elsewhere ({index, prediction} lines) is scored the same way.
    elsewhere = tmp_path / "mmstar_preds.jsonl"
    elsewhere.write_text("".join(json.dumps({"index": r["index"], "prediction": "### The final answer is:\nA"}) + "\n"
                                 for r in ROWS["MMStar"]))
    mmstar = next(b for b in bench_args if b.startswith("MMStar="))
    assert main(["--score-only", "--out", str(tmp_path / "x"), "--bench", mmstar,
                 "--predictions", f"MMStar={elsewhere}"]) == 0
    assert "- MMStar (MMStar): 50.0; 2 of 2 items scored" in capsys.readouterr().out

    # Other generation settings in the same directory are refused.
    assert main(["--model", str(model), "--out", str(out), *bench_args, *ARGS[:-2], "--protocol", "paper"]) == 2
    assert "holds predictions made with other settings" in capsys.readouterr().err
    # --fix na-text changes the questions (cells reading None, NA, ... kept): refused too
    assert main(["--model", str(model), "--out", str(out), *bench_args, *ARGS, "--fix", "na-text"]) == 2
    assert "'na_text': (None, True)" in capsys.readouterr().err


def test_sharding_over_ranks(tmp_path, files):
    model, _ = files
    policy = load_policy(model, torch.float32, torch.device("cpu"), 3136, 3136)
    bench = benchmarks.get("MMStar")
    rows = [{"index": str(i), **Q, "A": "3", "B": "4", "answer": "A"} for i in range(5)]
    table = benchmarks.load(bench, write_tsv(tmp_path / "m.tsv", rows))
    # What two torchrun ranks do: both take their share before either writes (the barrier).
    shares = [shard(table, tmp_path / "two", Dist(rank, 2, rank, torch.device("cpu"))) for rank in (0, 1)]
    for rank, items in enumerate(shares):
        generate_items(policy, bench, items, tmp_path / "two", rank, batch_size=2, max_new_tokens=3,
                       max_pixels=3136, progress=False)
    one = Dist(0, 1, 0, torch.device("cpu"))
    generate_benchmark(policy, bench, table, tmp_path / "one", one, batch_size=5, max_new_tokens=3,
                       max_pixels=3136, progress=False)
    rank0, rank1 = (_lines(tmp_path / "two" / f"predictions.rank{r}.jsonl") for r in (0, 1))
    assert [r["index"] for r in rank0] == ["0", "2", "4"] and [r["index"] for r in rank1] == ["1", "3"]
    single = {r["index"]: r["prediction"] for r in _lines(tmp_path / "one" / "predictions.rank0.jsonl")}
    assert {r["index"]: r["prediction"] for r in rank0 + rank1} == single  # batching does not change greedy


def test_unreadable_image(tmp_path, files, capsys):
    model, _ = files
    rows = [{"index": "0", "image": "A" * 100, **Q, "A": "3", "B": "4", "answer": "A"},
            {"index": "1", **Q, "A": "3", "B": "4", "answer": "B"}]
    bench = f"MMStar={write_tsv(tmp_path / 'm.tsv', rows)}"
    args = ["--model", str(model), "--bench", bench, *ARGS]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    assert "m.tsv: row 1 (index 0): unreadable image" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "b"), "--skip_bad_rows"]) == 0
    assert "1 of 2 items scored; skipped 1" in capsys.readouterr().out


def test_synthetic_held_out(tmp_path, files, capsys):
    """The built-in run's policy is scored the same way on the synthetic task's held-out records."""
    from r1vl.data.synthetic import write_dataset

    model, _ = files
    data = write_dataset(tmp_path / "syn", n=5, seed=3)
    assert main(["--model", str(model), "--bench", f"R1VL={data}", "--last", "2", "--out", str(tmp_path / "o"),
                 *ARGS]) == 0
    assert "- R1VL (R1VL): 0.0; 2 of 2 items scored" in capsys.readouterr().out


def test_bad_arguments(tmp_path, files, capsys):
    model, bench_args = files
    assert main(["--out", str(tmp_path), *bench_args]) == 2
    assert "--model is required" in capsys.readouterr().err
    assert main(["--score-only", "--out", str(tmp_path), "--bench", "MMMU=x.tsv"]) == 2
    assert "unknown benchmark 'MMMU'" in capsys.readouterr().err
    assert main(["--model", str(tmp_path), "--out", str(tmp_path), *bench_args]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_greedy_is_the_argmax(tmp_path, files):
    """Every greedy token is the argmax of the model's logits given the prompt and the tokens
    before it (one teacher-forced forward over the whole sequence)."""
    model, _ = files
    policy = load_policy(model, torch.float32, torch.device("cpu"), 3136, 3136)
    bench = benchmarks.get("MMStar")
    table = benchmarks.load(bench, write_tsv(tmp_path / "m.tsv", ROWS["MMStar"]))
    prompt = encode_item(table.items[0], bench.question(table.items[0]), policy, tmp_path, 3136, 3136)
    ids = greedy(policy.model, [prompt], 6, eos_token_ids=[])[0]
    assert len(ids) == 6
    full = torch.cat([prompt.ids, ids])[None]
    with torch.no_grad():
        types = (full == policy.model.config.image_token_id).to(torch.int32)
        logits = policy.model(input_ids=full, mm_token_type_ids=types, pixel_values=prompt.pixel_values,
                              image_grid_thw=prompt.image_grid_thw).logits[0]
    P = len(prompt.ids)
    assert torch.equal(logits[P - 1:P + 5].argmax(-1), ids)


@pytest.mark.gpu
def test_end_to_end_on_gpu(tmp_path, files, capsys):
    """The same run on a CUDA device in bfloat16 (the default dtype there): the table is written
    and greedy decoding is reproducible across a rerun in a fresh directory."""
    model, bench_args = files
    for out in ("a", "b"):
        assert main(["--model", str(model), "--out", str(tmp_path / out), "--device", "cuda", *bench_args, *ARGS]) == 0
    assert "| model (this run) |" in capsys.readouterr().out
    for name in ROWS:
        a, b = (_lines(tmp_path / out / name / "predictions.rank0.jsonl") for out in ("a", "b"))
        assert a == b


def test_qwen3_vl_checkpoint_is_evaluated_with_its_own_prompt(tmp_path, capsys):
    """A Qwen3-VL checkpoint through python -m r1vl.eval: its prompts open with the user turn (its
    chat template adds no system turn) and its images are cut into 16-pixel patches."""
    from r1vl.tiny import write_tiny_checkpoint

    model = write_tiny_checkpoint(tmp_path / "model", ["How many red shapes? ### The final answer is: 3 A B"] * 4,
                                  family="qwen3_vl", max_pixels=64 * 64, min_pixels=32 * 32)
    bench = f"MMStar={write_tsv(tmp_path / 'm.tsv', ROWS['MMStar'])}"
    assert main(["--model", str(model), "--bench", bench, "--out", str(tmp_path / "out"), *ARGS[:-4],
                 "--max_pixels", "4096", "--progress", "false"]) == 0
    assert "2 of 2 items scored" in capsys.readouterr().out
    policy = load_policy(model, torch.float32, torch.device("cpu"), 32 * 32, 64 * 64)
    item = benchmarks.load(benchmarks.get("MMStar"), write_tsv(tmp_path / "n.tsv", ROWS["MMStar"][:1])).items[0]
    prompt = encode_item(item, "How many red shapes?", policy, tmp_path, 64 * 64, 32 * 32)
    text = policy.tokenizer.decode(prompt.ids)
    assert text.startswith("<|im_start|>user\n<|vision_start|>") and "system" not in text
    assert prompt.pixel_values.shape[1] == 3 * 2 * 16 * 16


def test_score_only_reads_cells_as_pandas_does_unless_na_text(tmp_path, capsys):
    # An MMStar option reading "None" is missing to VLMEvalKit (pandas): the prediction "None" names no
    # option and waits for the judge; with --fix na-text the option is kept and "None" picks it.
    rows = [{"index": "0", **Q, "A": "3", "B": "4", "C": "None", "answer": "C"}]
    bench = f"MMStar={write_tsv(tmp_path / 'mmstar.tsv', rows)}"
    preds = tmp_path / "preds.jsonl"
    preds.write_text(json.dumps({"index": "0", "prediction": "None"}) + "\n")
    for fix, rule_only, score in (([], 1, 0.0), (["--fix", "na-text"], 0, 100.0)):
        out = tmp_path / f"out{len(fix)}"
        assert main(["--score-only", "--out", str(out), "--bench", bench, "--predictions", f"MMStar={preds}",
                     *fix]) == 0
        result = json.loads((out / "metrics.json").read_text())["results"]["MMStar"]
        assert (result["counts"]["rule_only"], result["score"]) == (rule_only, score)
    capsys.readouterr()
