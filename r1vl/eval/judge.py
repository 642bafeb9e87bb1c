"""An LLM judge that reads the answer out of a response: any OpenAI-compatible endpoint.

    python -m r1vl.eval ... --judge http://host:8000/v1 [--judge_model NAME] [--judge_api_key_env VAR]

VLMEvalKit's MathVista, MathVision, MathVerse and DynaMath scores, and its yes/no
benchmarks for outputs that are not plainly yes or no, extract the answer with an LLM
(GPT-4o-mini by default there). Here the judge is asked only about the responses whose
answer the rules could not read (no option letter, no yes/no, no number where one is
needed), and its short answer is then scored by the same rule as any other answer: the
judge extracts, it never grades. Replies are cached in DIR/<Benchmark>/judged.jsonl.
"""
from __future__ import annotations

from dataclasses import dataclass

from r1vl.eval.trainer_api import chat_completion

SYSTEM_PROMPT = (
    "You read a model's response to a question about an image and write out the final answer it "
    "gives, in the form the question asks for: the option letter alone for a multiple-choice "
    "question, Yes or No for a yes/no question, the number alone (no units) for a numeric question, "
    "otherwise a short phrase. Do not solve the question yourself. If the response gives no answer, "
    "reply Unknown. Reply with the answer only.")
USER_PROMPT = "Question:\n{question}\n\nResponse:\n{response}\n\nFinal answer:"
_MAX_RESPONSE_CHARS = 16_000  # the tail of a runaway response is enough to find its answer


class JudgeError(RuntimeError):
    """The endpoint failed or did not answer like an OpenAI chat completion."""


@dataclass(frozen=True)
class Judge:
    url: str  # base URL ("http://host:8000/v1") or the full ".../chat/completions"
    model: str = "gpt-4o-mini"  # VLMEvalKit's default judge
    api_key: str | None = None  # sent as "Authorization: Bearer ..." when given
    timeout_s: float = 60.0
    temperature: float = 0.0

    @property
    def endpoint(self) -> str:
        url = self.url.rstrip("/")
        return url if url.endswith("/chat/completions") else url + "/chat/completions"

    def request_body(self, question: str, response: str) -> dict:
        return {"model": self.model, "temperature": self.temperature, "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_PROMPT.format(question=question,
                                                           response=response[-_MAX_RESPONSE_CHARS:])}]}

    def __call__(self, question: str, response: str) -> str | None:
        """The judge's answer, stripped; None when it says Unknown. Raises JudgeError."""
        content = chat_completion(self.endpoint, self.request_body(question, response), self.api_key,
                                  self.timeout_s, JudgeError)
        answer = content.strip()
        return None if not answer or answer.strip(".").lower() == "unknown" else answer
