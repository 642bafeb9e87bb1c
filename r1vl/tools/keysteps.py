"""Fill in `key_steps` for a data file: rule-based, or by any OpenAI-compatible chat endpoint.

    python -m r1vl.tools.keysteps data.jsonl                        # rule-based, in place
    python -m r1vl.tools.keysteps data.jsonl --out with_keys.jsonl --llm-url http://host:8000/v1 \\
        --model NAME [--api-key-env OPENAI_API_KEY]

The paper extracted key steps with a strong LLM: at most 3 elements of the image
description, the core concepts of the rationale, and the essential variables, equations
and relations of each step, each a phrase of at most 3 words, no repeats. The rule-based
extractor is the deterministic, offline stand-in: from each step line it takes

- relations: maximal runs of math tokens around =, <, >, <=, >=, != (and their LaTeX and
  unicode forms), e.g. "12/2=6", "x = 3", "AB = 5 cm";
- numbers with what they count or measure: "3 red shapes", "7 units";
- comparisons in words: "bar is taller", "AB is parallel";

each with its equivalent spellings as alternatives ("x = 3" / "x=3", "12/2=6" /
"\\frac{12}{2}=6"). Every element is copied from the step text, so the reference solution
itself matches all of its key steps. Only the step bodies are read, not the description or
the rationale: StepRAR searches the step bodies, and an element it cannot find there would
keep even the reference below k = 1.

Records are never lost: unreadable lines and records without a solution are written back
unchanged (and reported); a bad LLM reply (HTTP error, timeout, no JSON, wrong shape) is
reported and that record falls back to the rule-based extractor (`--on-llm-error rule`,
the default) or keeps its old key steps (`--on-llm-error keep`). The file is replaced
atomically, and during an LLM run it is checkpointed every `--checkpoint-every` calls.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from r1vl import files
from r1vl.chat_api import chat_completion
from r1vl.rewards.normalize import normalize_math
from r1vl.rewards.rules import FINAL_ANSWER, step_bodies

logger = logging.getLogger(__name__)
Entry = str | list[str]  # one key step: a string or its equivalent alternatives

# --------------------------------------------------------------------------- rule-based

_RELATION = re.compile(r"<=|>=|!=|[=<>≤≥≠≈∥⊥]|\\(?:leq?|geq?|neq?|approx|parallel|perp)(?![a-z])")
# A token that can be part of a formula: digits, short labels (x, AB, ABC), operators,
# brackets, LaTeX commands; trailing punctuation is trimmed off the run afterwards.
_MATH_TOKEN = re.compile(r"[\w\\{}()\[\]^_+\-*/=<>≤≥≠≈∥⊥×÷·.,:;'°%$|]+")
_WORD = re.compile(r"[A-Za-z]{2,}[.,;:!?)]*")  # an ordinary word (labels are caught below)
_LABEL = re.compile(r"[A-Z]{1,3}[.,;:!?)]*")  # AB, ABC: geometry labels, not words
_UNITS = {"cm", "mm", "m", "km", "kg", "g", "mg", "s", "min", "h", "l", "ml", "cm²", "m²",
          "cm^2", "m^2", "units", "unit", "degrees", "°", "%", "dollars", "years"}
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?!\w|\.\d)")  # not glued to letters
_STOP = {"and", "or", "so", "the", "a", "an", "is", "are", "of", "to", "in", "on", "at",
         "by", "for", "with", "from", "than", "which", "that", "then", "thus", "as", "be"}
_COMPARISON = re.compile(
    r"\b([A-Za-z]\w*) (?:is|are) (\w+er|parallel|perpendicular|equal|congruent|similar)\b")
_TRIM = ".,;:!?$ "
_SIMPLE_FRAC = re.compile(r"\\[dt]?frac\{([\w.]+)\}\{([\w.]+)\}")
_SIMPLE_DIV = re.compile(r"(?<![\w.\\])([\w.]+)/([\w.]+)(?![\w.])")


def _is_math_token(token: str) -> bool:
    if not _MATH_TOKEN.fullmatch(token):
        return False
    if token.lower().rstrip(_TRIM) in _UNITS:
        return True
    return not (_WORD.fullmatch(token) and not _LABEL.fullmatch(token))


def _relations(line: str) -> list[tuple[int, int]]:
    """(start, end) spans of the math-token runs of `line` that contain a relation."""
    tokens = [(m.start(), m.end()) for m in re.finditer(r"\S+", line)]
    spans, run = [], []
    for start, end in tokens + [(len(line), len(line))]:  # sentinel flushes the last run
        if start < len(line) and _is_math_token(line[start:end]):
            run.append((start, end))
            continue
        if run:
            text = line[run[0][0]:run[-1][1]]
            lead = len(text) - len(text.lstrip(_TRIM))
            text = text.strip(_TRIM)
            rel = _RELATION.search(text)
            # The relation needs an operand on each side: "= 6" alone is not a key step.
            if rel and rel.start() > 0 and rel.end() < len(text):
                spans.append((run[0][0] + lead, run[0][0] + lead + len(text)))
            run = []
    return spans


def _quantities(line: str, taken: list[tuple[int, int]]) -> list[str]:
    """"3 red shapes", "7 units": a number and the (at most two) words that follow it."""
    out = []
    for m in _NUMBER.finditer(line):
        if any(a <= m.start() < b for a, b in taken):
            continue
        words = []
        for w in line[m.end():].split()[:2]:
            bare = w.rstrip(_TRIM)
            if not bare.isalpha() or bare.lower() in _STOP:
                break
            words.append(bare)
            if bare != w:  # punctuation ends the phrase
                break
        if words:
            out.append(" ".join([m.group(), *words]))
    return out


def alternatives(element: str) -> list[str]:
    """Equivalent spellings of a relation, the element itself first.

    Spacing ("x = 3", "x=3") and simple fractions ("12/2" and "\\frac{12}{2}") vary;
    everything else is kept as written.
    """
    # Drop the spaces next to symbols only: "6 cm" must not become "6cm".
    compact = re.sub(r"\s*([^\w\s])\s*", r"\1", element)
    spaced = re.sub(r"(<=|>=|!=|[=<>≤≥≠≈])", r" \1 ", compact).replace("  ", " ")
    forms = [element, compact, spaced]
    for f in list(forms):
        forms.append(_SIMPLE_DIV.sub(r"\\frac{\1}{\2}", f))
        forms.append(_SIMPLE_FRAC.sub(r"\1/\2", f))
    return list(dict.fromkeys(forms))


def extract_rule_based(solution: str) -> list[Entry]:
    """Key steps of a reference solution, deterministically (see the module docstring).

    Reads the `### Step N:` bodies (the part StepRAR matches against); a solution without
    step headers is read whole, up to its final-answer header. Returns the `Steps` list:
    strings, or lists of alternatives for relations that have several spellings.
    """
    bodies = step_bodies(solution) or [solution.split(FINAL_ANSWER, 1)[0]]
    entries: list[Entry] = []
    seen: set[str] = set()

    def add(element: str, alts: list[str]) -> None:
        key = normalize_math(element)
        if key and key not in seen:
            seen.add(key)
            entries.append(alts if len(alts) > 1 else element)

    for body in bodies:
        for line in body.splitlines():
            spans = _relations(line)
            for a, b in spans:
                add(line[a:b], alternatives(line[a:b]))
            for q in _quantities(line, spans):
                add(q, [q])
            for m in _COMPARISON.finditer(line):
                add(m.group(0), [m.group(0)])
    return entries


# --------------------------------------------------------------------------- LLM-based

SYSTEM_PROMPT = "You extract key elements from structured reasoning. You reply with JSON only."

USER_PROMPT = """Below is a solution written with '### ' section headers. List its key elements:
- '### Image Description:': at most 3 key elements, such as named objects, labels and numbers.
- '### Rationales:': the core concepts needed to solve the problem, such as properties, \
definitions or formulas.
- each '### Step N:': the essential variables, equations and relations that lead to the answer.
Skip '### Let's think step by step.' and '### The final answer is:'.
Copy each element exactly as it is written in the text. An element that is a phrase (not a \
number or an equation) has at most 3 words. Never list the same element twice, in any section.
An element may be a list of equivalent spellings, for example ["12/2=6", "\\\\frac{{12}}{{2}}=6"].
Reply with one JSON object and nothing else:
{{"image_description": [...], "rationales": [...], "steps": [[elements of step 1], \
[elements of step 2], ...]}}

