"""The LLM judge against a stub OpenAI-compatible server on 127.0.0.1: asked only about the
answers the rules cannot read, cached, failures counted."""
import json

import pytest
from evalkit_files import final, write_predictions, write_tsv

from r1vl.eval import benchmarks
from r1vl.eval.judge import Judge, JudgeError
from r1vl.eval.score import score_benchmark


def _judge_reply(text: str) -> str | bytes | int:
    """The stub judge's answer by keyword in the response: SECOND -> "B", NOTHING -> "Unknown",
    ERROR -> HTTP 500, GARBAGE -> a body that is no chat completion."""
    if "ERROR" in text:
        return 500
    if "GARBAGE" in text:
        return b"{oops"
    return "B" if "SECOND" in text else "Unknown"


@pytest.fixture
def stub(chat_server):
    """An OpenAI-compatible stub on 127.0.0.1 answering with _judge_reply (tests/r1vl/conftest.py)."""
    return chat_server(_judge_reply)


def test_judge_client(stub):
    judge = Judge(stub.url, model="m", api_key="k")
    assert judge("Which?", "the SECOND one") == "B"
    assert judge("Which?", "NOTHING") is None
    request = stub.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer k"
    assert request["body"]["model"] == "m" and request["body"]["temperature"] == 0.0
    assert "Which?" in request["body"]["messages"][-1]["content"]
    with pytest.raises(JudgeError, match="HTTP 500"):
        judge("q", "ERROR")
    with pytest.raises(JudgeError, match="not an OpenAI chat completion"):
        judge("q", "GARBAGE")
    with pytest.raises(JudgeError, match="failed"):
        Judge("http://127.0.0.1:1/v1", timeout_s=0.5)("q", "x")  # nothing listens there


def test_scoring_with_the_judge(tmp_path, stub):
    q = {"question": "How many?", "A": "3", "B": "4", "C": "5"}
    rows = [{"index": str(i), **q, "answer": a} for i, a in enumerate("BBAC")]
    bench = benchmarks.get("MMStar")
    table = benchmarks.load(bench, write_tsv(tmp_path / "m.tsv", rows))
    bench_dir = tmp_path / "out" / "MMStar"
    write_predictions(bench_dir, {"0": "I pick the SECOND one", "1": "ERROR", "2": final("A"), "3": "NOTHING"})

    rules_only = score_benchmark(bench, table, bench_dir)
    assert rules_only["score"] == pytest.approx(25.0) and rules_only["counts"]["unparsed"] == 3
    assert not stub.requests

    judged = score_benchmark(bench, table, bench_dir, Judge(stub.url))
    assert len(stub.requests) == 3  # only the three the rules could not read
    assert "Options:\nA. 3" in stub.requests[0]["body"]["messages"][-1]["content"]
    assert judged["score"] == pytest.approx(50.0)
    c = judged["counts"]
    assert (c["judged"], c["judge_failed"], c["unparsed"]) == (1, 1, 2)
    scored = [json.loads(line) for line in (bench_dir / "scored.jsonl").read_text().splitlines()]
    assert scored[0]["rule"] == "judge" and scored[0]["read"] == "B"

    again = score_benchmark(bench, table, bench_dir, Judge(stub.url))  # cached replies are not asked again
    assert len(stub.requests) == 4 and again["score"] == judged["score"]
