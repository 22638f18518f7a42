"""Black-box tests for worker.py: the real server process in front of a fake OpenAI.

Run them with::

    python -m pytest -q test_worker.py

Every test talks to ``python worker.py`` started as a subprocess on 127.0.0.1,
with a fake upstream (a Tornado server in a thread, also on 127.0.0.1) that
behaves like api.openai.com: it checks the owner's key, answers JSON, event
streams with delays, multipart uploads, binary downloads, gzip and errors, and
records every request it gets so a test can check what arrived. Clients are the
official ``openai`` SDKs (Python, and Node through ``node``), ``curl`` for the
admin commands as the README shows them, and the standard library's
``http.client`` where a test needs the raw bytes.

Test requests carry an ``x-test-id`` header, which the proxy forwards like any
other header, so each test finds its own requests among the upstream's records.
``x-fake-*`` headers tell the fake upstream how to answer (status, delay, gzip).
"""

# Python packages these tests need (requirements-dev.txt):
#   pytest
#   openai          the official SDK (the OpenAI(base_url=..., api_key=...) client)
#   tornado         the fake upstream (worker.py's own dependency too)
#   cryptography    optional: makes the TLS test's certificate (else `openssl req`)
# External commands: curl (admin tests); node and npm (Node SDK test, skipped
# without them; it installs the `openai` npm package into
# ~/.cache/worker-py-tests/node-openai6 once); openssl only when cryptography is missing.

import asyncio
import base64
import contextlib
import glob
import gzip
import hashlib
import http.client
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
import tornado.httpserver
import tornado.httputil
import tornado.netutil
import tornado.web

try:
    import openai
except ImportError:  # pragma: no cover - the SDK tests say so
    openai = None


HERE = os.path.dirname(os.path.abspath(__file__))
WORKER_PY = os.path.join(HERE, "worker.py")

UPSTREAM_KEY = "sk-proj-UPSTREAM" + secrets.token_hex(20)
ACCESS_TOKEN = "adm" + secrets.token_hex(10)
KEY_LINE = re.compile(r"sk-cfw[A-Za-z0-9]{45}\n\Z")
USER_KEY = re.compile(r"sk-cfw[A-Za-z0-9]{45}\Z")

# Every variable of CONTRACT.md §1; a test environment never inherits them.
WORKER_VARIABLES = (
    "OPENAPI_API_KEY", "ACCESS_TOKEN", "UPSTREAM_URL", "HOST", "PORT", "DB_PATH",
    "KV_URL", "WORKERS", "TLS_CERT", "TLS_KEY", "CORS_ORIGINS", "MAX_BODY_MB",
    "UPSTREAM_TIMEOUT", "LOG_LEVEL",
)

READY_SECONDS = 10.0


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def det_bytes(n: int, seed: str) -> bytes:
    """``n`` deterministic bytes: every byte value, CRLFs, dashes included."""
    return random.Random(seed).randbytes(n)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def new_test_id() -> str:
    return "t-" + secrets.token_hex(8)


class Answer:
    """A raw HTTP answer: status, headers (case-insensitive), body bytes."""

    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def __repr__(self) -> str:
        return f"<Answer {self.status} {self.body[:300]!r}>"


def connect(url: str, timeout: float = 30.0,
            context: Optional[ssl.SSLContext] = None) -> http.client.HTTPConnection:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        return http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout,
                                           context=context)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)


def request(method: str, url: str, body: Optional[bytes] = None,
            headers: Optional[Dict[str, str]] = None, timeout: float = 30.0,
            context: Optional[ssl.SSLContext] = None) -> Answer:
    """One request on a fresh connection; the body is read whole, nothing decoded."""
    parts = urllib.parse.urlsplit(url)
    conn = connect(url, timeout, context)
    try:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request(method, target, body=body, headers=headers or {})
        response = conn.getresponse()
        return Answer(response.status, response.headers, response.read())
    finally:
        conn.close()


def bearer(key: str) -> Dict[str, str]:
    return {"Authorization": "Bearer " + key}


def header_values(headers: List[Tuple[str, str]], name: str) -> List[str]:
    return [value for key, value in headers if key.lower() == name.lower()]


def is_openai_error(answer: Answer, status: int, code: Optional[str] = None) -> Dict[str, Any]:
    """Assert OpenAI's error shape with ``status`` (and ``code``); return the error."""
    assert answer.status == status, answer
    assert answer.headers.get("Content-Type", "").startswith("application/json"), answer.headers
    error = answer.json()["error"]
    assert isinstance(error["message"], str) and error["message"], error
    assert "type" in error and "param" in error and "code" in error, error
    if code is not None:
        assert error["code"] == code, error
    return error


def multipart(fields: Dict[str, str],
              files: Dict[str, Tuple[str, bytes, str]]) -> Tuple[bytes, str]:
    """A multipart/form-data body and its Content-Type."""
    boundary = "----worker-test-" + secrets.token_hex(12)
    out = []
    for name, value in fields.items():
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                   .encode() + value.encode() + b"\r\n")
    for name, (filename, data, content_type) in files.items():
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                   f'filename="{filename}"\r\nContent-Type: {content_type}\r\n\r\n'.encode()
                   + data + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


def curl(*args: str, timeout: float = 20.0) -> Tuple[int, str]:
    """Run curl as a user would; return (status, body)."""
    if shutil.which("curl") is None:
        pytest.fail("curl is needed for the admin tests (the README's commands)")
    done = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", *args],
                          capture_output=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    body, _, status = done.stdout.rpartition(b"\n")
    return int(status), body.decode("utf-8", "replace")


# ---------------------------------------------------------------------------
# The fake upstream: behaves like api.openai.com and records what it got
# ---------------------------------------------------------------------------

CHAT_PIECES = ["Hello", " from", " the", " fake", " upstream", " \u2713"]
RESPONSE_PIECES = ["Respon", "ses ", "API ", "\u00e9vents"]
MODEL_IDS = ["gpt-4o-mini", "text-embedding-3-small", "tts-1", "whisper-1"]
SPEECH_BYTES = det_bytes(1_234_567, "speech")
BIG_BLOCK = det_bytes(1 << 20, "big")
CHAT_USAGE = {"prompt_tokens": 11, "completion_tokens": 6, "total_tokens": 17}


def embedding_for(text: str) -> List[float]:
    """Values a float32 holds exactly, so base64 and JSON answers compare equal."""
    return [0.5, -0.25, 0.125, float(len(text))]


def compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


@tornado.web.stream_request_body
class UpstreamHandler(tornado.web.RequestHandler):
    """Every path, every method: the body is streamed in, then FakeUpstream answers."""

    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT", "OPTIONS")

    def initialize(self, fake: "FakeUpstream") -> None:
        self.fake = fake

    def prepare(self) -> None:
        self.request.connection.set_max_body_size(1 << 31)
        self.request.connection.stream.set_nodelay(True)  # events leave at once, as OpenAI's
        self.parts: List[bytes] = []
        self.digest, self.length = hashlib.sha256(), 0
        self.keep = not self.request.headers.get("x-fake-discard-body")

    def data_received(self, chunk: bytes) -> None:
        self.digest.update(chunk)
        self.length += len(chunk)
        if self.keep:
            self.parts.append(chunk)

    def compute_etag(self) -> Optional[str]:
        return None

    async def _any(self, *args: str) -> None:
        await self.fake.respond(self, b"".join(self.parts))

    get = head = post = delete = patch = put = options = _any


