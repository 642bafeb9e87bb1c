"""One request to an OpenAI-compatible chat-completions endpoint, with the standard library
only: what the key-step extractor (r1vl.tools.keysteps) and the evaluation's answer judge
(r1vl.eval.judge) send. Nothing the endpoint returns is evaluated: the caller parses the text."""
from __future__ import annotations

import json
import urllib.error
import urllib.request


def chat_completion(endpoint: str, body: dict, api_key: str | None, timeout_s: float,
                    error: type[Exception]) -> str:
    """POST `body` (model, messages, ...) to `endpoint` (the full .../chat/completions URL)
    and return the first choice's message content. Any failure (HTTP status, network,
    timeout, a reply that is not a chat completion, a content that is not text) raises
    `error` with a message that names it."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(endpoint, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            content = json.loads(reply.read())["choices"][0]["message"]["content"]
    except urllib.error.HTTPError as e:
        raise error(f"HTTP {e.code} from {endpoint}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise error(f"request to {endpoint} failed: {e}") from None
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise error(f"not an OpenAI chat completion: {type(e).__name__}: {e}") from None
    if not isinstance(content, str):
        raise error(f"message content is {type(content).__name__}, not text")
    return content
