"""Fixtures shared by the tests under tests/r1vl: a stub OpenAI-compatible chat server."""
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

# What the stub answers to the last message's text: str = the assistant's reply in a chat
# completion; bytes = this very body (e.g. one that is no chat completion); int = that HTTP
# status with an empty body. The function may also sleep, to outlast a client's timeout.
Reply = Callable[[str], "str | bytes | int"]


class StubChatServer:
    """POST .../chat/completions on 127.0.0.1 (an ephemeral port), answered by `reply`. Every
    request is recorded as {"path", "auth" (the Authorization header), "body" (parsed JSON)}.
    The server shuts itself down after `lifetime_s` even if a test forgets to."""

    def __init__(self, reply: Reply, lifetime_s: float = 60.0):
        self.requests: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                answer = reply(body["messages"][-1]["content"])
                try:
                    self._send(answer)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (a timeout test): nobody to answer

            def _send(self, answer):
                if isinstance(answer, int):
                    self.send_response(answer)
                    self.end_headers()
                    return
                if isinstance(answer, str):
                    answer = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.timer = threading.Timer(lifetime_s, self.stop)
        self.timer.daemon = True
        self.timer.start()

    def stop(self) -> None:
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def chat_server():
    """chat_server(reply) -> a running StubChatServer; stopped (and checked stopped) after the test."""
    started: list[StubChatServer] = []

    def start(reply: Reply, lifetime_s: float = 60.0) -> StubChatServer:
        started.append(StubChatServer(reply, lifetime_s))
        return started[-1]

    yield start
    for server in started:
        server.stop()
        server.thread.join(timeout=5)
        assert not server.thread.is_alive()