class FakeUpstream:
    """An OpenAI look-alike on 127.0.0.1, in a thread with its own event loop."""

    KEEP_BODY = 2 << 20  # bodies up to this size are kept whole in the record

    def __init__(self, key: str):
        self.key = key
        self.records: List[Dict[str, Any]] = []
        self.files: Dict[str, bytes] = {}
        self.lock = threading.Lock()
        self.sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
        self.port = self.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready = threading.Event()
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.thread = threading.Thread(target=self._run, name="fake-upstream", daemon=True)

    # -- life -----------------------------------------------------------------

    def start(self) -> "FakeUpstream":
        self.thread.start()
        assert self.ready.wait(10), "the fake upstream did not start"
        return self

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self.loop = loop
        server = loop.run_until_complete(self._serve())
        self.ready.set()
        try:
            loop.run_forever()
        finally:
            server.stop()
            for sock in self.sockets:
                sock.close()
            loop.close()

    async def _serve(self) -> tornado.httpserver.HTTPServer:
        app = tornado.web.Application([(r".*", UpstreamHandler, {"fake": self})],
                                      log_function=lambda handler: None)
        server = tornado.httpserver.HTTPServer(app, max_body_size=1 << 31,
                                               idle_connection_timeout=60)
        server.add_sockets(self.sockets)
        return server

    # -- what it got ----------------------------------------------------------

    def find(self, test_id: str) -> List[Dict[str, Any]]:
        with self.lock:
            return [r for r in self.records if test_id in header_values(r["headers"], "x-test-id")]

    def one(self, test_id: str) -> Dict[str, Any]:
        """The one request that carried ``test_id``, with its answer recorded."""
        for _ in range(100):  # the record is complete before the answer ends; be patient anyway
            found = self.find(test_id)
            if len(found) == 1 and "response" in found[0]:
                return found[0]
            if len(found) > 1:
                break
            time.sleep(0.02)
        raise AssertionError(f"expected one upstream request with x-test-id {test_id}, "
                             f"got {len(self.find(test_id))}")

    # -- answering ------------------------------------------------------------

    async def respond(self, h: UpstreamHandler, body: bytes) -> None:
        req = h.request
        record = {
            "id": secrets.token_hex(6), "method": req.method, "path": req.path,
            "query": req.query, "headers": list(req.headers.get_all()),
            "body": body if len(body) <= self.KEEP_BODY else None,
            "body_len": h.length, "body_sha256": h.digest.hexdigest(),
        }
        with self.lock:
            self.records.append(record)
        route = req.path[4:] if req.path.startswith("/api/") else req.path
        control = req.headers
        if req.headers.get("Authorization") != "Bearer " + self.key:
            return await self.error(h, record, 401, "invalid_request_error", "invalid_api_key",
                                    "Incorrect API key provided (fake upstream).")
        if control.get("x-fake-sleep"):
            await asyncio.sleep(float(control["x-fake-sleep"]))
        if control.get("x-fake-status"):
            return await self.fake_error(h, record, int(control["x-fake-status"]))
        if control.get("x-fake-download-mb"):
            chunks = [BIG_BLOCK] * int(control["x-fake-download-mb"])
            return await self.send(h, record, 200, {"Content-Type": "application/octet-stream"},
                                   chunks, stream=True)
        method = req.method
        if method == "POST" and route == "/v1/chat/completions":
            return await self.chat(h, record, body)
        if method == "POST" and route == "/v1/responses":
            return await self.responses(h, record, body)
        if method == "POST" and route == "/v1/embeddings":
            return await self.embeddings(h, record, body)
        if method == "GET" and route == "/v1/models":
            return await self.send_json(h, record, {"object": "list", "data": [
                self.model(m) for m in MODEL_IDS]})
        if method == "GET" and route.startswith("/v1/models/"):
            return await self.send_json(h, record, self.model(urllib.parse.unquote(route[11:])))
        if method == "POST" and route == "/v1/audio/speech":
            chunks = [SPEECH_BYTES[i:i + 65536] for i in range(0, len(SPEECH_BYTES), 65536)]
            return await self.send(h, record, 200, {"Content-Type": "audio/mpeg"}, chunks,
                                   stream=True)
        if method == "POST" and route == "/v1/audio/transcriptions":
            return await self.transcription(h, record, body)
        if method == "POST" and route == "/v1/files":
            return await self.upload(h, record, body)
        match = re.match(r"/v1/files/([^/]+)/content\Z", route)
        if method == "GET" and match:
            data = self.files.get(match.group(1)) or det_bytes(4096, match.group(1))
            chunks = [data[i:i + 65536] for i in range(0, len(data), 65536)] or [b""]
            return await self.send(h, record, 200, {"Content-Type": "application/octet-stream"},
                                   chunks, stream=True)
        return await self.echo(h, record)

    async def send(self, h: UpstreamHandler, record: Dict[str, Any], status: int,
                   headers: Dict[str, str], chunks: List[bytes], stream: bool = False,
                   delay: float = 0.0) -> None:
        """Answer; with ``stream``, each chunk is flushed (``delay`` s apart)."""
        h.set_status(status)
        h.clear_header("Content-Type")
        h.set_header("x-test", "up-" + record["id"])
        for name, value in headers.items():
            h.set_header(name, value)
        digest, length = hashlib.sha256(), 0
        for chunk in chunks:
            digest.update(chunk)
            length += len(chunk)
        record["response"] = {"status": status, "sha256": digest.hexdigest(), "length": length,
                              "headers": dict(h._headers),
                              "header_list": list(h._headers.get_all())}
        for i, chunk in enumerate(chunks):
            if stream and i and delay:
                await asyncio.sleep(delay)
            h.write(chunk)
            if stream:
                await h.flush()
        h.finish()

    async def send_json(self, h: UpstreamHandler, record: Dict[str, Any], obj: Any,
                        status: int = 200, headers: Optional[Dict[str, str]] = None) -> None:
        data, headers = compact(obj), dict(headers or {}, **{"Content-Type": "application/json"})
        if h.request.headers.get("x-fake-gzip") and "gzip" in h.request.headers.get(
                "Accept-Encoding", ""):
            data = gzip.compress(data, mtime=0)
            headers["Content-Encoding"] = "gzip"
        if h.request.headers.get("x-fake-hop"):
            # RFC 9110 §7.6.1: connection-specific, never to be forwarded.
            headers.update({"Keep-Alive": "timeout=99", "X-Hop-Down": "1",
                            "Connection": "X-Hop-Down", "Proxy-Authenticate": "Basic realm=up"})
        await self.send(h, record, status, headers, [data])

    async def error(self, h: UpstreamHandler, record: Dict[str, Any], status: int, type_: str,
                    code: Optional[str], message: str,
                    headers: Optional[Dict[str, str]] = None) -> None:
        await self.send_json(h, record, {"error": {"message": message, "type": type_,
                                                  "param": None, "code": code}},
                             status, headers)

    async def fake_error(self, h: UpstreamHandler, record: Dict[str, Any], status: int) -> None:
        kinds = {
            400: ("invalid_request_error", "invalid_value", "Invalid value for 'messages'"),
            429: ("requests", "rate_limit_exceeded", "Rate limit reached for gpt-4o-mini"),
            500: ("server_error", None, "The server had an error while processing your request"),
            503: ("server_error", None, "The engine is currently overloaded"),
        }
        type_, code, message = kinds.get(status, ("server_error", None, "Fake error"))
        headers = {"x-request-id": "req_" + record["id"], "retry-after": "20",
                   "x-ratelimit-remaining-requests": "0", "openai-processing-ms": "7"}
        await self.error(h, record, status, type_, code,
                         f"{message} (fake upstream {record['id']})", headers)

    @staticmethod
    def model(model_id: str) -> Dict[str, Any]:
        return {"id": model_id, "object": "model", "created": 1686935002, "owned_by": "openai"}

    async def chat(self, h: UpstreamHandler, record: Dict[str, Any], body: bytes) -> None:
        try:
            obj = json.loads(body)
        except ValueError:
            return await self.error(h, record, 400, "invalid_request_error", None,
                                    "We could not parse the JSON body of your request.")
        model = obj.get("model", "gpt-4o-mini")
        base = {"id": "chatcmpl-" + record["id"], "created": 1700000000, "model": model,
                "system_fingerprint": "fp_fake"}
        if not obj.get("stream"):
            return await self.send_json(h, record, dict(base, object="chat.completion", choices=[{
                "index": 0, "message": {"role": "assistant", "content": "".join(CHAT_PIECES),
                                        "refusal": None},
                "logprobs": None, "finish_reason": "stop"}], usage=CHAT_USAGE))
        usage = (obj.get("stream_options") or {}).get("include_usage")
        extra = {"usage": None} if usage else {}

        def chunk(delta: Dict[str, Any], finish: Optional[str] = None) -> bytes:
            data = dict(base, object="chat.completion.chunk", choices=[
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra)
            return b"data: " + compact(data) + b"\n\n"

        chunks = [chunk({"role": "assistant", "content": "", "refusal": None})]
        chunks += [chunk({"content": piece}) for piece in CHAT_PIECES]
        chunks.append(chunk({}, "stop"))
        if usage:
            chunks.append(b"data: " + compact(dict(base, object="chat.completion.chunk",
                                                   choices=[], usage=CHAT_USAGE)) + b"\n\n")
        chunks.append(b"data: [DONE]\n\n")
        delay = float(h.request.headers.get("x-fake-delay-ms", "10")) / 1000
        await self.send(h, record, 200, {"Content-Type": "text/event-stream; charset=utf-8",
                                         "Cache-Control": "no-cache"}, chunks, True, delay)

    async def responses(self, h: UpstreamHandler, record: Dict[str, Any], body: bytes) -> None:
        obj = json.loads(body)
        text = "".join(RESPONSE_PIECES)
        message = {"id": "msg_" + record["id"], "type": "message", "status": "completed",
                   "role": "assistant", "content": [{"type": "output_text", "text": text,
                                                     "annotations": [], "logprobs": []}]}
        response = {"id": "resp_" + record["id"], "object": "response", "created_at": 1700000000,
                    "status": "completed", "model": obj.get("model"), "output": [message],
                    "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
                    "usage": {"input_tokens": 5, "output_tokens": 4, "total_tokens": 9,
                              "input_tokens_details": {"cached_tokens": 0},
                              "output_tokens_details": {"reasoning_tokens": 0}}}
        if not obj.get("stream"):
            return await self.send_json(h, record, response)
        in_progress = dict(response, status="in_progress", output=[], usage=None)
        events = [("response.created", {"response": in_progress}),
                  ("response.in_progress", {"response": in_progress}),
                  ("response.output_item.added", {"output_index": 0, "item": dict(
                      message, status="in_progress", content=[])}),
                  ("response.content_part.added", {"item_id": message["id"], "output_index": 0,
                                                   "content_index": 0, "part": {
                                                       "type": "output_text", "text": "",
                                                       "annotations": []}})]
        events += [("response.output_text.delta", {"item_id": message["id"], "output_index": 0,
                                                   "content_index": 0, "delta": piece,
                                                   "logprobs": []})
                   for piece in RESPONSE_PIECES]
        events += [("response.output_text.done", {"item_id": message["id"], "output_index": 0,
                                                  "content_index": 0, "text": text,
                                                  "logprobs": []}),
                   ("response.output_item.done", {"output_index": 0, "item": message}),
                   ("response.completed", {"response": response})]
        chunks = []
        for number, (kind, data) in enumerate(events):
            data = dict(data, type=kind, sequence_number=number)
            chunks.append(b"event: " + kind.encode() + b"\ndata: " + compact(data) + b"\n\n")
        await self.send(h, record, 200, {"Content-Type": "text/event-stream; charset=utf-8"},
                        chunks, True, 0.01)

    async def embeddings(self, h: UpstreamHandler, record: Dict[str, Any], body: bytes) -> None:
        obj = json.loads(body)
        inputs = obj["input"] if isinstance(obj["input"], list) else [obj["input"]]
        data = []
        for i, text in enumerate(inputs):
            vector: Any = embedding_for(str(text))
            if obj.get("encoding_format") == "base64":
                vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": vector})
        await self.send_json(h, record, {"object": "list", "data": data, "model": obj["model"],
                                         "usage": {"prompt_tokens": 3, "total_tokens": 3}})

    @staticmethod
    def form(h: UpstreamHandler, body: bytes) -> Tuple[Dict[str, List[bytes]], Dict[str, Any]]:
        fields: Dict[str, List[bytes]] = {}
        files: Dict[str, Any] = {}
        tornado.httputil.parse_body_arguments(h.request.headers.get("Content-Type", ""),
                                              body, fields, files)
        return fields, files

    async def transcription(self, h: UpstreamHandler, record: Dict[str, Any], body: bytes) -> None:
        fields, files = self.form(h, body)
        if "file" not in files:
            return await self.error(h, record, 400, "invalid_request_error", None,
                                    "No file part in the multipart body.")
        upload = files["file"][0]["body"]
        record["file_sha256"] = sha256(upload)
        await self.send_json(h, record, {"text": sha256(upload), "usage": {
            "type": "duration", "seconds": 3}})

    async def upload(self, h: UpstreamHandler, record: Dict[str, Any], body: bytes) -> None:
        fields, files = self.form(h, body)
        upload = files["file"][0]
        file_id = "file-" + sha256(upload["body"])[:24]
        self.files[file_id] = upload["body"]
        await self.send_json(h, record, {
            "id": file_id, "object": "file", "bytes": len(upload["body"]),
            "created_at": 1700000000, "filename": upload["filename"],
            "purpose": fields.get("purpose", [b""])[0].decode(), "status": "processed",
            "status_details": None, "expires_at": None})

    async def echo(self, h: UpstreamHandler, record: Dict[str, Any]) -> None:
        """Any other path: the answer kind the test asks for (x-fake-response)."""
        kind = h.request.headers.get("x-fake-response", "json")
        if kind == "binary":
            return await self.send(h, record, 200, {"Content-Type": "application/octet-stream"},
                                   [det_bytes(70_000, record["id"])], stream=True)
        if kind == "none":
            return await self.send(h, record, 200, {}, [])
        if kind == "sse":
            chunks = [b"data: " + compact({"n": n, "id": record["id"]}) + b"\n\n" for n in range(3)]
            return await self.send(h, record, 200, {"Content-Type": "text/event-stream"},
                                   chunks + [b"data: [DONE]\n\n"], True, 0.01)
        await self.send_json(h, record, {"object": "echo", "id": record["id"],
                                         "method": h.request.method, "path": h.request.path,
                                         "query": h.request.query})


# ---------------------------------------------------------------------------
# The worker process
# ---------------------------------------------------------------------------

def clean_environ() -> Dict[str, str]:
    """The test runner's environment without any worker or OpenAI setting."""
    env = {k: v for k, v in os.environ.items()
           if k not in WORKER_VARIABLES and not k.startswith("OPENAI_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Worker:
    """``python worker.py`` in a subprocess, its output in a file, its store in a temp dir."""

    def __init__(self, root: str, upstream_url: str, ssl_context: Optional[ssl.SSLContext] = None,
                 **env: Optional[str]):
        self.dir = tempfile.mkdtemp(prefix="worker-", dir=root)
        self.ssl_context = ssl_context
        self.env = clean_environ()
        self.env.update({"OPENAPI_API_KEY": UPSTREAM_KEY, "ACCESS_TOKEN": ACCESS_TOKEN,
                         "UPSTREAM_URL": upstream_url, "HOST": "127.0.0.1",
                         "PORT": str(free_port()), "DB_PATH": os.path.join(self.dir, "db"),
                         "LOG_LEVEL": "info"})
        for name, value in env.items():
            if value is None:
                self.env.pop(name, None)
            else:
                self.env[name] = value
        self.log_path = os.path.join(self.dir, "worker.log")
        self.proc: Optional[subprocess.Popen] = None

    @property
    def db_path(self) -> str:
        return self.env["DB_PATH"]

    @property
    def url(self) -> str:
        scheme = "https" if self.env.get("TLS_CERT") else "http"
        return f"{scheme}://127.0.0.1:{self.env['PORT']}"

    @property
    def admin(self) -> str:
        return f"{self.url}/{ACCESS_TOKEN}"

    def start(self, port: Optional[int] = None) -> "Worker":
        if port is not None:
            self.env["PORT"] = str(port)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, WORKER_PY], cwd=HERE, env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_SECONDS
        for _ in range(1000):
            if self.proc.poll() is not None:
                raise AssertionError(f"worker.py exited with {self.proc.returncode}:\n"
                                     f"{self.log()[-3000:]}")
            try:
                if request("GET", self.url + "/healthz", timeout=2,
                           context=self.ssl_context).status == 200:
                    return
            except (OSError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"worker.py did not answer /healthz in {READY_SECONDS:g} s:\n"
                             f"{self.log()[-3000:]}")

    def stop(self, timeout: float = 10.0) -> Optional[int]:
        """SIGTERM; SIGKILL if it is still there after ``timeout``. Returns its exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def command(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """``python worker.py ARGS`` with this worker's environment (import, export)."""
        return subprocess.run([sys.executable, WORKER_PY, *args], cwd=HERE, env=self.env,
                              capture_output=True, timeout=timeout)

    # -- the admin and proxy calls most tests make ----------------------------------

    def register(self, name: str, query: str = "") -> str:
        answer = request("GET", f"{self.admin}/register/{name}{query}", context=self.ssl_context)
        assert answer.status == 200, answer
        assert KEY_LINE.match(answer.text), answer
        return answer.text.strip()

    def reset(self, name: str) -> str:
        answer = request("GET", f"{self.admin}/reset/{name}", context=self.ssl_context)
        assert answer.status == 200, answer
        return answer.text.strip()

    def delete(self, name: str) -> None:
        answer = request("DELETE", f"{self.admin}/{name}", context=self.ssl_context)
        assert answer.status == 200 and answer.text == "ok\n", answer

    def models(self, key: str, **headers: str) -> Answer:
        """``GET /v1/models`` through the proxy with ``key``."""
        return request("GET", self.url + "/v1/models", headers=dict(bearer(key), **headers),
                       context=self.ssl_context)


@contextlib.contextmanager
def running_worker(root: str, upstream_url: str, **env: Optional[str]) -> Iterator[Worker]:
    worker = Worker(root, upstream_url, **env)
    try:
        yield worker.start()
    finally:
        worker.stop()


_names = iter(range(1, 1 << 30))


def unique(prefix: str) -> str:
    return f"{prefix}{next(_names)}-{secrets.token_hex(3)}"


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tmp_root() -> Iterator[str]:
    root = tempfile.mkdtemp(prefix="worker-tests-")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream(UPSTREAM_KEY).start()
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def worker(upstream: FakeUpstream, tmp_root: str) -> Iterator[Worker]:
    """The shared server: default settings, the fake upstream behind it."""
    with running_worker(tmp_root, upstream.url) as w:
        yield w


@pytest.fixture(scope="session")
def user_key(worker: Worker) -> str:
    return worker.register(unique("user"))


@pytest.fixture(scope="session")
def client(worker: Worker, user_key: str) -> Any:
    if openai is None:
        pytest.fail("the openai package is needed (pip install -r requirements-dev.txt)")
    return openai.OpenAI(base_url=worker.url + "/v1", api_key=user_key, max_retries=0,
                         timeout=120)


# ---------------------------------------------------------------------------
# 1. Start and configuration
# ---------------------------------------------------------------------------

def make_certificate(directory: str) -> Tuple[str, str]:
    """A self-signed certificate for 127.0.0.1: (cert.pem, key.pem)."""
    cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    try:
        import datetime
        import ipaddress
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor openssl to make a certificate")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-keyout", key_path, "-out", cert_path, "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                       check=True, capture_output=True, timeout=60)
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


BAD_SETTINGS = [
    ("OPENAPI_API_KEY", None),
    ("ACCESS_TOKEN", None),
    ("ACCESS_TOKEN", "short7c"),
    ("ACCESS_TOKEN", "v1"),
    ("ACCESS_TOKEN", "dashboard"),
    ("PORT", "abc"),
    ("PORT", "70000"),
    ("MAX_BODY_MB", "-1"),
    ("UPSTREAM_TIMEOUT", "0"),
    ("LOG_LEVEL", "loud"),
    ("UPSTREAM_URL", "ftp://x"),
    ("CORS_ORIGINS", "not an origin"),
]


class TestStart:
    """``python worker.py``: settings from the environment, --help, HTTPS."""

    @pytest.mark.parametrize("name,value", BAD_SETTINGS,
                             ids=[f"{n}={v}" for n, v in BAD_SETTINGS])
    def test_bad_setting_exits_2_with_one_line_naming_it(self, tmp_root, upstream, name, value):
        worker = Worker(tmp_root, upstream.url, **{name: value})
        try:
            done = worker.command(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker.py started serving with {name}={value!r}")
        lines = [line for line in done.stderr.decode().splitlines() if line.strip()]
        assert done.returncode == 2, done
        assert len(lines) == 1, lines
        assert name in lines[0], lines

    def test_tls_cert_without_key_exits_2(self, tmp_root, upstream):
        directory = tempfile.mkdtemp(dir=tmp_root)
        cert, _ = make_certificate(directory)
        done = Worker(tmp_root, upstream.url, TLS_CERT=cert).command(timeout=15)
        lines = [line for line in done.stderr.decode().splitlines() if line.strip()]
        assert done.returncode == 2, done
        assert len(lines) == 1 and "TLS_KEY" in lines[0], lines

    def test_help_prints_every_variable_and_exits_0(self):
        done = subprocess.run([sys.executable, WORKER_PY, "--help"], cwd=HERE, env=clean_environ(),
                              capture_output=True, timeout=15)
        assert done.returncode == 0, done
        text = done.stdout.decode()
        for name in WORKER_VARIABLES:
            assert name in text, f"--help does not name {name}"

    def test_openai_api_key_is_an_alias(self, tmp_root, upstream):
        with running_worker(tmp_root, upstream.url, OPENAPI_API_KEY=None,
                            OPENAI_API_KEY=UPSTREAM_KEY) as w:
            key, test_id = w.register("alias"), new_test_id()
            assert w.models(key, **{"x-test-id": test_id}).status == 200
            assert header_values(upstream.one(test_id)["headers"], "Authorization") == [
                "Bearer " + UPSTREAM_KEY]

    def test_tls_cert_and_key_serve_https(self, tmp_root, upstream):
        directory = tempfile.mkdtemp(dir=tmp_root)
        cert, key_file = make_certificate(directory)
        context = ssl.create_default_context(cafile=cert)
        with running_worker(tmp_root, upstream.url, ssl_context=context, TLS_CERT=cert,
                            TLS_KEY=key_file) as w:
            assert w.url.startswith("https://")
            health = request("GET", w.url + "/healthz", context=context)
            assert (health.status, health.body) == (200, b"ok")
            key = w.register("tls")
            answer = w.models(key)
            assert answer.status == 200 and answer.json()["object"] == "list"
            with pytest.raises((ssl.SSLError, OSError, http.client.HTTPException)):
                request("GET", w.url + "/healthz", context=ssl.create_default_context())


# ---------------------------------------------------------------------------
# 2. Admin commands with curl
# ---------------------------------------------------------------------------

class TestAdmin:
    """``/TOKEN/…`` and ``/admin/…``: register, reset, delete, as the README shows them."""

    def test_register_prints_a_key(self, worker):
        status, body = curl(f"{worker.admin}/register/{unique('janlay')}")
        assert status == 200 and KEY_LINE.match(body), body

    def test_register_with_post_prints_a_key(self, worker):
        status, body = curl("-X", "POST", f"{worker.admin}/register/{unique('poster')}")
        assert status == 200 and KEY_LINE.match(body), body

    def test_registered_keys_differ_and_work(self, worker):
        first, second = worker.register(unique("a")), worker.register(unique("b"))
        assert first != second
        assert worker.models(first).status == 200 and worker.models(second).status == 200

    def test_register_twice_is_409(self, worker):
        name = unique("twice")
        worker.register(name)
        status, body = curl(f"{worker.admin}/register/{name}")
        assert status == 409, body

    def test_reset_prints_a_new_key_and_the_old_stops_at_once(self, worker):
        name = unique("resetme")
        old = worker.register(name)
        status, body = curl(f"{worker.admin}/reset/{name}")
        assert status == 200 and KEY_LINE.match(body), body
        new = body.strip()
        assert new != old
        is_openai_error(worker.models(old), 401, "invalid_api_key")
        assert worker.models(new).status == 200

    def test_delete_prints_ok_and_the_key_stops(self, worker):
        name = unique("deleteme")
        key = worker.register(name)
        assert worker.models(key).status == 200
        assert curl("-X", "DELETE", f"{worker.admin}/{name}") == (200, "ok\n")
        is_openai_error(worker.models(key), 401, "invalid_api_key")
        assert curl(f"{worker.admin}/register/{name}")[0] == 200  # the name is free again

    @pytest.mark.parametrize("method,path", [("GET", "reset/{}"), ("DELETE", "{}")],
                             ids=["reset", "delete"])
    def test_reset_or_delete_of_unknown_user_is_404(self, worker, method, path):
        status, body = curl("-X", method, f"{worker.admin}/{path.format(unique('nobody'))}")
        assert status == 404, body

    @pytest.mark.parametrize("name", ["a%20b", "-x", "a" * 65, "register", "me", "v1"],
                             ids=["space", "leading-dash", "65-chars", "register", "me", "v1"])
    def test_bad_name_is_400(self, worker, name):
        status, body = curl(f"{worker.admin}/register/{name}")
        assert status == 400, body
        assert body.startswith("error:"), body

    def test_name_of_64_chars_is_fine(self, worker):
        name = "n" + secrets.token_hex(4) + "x" * 55
        assert len(name) == 64
        assert KEY_LINE.match(curl(f"{worker.admin}/register/{name}")[1])

    def test_wrong_token_is_403_access_forbidden(self, worker):
        status, body = curl(f"{worker.url}/wrong{ACCESS_TOKEN}/register/{unique('x')}")
        assert (status, body) == (403, "Access forbidden")

    def test_admin_routes_take_a_bearer_token(self, worker):
        name = unique("bearer")
        auth = ["-H", f"Authorization: Bearer {ACCESS_TOKEN}"]
        status, body = curl(*auth, f"{worker.url}/admin/register/{name}")
        assert status == 200 and KEY_LINE.match(body), body
        status, new = curl(*auth, f"{worker.url}/admin/reset/{name}")
        assert status == 200 and KEY_LINE.match(new), new
        is_openai_error(worker.models(body.strip()), 401)
        assert worker.models(new.strip()).status == 200
        assert curl(*auth, "-X", "DELETE", f"{worker.url}/admin/{name}") == (200, "ok\n")
        is_openai_error(worker.models(new.strip()), 401)

    def test_admin_routes_with_a_wrong_or_no_bearer_are_403(self, worker):
        status, body = curl("-H", "Authorization: Bearer wrong-token-123",
                            f"{worker.url}/admin/register/{unique('x')}")
        assert (status, body) == (403, "Access forbidden")
        status, body = curl(f"{worker.url}/admin/register/{unique('x')}")
        assert (status, body) == (403, "Access forbidden")

    def test_format_json(self, worker):
        name = unique("json")
        status, body = curl(f"{worker.admin}/register/{name}?format=json")
        assert status == 200, body
        data = json.loads(body)
        assert data["name"] == name and USER_KEY.match(data["key"]), data
        assert worker.models(data["key"]).status == 200
        status, body = curl(f"{worker.admin}/register/{name}?format=json")
        assert status == 409 and "error" in json.loads(body), body
        status, body = curl(f"{worker.admin}/reset/{name}?format=json")
        assert status == 200 and USER_KEY.match(json.loads(body)["key"]), body

    def test_ten_wrong_tokens_in_a_minute_get_429(self, tmp_root, upstream):
        with running_worker(tmp_root, upstream.url) as w:  # its own: the lockout lasts a minute
            for attempt in range(10):
                status, body = curl(f"{w.url}/not-the-token-{attempt}/register/x{attempt}")
                assert status == 403, (attempt, body)
            status, body = curl(f"{w.url}/not-the-token-again/register/y")
            assert status == 429, body
            status, body = curl(f"{w.admin}/register/after-lockout")
            assert status == 429, "a locked-out client still gets an answer to the right token"


# ---------------------------------------------------------------------------
# 3. The official Python SDK
# ---------------------------------------------------------------------------

class TestPythonSDK:
    """``openai.OpenAI(base_url=proxy + "/v1", api_key=user_key)`` as a user runs it."""

    def test_chat_completion(self, client, upstream):
        test_id = new_test_id()
        answer = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-test-id": test_id})
        assert answer.choices[0].message.content == "".join(CHAT_PIECES)
        assert answer.usage.total_tokens == CHAT_USAGE["total_tokens"]
        record = upstream.one(test_id)
        assert json.loads(record["body"])["messages"] == [{"role": "user", "content": "hi"}]

    def test_streamed_chat_completion_arrives_in_order(self, client):
        stream = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True)
        pieces, finish = [], None
        for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.content:
                    pieces.append(choice.delta.content)
                finish = choice.finish_reason or finish
        assert pieces == CHAT_PIECES
        assert finish == "stop"

    def test_streamed_chat_completion_with_usage_asked(self, client):
        stream = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True})
        chunks = list(stream)
        assert [c.choices[0].delta.content for c in chunks if c.choices
                and c.choices[0].delta.content] == CHAT_PIECES
        assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 17

    def test_streamed_responses_api_events(self, client):
        stream = client.responses.create(model="gpt-4o-mini", input="hi", stream=True)
        events = list(stream)
        types = [e.type for e in events]
        assert types[0] == "response.created" and types[-1] == "response.completed", types
        assert [e.delta for e in events if e.type == "response.output_text.delta"] == \
            RESPONSE_PIECES
        assert [e.sequence_number for e in events] == list(range(len(events)))
        assert events[-1].response.usage.total_tokens == 9

    def test_embeddings(self, client):
        answer = client.embeddings.create(model="text-embedding-3-small", input=["a", "bbb"])
        assert [d.embedding for d in answer.data] == [embedding_for("a"), embedding_for("bbb")]

    def test_models_list_and_retrieve(self, client):
        assert [m.id for m in client.models.list()] == MODEL_IDS
        assert client.models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"

    def test_speech_is_byte_exact(self, client):
        answer = client.audio.speech.create(model="tts-1", voice="alloy", input="hello")
        assert sha256(answer.content) == sha256(SPEECH_BYTES)

    def test_25_mb_transcription_upload(self, client, upstream):
        audio = os.urandom(25 * 1024 * 1024)
        test_id = new_test_id()
        answer = client.audio.transcriptions.create(
            model="whisper-1", file=("speech.wav", audio, "audio/wav"),
            extra_headers={"x-test-id": test_id})
        assert answer.text == sha256(audio)
        assert upstream.one(test_id)["file_sha256"] == sha256(audio)

    @pytest.mark.parametrize("purpose", ["batch", "assistants"])
    def test_file_upload_and_download_are_byte_exact(self, client, upstream, purpose):
        content = det_bytes(3 * 1024 * 1024 + 7, purpose)
        uploaded = client.files.create(file=("data.jsonl", content), purpose=purpose)
        assert uploaded.bytes == len(content) and uploaded.purpose == purpose
        assert upstream.files[uploaded.id] == content
        assert sha256(client.files.content(uploaded.id).content) == sha256(content)

    def test_unknown_key_raises_authentication_error(self, worker):
        bad = openai.OpenAI(base_url=worker.url + "/v1", max_retries=0,
                            api_key="sk-cfw" + "x" * 45)
        with pytest.raises(openai.AuthenticationError) as caught:
            bad.models.list()
        assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"

    def test_deleted_key_raises_authentication_error(self, worker):
        name = unique("gone")
        key = worker.register(name)
        worker.delete(name)
        gone = openai.OpenAI(base_url=worker.url + "/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as caught:
            gone.chat.completions.create(model="gpt-4o-mini", messages=[])
        assert caught.value.code == "invalid_api_key"

    def test_missing_key_is_401_invalid_api_key(self, worker):
        answer = request("GET", worker.url + "/v1/models")
        is_openai_error(answer, 401, "invalid_api_key")

    @pytest.mark.parametrize("status,error", [(400, "BadRequestError"), (429, "RateLimitError"),
                                              (500, "InternalServerError")])
    def test_upstream_error_passes_through(self, client, upstream, status, error):
        test_id = new_test_id()
        with pytest.raises(getattr(openai, error)) as caught:
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                extra_headers={"x-test-id": test_id, "x-fake-status": str(status)})
        record = upstream.one(test_id)
        assert caught.value.status_code == status
        assert caught.value.body["message"].endswith(f"(fake upstream {record['id']})")
        headers = caught.value.response.headers
        assert headers["x-request-id"] == "req_" + record["id"]
        assert headers["x-test"] == "up-" + record["id"]
        assert headers["retry-after"] == "20"


