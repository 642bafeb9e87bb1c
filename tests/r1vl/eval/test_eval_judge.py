"""The LLM judge against a stub OpenAI-compatible server on 127.0.0.1: asked only about the
answers the rules cannot read, cached, failures counted."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from evalkit_files import final, write_predictions, write_tsv

from r1vl.eval import benchmarks
from r1vl.eval.judge import Judge, JudgeError
from r1vl.eval.score import score_benchmark


class StubJudge:
    """Answers by keyword in the response: SECOND -> "B", NOTHING -> "Unknown", ERROR -> HTTP 500,
    GARBAGE -> a body that is no chat completion. Records every request."""

    def __init__(self):
        self.requests = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                text = body["messages"][-1]["content"]
                if "ERROR" in text:
                    self.send_response(500)
                    self.end_headers()
                    return
                reply = {"choices": [{"message": {"role": "assistant",
                                                  "content": "B" if "SECOND" in text else "Unknown"}}]}
                payload = b"{oops" if "GARBAGE" in text else json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    s = StubJudge()
    yield s
    s.stop()
    s.thread.join(timeout=5)


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