Solution:
{solution}"""


class KeyStepError(ValueError):
    """The endpoint failed or its reply was not usable key steps; the message says why."""


@dataclass(frozen=True)
class LLMExtractor:
    """Calls an OpenAI-compatible `/chat/completions` endpoint with the paper's instructions.

    url: the base URL ("http://host:8000/v1") or the full ".../chat/completions" URL.
    """

    url: str
    model: str = "gpt-4o"  # the model the authors used
    api_key: str | None = None  # sent as "Authorization: Bearer ..." when given
    timeout_s: float = 60.0
    temperature: float = 0.0  # deterministic extraction where the server allows it

    @property
    def endpoint(self) -> str:
        url = self.url.rstrip("/")
        return url if url.endswith("/chat/completions") else url + "/chat/completions"

    def request_body(self, solution: str) -> dict:
        return {"model": self.model, "temperature": self.temperature, "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_PROMPT.format(solution=solution)}]}

    def __call__(self, solution: str) -> list[Entry]:
        """The Steps list for one solution. Raises KeyStepError on any failure."""
        content = chat_completion(self.endpoint, self.request_body(solution), self.api_key, self.timeout_s,
                                  KeyStepError)
        return parse_reply(content)


def _elements(value, where: str) -> list[Entry]:
    if not isinstance(value, list):
        raise KeyStepError(f"{where} must be a list, got {type(value).__name__}")
    out: list[Entry] = []
    for element in value:
        if isinstance(element, str) and element.strip():
            out.append(element.strip())
        elif (isinstance(element, list) and element
              and all(isinstance(a, str) and a.strip() for a in element)):
            out.append([a.strip() for a in element])
        else:
            raise KeyStepError(f"{where} has an element that is not a string or list of strings: {element!r}")
    return out


def parse_reply(content) -> list[Entry]:
    """The Steps list from the model's reply text (a JSON object, possibly in a code fence).

    Description, rationale and step elements are concatenated in that order (the paper's
    key steps cover all three); repeats (compared by their first spelling, lowercased) are
    dropped. Raises KeyStepError when there is no usable JSON object or no element.
    """
    if not isinstance(content, str):
        raise KeyStepError(f"reply content is {type(content).__name__}, not text")
    start, end = content.find("{"), content.rfind("}")
    if start < 0 or end < start:
        raise KeyStepError(f"no JSON object in the reply: {content[:200]!r}")
    try:
        obj = json.loads(content[start:end + 1])
    except ValueError as e:
        raise KeyStepError(f"reply is not valid JSON ({e}): {content[:200]!r}") from None
    if not isinstance(obj, dict):
        raise KeyStepError("reply JSON is not an object")
    entries = _elements(obj.get("image_description", []), "image_description")
    entries += _elements(obj.get("rationales", []), "rationales")
    steps = obj.get("steps", [])
    if not isinstance(steps, list):
        raise KeyStepError("steps must be a list of lists")
    for i, step in enumerate(steps, start=1):
        entries += _elements(step, f"steps[{i}]")
    unique, seen = [], set()
    for e in entries:
        key = (e if isinstance(e, str) else e[0]).lower()
        if key not in seen:
            seen.add(key)
            unique.append(e)
    if not unique:
        raise KeyStepError("the reply lists no key elements")
    return unique


# --------------------------------------------------------------------------- data files

@dataclass
class FillReport:
    """What `fill_key_steps` did, record by record index."""

    rule: int = 0  # records filled by the rule-based extractor
    llm: int = 0  # records filled from the endpoint
    kept: int = 0  # records that already had key steps (without overwrite)
    llm_failures: list[tuple[int, str]] = field(default_factory=list)  # (index, reason)
    unchanged: list[tuple[int, str]] = field(default_factory=list)  # (index, why not filled)

    def summary(self) -> str:
        lines = [f"filled {self.rule} by rules, {self.llm} by the LLM; kept {self.kept} existing; "
                 f"{len(self.llm_failures)} LLM failures; {len(self.unchanged)} left unchanged"]
        lines += [f"  record {i}: LLM failed: {why}" for i, why in self.llm_failures]
        lines += [f"  record {i}: unchanged: {why}" for i, why in self.unchanged]
        return "\n".join(lines)


def _reference_text(record: dict) -> str | None:
    """The reasoning to extract from: `solution`, else the last assistant message."""
    if isinstance(record.get("solution"), str):
        return record["solution"]
    for message in reversed(record.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "assistant":
            content = message.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            return content if isinstance(content, str) else None
    return None


def fill_key_steps(path: str | Path, out: str | Path | None = None, *,
                   llm: LLMExtractor | None = None, on_llm_error: str = "rule",
                   overwrite: bool = False, checkpoint_every: int = 100) -> FillReport:
    """Read a JSON list or JSONL data file, fill `key_steps`, write it to `out` (default: in place).

    Args:
        llm: extract with this endpoint; rule-based when None.
        on_llm_error: "rule" (fall back to the rule-based extractor) or "keep" (leave the
            record's key steps as they were) when the endpoint fails for a record.
        overwrite: re-extract records that already have key steps.
        checkpoint_every: with an LLM, write the file after this many calls, so a crash
            loses at most that much work (records not yet reached are written unchanged).

    Every record is written back: lines that are not JSON objects verbatim, records without
    a reasoning text unchanged (both listed in the report).
    """
    if on_llm_error not in ("rule", "keep"):
        raise ValueError(f'on_llm_error must be "rule" or "keep", got {on_llm_error!r}')
    path = Path(path)
    out = Path(out) if out is not None else path
    text = path.read_text(encoding="utf-8")
    is_list = text.lstrip().startswith("[")
    if is_list:
        try:
            items = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(items, list):
            raise ValueError(f"{path}: expected a JSON list of records")
        raw = [None] * len(items)
    else:
        raw = text.splitlines()  # kept verbatim for records that do not change
        items = []
        for line in raw:
            try:
                items.append(json.loads(line) if line.strip() else None)
            except ValueError:
                items.append(None)

    def render() -> str:
        if is_list:
            return json.dumps(items, ensure_ascii=False, indent=2) + "\n"
        return "".join(
            (json.dumps(r, ensure_ascii=False) if changed[i] else raw[i]) + "\n"
            for i, r in enumerate(items))

    report = FillReport()
    changed = [False] * len(items)
    calls = 0
    index = -1  # record index: JSONL blank lines are not records
    for i, record in enumerate(items):
        if not is_list and not raw[i].strip():
            continue
        index += 1
        if not isinstance(record, dict):
            report.unchanged.append((index, "not a JSON object"))
            continue
        if record.get("key_steps") and not overwrite:
            report.kept += 1
            continue
        reference = _reference_text(record)
        if reference is None:
            report.unchanged.append((index, "no solution or assistant message"))
            continue
        if llm is not None:
            calls += 1
            try:
                record["key_steps"] = {"Steps": llm(reference)}
                report.llm += 1
                changed[i] = True
            except KeyStepError as e:
                report.llm_failures.append((index, str(e)))
                logger.warning("%s: record %d: LLM failed (%s); %s", path, index, e,
                               "using the rule-based extractor" if on_llm_error == "rule"
                               else "left unchanged")
            if calls % checkpoint_every == 0:
                files.write_text(out, render(), durable=True)
            if changed[i] or on_llm_error == "keep":
                continue
        record["key_steps"] = {"Steps": extract_rule_based(reference)}
        report.rule += 1
        changed[i] = True
    files.write_text(out, render(), durable=True)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Fill in key_steps for an R1-VL data file (JSON list or JSONL).")
    parser.add_argument("data", help="the data file; rewritten in place unless --out is given")
    parser.add_argument("--out", help="write here instead of in place")
    parser.add_argument("--llm-url", help="OpenAI-compatible endpoint (base URL or .../chat/completions); rule-based without it")
    parser.add_argument("--model", default="gpt-4o", help="model name sent to the endpoint")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY",
                        help="environment variable holding the API key (optional)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument("--on-llm-error", choices=("rule", "keep"), default="rule")
    parser.add_argument("--overwrite", action="store_true", help="re-extract existing key_steps")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    llm = None
    if args.llm_url:
        llm = LLMExtractor(args.llm_url, args.model, os.environ.get(args.api_key_env), args.timeout)
    report = fill_key_steps(args.data, args.out, llm=llm, on_llm_error=args.on_llm_error,
                            overwrite=args.overwrite, checkpoint_every=args.checkpoint_every)
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