# ---------------------------------------------------------------------------
# 4. The official Node SDK
# ---------------------------------------------------------------------------

NODE_SCRIPT = r"""
import OpenAI from 'openai';
const [base, key, badKey] = process.argv.slice(2);
const client = new OpenAI({ baseURL: base, apiKey: key, maxRetries: 0 });
const out = {};
const plain = await client.chat.completions.create({
  model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }] });
out.plain = plain.choices[0].message.content;
out.usage = plain.usage.total_tokens;
const stream = await client.chat.completions.create({
  model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }], stream: true });
out.pieces = [];
for await (const chunk of stream) {
  const piece = chunk.choices[0]?.delta?.content;
  if (piece) out.pieces.push(piece);
}
try {
  await new OpenAI({ baseURL: base, apiKey: badKey, maxRetries: 0 }).models.list();
  out.auth = 'no error';
} catch (e) {
  out.auth = { name: e.constructor.name, status: e.status, code: e.code };
}
console.log(JSON.stringify(out));
"""


def node_openai_dir() -> str:
    """``~/.cache/worker-py-tests/node-openai6`` with the `openai` npm package, installed once.

    Version 6: the newest that runs on the Node.js of Debian 12 (7.x asks for Node 22)."""
    directory = os.path.join(os.path.expanduser("~"), ".cache", "worker-py-tests", "node-openai6")
    if not os.path.exists(os.path.join(directory, "node_modules", "openai", "package.json")):
        os.makedirs(directory, exist_ok=True)
        done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", directory,
                               "openai@6"], capture_output=True, timeout=300, cwd=directory)
        assert done.returncode == 0, f"npm install openai failed:\n{done.stderr.decode()[-2000:]}"
    return directory


