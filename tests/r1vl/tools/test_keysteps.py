"""Key-step extraction: the rule-based extractor, the LLM path against a local stub
server, and rewriting data files without losing records."""
import json
import os
import time

import pytest

from r1vl.data.synthetic import write_dataset
from r1vl.rewards import key_step_match
from r1vl.tools import keysteps
from r1vl.tools.keysteps import (
    KeyStepError,
    LLMExtractor,
    alternatives,
    extract_rule_based,
    fill_key_steps,
    main,
    parse_reply,
)

SOLUTION = """### Image Description:
A triangle ABC with BC = 12 cm and a median AD.
### Rationales:
A median meets the opposite side at its midpoint.
### Let's think step by step.
### Step 1:
Since AD is a median, BD = DC, so BD = 12/2=6 cm.
### Step 2:
Then $x = \\frac{12}{2} = 6$, and BD = DC again.
### Step 3:
There are 3 red shapes; the left bar is taller.
### The final answer is:
6"""


# --------------------------------------------------------------------------- rule-based

def test_alternatives():
    assert alternatives("x = 3") == ["x = 3", "x=3"]
    assert alternatives("12/2=6") == ["12/2=6", "12/2 = 6", "\\frac{12}{2}=6", "\\frac{12}{2} = 6"]
    assert "12/2=6" in alternatives("\\frac{12}{2}=6")
    assert alternatives("AB = 5 cm")[:2] == ["AB = 5 cm", "AB=5 cm"]  # "5 cm" keeps its space


def test_rule_based_by_hand():
    assert extract_rule_based(SOLUTION) == [
        ["BD = DC", "BD=DC"],
        ["BD = 12/2=6 cm", "BD=12/2=6 cm", "BD = 12/2 = 6 cm", "BD = \\frac{12}{2}=6 cm",
         "BD=\\frac{12}{2}=6 cm", "BD = \\frac{12}{2} = 6 cm"],
        ["x = \\frac{12}{2} = 6", "x=\\frac{12}{2}=6", "x = 12/2 = 6", "x=12/2=6"],
        # "BD = DC" of step 2 is a repeat and is not listed again.
        "3 red shapes",
        "bar is taller",
    ]


def test_rule_based_reference_matches_all_its_key_steps(tmp_path):
    assert key_step_match(SOLUTION, extract_rule_based(SOLUTION)) == 1.0
    # The synthetic tasks whose steps hold numbers, relations or comparisons. The colour
    # task's steps ("filled with red") hold none, so the extractor finds nothing there; its
    # records carry their own key steps.
    for line in write_dataset(tmp_path, 12, seed=5, tasks=("count", "bars", "add")).read_text().splitlines():
        solution = json.loads(line)["solution"]
        steps = extract_rule_based(solution)
        assert steps and key_step_match(solution, steps) == 1.0


def test_rule_based_edges():
    assert extract_rule_based("") == []
    assert extract_rule_based("### Step 1:\n= 6 and x =\n### The final answer is:\n6") == []
    # Without step headers the whole text before the answer is read.
    assert extract_rule_based("so y = 2x\n### The final answer is:\n2") == [["y = 2x", "y=2x"]]


# --------------------------------------------------------------------------- LLM replies

GOOD = {"image_description": ["triangle ABC", "BC = 12 cm"], "rationales": ["median"],
        "steps": [[["BD = 6", "BD=6"]], ["x = 6", "median"]]}


def test_parse_reply():
    assert parse_reply("```json\n" + json.dumps(GOOD) + "\n```") == [
        "triangle ABC", "BC = 12 cm", "median", ["BD = 6", "BD=6"], "x = 6"]  # no repeats
    for bad, reason in [("no json here", "no JSON object"), ("{'a': 1}", "not valid JSON"),
                        ('{"steps": "x"}', "steps must be a list"),
                        ('{"rationales": [1]}', "not a string"), ("{}", "no key elements"),
                        (None, "not text")]:
        with pytest.raises(KeyStepError, match=reason):
            parse_reply(bad)


def _llm_reply(prompt: str) -> str | int:
    """The stub's answer by keyword in the solution: BADJSON -> unusable content, ERROR500 ->
    HTTP 500, SLOW -> sleeps past the client's timeout, otherwise GOOD."""
    if "ERROR500" in prompt:
        return 500
    if "SLOW" in prompt:
        time.sleep(1.0)
    return "Sure! {broken" if "BADJSON" in prompt else json.dumps(GOOD)


@pytest.fixture
def stub(chat_server):
    """An OpenAI-compatible stub on 127.0.0.1 answering with _llm_reply (tests/r1vl/conftest.py)."""
    return chat_server(_llm_reply)


def test_llm_extractor_request_and_reply(stub):
    llm = LLMExtractor(stub.url, model="tiny-model", api_key="k-123", timeout_s=5)
    assert llm(SOLUTION) == parse_reply(json.dumps(GOOD))
    (req,) = stub.requests
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer k-123"
    body = req["body"]
    assert body["model"] == "tiny-model" and body["temperature"] == 0.0
    prompt = body["messages"][-1]["content"]
    for instruction in ("at most 3 key elements", "core concepts", "equations and relations",
                        "at most 3 words", "Never list the same element twice", "JSON", SOLUTION):
        assert instruction in prompt
    assert LLMExtractor(stub.url + "/chat/completions").endpoint == stub.url + "/chat/completions"


