"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1, for tests and `rfm bench labels`.

It speaks just enough of the API (`POST /v1/chat/completions`, `GET /v1/models`) for `OpenAIBackend`, and answers
from a script instead of a model. A script is one of:
- a Behaviour (e.g. `correct(labels)`): used for every call;
- a list of Behaviours: call k for a report gets item k (the last one repeats), e.g. `[http_error(), correct(l)]`;
- a dict {substring of the report text: Behaviour or list}, with `default=` for reports matching no key;
- a callable (request_json, call_index_for_this_report) -> Reply or Behaviour.

A Behaviour sees the request, so `correct(labels)` answers JSON when the request carries `response_format` and the
csv protocol otherwise. The server records every request body, arrival time and the most requests it held at once
(`max_in_flight`), which is how tests prove client concurrency without timing it.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

from appliance.labels.prompt import report_from_messages


@dataclass
class Reply:
    """One HTTP answer: a completion with `content`, or a raw `body` with any status, after `delay_s`."""

    status: int = 200
    content: str | None = None
    body: dict | str | None = None
    delay_s: float = 0.0
    finish_reason: str = "stop"


class Behaviour:
    """Turns a request into a Reply."""

    def reply(self, request: dict) -> Reply:  # pragma: no cover - interface
        raise NotImplementedError


class _FromFunction(Behaviour):
    def __init__(self, make: Callable[[dict], Reply], label: str):
        self._make, self.label = make, label

    def reply(self, request: dict) -> Reply:
        return self._make(request)

    def __repr__(self) -> str:
        return f"<behaviour {self.label}>"


def wants_json(request: dict) -> bool:
    """Whether the request asked for a JSON-schema-constrained answer."""
    fmt = request.get("response_format")
    return isinstance(fmt, dict) and fmt.get("type") == "json_schema"


def _wants_evidence(request: dict) -> bool:
    if wants_json(request):
        schema = request["response_format"].get("json_schema", {}).get("schema", {})
        return "evidence" in schema.get("properties", {})
    return any("copied word for word" in str(m.get("content", "")) for m in request.get("messages", []))


def render_answer(request: dict, labels: dict[str, int], evidence: dict[str, str] | None = None) -> str:
    """The well-formed answer for `labels` in the format the request asked for (csv order = dict order)."""
    evidence = evidence or {}
    if wants_json(request):
        obj: dict = {"labels": dict(labels)}
        if _wants_evidence(request) or evidence:
            obj["evidence"] = {name: evidence.get(name, "") for name in labels}
        return json.dumps(obj)
    lines = [",".join(str(v) for v in labels.values())]
    if _wants_evidence(request):
        lines += [f"{name}: {evidence.get(name, '')}" for name, v in labels.items() if v != 0]
    return "\n".join(lines)


def correct(labels: dict[str, int], evidence: dict[str, str] | None = None) -> Behaviour:
    """A well-formed answer with these labels (and evidence sentences, when asked for)."""
    return _FromFunction(lambda req: Reply(content=render_answer(req, labels, evidence)), "correct")


def malformed(text: str = "The report suggests there may be some cardiomegaly.") -> Behaviour:
    """Prose instead of the format."""
    return _FromFunction(lambda req: Reply(content=text), "malformed")