class TestNodeSDK:
    """The `openai` npm package through ``node``: a chat completion, plain and streamed."""

    def test_chat_completion_plain_and_streamed(self, worker, user_key):
        if shutil.which("node") is None or shutil.which("npm") is None:
            pytest.skip("node and npm are needed for the Node SDK test")
        directory = node_openai_dir()
        script = os.path.join(directory, f"chat-{os.getpid()}-{secrets.token_hex(4)}.mjs")
        with open(script, "w") as f:
            f.write(NODE_SCRIPT)
        try:
            done = subprocess.run(["node", script, worker.url + "/v1", user_key,
                                   "sk-cfw" + "y" * 45], capture_output=True, timeout=60,
                                  cwd=directory, env=clean_environ())
        finally:
            os.unlink(script)
        assert done.returncode == 0, done.stderr.decode()
        out = json.loads(done.stdout.decode().strip().splitlines()[-1])
        assert out["plain"] == "".join(CHAT_PIECES) and out["usage"] == 17
        assert out["pieces"] == CHAT_PIECES
        assert out["auth"] == {"name": "AuthenticationError", "status": 401,
                               "code": "invalid_api_key"}


# ---------------------------------------------------------------------------
# 5. Every REST endpoint of ../shared/openai-endpoints.tsv passes through
# ---------------------------------------------------------------------------

