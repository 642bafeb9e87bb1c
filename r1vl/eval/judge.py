"""VLMEvalKit's GPT judge, as any OpenAI-compatible endpoint.

    python -m r1vl.eval ... --judge http://host:8000/v1 [--judge_model NAME] [--judge_api_key_env VAR]

VLMEvalKit asks its judge (gpt-4o-mini by default) only where its rules send an item
(r1vl.eval.verdicts): MMStar's, MME's and HallusionBench's unreadable answers, MathVista's and
MathVision's answers that the post-check does not find right, every MathVerse answer (twice)
and DynaMath's unparsable ones. The prompts are VLMEvalKit's own (r1vl.eval.vlmevalkit), sent
as one user message (DynaMath's with its system message), at the temperatures of its retry
loops; replies are read by its rules. Replies are cached in DIR/<Benchmark>/judged.jsonl.
"""
from __future__ import annotations

from dataclasses import dataclass

from r1vl.eval.trainer_api import chat_completion


class JudgeError(RuntimeError):
    """The endpoint failed or did not answer like an OpenAI chat completion."""


@dataclass(frozen=True)
class Judge:
    url: str  # base URL ("http://host:8000/v1") or the full ".../chat/completions"
    model: str = "gpt-4o-mini"  # VLMEvalKit's default judge
    api_key: str | None = None  # sent as "Authorization: Bearer ..." when given
    timeout_s: float = 60.0
    max_tokens: int | None = None

    @property
    def endpoint(self) -> str:
        url = self.url.rstrip("/")
        return url if url.endswith("/chat/completions") else url + "/chat/completions"

    def request_body(self, prompt: str, temperature: float = 0.0, system: str | None = None) -> dict:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        body = {"model": self.model, "temperature": temperature, "messages": messages}
        if self.max_tokens:
            body["max_tokens"] = self.max_tokens
        return body

    def __call__(self, prompt: str, temperature: float = 0.0, system: str | None = None) -> str:
        """The reply's text, stripped (VLMEvalKit's OpenAI wrapper strips it). Raises JudgeError."""
        return chat_completion(self.endpoint, self.request_body(prompt, temperature, system), self.api_key,
                               self.timeout_s, JudgeError).strip()

    def describe(self) -> str:
        return f"{self.model} at {self.endpoint}"