def truncated(labels: dict[str, int]) -> Behaviour:
    """The right answer cut off halfway, as when max_tokens runs out."""

    def make(req: dict) -> Reply:
        text = render_answer(req, labels)
        return Reply(content=text[: max(1, len(text) // 2)], finish_reason="length")

    return _FromFunction(make, "truncated")


def wrong_count(labels: dict[str, int]) -> Behaviour:
    """One finding too few."""
    return _FromFunction(lambda req: Reply(content=render_answer(req, dict(list(labels.items())[:-1]))), "wrong_count")


def out_of_range(labels: dict[str, int], value: int = 2) -> Behaviour:
    """The first finding gets a value outside {-1, 0, 1}."""
    first = next(iter(labels))
    return _FromFunction(lambda req: Reply(content=render_answer(req, {**labels, first: value})), "out_of_range")


def http_error(status: int = 500, message: str = "internal server error") -> Behaviour:
    """An HTTP error with an OpenAI-style error body."""
    body = {"error": {"message": message, "type": "server_error" if status >= 500 else "invalid_request_error"}}
    return _FromFunction(lambda req: Reply(status=status, body=body), f"http_{status}")


def stall(seconds: float, then: Behaviour | None = None) -> Behaviour:
    """Answer only after `seconds` (longer than the client's timeout), then like `then` (default: malformed)."""
    after = then or malformed()

    def make(req: dict) -> Reply:
        reply = after.reply(req)
        reply.delay_s += seconds
        return reply

    return _FromFunction(make, "stall")


def rejects_response_format(then: Behaviour) -> Behaviour:
    """A server without structured output: 400 for any request with response_format, else like `then`."""
    rejection = http_error(400, "response_format is not supported by this server")

    def make(req: dict) -> Reply:
        return rejection.reply(req) if "response_format" in req else then.reply(req)

    return _FromFunction(make, "rejects_response_format")


@dataclass
class Call:
    """One request as the server saw it."""

    report: str | None
    index: int  # 0 for the first call about this report
    arrived_s: float  # time.monotonic()
    body: dict = field(repr=False, default_factory=dict)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do; HTTP/1.0 would reconnect per request
    server: _Server

    def log_message(self, format, *args):
        pass

    def setup(self):
        super().setup()
        # without it Nagle + delayed ACK add ~40 ms to every keep-alive answer (real servers set it too)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _send(self, status: int, body: dict | str) -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if not isinstance(body, str) else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self._headers_buffer.append(b"\r\n" + data)  # headers and body in one write
        self.flush_headers()

    def do_GET(self):
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": self.server.owner.model, "object": "model"}]})
        else:
            self._send(404, {"error": {"message": "not found"}})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send(404, {"error": {"message": "not found"}})
            return
        try:
            request = json.loads(raw)
        except json.JSONDecodeError:
            self._send(400, {"error": {"message": "request body is not JSON"}})
            return
        owner = self.server.owner
        reply = owner._begin(request)
        try:
            if owner._stopping.wait(owner.latency_s + reply.delay_s):
                return
            if reply.body is not None:
                self._send(reply.status, reply.body)
                return
            self._send(reply.status, owner._completion(request, reply))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its timeout): nothing to answer
        finally:
            owner._end()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default 5 refuses connections when a client opens many at once
    owner: ScriptedLLMServer

    def handle_error(self, request, client_address):
        pass  # broken connections from clients that timed out are expected here


class ScriptedLLMServer:
    """Context manager running the scripted server in a thread; `.url` is its base URL (without /v1)."""

    def __init__(self, script, latency_s: float = 0.0, port: int = 0, *, default: Behaviour | None = None,
                 model: str = "scripted-llm"):
        self.script = script
        self.latency_s = latency_s
        self.default = default
        self.model = model
        self.calls: list[Call] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._per_report: dict[str | None, int] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.owner = self
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def requests(self) -> list[dict]:
        """Recorded request bodies, in arrival order."""
        return [c.body for c in self.calls]

    def calls_for(self, report_substring: str) -> list[Call]:
        return [c for c in self.calls if c.report is not None and report_substring in c.report]

    def __enter__(self) -> Self:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="scripted-llm", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()

    def _pick(self, report: str | None, index: int, request: dict) -> Reply:
        entry = self.script
        if isinstance(entry, dict):
            entry = next((v for k, v in entry.items() if report is not None and k in report), self.default)
            if entry is None:
                return http_error(500, "no script entry for this report").reply(request)
        if isinstance(entry, (list, tuple)):
            entry = entry[min(index, len(entry) - 1)]
        elif not isinstance(entry, Behaviour) and callable(entry):
            entry = entry(request, index)
        return entry if isinstance(entry, Reply) else entry.reply(request)

    def _begin(self, request: dict) -> Reply:
        report = report_from_messages(request.get("messages", []))
        with self._lock:
            index = self._per_report.get(report, 0)
            self._per_report[report] = index + 1
            self.calls.append(Call(report, index, time.monotonic(), request))
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        return self._pick(report, index, request)

    def _end(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _completion(self, request: dict, reply: Reply) -> dict:
        return {
            "id": f"chatcmpl-{len(self.calls)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model") or self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply.content},
                    "finish_reason": reply.finish_reason,
                }
            ],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }


def measure_client_throughput(vocabulary, *, n_reports: int = 200, max_in_flight: int = 16, latency_s: float = 0.2,
                              structured: str = "json_schema") -> dict:
    """Reports/s that OpenAIBackend gets from a server answering correctly after `latency_s` each.

    The ceiling is max_in_flight / latency_s; the gap to it is the client's (and this server's) overhead.
    """
    from appliance.labels.llm import OpenAIBackend

    labels = {name: 0 for name in vocabulary.names}
    items = [(f"r{i}", f"Report {i}. No acute findings.") for i in range(n_reports)]
    with ScriptedLLMServer(correct(labels), latency_s=latency_s) as server:
        backend = OpenAIBackend(server.url, "scripted-llm", max_in_flight=max_in_flight, structured=structured)
        start = time.perf_counter()
        outcomes = backend.label(items, vocabulary)
        elapsed = time.perf_counter() - start
    labelled = sum(o.status == "labelled" for o in outcomes)
    return {
        "reports": n_reports,
        "labelled": labelled,
        "max_in_flight": max_in_flight,
        "latency_s": latency_s,
        "seconds": round(elapsed, 3),
        "reports_per_s": round(n_reports / elapsed, 1),
        "ceiling_per_s": round(max_in_flight / latency_s, 1) if latency_s > 0 else None,
        "server_max_in_flight": server.max_in_flight,
    }