# The REST rows of openai-endpoints.tsv (method, path, request body, response),
# kept here so the suite runs where the shared folder is not;
# test_table_matches_the_shared_tsv keeps the two in step.
ENDPOINTS = """
GET    /v1/chat/completions                                                                  none             json
POST   /v1/chat/completions                                                                  json             sse-optional
GET    /v1/chat/completions/{completion_id}                                                  none             json
POST   /v1/chat/completions/{completion_id}                                                  json             json
DELETE /v1/chat/completions/{completion_id}                                                  none             json
GET    /v1/chat/completions/{completion_id}/messages                                         none             json
POST   /v1/completions                                                                       json             sse-optional
POST   /v1/responses                                                                         json             sse-optional
GET    /v1/responses/{response_id}                                                           none             sse-optional
DELETE /v1/responses/{response_id}                                                           none             none
POST   /v1/responses/{response_id}/cancel                                                    none             json
GET    /v1/responses/{response_id}/input_items                                               none             json
POST   /v1/responses/input_tokens                                                            json             json
POST   /v1/responses/compact                                                                 json             json
POST   /v1/responses?beta=true                                                               json             sse-optional
GET    /v1/responses/{response_id}?beta=true                                                 none             sse-optional
DELETE /v1/responses/{response_id}?beta=true                                                 none             none
POST   /v1/responses/{response_id}/cancel?beta=true                                          none             json
POST   /v1/responses/compact?beta=true                                                       json             json
GET    /v1/responses/{response_id}/input_items?beta=true                                     none             json
POST   /v1/responses/input_tokens?beta=true                                                  json             json
POST   /v1/conversations/{conversation_id}/items                                             json             json
GET    /v1/conversations/{conversation_id}/items                                             none             json
GET    /v1/conversations/{conversation_id}/items/{item_id}                                   none             json
DELETE /v1/conversations/{conversation_id}/items/{item_id}                                   none             json
POST   /v1/conversations                                                                     json             json
GET    /v1/conversations/{conversation_id}                                                   none             json
DELETE /v1/conversations/{conversation_id}                                                   none             json
POST   /v1/conversations/{conversation_id}                                                   json             json
POST   /v1/embeddings                                                                        json             json
POST   /v1/moderations                                                                       json             json
GET    /v1/models                                                                            none             json
GET    /v1/models/{model}                                                                    none             json
DELETE /v1/models/{model}                                                                    none             json
POST   /v1/audio/speech                                                                      json             binary-or-sse
POST   /v1/audio/transcriptions                                                              multipart        sse-optional
POST   /v1/audio/translations                                                                multipart        json
POST   /v1/audio/voice_consents                                                              multipart        json
GET    /v1/audio/voice_consents                                                              none             json
GET    /v1/audio/voice_consents/{consent_id}                                                 none             json
POST   /v1/audio/voice_consents/{consent_id}                                                 json             json
DELETE /v1/audio/voice_consents/{consent_id}                                                 none             json
POST   /v1/audio/voices                                                                      multipart        json
POST   /v1/images/edits                                                                      multipart|json   sse-optional
POST   /v1/images/generations                                                                json             sse-optional
POST   /v1/images/variations                                                                 multipart        json
GET    /v1/files                                                                             none             json
POST   /v1/files                                                                             multipart        json
DELETE /v1/files/{file_id}                                                                   none             json
GET    /v1/files/{file_id}                                                                   none             json
GET    /v1/files/{file_id}/content                                                           none             binary
POST   /v1/uploads                                                                           json             json
POST   /v1/uploads/{upload_id}/cancel                                                        none             json
POST   /v1/uploads/{upload_id}/complete                                                      json             json
POST   /v1/uploads/{upload_id}/parts                                                         multipart        json
POST   /v1/batches                                                                           json             json
GET    /v1/batches                                                                           none             json
GET    /v1/batches/{batch_id}                                                                none             json
POST   /v1/batches/{batch_id}/cancel                                                         none             json
POST   /v1/fine_tuning/alpha/graders/run                                                     json             json
POST   /v1/fine_tuning/alpha/graders/validate                                                json             json
GET    /v1/fine_tuning/checkpoints/{fine_tuned_model_checkpoint}/permissions                 none             json
POST   /v1/fine_tuning/checkpoints/{fine_tuned_model_checkpoint}/permissions                 json             json
DELETE /v1/fine_tuning/checkpoints/{fine_tuned_model_checkpoint}/permissions/{permission_id} none             json
POST   /v1/fine_tuning/jobs                                                                  json             json
GET    /v1/fine_tuning/jobs                                                                  none             json
GET    /v1/fine_tuning/jobs/{fine_tuning_job_id}                                             none             json
POST   /v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel                                      none             json
GET    /v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints                                 none             json
GET    /v1/fine_tuning/jobs/{fine_tuning_job_id}/events                                      none             json
POST   /v1/fine_tuning/jobs/{fine_tuning_job_id}/pause                                       none             json
POST   /v1/fine_tuning/jobs/{fine_tuning_job_id}/resume                                      none             json
GET    /v1/vector_stores                                                                     none             json
POST   /v1/vector_stores                                                                     json             json
GET    /v1/vector_stores/{vector_store_id}                                                   none             json
POST   /v1/vector_stores/{vector_store_id}                                                   json             json
DELETE /v1/vector_stores/{vector_store_id}                                                   none             json
POST   /v1/vector_stores/{vector_store_id}/file_batches                                      json             json
GET    /v1/vector_stores/{vector_store_id}/file_batches/{batch_id}                           none             json
POST   /v1/vector_stores/{vector_store_id}/file_batches/{batch_id}/cancel                    none             json
GET    /v1/vector_stores/{vector_store_id}/file_batches/{batch_id}/files                     none             json
GET    /v1/vector_stores/{vector_store_id}/files                                             none             json
POST   /v1/vector_stores/{vector_store_id}/files                                             json             json
GET    /v1/vector_stores/{vector_store_id}/files/{file_id}                                   none             json
DELETE /v1/vector_stores/{vector_store_id}/files/{file_id}                                   none             json
POST   /v1/vector_stores/{vector_store_id}/files/{file_id}                                   json             json
GET    /v1/vector_stores/{vector_store_id}/files/{file_id}/content                           none             json
POST   /v1/vector_stores/{vector_store_id}/search                                            json             json
GET    /v1/assistants                                                                        none             json
POST   /v1/assistants                                                                        json             json
GET    /v1/assistants/{assistant_id}                                                         none             json
POST   /v1/assistants/{assistant_id}                                                         json             json
DELETE /v1/assistants/{assistant_id}                                                         none             json
POST   /v1/threads                                                                           json             json
POST   /v1/threads/runs                                                                      json             sse-optional
GET    /v1/threads/{thread_id}                                                               none             json
POST   /v1/threads/{thread_id}                                                               json             json
DELETE /v1/threads/{thread_id}                                                               none             json
GET    /v1/threads/{thread_id}/messages                                                      none             json
POST   /v1/threads/{thread_id}/messages                                                      json             json
GET    /v1/threads/{thread_id}/messages/{message_id}                                         none             json
POST   /v1/threads/{thread_id}/messages/{message_id}                                         json             json
DELETE /v1/threads/{thread_id}/messages/{message_id}                                         none             json
GET    /v1/threads/{thread_id}/runs                                                          none             json
POST   /v1/threads/{thread_id}/runs                                                          json             sse-optional
GET    /v1/threads/{thread_id}/runs/{run_id}                                                 none             json
POST   /v1/threads/{thread_id}/runs/{run_id}                                                 json             json
POST   /v1/threads/{thread_id}/runs/{run_id}/cancel                                          none             json
GET    /v1/threads/{thread_id}/runs/{run_id}/steps                                           none             json
GET    /v1/threads/{thread_id}/runs/{run_id}/steps/{step_id}                                 none             json
POST   /v1/threads/{thread_id}/runs/{run_id}/submit_tool_outputs                             json             sse-optional
GET    /v1/evals                                                                             none             json
POST   /v1/evals                                                                             json             json
GET    /v1/evals/{eval_id}                                                                   none             json
POST   /v1/evals/{eval_id}                                                                   json             json
DELETE /v1/evals/{eval_id}                                                                   none             json
GET    /v1/evals/{eval_id}/runs                                                              none             json
POST   /v1/evals/{eval_id}/runs                                                              json             json
GET    /v1/evals/{eval_id}/runs/{run_id}                                                     none             json
POST   /v1/evals/{eval_id}/runs/{run_id}                                                     none             json
DELETE /v1/evals/{eval_id}/runs/{run_id}                                                     none             json
GET    /v1/evals/{eval_id}/runs/{run_id}/output_items                                        none             json
GET    /v1/evals/{eval_id}/runs/{run_id}/output_items/{output_item_id}                       none             json
GET    /v1/containers                                                                        none             json
POST   /v1/containers                                                                        json             json
GET    /v1/containers/{container_id}                                                         none             json
DELETE /v1/containers/{container_id}                                                         none             none
POST   /v1/containers/{container_id}/files                                                   multipart|json   json
GET    /v1/containers/{container_id}/files                                                   none             json
GET    /v1/containers/{container_id}/files/{file_id}                                         none             json
DELETE /v1/containers/{container_id}/files/{file_id}                                         none             none
GET    /v1/containers/{container_id}/files/{file_id}/content                                 none             binary
POST   /v1/realtime/calls                                                                    multipart|binary binary
POST   /v1/realtime/calls/{call_id}/accept                                                   json             none
POST   /v1/realtime/calls/{call_id}/hangup                                                   none             none
POST   /v1/realtime/calls/{call_id}/refer                                                    json             none
POST   /v1/realtime/calls/{call_id}/reject                                                   json             none
POST   /v1/realtime/client_secrets                                                           json             json
POST   /v1/realtime/sessions                                                                 json             json
POST   /v1/realtime/transcription_sessions                                                   json             json
POST   /v1/realtime/translations/client_secrets                                              json             json
POST   /v1/chatkit/sessions/{session_id}/cancel                                              none             json
POST   /v1/chatkit/sessions                                                                  json             json
GET    /v1/chatkit/threads/{thread_id}/items                                                 none             json
GET    /v1/chatkit/threads/{thread_id}                                                       none             json
DELETE /v1/chatkit/threads/{thread_id}                                                       none             json
GET    /v1/chatkit/threads                                                                   none             json
POST   /v1/skills                                                                            multipart|json   json
GET    /v1/skills                                                                            none             json
DELETE /v1/skills/{skill_id}                                                                 none             json
GET    /v1/skills/{skill_id}                                                                 none             json
POST   /v1/skills/{skill_id}                                                                 json             json
GET    /v1/skills/{skill_id}/content                                                         none             json-or-binary
POST   /v1/skills/{skill_id}/versions                                                        multipart|json   json
GET    /v1/skills/{skill_id}/versions                                                        none             json
GET    /v1/skills/{skill_id}/versions/{version}                                              none             json
DELETE /v1/skills/{skill_id}/versions/{version}                                              none             json
GET    /v1/skills/{skill_id}/versions/{version}/content                                      none             json-or-binary
POST   /v1/videos                                                                            multipart|json   json
GET    /v1/videos                                                                            none             json
POST   /v1/videos/characters                                                                 multipart        json
GET    /v1/videos/characters/{character_id}                                                  none             json
POST   /v1/videos/edits                                                                      multipart|json   json
POST   /v1/videos/extensions                                                                 multipart|json   json
GET    /v1/videos/{video_id}                                                                 none             json
DELETE /v1/videos/{video_id}                                                                 none             json
GET    /v1/videos/{video_id}/content                                                         none             json-or-binary
POST   /v1/videos/{video_id}/remix                                                           multipart|json   json
POST   /v1/content_provenance_checks                                                         multipart        json
GET    /v1/organization/admin_api_keys                                                       none             json
POST   /v1/organization/admin_api_keys                                                       json             json
GET    /v1/organization/admin_api_keys/{key_id}                                              none             json
DELETE /v1/organization/admin_api_keys/{key_id}                                              none             json
GET    /v1/organization/audit_logs                                                           none             json
GET    /v1/organization/certificates                                                         none             json
POST   /v1/organization/certificates                                                         json             json
POST   /v1/organization/certificates/activate                                                json             json
POST   /v1/organization/certificates/deactivate                                              json             json
GET    /v1/organization/certificates/{certificate_id}                                        none             json
POST   /v1/organization/certificates/{certificate_id}                                        json             json
DELETE /v1/organization/certificates/{certificate_id}                                        none             json
GET    /v1/organization/costs                                                                none             json
GET    /v1/organization/data_retention                                                       none             json
POST   /v1/organization/data_retention                                                       json             json
GET    /v1/organization/groups                                                               none             json
POST   /v1/organization/groups                                                               json             json
GET    /v1/organization/groups/{group_id}                                                    none             json
POST   /v1/organization/groups/{group_id}                                                    json             json
DELETE /v1/organization/groups/{group_id}                                                    none             json
GET    /v1/organization/groups/{group_id}/roles                                              none             json
POST   /v1/organization/groups/{group_id}/roles                                              json             json
GET    /v1/organization/groups/{group_id}/roles/{role_id}                                    none             json
DELETE /v1/organization/groups/{group_id}/roles/{role_id}                                    none             json
GET    /v1/organization/groups/{group_id}/users                                              none             json
POST   /v1/organization/groups/{group_id}/users                                              json             json
GET    /v1/organization/groups/{group_id}/users/{user_id}                                    none             json
DELETE /v1/organization/groups/{group_id}/users/{user_id}                                    none             json
GET    /v1/organization/invites                                                              none             json
POST   /v1/organization/invites                                                              json             json
GET    /v1/organization/invites/{invite_id}                                                  none             json
DELETE /v1/organization/invites/{invite_id}                                                  none             json
GET    /v1/organization/projects                                                             none             json
POST   /v1/organization/projects                                                             json             json
GET    /v1/organization/projects/{project_id}                                                none             json
POST   /v1/organization/projects/{project_id}                                                json             json
GET    /v1/organization/projects/{project_id}/api_keys                                       none             json
GET    /v1/organization/projects/{project_id}/api_keys/{api_key_id}                          none             json
DELETE /v1/organization/projects/{project_id}/api_keys/{api_key_id}                          none             json
POST   /v1/organization/projects/{project_id}/archive                                        none             json
GET    /v1/organization/projects/{project_id}/certificates                                   none             json
POST   /v1/organization/projects/{project_id}/certificates/activate                          json             json
POST   /v1/organization/projects/{project_id}/certificates/deactivate                        json             json
GET    /v1/organization/projects/{project_id}/data_retention                                 none             json
POST   /v1/organization/projects/{project_id}/data_retention                                 json             json
GET    /v1/organization/projects/{project_id}/groups                                         none             json
POST   /v1/organization/projects/{project_id}/groups                                         json             json
GET    /v1/organization/projects/{project_id}/groups/{group_id}                              none             json
DELETE /v1/organization/projects/{project_id}/groups/{group_id}                              none             json
GET    /v1/organization/projects/{project_id}/hosted_tool_permissions                        none             json
POST   /v1/organization/projects/{project_id}/hosted_tool_permissions                        json             json
GET    /v1/organization/projects/{project_id}/model_permissions                              none             json
POST   /v1/organization/projects/{project_id}/model_permissions                              json             json
DELETE /v1/organization/projects/{project_id}/model_permissions                              none             json
GET    /v1/organization/projects/{project_id}/rate_limits                                    none             json
POST   /v1/organization/projects/{project_id}/rate_limits/{rate_limit_id}                    json             json
GET    /v1/organization/projects/{project_id}/service_accounts                               none             json
POST   /v1/organization/projects/{project_id}/service_accounts                               json             json
GET    /v1/organization/projects/{project_id}/service_accounts/{service_account_id}          none             json
POST   /v1/organization/projects/{project_id}/service_accounts/{service_account_id}          json             json
DELETE /v1/organization/projects/{project_id}/service_accounts/{service_account_id}          none             json
GET    /v1/organization/projects/{project_id}/spend_alerts                                   none             json
POST   /v1/organization/projects/{project_id}/spend_alerts                                   json             json
GET    /v1/organization/projects/{project_id}/spend_alerts/{alert_id}                        none             json
POST   /v1/organization/projects/{project_id}/spend_alerts/{alert_id}                        json             json
DELETE /v1/organization/projects/{project_id}/spend_alerts/{alert_id}                        none             json
GET    /v1/organization/projects/{project_id}/users                                          none             json
POST   /v1/organization/projects/{project_id}/users                                          json             json
GET    /v1/organization/projects/{project_id}/users/{user_id}                                none             json
POST   /v1/organization/projects/{project_id}/users/{user_id}                                json             json
DELETE /v1/organization/projects/{project_id}/users/{user_id}                                none             json
GET    /v1/organization/roles                                                                none             json
POST   /v1/organization/roles                                                                json             json
GET    /v1/organization/roles/{role_id}                                                      none             json
POST   /v1/organization/roles/{role_id}                                                      json             json
DELETE /v1/organization/roles/{role_id}                                                      none             json
GET    /v1/organization/spend_alerts                                                         none             json
POST   /v1/organization/spend_alerts                                                         json             json
GET    /v1/organization/spend_alerts/{alert_id}                                              none             json
POST   /v1/organization/spend_alerts/{alert_id}                                              json             json
DELETE /v1/organization/spend_alerts/{alert_id}                                              none             json
GET    /v1/organization/usage/audio_speeches                                                 none             json
GET    /v1/organization/usage/audio_transcriptions                                           none             json
GET    /v1/organization/usage/code_interpreter_sessions                                      none             json
GET    /v1/organization/usage/completions                                                    none             json
GET    /v1/organization/usage/embeddings                                                     none             json
GET    /v1/organization/usage/file_search_calls                                              none             json
GET    /v1/organization/usage/images                                                         none             json
GET    /v1/organization/usage/moderations                                                    none             json
GET    /v1/organization/usage/vector_stores                                                  none             json
GET    /v1/organization/usage/web_search_calls                                               none             json
GET    /v1/organization/users                                                                none             json
GET    /v1/organization/users/{user_id}                                                      none             json
POST   /v1/organization/users/{user_id}                                                      json             json
DELETE /v1/organization/users/{user_id}                                                      none             json
GET    /v1/organization/users/{user_id}/roles                                                none             json
POST   /v1/organization/users/{user_id}/roles                                                json             json
GET    /v1/organization/users/{user_id}/roles/{role_id}                                      none             json
DELETE /v1/organization/users/{user_id}/roles/{role_id}                                      none             json
GET    /v1/organization/spend_limit                                                          none             json
POST   /v1/organization/spend_limit                                                          json             json
DELETE /v1/organization/spend_limit                                                          none             json
GET    /v1/organization/projects/{project_id}/spend_limit                                    none             json
DELETE /v1/organization/projects/{project_id}/spend_limit                                    none             json
POST   /v1/organization/projects/{project_id}/spend_limit                                    json             json
POST   /v1/organization/projects/{project_id}/service_accounts/{service_account_id}/api_keys json             json
GET    /v1/projects/{project_id}/groups/{group_id}/roles                                     none             json
POST   /v1/projects/{project_id}/groups/{group_id}/roles                                     json             json
GET    /v1/projects/{project_id}/groups/{group_id}/roles/{role_id}                           none             json
DELETE /v1/projects/{project_id}/groups/{group_id}/roles/{role_id}                           none             json
GET    /v1/projects/{project_id}/roles                                                       none             json
POST   /v1/projects/{project_id}/roles                                                       json             json
GET    /v1/projects/{project_id}/roles/{role_id}                                             none             json
POST   /v1/projects/{project_id}/roles/{role_id}                                             json             json
DELETE /v1/projects/{project_id}/roles/{role_id}                                             none             json
GET    /v1/projects/{project_id}/users/{user_id}/roles                                       none             json
POST   /v1/projects/{project_id}/users/{user_id}/roles                                       json             json
GET    /v1/projects/{project_id}/users/{user_id}/roles/{role_id}                             none             json
DELETE /v1/projects/{project_id}/users/{user_id}/roles/{role_id}                             none             json
"""
ENDPOINT_ROWS = [tuple(line.split()) for line in ENDPOINTS.strip().splitlines()]