def test_llm_extractor_failures(stub):
    llm = LLMExtractor(stub.url, timeout_s=0.3)
    with pytest.raises(KeyStepError, match="HTTP 500"):
        llm("ERROR500")
    with pytest.raises(KeyStepError, match="no JSON object|not valid JSON"):
        llm("BADJSON")
    start = time.perf_counter()
    with pytest.raises(KeyStepError, match="failed"):
        llm("SLOW")
    assert time.perf_counter() - start < 0.9
    with pytest.raises(KeyStepError, match="failed"):
        LLMExtractor("http://127.0.0.1:1/v1", timeout_s=0.5)("x")  # nothing listens there


# --------------------------------------------------------------------------- data files

def _write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


def _lines(sol_good=SOLUTION):
    return [
        json.dumps({"image_path": "a.png", "problem": "p", "solution": sol_good}),
        "{this line is not json",
        json.dumps({"image_path": "b.png", "problem": "p", "solution": "BADJSON " + SOLUTION}),
        "",
        json.dumps({"image_path": "c.png", "problem": "p", "solution": SOLUTION,
                    "key_steps": {"Steps": ["kept"]}}),
        json.dumps({"image_path": "d.png", "problem": "p"}),
        json.dumps({"images": ["e.png"], "messages": [
            {"role": "user", "content": "<image>q"},
            {"role": "assistant", "content": "### Step 1:\nx = 3\n### The final answer is:\n3"}]}),
    ]


def test_fill_rule_based_keeps_every_record(tmp_path):
    path = tmp_path / "d.jsonl"
    _write_jsonl(path, _lines())
    report = fill_key_steps(path)
    out = path.read_text().splitlines()
    assert len(out) == len(_lines())
    assert out[1] == "{this line is not json" and out[3] == ""  # verbatim
    assert out[4] == _lines()[4] and out[5] == _lines()[5]  # kept / unchanged verbatim
    assert json.loads(out[0])["key_steps"] == {"Steps": extract_rule_based(SOLUTION)}
    assert json.loads(out[6])["key_steps"] == {"Steps": [["x = 3", "x=3"]]}
    assert (report.rule, report.llm, report.kept) == (3, 0, 1)
    assert [i for i, _ in report.unchanged] == [1, 4]  # record indices skip the blank line
    assert os.listdir(tmp_path) == ["d.jsonl"]  # no temp files left behind


@pytest.mark.parametrize("on_error, expected_b", [
    ("rule", {"Steps": extract_rule_based("BADJSON " + SOLUTION)}), ("keep", None)])
def test_fill_with_llm_and_fallback(tmp_path, stub, on_error, expected_b):
    path, out = tmp_path / "d.jsonl", tmp_path / "out.jsonl"
    _write_jsonl(path, _lines())
    report = fill_key_steps(path, out, llm=LLMExtractor(stub.url, timeout_s=5),
                            on_llm_error=on_error, checkpoint_every=1)
    assert path.read_text().splitlines() == _lines()  # the input is untouched
    rows = out.read_text().splitlines()
    assert json.loads(rows[0])["key_steps"] == {"Steps": parse_reply(json.dumps(GOOD))}
    assert json.loads(rows[2]).get("key_steps") == expected_b
    assert report.llm == 2 and [i for i, _ in report.llm_failures] == [2]
    assert "record 2: LLM failed" in report.summary()
    assert len(stub.requests) == 3  # records 0, 2 and the SFT record; not the kept one


def test_fill_json_list_in_place_and_overwrite(tmp_path):
    path = tmp_path / "d.json"
    records = [{"solution": SOLUTION, "key_steps": {"Steps": ["old"]}}, 5]
    path.write_text(json.dumps(records))
    report = fill_key_steps(path, overwrite=True)
    data = json.loads(path.read_text())
    assert data[0]["key_steps"]["Steps"] == extract_rule_based(SOLUTION) and data[1] == 5
    assert report.rule == 1 and report.unchanged == [(1, "not a JSON object")]


def test_failed_run_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    _write_jsonl(path, _lines())
    before = path.read_bytes()

    def explode(_):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(keysteps, "extract_rule_based", explode)
    with pytest.raises(RuntimeError):
        fill_key_steps(path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["d.jsonl"]


def test_cli(tmp_path, stub, capsys, monkeypatch):
    path = tmp_path / "d.jsonl"
    _write_jsonl(path, _lines()[:1])
    monkeypatch.setenv("STUB_KEY", "secret")
    assert main([str(path), "--llm-url", stub.url, "--api-key-env", "STUB_KEY", "--timeout", "5"]) == 0
    assert "filled 0 by rules, 1 by the LLM" in capsys.readouterr().out
    assert stub.requests[0]["auth"] == "Bearer secret"
    assert main([str(path), "--overwrite"]) == 0  # rule-based, in place
    assert json.loads(path.read_text())["key_steps"] == {"Steps": extract_rule_based(SOLUTION)}