JSON_BODY = ('{ "model" : "gpt-4o-mini",\n  "input": "h\\u00e9llo \u00e9\u00e8 \U0001f600",'
             '  "n": 1.50, "metadata": {"b": 1, "a": 2},"items":[ ] }\n').encode()
MULTIPART_BODY, MULTIPART_TYPE = multipart(
    {"model": "gpt-4o-mini", "purpose": "assistants"},
    {"file": ("data.bin", det_bytes(100_000, "table") + b"\r\n--not-a-boundary\r\n",
              "application/octet-stream")})
RESPONSE_KIND = {"json": "json", "sse-optional": "json", "json-or-binary": "binary",
                 "binary": "binary", "binary-or-sse": "binary", "none": "none"}


def fill_ids(path: str) -> str:
    def made_up(match: "re.Match[str]") -> str:
        name = match.group(1)
        return {"model": "gpt-4o-mini", "version": "3"}.get(
            name, name.replace("_id", "") + "_T3stId9")
    return re.sub(r"\{(\w+)\}", made_up, path)


def table_body(kind: str) -> Tuple[Optional[bytes], Dict[str, str]]:
    if kind == "json":
        return JSON_BODY, {"Content-Type": "application/json"}
    if kind.startswith("multipart"):
        return MULTIPART_BODY, {"Content-Type": MULTIPART_TYPE}
    if kind == "binary":
        return det_bytes(50_000, "binary"), {"Content-Type": "application/octet-stream"}
    assert kind == "none", kind
    return None, {}


def shared_tsv() -> Optional[str]:
    for path in (os.path.join(HERE, "..", "shared", "openai-endpoints.tsv"),
                 os.path.join(HERE, "openai-endpoints.tsv")):
        if os.path.exists(path):
            return path
    return None


@pytest.fixture(scope="module")
def table_key(worker: Worker) -> str:
    """A user with ``scope=all``: not isolated, so /v1/organization/… passes too."""
    return worker.register(unique("table"), "?scope=all")


class TestEndpointTable:
    """One request per REST row: it arrives unchanged but for the key, and so does the answer."""

    def test_table_matches_the_shared_tsv(self):
        path = shared_tsv()
        if path is None:
            pytest.skip("../shared/openai-endpoints.tsv is not here")
        with open(path) as f:
            rows = [line.rstrip("\n").split("\t") for line in f][1:]
        rest = [tuple(row[:4]) for row in rows if row and row[0] in ("GET", "POST", "DELETE",
                                                                      "PUT", "PATCH")]
        assert rest == ENDPOINT_ROWS

    @pytest.mark.parametrize("method,path,body_kind,response_kind", ENDPOINT_ROWS,
                             ids=[f"{row[0]} {row[1]}" for row in ENDPOINT_ROWS])
    def test_endpoint_passes_through_unchanged(self, worker, upstream, table_key, method, path,
                                               body_kind, response_kind):
        filled, _, beta = fill_ids(path).partition("?")
        query = (beta + "&" if beta else "") + "limit=2&after=x"
        body, headers = table_body(body_kind)
        test_id = new_test_id()
        headers.update(bearer(table_key))
        headers.update({"OpenAI-Organization": "org-not-forwarded", "OpenAI-Project":
                        "proj_not_forwarded", "x-test-id": test_id, "Accept": "*/*",
                        "x-fake-response": RESPONSE_KIND[response_kind],
                        "x-stainless-lang": "python", "OpenAI-Beta": "assistants=v2"})
        answer = request(method, f"{worker.url}{filled}?{query}", body, headers)

        record = upstream.one(test_id)
        assert (record["method"], record["path"], record["query"]) == (method, filled, query)
        assert record["body_len"] == len(body or b"")
        assert record["body_sha256"] == sha256(body or b"")
        got = record["headers"]
        assert header_values(got, "Authorization") == ["Bearer " + UPSTREAM_KEY]
        for name in ("OpenAI-Organization", "OpenAI-Project", "api-key"):
            assert header_values(got, name) == [], name
        for name, value in got:
            assert table_key[6:26] not in value, f"the user key went upstream in {name}"
        assert header_values(got, "x-stainless-lang") == ["python"]
        assert header_values(got, "OpenAI-Beta") == ["assistants=v2"]
        if body is not None:
            assert header_values(got, "Content-Type") == [headers["Content-Type"]]

        sent = record["response"]
        assert answer.status == sent["status"]
        assert answer.headers.get("x-test") == "up-" + record["id"]
        assert answer.headers.get("Content-Type") == sent["headers"].get("Content-Type")
        assert (len(answer.body), sha256(answer.body)) == (sent["length"], sent["sha256"])


# ---------------------------------------------------------------------------
# 6. Proxy behaviours
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tight_worker(upstream: FakeUpstream, tmp_root: str) -> Iterator[Worker]:
    """A server with UPSTREAM_TIMEOUT=1 and MAX_BODY_MB=1."""
    with running_worker(tmp_root, upstream.url, UPSTREAM_TIMEOUT="1", MAX_BODY_MB="1") as w:
        yield w


class TestProxy:
    """``/v<N>/…``: headers, streaming, compression, failures, limits, paths."""

    def test_beta_and_stainless_headers_pass(self, worker, upstream, user_key):
        test_id = new_test_id()
        sent = {"OpenAI-Beta": "assistants=v2", "x-stainless-os": "Linux",
                "x-stainless-retry-count": "0", "x-stainless-package-version": "2.8.1",
                "User-Agent": "OpenAI/Python 2.8.1", "x-test-id": test_id}
        assert worker.models(user_key, **sent).status == 200
        got = upstream.one(test_id)["headers"]
        for name, value in sent.items():
            assert header_values(got, name) == [value], name

    def test_api_key_header_authenticates(self, worker, upstream, user_key):
        test_id = new_test_id()
        answer = request("GET", worker.url + "/v1/models",
                         headers={"api-key": user_key, "x-test-id": test_id})
        assert answer.status == 200, answer
        got = upstream.one(test_id)["headers"]
        assert header_values(got, "api-key") == []
        assert header_values(got, "Authorization") == ["Bearer " + UPSTREAM_KEY]

    def test_api_key_header_with_unknown_key_is_401(self, worker):
        answer = request("GET", worker.url + "/v1/models", headers={"api-key": "sk-cfw" + "z" * 45})
        is_openai_error(answer, 401, "invalid_api_key")

    def test_hop_by_hop_request_headers_are_not_forwarded(self, worker, upstream, user_key):
        test_id = new_test_id()
        headers = dict(bearer(user_key), **{
            "x-test-id": test_id, "Connection": "keep-alive, X-Drop-Me",
            "X-Drop-Me": "1", "Keep-Alive": "timeout=5", "Proxy-Authorization": "Basic eDp5",
            "TE": "trailers", "X-Keep-Me": "1"})
        assert request("GET", worker.url + "/v1/models", headers=headers).status == 200
        got = upstream.one(test_id)["headers"]
        for name in ("X-Drop-Me", "Keep-Alive", "Proxy-Authorization", "TE"):
            assert header_values(got, name) == [], name
        assert all("x-drop-me" not in v.lower() for v in header_values(got, "Connection"))
        assert header_values(got, "X-Keep-Me") == ["1"]
        assert header_values(got, "Host") == [f"127.0.0.1:{upstream.port}"]

    def test_hop_by_hop_response_headers_are_not_forwarded(self, worker, user_key):
        answer = worker.models(user_key, **{"x-fake-hop": "1"})
        assert answer.status == 200 and answer.json()["object"] == "list"
        assert answer.headers.get("Keep-Alive") != "timeout=99"
        assert answer.headers.get("Proxy-Authenticate") is None
        assert answer.headers.get("X-Hop-Down") is None, "named by the upstream's Connection header"

    @pytest.mark.parametrize("status", [200, 429])
    def test_answer_headers_come_back_unchanged_and_once(self, worker, upstream, user_key, status):
        test_id = new_test_id()
        headers = {"x-test-id": test_id}
        if status != 200:
            headers["x-fake-status"] = str(status)
        answer = worker.models(user_key, **headers)
        sent = upstream.one(test_id)["response"]
        assert answer.status == sent["status"] == status
        names = {name.lower() for name, _ in sent["header_list"]}
        assert {"date", "server", "content-type", "x-test"} <= names
        changed = [f"{name}: {header_values(sent['header_list'], name)} upstream, "
                   f"{answer.headers.get_all(name)} at the client" for name in sorted(names)
                   if answer.headers.get_all(name) != header_values(sent["header_list"], name)]
        assert changed == []

    def test_gzip_answer_passes_still_compressed(self, worker, upstream, user_key):
        test_id = new_test_id()
        answer = worker.models(user_key, **{"Accept-Encoding": "gzip", "x-fake-gzip": "1",
                                            "x-test-id": test_id})
        sent = upstream.one(test_id)["response"]
        assert answer.status == 200
        assert answer.headers.get("Content-Encoding") == "gzip"
        assert sha256(answer.body) == sent["sha256"]
        assert [m["id"] for m in json.loads(gzip.decompress(answer.body))["data"]] == MODEL_IDS

    def test_gzip_request_body_passes_byte_exact(self, worker, upstream, user_key):
        test_id, body = new_test_id(), gzip.compress(JSON_BODY * 50)
        answer = request("POST", worker.url + "/v1/moderations", body, dict(
            bearer(user_key), **{"Content-Type": "application/json", "Content-Encoding": "gzip",
                                 "x-test-id": test_id}))
        assert answer.status == 200, answer
        record = upstream.one(test_id)
        assert record["body_sha256"] == sha256(body)
        assert header_values(record["headers"], "Content-Encoding") == ["gzip"]

    def test_sse_chunks_arrive_as_they_leave_the_upstream(self, worker, upstream, user_key):
        test_id = new_test_id()
        body = compact({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
                        "stream": True, "stream_options": {"include_usage": True}})
        conn = connect(worker.url)
        try:
            conn.request("POST", "/v1/chat/completions", body=body, headers=dict(
                bearer(user_key), **{"Content-Type": "application/json", "x-test-id": test_id,
                                     "x-fake-delay-ms": "200"}))
            response = conn.getresponse()
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            received, arrivals = b"", []
            for _ in range(1000):
                line = response.readline()
                if not line:
                    break
                received += line
                if line.startswith(b"data: "):
                    arrivals.append(time.monotonic())
        finally:
            conn.close()
        sent = upstream.one(test_id)["response"]
        assert sha256(received) == sent["sha256"], "the stream changed on the way"
        assert len(arrivals) == len(CHAT_PIECES) + 4
        # 10 events 200 ms apart leave the upstream over 1.8 s: the first must
        # reach the client long before the last.
        assert arrivals[-1] - arrivals[0] > 0.9, arrivals

    def test_unreachable_upstream_is_502(self, tmp_root):
        closed = f"http://127.0.0.1:{free_port()}"
        with running_worker(tmp_root, closed) as w:
            key = w.register("lonely")
            error = is_openai_error(w.models(key), 502)
            assert UPSTREAM_KEY not in json.dumps(error)

    def test_slow_upstream_is_504(self, tight_worker):
        key = tight_worker.register(unique("patient"))
        started = time.monotonic()
        answer = tight_worker.models(key, **{"x-fake-sleep": "4"})
        elapsed = time.monotonic() - started
        is_openai_error(answer, 504)
        assert elapsed < 3.5, f"the 504 came after {elapsed:.1f} s with UPSTREAM_TIMEOUT=1"

    def test_body_over_max_body_mb_is_413_and_never_sent(self, tight_worker, upstream):
        key = tight_worker.register(unique("big"))
        test_id = new_test_id()
        sock = socket.create_connection(("127.0.0.1", int(tight_worker.env["PORT"])), timeout=10)
        try:
            sock.sendall((f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          f"Authorization: Bearer {key}\r\nx-test-id: {test_id}\r\n"
                          f"Content-Type: application/octet-stream\r\n"
                          f"Content-Length: {2 * 1024 * 1024}\r\n\r\n").encode())
            sock.sendall(b"x" * 65536)  # a little of the body; the rest never comes
            response = http.client.HTTPResponse(sock)
            response.begin()
            answer = Answer(response.status, response.headers, response.read())
        finally:
            sock.close()
        is_openai_error(answer, 413, "request_too_large")
        time.sleep(0.2)
        assert upstream.find(test_id) == []

    def test_body_under_max_body_mb_passes(self, tight_worker, upstream):
        key, test_id = tight_worker.register(unique("small")), new_test_id()
        body = det_bytes(900 * 1024, "small")
        answer = request("POST", tight_worker.url + "/v1/uploads/u_1/parts", body, dict(
            bearer(key), **{"Content-Type": "application/octet-stream", "x-test-id": test_id}))
        assert answer.status == 200, answer
        assert upstream.one(test_id)["body_sha256"] == sha256(body)

    def test_query_and_encoded_path_pass_exactly(self, worker, upstream, user_key):
        test_id = new_test_id()
        path = "/v1/models/ft%3Agpt-4o-mini%3Aacme%3Afoo%2Fbar%3AabC12"
        query = "a=1&a=2&q=h%C3%A9llo%20world+x&slash=%2F&empty=&flag"
        answer = request("GET", f"{worker.url}{path}?{query}",
                         headers=dict(bearer(user_key), **{"x-test-id": test_id}))
        assert answer.status == 200, answer
        record = upstream.one(test_id)
        assert (record["path"], record["query"]) == (path, query)

    def test_doubled_version_is_served_as_one(self, worker, upstream, user_key):
        test_id = new_test_id()
        answer = request("GET", worker.url + "/v1/v1/models?limit=2",
                         headers=dict(bearer(user_key), **{"x-test-id": test_id}))
        assert answer.status == 200, answer
        record = upstream.one(test_id)
        assert (record["path"], record["query"]) == ("/v1/models", "limit=2")

    @pytest.mark.parametrize("path", ["/chat/completions", "/models", "/embeddings",
                                      "/responses", "/audio/speech"])
    def test_path_without_version_is_404_saying_v1(self, worker, user_key, path):
        answer = request("POST" if path != "/models" else "GET", worker.url + path,
                         headers=bearer(user_key))
        error = is_openai_error(answer, 404)
        assert "/v1" in error["message"], error

    @pytest.mark.parametrize("path", ["/", "/foo", "/favicon.ico", "/robots.txt", "/.env",
                                      "/wp-login.php", "/cgi-bin/test.cgi"])
    def test_other_paths_are_403_access_forbidden(self, worker, path):
        answer = request("GET", worker.url + path)
        assert (answer.status, answer.text) == (403, "Access forbidden")

    def test_healthz(self, worker):
        answer = request("GET", worker.url + "/healthz")
        assert (answer.status, answer.body) == (200, b"ok")

    def test_upstream_url_path_prefix_is_kept(self, tmp_root, upstream):
        with running_worker(tmp_root, upstream.url + "/api") as w:
            key, test_id = w.register("prefixed"), new_test_id()
            answer = request("GET", w.url + "/v1/models?limit=2",
                             headers=dict(bearer(key), **{"x-test-id": test_id}))
            assert answer.status == 200, answer
            record = upstream.one(test_id)
            assert (record["path"], record["query"]) == ("/api/v1/models", "limit=2")


def peak_memory_mb(pid: int) -> float:
    """The process's peak resident memory (Linux ``VmHWM``), in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc")


class TestStreaming:
    """Bodies stream both ways: the server never holds a whole big body."""

    BIG_MB = 256

    @pytest.fixture(scope="class")
    def fresh_worker(self, upstream, tmp_root):
        if not os.path.exists("/proc/self/status"):
            pytest.skip("needs /proc to read the server's peak memory")
        with running_worker(tmp_root, upstream.url) as w:
            yield w

    def test_big_upload_streams_through(self, fresh_worker, upstream):
        key, test_id = fresh_worker.register("uploader"), new_test_id()
        digest = hashlib.sha256()

        def body() -> Iterator[bytes]:
            for _ in range(self.BIG_MB):
                digest.update(BIG_BLOCK)
                yield BIG_BLOCK

        conn = connect(fresh_worker.url, timeout=120)
        try:
            conn.request("POST", "/v1/uploads/upload_big/parts", body=body(), headers=dict(
                bearer(key), **{"Content-Length": str(self.BIG_MB << 20), "x-test-id": test_id,
                                "Content-Type": "application/octet-stream",
                                "x-fake-discard-body": "1"}))
            response = conn.getresponse()
            assert response.status == 200, response.read()[:300]
            response.read()
        finally:
            conn.close()
        record = upstream.one(test_id)
        assert record["body_len"] == self.BIG_MB << 20
        assert record["body_sha256"] == digest.hexdigest()
        peak = peak_memory_mb(fresh_worker.proc.pid)
        print(f"worker.py peak memory after the upload: {peak:.0f} MB")
        assert peak < self.BIG_MB / 2, f"{peak:.0f} MB for a {self.BIG_MB} MB upload"

    def test_big_download_streams_through(self, fresh_worker, upstream):
        key, test_id = fresh_worker.register("downloader"), new_test_id()
        conn = connect(fresh_worker.url, timeout=120)
        digest, length = hashlib.sha256(), 0
        try:
            conn.request("GET", "/v1/files/file-big/content", headers=dict(
                bearer(key), **{"x-test-id": test_id, "x-fake-download-mb": str(self.BIG_MB)}))
            response = conn.getresponse()
            assert response.status == 200
            for _ in range(self.BIG_MB * 64 + 10):
                block = response.read(1 << 16)
                if not block:
                    break
                digest.update(block)
                length += len(block)
        finally:
            conn.close()
        sent = upstream.one(test_id)["response"]
        assert (length, digest.hexdigest()) == (sent["length"], sent["sha256"])
        peak = peak_memory_mb(fresh_worker.proc.pid)
        print(f"worker.py peak memory after the download: {peak:.0f} MB")
        assert peak < self.BIG_MB / 2, f"{peak:.0f} MB for a {self.BIG_MB} MB download"

    def test_twelve_concurrent_streams_are_not_queued(self, fresh_worker):
        """Tornado's client runs 10 requests at once by default and queues the 11th."""
        key = fresh_worker.register("streamer")
        body = compact({"model": "gpt-4o-mini", "stream": True, "messages": [],
                        "stream_options": {"include_usage": True}})
        first: List[float] = []
        ends: List[float] = []
        problems: List[str] = []

        def stream() -> None:
            conn = connect(fresh_worker.url, timeout=60)
            try:
                conn.request("POST", "/v1/chat/completions", body=body, headers=dict(
                    bearer(key), **{"Content-Type": "application/json", "x-fake-delay-ms": "250"}))
                response = conn.getresponse()
                for _ in range(100):
                    line = response.readline()
                    if not line:
                        break
                    if line.startswith(b"data: "):
                        first.append(time.monotonic())
                        break
                response.read()
                ends.append(time.monotonic())
            except Exception as e:  # reported below
                problems.append(repr(e))
            finally:
                conn.close()

        threads = [threading.Thread(target=stream) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert problems == [] and len(first) == len(ends) == 12, (problems, len(first), len(ends))
        # Each stream lasts ~2.5 s; a queued one would start only after another ended.
        assert max(first) < min(ends), "a stream waited for another to finish"


# ---------------------------------------------------------------------------
# 7. CORS
# ---------------------------------------------------------------------------

def header_list(value: Optional[str]) -> List[str]:
    return [item.strip().lower() for item in (value or "").split(",") if item.strip()]


class TestCORS:
    """Browser apps: preflight answered here, allow-origin on every answer."""

    def test_preflight_allows_the_sdk_headers(self, worker, upstream):
        test_id = new_test_id()
        answer = request("OPTIONS", worker.url + "/v1/chat/completions", headers={
            "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os",
            "x-test-id": test_id})
        assert 200 <= answer.status < 300, answer
        assert answer.headers.get("Access-Control-Allow-Origin") in ("*", "http://app.example")
        allowed = header_list(answer.headers.get("Access-Control-Allow-Headers"))
        assert "authorization" in allowed, allowed  # `*` does not cover it (Fetch standard)
        for name in ("content-type", "x-stainless-os"):
            assert name in allowed or "*" in allowed, allowed
        methods = header_list(answer.headers.get("Access-Control-Allow-Methods"))
        assert "post" in methods or "*" in methods, methods
        assert upstream.find(test_id) == []

    @pytest.mark.parametrize("case", ["proxied", "401", "upstream-500"])
    def test_answers_carry_allow_origin(self, worker, user_key, case):
        headers = {"Origin": "http://app.example"}
        if case != "401":
            headers.update(bearer(user_key))
        if case == "upstream-500":
            headers["x-fake-status"] = "500"
        answer = request("GET", worker.url + "/v1/models", headers=headers)
        assert answer.status == {"proxied": 200, "401": 401, "upstream-500": 500}[case]
        assert answer.headers.get("Access-Control-Allow-Origin") in ("*", "http://app.example")

    def test_cors_origins_limits_who_is_allowed(self, tmp_root, upstream):
        with running_worker(tmp_root, upstream.url, CORS_ORIGINS="http://a.example") as w:
            key = w.register("cors")
            allowed = w.models(key, Origin="http://a.example")
            assert allowed.headers.get("Access-Control-Allow-Origin") == "http://a.example"
            other = w.models(key, Origin="http://b.example")
            assert other.status == 200
            assert other.headers.get("Access-Control-Allow-Origin") in (None, ""), other.headers
            preflight = request("OPTIONS", w.url + "/v1/chat/completions", headers={
                "Origin": "http://b.example", "Access-Control-Request-Method": "POST"})
            assert preflight.headers.get("Access-Control-Allow-Origin") not in (
                "*", "http://b.example")


# ---------------------------------------------------------------------------
# 8. The store: restart, import, export, nothing secret on disk
# ---------------------------------------------------------------------------

def files_under(path: str) -> Iterator[str]:
    for directory, _, names in os.walk(path):
        for name in names:
            yield os.path.join(directory, name)


def assert_no_secret_in_files(path: str, keys: List[str]) -> None:
    found = list(files_under(path))
    assert found, f"nothing was stored under {path}"
    secrets_ = [UPSTREAM_KEY.encode(), ACCESS_TOKEN.encode()]
    secrets_ += [k.encode() for k in keys] + [k[6:26].encode() for k in keys]
    for file in found:
        with open(file, "rb") as f:
            data = f.read()
        for secret in secrets_:
            assert secret not in data, f"{file} holds a secret ({secret[:10]!r}…)"


class TestStore:
    """Users survive restarts; Cloudflare users import; no key is stored in clear."""

    def test_restart_keeps_users(self, tmp_root, upstream):
        worker = Worker(tmp_root, upstream.url).start()
        try:
            kept, deleted = worker.register("kept"), worker.register("deleted")
            old = worker.register("renewed")
            new = worker.reset("renewed")
            worker.delete("deleted")
            assert worker.stop() == 0
            worker.start(port=free_port())
            assert worker.models(kept).status == 200
            assert worker.models(new).status == 200
            is_openai_error(worker.models(old), 401, "invalid_api_key")
            is_openai_error(worker.models(deleted), 401, "invalid_api_key")
            status, _ = curl(f"{worker.admin}/register/kept")
            assert status == 409
        finally:
            worker.stop()
        assert_no_secret_in_files(worker.db_path, [kept, new, old, deleted])

    def test_import_cloudflare_users_keeps_their_keys(self, tmp_root, upstream):
        worker = Worker(tmp_root, upstream.url)
        keys = {"janlay": "sk-cfwAAAA" + secrets.token_hex(20)[:41],
                "friend.one@example": "sk-cfw" + "".join(random.choice("AZaz09")
                                                          for _ in range(45))}
        users_json = os.path.join(worker.dir, "users.json")
        with open(users_json, "w") as f:
            json.dump({name: {"key": key} for name, key in keys.items()}, f)
        done = worker.command("import", users_json)
        assert done.returncode == 0, done
        worker.start()
        try:
            for key in keys.values():
                assert worker.models(key).status == 200, key
            is_openai_error(worker.models("sk-cfwAAAA" + "B" * 41), 401, "invalid_api_key")
            assert curl(f"{worker.admin}/register/janlay")[0] == 409
            assert worker.stop() == 0
            done = worker.command("export")
            assert done.returncode == 0, done
            exported = json.loads(done.stdout)
            assert set(exported) >= set(keys), exported
            for key in keys.values():
                assert key.encode() not in done.stdout and key[6:26].encode() not in done.stdout
        finally:
            worker.stop()
        assert_no_secret_in_files(worker.db_path, list(keys.values()))

    def test_export_lists_registered_users_without_keys(self, tmp_root, upstream):
        with running_worker(tmp_root, upstream.url) as worker:
            keys = {name: worker.register(name) for name in ("alice", "bob")}
            worker.delete("bob")
        done = worker.command("export")
        assert done.returncode == 0, done
        exported = json.loads(done.stdout)
        assert "alice" in exported and "bob" not in exported, exported
        for key in keys.values():
            assert key.encode() not in done.stdout and key[6:26].encode() not in done.stdout


# ---------------------------------------------------------------------------
# 9. Crash test: acknowledged admin writes survive SIGKILL (CONTRACT.md §9)
# ---------------------------------------------------------------------------

# Long model allowlists make every user record a few KB, so the store's journal
# grows fast enough for the kills to land before, during and after compactions.
BIG_ALLOWLIST = ",".join(f"model-{i:02d}-" + "x" * 110 for i in range(60))


class AdminLoad(threading.Thread):
    """Register, reset and delete as fast as one client can; remember what was acknowledged."""

    def __init__(self, worker: Worker, state: Dict[str, Optional[str]], rng: random.Random):
        super().__init__(name="admin-load", daemon=True)
        self.worker, self.state, self.rng = worker, state, rng
        self.in_flight: Optional[Tuple[str, str, Optional[str]]] = None
        self.acknowledged = 0
        self.dead_keys: List[str] = []
        self.problem: Optional[str] = None
        self.stopping = threading.Event()

    def run(self) -> None:
        conn = connect(self.worker.url, timeout=10)
        try:
            for _ in range(100000):
                if self.stopping.is_set():
                    return
                name = self.rng.choice(sorted(self.state))
                old = self.state[name]
                op = ("register" if old is None
                      else "delete" if self.rng.random() < 0.3 else "reset")
                method, path = ("DELETE", f"/{ACCESS_TOKEN}/{name}") if op == "delete" else (
                    "GET", f"/{ACCESS_TOKEN}/{op}/{name}")
                if op == "register" and self.rng.random() < 0.7:
                    path += "?models=" + BIG_ALLOWLIST
                self.in_flight = (op, name, old)
                conn.request(method, path)
                response = conn.getresponse()
                text = response.read().decode()
                if response.status != 200:
                    self.problem = f"{op} {name} answered {response.status} {text!r}"
                    self.in_flight = None
                    return
                self.state[name] = None if op == "delete" else text.strip()
                if old is not None:
                    self.dead_keys.append(old)
                self.in_flight = None
                self.acknowledged += 1
        except (OSError, http.client.HTTPException):
            return  # killed under us: in_flight is what may or may not have happened
        finally:
            conn.close()


class TestCrash:
    ROUNDS = 30
    NAMES = 24

    def test_acknowledged_admin_writes_survive_sigkill(self, tmp_root, upstream):
        seed = random.randrange(1 << 30)
        rng = random.Random(seed)
        worker = Worker(tmp_root, upstream.url, LOG_LEVEL="warning")
        state: Dict[str, Optional[str]] = {f"crash{i}": None for i in range(self.NAMES)}
        dead: List[str] = []
        in_flight: Optional[Tuple[str, str, Optional[str]]] = None
        acknowledged = cut = 0
        started = time.monotonic()
        try:
            for round_ in range(self.ROUNDS + 1):
                where = f"round {round_} (seed {seed})"
                try:
                    worker.start(port=free_port())
                except AssertionError as e:
                    raise AssertionError(f"{where}: the store did not open after SIGKILL: {e}")
                if in_flight is not None:
                    self.settle(worker, state, dead, in_flight, where)
                    in_flight = None
                self.check(worker, state, dead, rng, where)
                if round_ == self.ROUNDS:
                    break
                load = AdminLoad(worker, state, rng)
                load.start()
                time.sleep(rng.uniform(0.05, 0.6))
                worker.kill()
                load.stopping.set()
                load.join(15)
                assert not load.is_alive(), f"{where}: the load thread hangs"
                assert load.problem is None, f"{where}: {load.problem}"
                in_flight, acknowledged = load.in_flight, acknowledged + load.acknowledged
                cut += in_flight is not None
                dead += load.dead_keys
        finally:
            worker.stop()
        print(f"crash test: {self.ROUNDS} kills, {acknowledged} acknowledged writes, "
              f"{cut} cut by a kill, seed {seed}, {time.monotonic() - started:.1f} s")
        assert acknowledged >= self.ROUNDS, f"only {acknowledged} writes were acknowledged"
        assert time.monotonic() - started < 120

    @staticmethod
    def works(worker: Worker, key: str) -> int:
        return worker.models(key).status

    def settle(self, worker: Worker, state: Dict[str, Optional[str]], dead: List[str],
               in_flight: Tuple[str, str, Optional[str]], where: str) -> None:
        """The write cut by the kill may or may not have happened: find out, know the key again."""
        op, name, old = in_flight
        if old is not None and self.works(worker, old) == 200:
            return  # a reset or delete that did not happen
        if old is not None:
            dead.append(old)
        answer = request("GET", f"{worker.admin}/reset/{name}")
        if answer.status == 200:
            state[name] = answer.text.strip()  # it happened (register or reset): a known key now
        else:
            assert answer.status == 404, f"{where}: reset {name} after a cut {op}: {answer}"
            state[name] = None

    def check(self, worker: Worker, state: Dict[str, Optional[str]], dead: List[str],
              rng: random.Random, where: str) -> None:
        for name, key in state.items():
            if key is not None:
                assert self.works(worker, key) == 200, f"{where}: acknowledged key of {name} lost"
        recent, older = dead[-40:], dead[:-40]
        for key in recent + rng.sample(older, min(20, len(older))):
            assert self.works(worker, key) == 401, f"{where}: a reset or deleted key works again"


# ---------------------------------------------------------------------------
# The store on its own: journal, checkpoints, and SIGKILL at random moments
# ---------------------------------------------------------------------------

STORE_WRITER = r'''
import asyncio, json, random, sys
sys.path.insert(0, sys.argv[1])
import worker
worker.JOURNAL_CHECKPOINT_BYTES = 2000   # checkpoint often, so kills land inside them

async def main():
    kv = worker.DbmKV(sys.argv[2]).open()
    rng = random.Random(int(sys.argv[3]))
    n = 0
    while True:
        n += 1
        key = "k%d" % rng.randrange(60)
        if rng.random() < 0.25:
            ops = {key: None, "seq": str(n)}
        else:
            ops = {key: "v%d-%s" % (n, "x" * rng.randrange(200)), "seq": str(n)}
        await kv.write(ops)
        print(json.dumps(ops), flush=True)       # acknowledged
        await asyncio.sleep(0)

asyncio.run(main())
'''


def _read_store(python, path):
    """Every key and value of a closed store, read by a fresh process."""
    code = ("import asyncio, json, sys; sys.path.insert(0, sys.argv[1]); import worker\n"
            "kv = worker.DbmKV(sys.argv[2]).open()\n"
            "print(json.dumps(asyncio.run(kv.scan(''))))\n"
            "kv._journal.close()\n")
    out = subprocess.run([python, "-c", code, HERE, path],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _interpreters_with_backends():
    """Each Python here that runs worker.py, with the dbm backend it picks:
    dbm.dumb (pyenv builds), dbm.ndbm (Debian's python3), dbm.sqlite3 (3.13+)."""
    candidates = [sys.executable, "/usr/bin/python3"]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.1[3-9]*/bin/python")))
    found = {}
    for python in candidates:
        if not os.path.exists(python):
            continue
        probe = subprocess.run(
            [python, "-c", "import tornado, dbm, tempfile, os\n"
                           "d = tempfile.mkdtemp(); dbm.open(os.path.join(d, 'x'), 'n').close()\n"
                           "print(dbm.whichdb(os.path.join(d, 'x')))"],
            capture_output=True, text=True, timeout=30)
        backend = probe.stdout.strip()
        if probe.returncode == 0 and backend not in found:
            found[backend] = python
    return sorted((backend, python) for backend, python in found.items())


class TestStoreCrashSafety:
    @pytest.mark.parametrize("backend,python", _interpreters_with_backends())
    def test_every_acknowledged_write_survives_sigkill(self, tmp_path, backend, python):
        """40 rounds on each dbm backend here: kill -9 mid-write (and
        mid-checkpoint); the store opens and holds every acknowledged write."""
        path = str(tmp_path / "db")
        expected = {}
        rng = random.Random(7)
        script = tmp_path / "writer.py"
        script.write_text(STORE_WRITER)
        rounds = 40
        for round_no in range(rounds):
            proc = subprocess.Popen([python, str(script), HERE, path, str(round_no)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(rng.uniform(0.05, 0.4))
            proc.kill()
            out, err = proc.communicate(timeout=30)
            assert "Traceback" not in err, err
            for line in out.splitlines():
                try:
                    ops = json.loads(line)
                except ValueError:
                    break  # the line being printed when the kill landed
                for key, value in ops.items():
                    if value is None:
                        expected.pop(key, None)
                    else:
                        expected[key] = value
            found = _read_store(python, path)
            # A write that was journaled but not yet acknowledged may be there too:
            # the one after the last acknowledged sequence number.
            # (Each round's writer numbers its writes from 1.)
            acked_this_round = any(line.startswith("{") for line in out.splitlines())
            next_seq = int(expected.get("seq", 0)) + 1 if acked_this_round else 1
            if found.get("seq") != expected.get("seq"):
                assert int(found["seq"]) == next_seq, (round_no, found["seq"], next_seq)
                expected = found  # adopt the unacknowledged-but-durable write
            assert found == expected, f"round {round_no}"
        assert len(expected) > 10


# ---------------------------------------------------------------------------
# 10. Logs: a line per request, no secret ever
# ---------------------------------------------------------------------------

class TestLogs:
    def test_a_whole_session_logs_no_secret_and_a_line_per_request(self, tmp_root, upstream):
        worker = Worker(tmp_root, upstream.url, LOG_LEVEL="debug").start()
        expected: List[Tuple[str, str, int]] = []

        def proxied(method: str, path: str, key: Optional[str], status: int,
                    body: Optional[bytes] = None, **headers: str) -> None:
            if key is not None:
                headers.update(bearer(key))
            answer = request(method, worker.url + path, body, headers)
            assert answer.status == status, (method, path, answer)
            expected.append((method, path.partition("?")[0], status))

        try:
            alice = worker.register("alice")
            alice2 = worker.reset("alice")
            status, bob = curl("-H", f"Authorization: Bearer {ACCESS_TOKEN}",
                               f"{worker.url}/admin/register/bob")
            bob = bob.strip()
            assert status == 200 and USER_KEY.match(bob)
            assert curl(f"{worker.url}/{ACCESS_TOKEN[:-1]}x/register/eve")[0] == 403
            unknown = "sk-cfw" + secrets.token_hex(22)[:45]
            chat = compact({"model": "gpt-4o-mini",
                            "messages": [{"role": "user", "content": "hi"}]})
            stream = compact({"model": "gpt-4o-mini", "stream": True,
                              "messages": [{"role": "user", "content": "hi"}]})
            proxied("GET", "/v1/models", alice2, 200)
            proxied("GET", f"/v1/models?api_key={bob}&token={ACCESS_TOKEN}", bob, 200)
            proxied("POST", "/v1/chat/completions", alice2, 200, chat,
                    **{"Content-Type": "application/json"})
            proxied("POST", "/v1/chat/completions", alice2, 200, stream,
                    **{"Content-Type": "application/json"})
            proxied("POST", "/v1/embeddings", bob, 429, chat, **{"x-fake-status": "429"})
            proxied("POST", "/v1/responses", bob, 500, chat, **{"x-fake-status": "500"})
            proxied("GET", "/v1/models", alice, 401)
            proxied("GET", "/v1/files", unknown, 401)
            proxied("GET", "/v1/models/gpt-4o-mini", None, 401, **{"api-key": unknown})
            proxied("DELETE", "/v1/files/file-abc", None, 200, **{"api-key": bob})
            worker.delete("bob")
            proxied("GET", "/v1/models", bob, 401)
            assert worker.stop() == 0
        finally:
            worker.stop()
        log = worker.log()
        for name, secret in [("ACCESS_TOKEN", ACCESS_TOKEN), ("upstream key", UPSTREAM_KEY),
                             ("upstream key part", UPSTREAM_KEY[16:36])]:
            assert secret not in log, f"the log holds the {name}"
        for key in (alice, alice2, bob, unknown):
            assert key not in log and key[6:26] not in log, "the log holds a user key"
        lines = [line.split() for line in log.splitlines()]
        for method, path, status in set(expected):
            want = expected.count((method, path, status))
            have = sum(1 for words in lines if method in words and path in words
                       and str(status) in words)
            assert have >= want, f"{want} log lines for {method} {path} {status}, found {have}"


# ---------------------------------------------------------------------------
# 11. Signals
# ---------------------------------------------------------------------------

class TestSignals:
    def test_sigterm_exits_0_within_seconds(self, tmp_root, upstream):
        worker = Worker(tmp_root, upstream.url).start()
        idle = connect(worker.url)  # a kept-alive client must not hold the stop up
        try:
            idle.request("GET", "/healthz")
            assert idle.getresponse().read() == b"ok"
            started = time.monotonic()
            worker.proc.send_signal(signal.SIGTERM)
            try:
                status = worker.proc.wait(8)
            except subprocess.TimeoutExpired:
                pytest.fail("worker.py still runs 8 s after SIGTERM")
            assert status == 0, worker.log()[-2000:]
            assert time.monotonic() - started < 8
        finally:
            idle.close()
            worker.stop()
