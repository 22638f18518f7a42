#!/usr/bin/env python3
"""bench.py: how close worker.py comes to a plain reverse proxy, on your own box.

One command, from the checkout::

    python bench/bench.py                 # about 2-3 minutes on 2 cores
    python bench/bench.py --quick         # a smoke run, under a minute
    python bench/bench.py --https --out results.md

It starts, all on 127.0.0.1:

- a fast fake OpenAI upstream (this file, ``--serve-upstream``, in its own
  process: raw asyncio, plain HTTP or, with ``--https``, TLS with a
  certificate made at run time);
- worker.py from this checkout with one imported user, and a second one with
  10,000 imported users;
- nginx as a plain reverse proxy (``proxy_buffering off``), if it is installed;

then measures each of them and the upstream called directly, interleaved in
one run: non-streaming chat completions (req/s and latency at c=1, 16, 64),
200 concurrent SSE streams (time to first byte, delay added per chunk,
bunched chunks), a 25 MiB upload and a 20 MiB download (time, RSS growth),
and idle RSS and start-up time. It prints one markdown table of values and
ratios (against the upstream called directly, and against nginx).

Standard library and tornado only (tornado for worker.py). If ``wrk`` is
installed it drives the non-streaming load (faster than any Python client);
``--load python`` uses the built-in asyncio client instead.
"""

import argparse
import asyncio
import bisect
import gc
import hashlib
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from typing import Any, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HOST = "127.0.0.1"
UPSTREAM_KEY = "sk-bench-upstream-key-0123456789"
ADMIN_TOKEN = "bench-admin-token-123"
CLIENT_KEY = "sk-cfw" + "Bench" * 9  # 45 characters after the prefix
KEY_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
MIB = 1 << 20

CHAT_REQUEST = (b'{"model":"gpt-4o-mini","messages":[{"role":"user",'
                b'"content":"Say hello in one short sentence."}]}')
STREAM_REQUEST = (b'{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},'
                  b'"messages":[{"role":"user","content":"Count slowly."}]}')
SPEECH_REQUEST = b'{"model":"tts-1","input":"Hello there.","voice":"alloy"}'
MARK_RE = re.compile(rb"\[(\d+)@(\d+)\]")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ===========================================================================
# The fake upstream (runs in its own process: bench.py --serve-upstream)
# ===========================================================================

def _canned_chat() -> bytes:
    body = json.dumps({
        "id": "chatcmpl-bench0001", "object": "chat.completion", "created": 1700000000,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello! How can I help you today?",
                                             "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 14, "completion_tokens": 9, "total_tokens": 23,
                  "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                  "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0}},
        "system_fingerprint": "fp_bench",
    }, separators=(",", ":")).encode()
    return (b"HTTP/1.1 200 OK\r\nDate: Fri, 04 Dec 2026 18:00:00 GMT\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: keep-alive\r\n%s\r\n%s"
            % (len(body), OPENAI_ANSWER_FIELDS, body))


# What OpenAI sends with an answer, and the official Python SDK with a request:
# a proxy reads and passes on every one of these fields.
OPENAI_ANSWER_FIELDS = (
    b"access-control-expose-headers: X-Request-ID\r\nopenai-organization: user-bench\r\n"
    b"openai-processing-ms: 1\r\nopenai-project: proj_bench\r\nopenai-version: 2020-10-01\r\n"
    b"x-ratelimit-limit-requests: 10000\r\nx-ratelimit-limit-tokens: 2000000\r\n"
    b"x-ratelimit-remaining-requests: 9999\r\nx-ratelimit-remaining-tokens: 1999990\r\n"
    b"x-ratelimit-reset-requests: 6ms\r\nx-ratelimit-reset-tokens: 0s\r\n"
    b"x-request-id: req_0123456789abcdef0123456789abcdef\r\n"
    b"strict-transport-security: max-age=31536000; includeSubDomains; preload\r\n"
    b"cf-cache-status: DYNAMIC\r\n"
    b"set-cookie: __cf_bm=bench; path=/; domain=.api.openai.com; HttpOnly; Secure; SameSite=None\r\n"
    b"set-cookie: _cfuvid=bench; path=/; domain=.api.openai.com; HttpOnly; Secure; SameSite=None\r\n"
    b"x-content-type-options: nosniff\r\nServer: cloudflare\r\ncf-ray: 8f0000000000abcd-FRA\r\n"
    b'alt-svc: h3=":443"; ma=86400\r\n')
SDK_FIELDS = (
    ("Accept", "application/json"), ("User-Agent", "OpenAI/Python 1.99.0"),
    ("X-Stainless-Lang", "python"), ("X-Stainless-Package-Version", "1.99.0"),
    ("X-Stainless-OS", "Linux"), ("X-Stainless-Arch", "x64"), ("X-Stainless-Runtime", "CPython"),
    ("X-Stainless-Runtime-Version", "3.11.7"), ("X-Stainless-Async", "false"),
    ("X-Stainless-Retry-Count", "0"), ("X-Stainless-Read-Timeout", "600"),
    ("Accept-Encoding", "gzip, deflate"),
)


def _json_response(status: str, obj: Any, close: bool = False) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return (b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (status.encode(), len(body), b"Connection: close\r\n" if close else b"", body))


SPEECH_BLOCK = bytes(range(256)) * 4096  # 1 MiB, the known pattern of a speech answer
CHAT_RESPONSE = _canned_chat()
UNAUTHORIZED = _json_response("401 Unauthorized", {"error": {
    "message": "Incorrect API key provided (fake upstream).", "type": "invalid_request_error",
    "param": None, "code": "invalid_api_key"}})
NOT_FOUND = _json_response("404 Not Found", {"error": {"message": "no such route (fake upstream)",
                                                       "type": "invalid_request_error"}})
BAD_REQUEST = _json_response("400 Bad Request", {"error": {"message": "bad request (fake upstream)"}}, True)
MODELS = _json_response("200 OK", {"object": "list", "data": [
    {"id": m, "object": "model", "created": 1700000000, "owned_by": "system"}
    for m in ("gpt-4o-mini", "tts-1", "whisper-1")]})
HEALTH = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
            b"Transfer-Encoding: chunked\r\nCache-Control: no-cache\r\n\r\n")
SSE_CHUNK = (b'data: {"id":"chatcmpl-bench0002","object":"chat.completion.chunk","created":1700000000,'
             b'"model":"gpt-4o-mini","system_fingerprint":"fp_bench","choices":[{"index":0,'
             b'"delta":{"content":"[%d@%d]"},"logprobs":null,"finish_reason":null}]%s}\n\n')
SSE_STOP = (b'data: {"id":"chatcmpl-bench0002","object":"chat.completion.chunk","created":1700000000,'
            b'"model":"gpt-4o-mini","system_fingerprint":"fp_bench","choices":[{"index":0,'
            b'"delta":{},"logprobs":null,"finish_reason":"stop"}]%s}\n\n')
SSE_USAGE = (b'data: {"id":"chatcmpl-bench0002","object":"chat.completion.chunk","created":1700000000,'
             b'"model":"gpt-4o-mini","system_fingerprint":"fp_bench","choices":[],'
             b'"usage":{"prompt_tokens":11,"completion_tokens":%d,"total_tokens":%d}}\n\n')
SSE_DONE = b"data: [DONE]\n\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class UpstreamProtocol(asyncio.Protocol):
    """One client connection of the fake upstream: HTTP/1.1 keep-alive, bodies
    with Content-Length or chunked, answers written whole where possible."""

    INTERESTING = (b"content-length", b"transfer-encoding", b"authorization", b"connection", b"expect")

    def __init__(self, auth: bytes):
        self.auth = auth
        self.transport: Any = None
        self.buf = bytearray()
        self.closed = False
        self.busy = False  # a streamed answer is being written
        self.paused = False
        self.drained: Optional[asyncio.Future] = None
        self._reset()

    def _reset(self) -> None:
        self.head: Optional[Tuple[bytes, bytes, bytes, Dict[bytes, bytes]]] = None
        self.remaining = 0
        self.chunked = False
        self.chunk_state = "size"
        self.body: Optional[bytearray] = None
        self.hasher: Any = None
        self.nbytes = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.closed = True
        self._wake()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake()

    def _wake(self) -> None:
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    async def _drain(self) -> None:
        if self.paused and not self.closed:
            self.drained = asyncio.get_running_loop().create_future()
            await self.drained

    # -- reading ------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if (self.head is not None and not self.chunked and not self.buf and not self.busy
                and len(data) < self.remaining):
            self._feed(data)  # the middle of a big body: no copy through the buffer
            self.remaining -= len(data)
            return
        self.buf += data
        self._process()

    def _feed(self, data: Any) -> None:
        self.nbytes += len(data)
        if self.hasher is not None:
            self.hasher.update(data)
        else:
            self.body += data

    def _process(self) -> None:
        buf = self.buf
        while not self.busy and not self.closed:
            if self.head is None:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > 65536:
                        self.transport.close()
                    return
                self._start(bytes(buf[:end]))
                del buf[:end + 4]
                if self.head is None:
                    return
                continue
            if self.chunked:
                if not self._read_chunked():
                    return
            else:
                n = min(self.remaining, len(buf))
                if n:
                    self._feed(bytes(buf[:n]))
                    del buf[:n]
                    self.remaining -= n
                if self.remaining:
                    return
            self._complete()

    def _start(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            self.transport.write(BAD_REQUEST)
            self.transport.close()
            return
        headers: Dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name in self.INTERESTING:
                headers[name] = value.strip()
        method, target, _ = parts
        path, _, query = target.partition(b"?")
        self.head = (method, path, query, headers)
        self.chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        self.remaining = int(headers.get(b"content-length", b"0") or b"0") if not self.chunked else 0
        if path == b"/v1/audio/transcriptions":
            self.hasher = hashlib.sha256()
        else:
            self.body = bytearray()
        if headers.get(b"expect", b"").lower() == b"100-continue":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _read_chunked(self) -> bool:
        """Consume chunked body bytes from the buffer; True once the body is complete."""
        buf = self.buf
        while True:
            if self.chunk_state == "data":
                n = min(self.remaining, len(buf))
                if n:
                    self._feed(bytes(buf[:n]))
                    del buf[:n]
                    self.remaining -= n
                if self.remaining:
                    return False
                self.chunk_state = "crlf"
            if self.chunk_state == "crlf":
                if len(buf) < 2:
                    return False
                del buf[:2]
                self.chunk_state = "size"
            end = buf.find(b"\r\n")
            if end < 0:
                return False
            line = bytes(buf[:end])
            del buf[:end + 2]
            if self.chunk_state == "trailer":
                if not line:
                    return True
                continue
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                self.chunk_state = "trailer"
            else:
                self.remaining = size
                self.chunk_state = "data"

    # -- answering ----------------------------------------------------------

    def _complete(self) -> None:
        method, path, query, headers = self.head  # type: ignore[misc]
        body, hasher, nbytes = self.body, self.hasher, self.nbytes
        close = headers.get(b"connection", b"").lower() == b"close"
        self._reset()
        write = self.transport.write
        if path == b"/healthz":
            write(HEALTH)
        elif headers.get(b"authorization") != self.auth:
            write(UNAUTHORIZED)
        elif path == b"/v1/chat/completions" and method == b"POST":
            if b'"stream"' in body:
                try:
                    obj = json.loads(body)
                except ValueError:
                    obj = {}
                if isinstance(obj, dict) and obj.get("stream") is True:
                    q = urllib.parse.parse_qs(query.decode("latin-1"))
                    options = obj.get("stream_options") or {}
                    usage = isinstance(options, dict) and bool(options.get("include_usage"))
                    self._spawn(self._stream(int(q.get("chunks", ["20"])[0]),
                                             float(q.get("gap_ms", ["20"])[0]) / 1000, usage, close))
                    return
            write(CHAT_RESPONSE)
        elif path == b"/v1/audio/transcriptions" and method == b"POST":
            digest = hasher.hexdigest() if hasher is not None else ""
            write(_json_response("200 OK", {"text": "bench", "bytes": nbytes, "sha256": digest}))
        elif path == b"/v1/audio/speech" and method == b"POST":
            q = urllib.parse.parse_qs(query.decode("latin-1"))
            self._spawn(self._speech(int(q.get("mb", ["20"])[0]), close))
            return
        elif path == b"/v1/models" and method == b"GET":
            write(MODELS)
        else:
            write(NOT_FOUND)
        if close:
            self.transport.close()

    def _spawn(self, coro: Any) -> None:
        self.busy = True
        asyncio.ensure_future(coro).add_done_callback(self._answered)

    def _answered(self, task: "asyncio.Future[bool]") -> None:
        self.busy = False
        if task.cancelled() or task.exception() is not None or task.result():
            self.transport.close()
        elif self.buf and not self.closed:
            self._process()

    async def _stream(self, chunks: int, gap: float, usage: bool, close: bool) -> bool:
        usage_null = b',"usage":null' if usage else b""
        write = self.transport.write
        for i in range(chunks):
            if i:
                await asyncio.sleep(gap)
            if self.closed:
                return True
            event = SSE_CHUNK % (i, time.monotonic_ns(), usage_null)
            write(SSE_HEAD + _chunk(event) if i == 0 else _chunk(event))
        tail = _chunk(SSE_STOP % usage_null)
        if usage:
            tail += _chunk(SSE_USAGE % (chunks, chunks + 11))
        write(tail + _chunk(SSE_DONE) + b"0\r\n\r\n")
        return close

    async def _speech(self, mb: int, close: bool) -> bool:
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: audio/mpeg\r\nContent-Length: %d\r\n\r\n"
                             % (mb * MIB))
        for _ in range(mb):
            if self.closed:
                return True
            self.transport.write(SPEECH_BLOCK)
            await self._drain()
        return close


async def _serve_upstream(port: int, cert: str, key: str, auth: str) -> None:
    loop = asyncio.get_running_loop()
    context = None
    if cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
    token = ("Bearer " + auth).encode()
    server = await loop.create_server(lambda: UpstreamProtocol(token), HOST, port,
                                      backlog=4096, ssl=context, reuse_address=True)
    print("PORT %d" % server.sockets[0].getsockname()[1], flush=True)
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
    parent = os.getppid()
    while not stop.done():  # also ends when the bench that started it is gone
        await asyncio.wait([stop], timeout=1.0)
        if os.getppid() != parent:
            break
    server.close()


def upstream_main(args: argparse.Namespace) -> int:
    gc.freeze()
    asyncio.run(_serve_upstream(args.port, args.cert, args.key, args.auth))
    return 0


# ===========================================================================
# Child processes
# ===========================================================================

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _children_of(pid: int) -> List[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids


def process_tree(pid: int) -> List[int]:
    tree, todo = [], [pid]
    while todo and len(tree) < 64:
        p = todo.pop()
        tree.append(p)
        todo.extend(_children_of(p))
    return tree


def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cpu_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0


def listen_overflows() -> int:
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
        for names, values in zip(lines[::2], lines[1::2]):
            if names.startswith("TcpExt:"):
                return int(dict(zip(names.split()[1:], values.split()[1:])).get("ListenOverflows", 0))
    except (OSError, ValueError):
        pass
    return 0


class Proc:
    """A child process in its own session, stopped with its whole group."""

    ALL: List["Proc"] = []

    def __init__(self, name: str, argv: List[str], env: Optional[Dict[str, str]] = None,
                 cwd: Optional[str] = None, log_path: Optional[str] = None):
        self.name, self.argv, self.env, self.cwd, self.log_path = name, argv, env, cwd, log_path
        self.popen: Optional[subprocess.Popen] = None
        self.started = 0.0

    def start(self, stdout: Any = None) -> "Proc":
        out = stdout if stdout is not None else (
            open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL)
        self.started = time.monotonic()
        self.popen = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=out,
                                      stderr=subprocess.STDOUT if self.log_path else None,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        if out is not stdout and out is not subprocess.DEVNULL:
            out.close()
        Proc.ALL.append(self)
        return self

    @property
    def pid(self) -> int:
        return self.popen.pid if self.popen else 0

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def pids(self) -> List[int]:
        return process_tree(self.pid) if self.alive() else []

    def rss_mb(self, field: str = "VmRSS") -> float:
        return sum(_status_kb(p, field) for p in self.pids()) / 1024

    def reset_peak(self) -> None:
        for p in self.pids():
            try:
                with open(f"/proc/{p}/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass

    def cpu_seconds(self) -> float:
        return sum(_cpu_ticks(p) for p in self.pids()) / CLK_TCK

    def stop(self) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            for signum, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.popen.pid, signum)
                except OSError:
                    pass
                try:
                    self.popen.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self in Proc.ALL:
            Proc.ALL.remove(self)

    @classmethod
    def stop_all(cls) -> None:
        for proc in list(cls.ALL):
            proc.stop()


# ===========================================================================
# Targets: what a client talks to
# ===========================================================================

class Target:
    def __init__(self, name: str, port: int, tls: Optional[ssl.SSLContext] = None,
                 proc: Optional[Proc] = None, key: str = CLIENT_KEY):
        self.name, self.port, self.tls, self.proc, self.key = name, port, tls, proc, key
        self.url = ("https" if tls else "http") + f"://{HOST}:{port}"
        self.start_fn: Any = None  # () -> Proc, for start-up measurements

    def request(self, method: str, path: str, body: bytes = b"",
                content_type: str = "application/json", key: Optional[str] = None) -> bytes:
        return (f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
                f"Authorization: Bearer {key or self.key}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n"
                + "".join(f"{name}: {value}\r\n" for name, value in SDK_FIELDS) + "\r\n").encode() + body


async def open_conn(target: Target, timeout: float = 10.0) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        HOST, target.port, ssl=target.tls, server_hostname=HOST if target.tls else None,
        limit=1 << 20), timeout)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


async def read_response(reader: asyncio.StreamReader, sink: Any = None) -> Tuple[int, Dict[str, str], bytes]:
    """One HTTP/1.1 response; the body goes to ``sink(chunk)`` when given."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    parts: List[bytes] = []
    put = sink or parts.append
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                break
            remaining = size
            while remaining:
                data = await reader.read(min(remaining, 1 << 20))
                if not data:
                    raise ConnectionError("closed mid-chunk")
                put(data)
                remaining -= len(data)
            await reader.readexactly(2)
    elif "content-length" in headers:
        remaining = int(headers["content-length"])
        while remaining:
            data = await reader.read(min(remaining, 1 << 20))
            if not data:
                raise ConnectionError("closed mid-body")
            put(data)
            remaining -= len(data)
    else:
        while True:
            data = await reader.read(1 << 20)
            if not data:
                break
            put(data)
    return status, headers, b"".join(parts)


async def one_request(target: Target, raw: bytes, timeout: float = 10.0) -> Tuple[int, bytes]:
    reader, writer = await open_conn(target, timeout)
    try:
        writer.write(raw)
        status, _, body = await asyncio.wait_for(read_response(reader), timeout)
        return status, body
    finally:
        writer.close()


# ===========================================================================
# (a) Non-streaming load: a keep-alive asyncio client, or wrk
# ===========================================================================

class LoadRun:
    def __init__(self, max_requests: int, duration: float):
        self.max_requests = max_requests
        self.deadline = 0.0
        self.duration = duration
        self.issued = self.done = self.errors = 0
        self.latencies: List[int] = []
        self.open = 0
        self.finished: Optional[asyncio.Future] = None
        self.last = 0.0

    def conn_done(self) -> None:
        self.open -= 1
        if self.open <= 0 and self.finished is not None and not self.finished.done():
            self.finished.set_result(None)


class LoadConn(asyncio.Protocol):
    def __init__(self, run: LoadRun, raw: bytes):
        self.run, self.raw = run, raw
        self.transport: Any = None
        self.buf = b""
        self.need = -1
        self.chunked = False
        self.ok = True
        self.t0 = 0
        self.active = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def go(self) -> None:
        self.active = True
        self.run.open += 1
        self._send()

    def _send(self) -> None:
        run = self.run
        if run.issued >= run.max_requests or time.perf_counter() >= run.deadline:
            self.active = False
            self.transport.close()
            run.conn_done()
            return
        run.issued += 1
        self.buf, self.need = b"", -1
        self.t0 = time.perf_counter_ns()
        self.transport.write(self.raw)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if self.need < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            head = buf[:end].lower()
            self.ok = buf[9:10] == b"2"
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = head.find(b"\r\n", at + 2)
                self.need = end + 4 + int(head[at + 17:stop if stop > 0 else len(head)])
                self.chunked = False
            else:
                self.chunked = b"chunked" in head
                self.need = end + 4
        if self.chunked:
            complete = len(buf) >= self.need + 5 and buf.endswith(b"0\r\n\r\n")
        else:
            complete = len(buf) >= self.need
        if not complete:
            self.buf = buf
            return
        run = self.run
        run.latencies.append(time.perf_counter_ns() - self.t0)
        run.done += 1
        run.last = time.perf_counter()
        if not self.ok:
            run.errors += 1
        self._send()

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if self.active:
            self.active = False
            self.run.errors += 1
            self.run.conn_done()


def percentile(values: List[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def python_load(target: Target, concurrency: int, duration: float, max_requests: int) -> Dict[str, Any]:
    loop = asyncio.get_running_loop()
    run = LoadRun(max_requests, duration)
    raw = target.request("POST", "/v1/chat/completions", CHAT_REQUEST)
    conns = []
    for _ in range(concurrency):
        _, proto = await asyncio.wait_for(loop.create_connection(
            lambda: LoadConn(run, raw), HOST, target.port, ssl=target.tls,
            server_hostname=HOST if target.tls else None), 10)
        conns.append(proto)
    run.finished = loop.create_future()
    start = time.perf_counter()
    run.deadline = start + duration
    for conn in conns:
        conn.go()
    try:
        await asyncio.wait_for(asyncio.shield(run.finished), duration + 15)
    except asyncio.TimeoutError:
        run.errors += run.open
    for conn in conns:
        conn.transport.close()
    elapsed = max((run.last or time.perf_counter()) - start, 1e-9)
    lat = [x / 1e6 for x in run.latencies]
    return {"rps": run.done / elapsed, "p50": percentile(lat, 50), "p99": percentile(lat, 99),
            "requests": run.done, "errors": run.errors}


WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _wrk_ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text)
    return float(m.group(1)) * WRK_UNITS[m.group(2)] if m else float("nan")


def wrk_script(tmp: str, target: Target, max_requests: int) -> str:
    path = os.path.join(tmp, f"wrk-{target.name}.lua")
    with open(path, "w") as f:
        f.write('wrk.method = "POST"\n')
        f.write("wrk.body = '%s'\n" % CHAT_REQUEST.decode())
        f.write('wrk.headers["Content-Type"] = "application/json"\n')
        f.write('wrk.headers["Authorization"] = "Bearer %s"\n' % target.key)
        for name, value in SDK_FIELDS:
            f.write('wrk.headers["%s"] = "%s"\n' % (name, value))
        # The count bound: each thread stops after its share of requests.
        f.write("local n = 0\nfunction response(status, headers, body)\n"
                "  n = n + 1\n  if n >= %d then wrk.thread:stop() end\nend\n" % max_requests)
    return path


async def wrk_load(target: Target, concurrency: int, duration: float, max_requests: int,
                   script: str) -> Dict[str, Any]:
    argv = ["wrk", "-t1", "-c%d" % concurrency, "-d%gs" % max(duration, 1), "--latency",
            "-s", script, target.url + "/v1/chat/completions"]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT,
                                                start_new_session=True)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), duration + 20)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return {"rps": float("nan"), "p50": float("nan"), "p99": float("nan"), "requests": 0,
                "errors": 1}
    text = out.decode("utf-8", "replace")
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    count = re.search(r"(\d+) requests in", text)
    p50 = re.search(r"^\s+50%\s+(\S+)", text, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", text, re.M)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, sock.groups())) if sock else 0)
    if count and int(count.group(1)) >= max_requests:
        log(f"  wrk hit the request cap ({max_requests:,}) before {duration:g} s: its req/s is too low; "
            "raise --max-requests")
    if rps is None or errors:
        log("  wrk said: " + " | ".join(line.strip() for line in text.splitlines()
                                        if "error" in line.lower() or "Non-2xx" in line or rps is None))
    return {"rps": float(rps.group(1)) if rps else float("nan"),
            "p50": _wrk_ms(p50.group(1)) if p50 else float("nan"),
            "p99": _wrk_ms(p99.group(1)) if p99 else float("nan"),
            "requests": int(count.group(1)) if count else 0, "errors": errors}


# ===========================================================================
# (b) Streams
# ===========================================================================

class StreamConn(asyncio.Protocol):
    """Records every read of an SSE answer with its arrival time."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.pieces: List[Tuple[int, bytes]] = []
        self.data = bytearray()
        self.waiter: Optional[asyncio.Future] = None
        self.need = -1
        self.chunked = False
        self.lost = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def begin(self, raw: bytes) -> "asyncio.Future[None]":
        self.pieces, self.data, self.need = [], bytearray(), -1
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.pieces.append((time.monotonic_ns(), data))
        self.data += data
        if self.need < 0:
            end = self.data.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.data[:end]).lower()
            m = re.search(rb"\r\ncontent-length:\s*(\d+)", head)
            self.chunked = m is None and b"chunked" in head
            self.need = end + 4 + (int(m.group(1)) if m else 0)
        if self.chunked:
            complete = self.data.endswith(b"\r\n0\r\n\r\n")
        else:
            complete = len(self.data) >= self.need
        if complete and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.lost = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed"))


def analyse_stream(t0: int, pieces: List[Tuple[int, bytes]], chunks: int) -> Dict[str, Any]:
    data = b"".join(p for _, p in pieces)
    ends, total = [], 0
    for _, piece in pieces:
        total += len(piece)
        ends.append(total)
    status = int(data[9:12]) if data[:5] == b"HTTP/" and data[9:12].isdigit() else 0
    delays, arrivals = [], []
    for m in MARK_RE.finditer(data):
        at = pieces[bisect.bisect_right(ends, m.end() - 1)][0]
        arrivals.append(at)
        delays.append((at - int(m.group(2))) / 1e6)
    ok = (status == 200 and len(delays) == chunks and b"data: [DONE]" in data
          and b'"choices":[]' in data and b'"usage":{' in data)
    return {"ok": ok, "status": status, "ttfb": (pieces[0][0] - t0) / 1e6 if pieces else None,
            "delays": delays, "gaps": [(b - a) / 1e6 for a, b in zip(arrivals, arrivals[1:])]}


async def stream_phase(target: Target, clients: int, per_client: int, chunks: int, gap_ms: float,
                       time_limit: float) -> Dict[str, Any]:
    loop = asyncio.get_running_loop()
    raw = target.request("POST", f"/v1/chat/completions?chunks={chunks}&gap_ms={gap_ms:g}", STREAM_REQUEST)
    results: List[Dict[str, Any]] = []
    failures = [0]
    reasons: Dict[str, int] = {}

    def fail(reason: str, n: int = 1) -> None:
        failures[0] += n
        reasons[reason] = reasons.get(reason, 0) + n
    per_stream_timeout = chunks * gap_ms / 1000 + 15

    async def client() -> None:
        t0 = time.monotonic_ns()  # the first stream's TTFB includes the connect
        try:
            transport, proto = await asyncio.wait_for(loop.create_connection(
                StreamConn, HOST, target.port, ssl=target.tls,
                server_hostname=HOST if target.tls else None), 15)
        except (OSError, asyncio.TimeoutError) as e:
            fail("connect: " + type(e).__name__, per_client)
            return
        try:
            for i in range(per_client):
                if i:
                    t0 = time.monotonic_ns()
                try:
                    await asyncio.wait_for(proto.begin(raw), per_stream_timeout)
                except asyncio.TimeoutError:
                    fail("timeout", per_client - i)
                    return
                except (OSError, ConnectionError):
                    result = analyse_stream(t0, proto.pieces, chunks)
                    fail(f"closed after {len(result['delays'])} chunks, status {result['status']}", per_client - i)
                    return
                result = analyse_stream(t0, proto.pieces, chunks)
                results.append(result)
                if not result["ok"]:
                    fail(f"status {result['status']}" if result["status"] != 200 else
                         f"incomplete: {len(result['delays'])} chunks")
        finally:
            transport.close()

    before = listen_overflows()
    tasks = [asyncio.ensure_future(client()) for _ in range(clients)]
    done, pending = await asyncio.wait(tasks, timeout=time_limit)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=5)
        fail("phase time limit", len(pending))
    good = [r for r in results if r["ok"]]
    delays = [d for r in good for d in r["delays"]]
    gaps = [g for r in good for g in r["gaps"]]
    ttfb = [r["ttfb"] for r in good if r["ttfb"] is not None]
    return {"ttfb50": percentile(ttfb, 50), "ttfb99": percentile(ttfb, 99),
            "delay50": percentile(delays, 50), "delay99": percentile(delays, 99),
            "gap50": percentile(gaps, 50),
            "bunched": (sum(1 for g in gaps if g < gap_ms / 4) / len(gaps)) if gaps else float("nan"),
            "complete": len(good), "total": clients * per_client, "failed": clients * per_client - len(good),
            "overflows": listen_overflows() - before, "reasons": reasons}


async def unbuffered_check(target: Target, chunks: int = 8, gap_ms: float = 20) -> Tuple[bool, float]:
    """Three streams in a row on one connection, nothing else running: is any
    chunk held back (Nagle + delayed ACK shows as ~40 ms)?"""
    loop = asyncio.get_running_loop()
    raw = target.request("POST", f"/v1/chat/completions?chunks={chunks}&gap_ms={gap_ms:g}", STREAM_REQUEST)
    transport, proto = await asyncio.wait_for(loop.create_connection(
        StreamConn, HOST, target.port, ssl=target.tls, server_hostname=HOST if target.tls else None), 10)
    worst, ok = 0.0, True
    try:
        for _ in range(3):
            t0 = time.monotonic_ns()
            await asyncio.wait_for(proto.begin(raw), chunks * gap_ms / 1000 + 10)
            result = analyse_stream(t0, proto.pieces, chunks)
            ok = ok and result["ok"]
            worst = max([worst] + result["delays"])
    finally:
        transport.close()
    return ok and worst < gap_ms / 2, worst


# ===========================================================================
# (c) Big bodies
# ===========================================================================

def multipart_body(size: int) -> Tuple[bytes, str]:
    boundary = "----benchboundary7MA4YWxkTrZu0gW"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"speech.mp3\"\r\n"
            f"Content-Type: audio/mpeg\r\n\r\n").encode()
    data = random.Random(7).randbytes(size) if hasattr(random.Random, "randbytes") else os.urandom(size)
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


async def upload(target: Target, body: bytes, content_type: str, timeout: float) -> Tuple[float, bool]:
    head = target.request("POST", "/v1/audio/transcriptions", b"", content_type)
    head = head.replace(b"Content-Length: 0\r\n", b"Content-Length: %d\r\n" % len(body))
    expected = hashlib.sha256(body).hexdigest()
    start = time.perf_counter()
    reader, writer = await open_conn(target)
    try:
        writer.write(head)
        view = memoryview(body)
        for at in range(0, len(body), MIB):
            writer.write(view[at:at + MIB])
            await writer.drain()
        status, _, answer = await asyncio.wait_for(read_response(reader), timeout)
    finally:
        writer.close()
    elapsed = time.perf_counter() - start
    try:
        ok = status == 200 and json.loads(answer).get("sha256") == expected
    except ValueError:
        ok = False
    return elapsed, ok


async def download(target: Target, mb: int, timeout: float) -> Tuple[float, bool]:
    expected = hashlib.sha256(SPEECH_BLOCK * mb).hexdigest()
    hasher = hashlib.sha256()
    start = time.perf_counter()
    reader, writer = await open_conn(target)
    try:
        writer.write(target.request("POST", f"/v1/audio/speech?mb={mb}", SPEECH_REQUEST))
        status, _, _ = await asyncio.wait_for(read_response(reader, hasher.update), timeout)
    finally:
        writer.close()
    return time.perf_counter() - start, status == 200 and hasher.hexdigest() == expected


# ===========================================================================
# Setting the targets up
# ===========================================================================

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def make_cert(tmp: str) -> Tuple[str, str]:
    cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
    if shutil.which("openssl"):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                        "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        return cert, key
    try:
        import datetime
        import ipaddress
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID
    except ImportError:
        raise SystemExit("--https needs `openssl` on PATH or the `cryptography` package") from None
    pkey = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(pkey.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=2))
                   .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]),
                                  critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(pkey, hashes.SHA256()))
    with open(cert, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    with open(key, "wb") as f:
        f.write(pkey.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                   serialization.NoEncryption()))
    return cert, key


def start_upstream(tmp: str, cert: str, key: str) -> Tuple[Proc, int]:
    argv = [sys.executable, os.path.abspath(__file__), "--serve-upstream", "--port", "0",
            "--auth", UPSTREAM_KEY]
    if cert:
        argv += ["--cert", cert, "--key", key]
    proc = Proc("upstream", argv).start(stdout=subprocess.PIPE)
    assert proc.popen is not None and proc.popen.stdout is not None
    # The first line says the port; bounded by the process ending or 15 s.
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(proc.popen.stdout, selectors.EVENT_READ)
    if not sel.select(15):
        raise SystemExit("the fake upstream did not start")
    line = proc.popen.stdout.readline().decode()
    sel.close()
    if not line.startswith("PORT "):
        raise SystemExit(f"the fake upstream did not start: {line!r}")
    return proc, int(line.split()[1])


def worker_env(db: str, port: int, upstream_url: str, cert: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENAI_API_KEY", "KV_URL", "WORKERS", "TLS_CERT", "TLS_KEY", "CORS_ORIGINS",
                        "MAX_BODY_MB", "UPSTREAM_TIMEOUT")}
    env.update({"ACCESS_TOKEN": ADMIN_TOKEN, "OPENAPI_API_KEY": UPSTREAM_KEY, "UPSTREAM_URL": upstream_url,
                "HOST": HOST, "PORT": str(port), "DB_PATH": db, "LOG_LEVEL": "warning",
                "PYTHONUNBUFFERED": "1"})
    if cert:
        env["SSL_CERT_FILE"] = cert
    return env


def import_users(worker: str, env: Dict[str, str], users: Dict[str, Any], tmp: str, tag: str) -> float:
    path = os.path.join(tmp, f"users-{tag}.json")
    with open(path, "w") as f:
        json.dump(users, f)
    start = time.monotonic()
    done = subprocess.run([sys.executable, worker, "import", path], env=env, cwd=os.path.dirname(worker),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"worker.py import failed: {done.stdout.decode()[-500:]}")
    return time.monotonic() - start


def many_users(count: int) -> Dict[str, Any]:
    rng = random.Random(10000)
    users = {f"user{i:05d}": {"key": "sk-cfw" + "".join(rng.choice(KEY_ALPHABET) for _ in range(45))}
             for i in range(count - 1)}
    users["bench"] = {"key": CLIENT_KEY}
    return users


NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
{user}
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    client_max_body_size 0;
    keepalive_requests 1000000;
    upstream fake_openai {{
        server {host}:{upstream_port};
        keepalive 256;
        keepalive_requests 1000000;
    }}
    server {{
        listen {host}:{port} backlog=4096;
        location / {{
            proxy_pass {scheme}://fake_openai;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {key}";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
            {ssl}
        }}
    }}
}}
"""


def nginx_proc(tmp: str, port: int, upstream_port: int, tls: bool) -> Proc:
    folder = os.path.join(tmp, "nginx")
    os.makedirs(folder, exist_ok=True)
    conf = os.path.join(folder, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF.format(tmp=folder, host=HOST, port=port, upstream_port=upstream_port,
                                  scheme="https" if tls else "http", key=UPSTREAM_KEY,
                                  user="user root;" if os.geteuid() == 0 else "",
                                  ssl="proxy_ssl_session_reuse on;" if tls else ""))
    return Proc("nginx", ["nginx", "-p", folder, "-c", conf, "-e", os.path.join(folder, "nginx-error.log")],
                log_path=os.path.join(folder, "nginx.out"))


async def first_200(target: Target, proc: Proc, limit: float) -> float:
    """Seconds from spawn to the first 200 on a chat completion (polled every 5 ms)."""
    raw = target.request("POST", "/v1/chat/completions", CHAT_REQUEST)
    deadline = proc.started + limit
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{target.name} exited with status {proc.popen.returncode}")
        try:
            status, _ = await one_request(target, raw, timeout=2)
            if status == 200:
                return time.monotonic() - proc.started
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        await asyncio.sleep(0.005)
    raise RuntimeError(f"{target.name}: no 200 within {limit:g} s")


# ===========================================================================
# The run
# ===========================================================================

def med(values: List[float]) -> float:
    values = [v for v in values if v == v]  # not NaN
    return statistics.median(values) if values else float("nan")


def fmt(value: float, digits: int = 3) -> str:
    if value != value:
        return "–"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}g}" if value else "0"


def fmt_s(value: float) -> str:
    return "–" if value != value else f"{value:.3f}"


def fmt_ms(value: float) -> str:
    if value != value:
        return "–"
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}" if abs(value) < 100 else f"{value:,.0f}"


def signed(value: float) -> str:
    return "–" if value != value else ("+" if value >= 0 else "−") + fmt_ms(abs(value))


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="worker-bench-")
        self.targets: List[Target] = []
        self.notes: List[str] = []
        self.data: Dict[str, Dict[str, List[Any]]] = {}
        self.worker = os.path.abspath(args.worker)

    def put(self, target: str, metric: str, value: Any) -> None:
        self.data.setdefault(target, {}).setdefault(metric, []).append(value)

    def get(self, target: str, metric: str) -> List[Any]:
        return self.data.get(target, {}).get(metric, [])

    def order(self, rep: int) -> List[Target]:
        k = rep % len(self.targets)
        return self.targets[k:] + self.targets[:k]

    # -- setting up ---------------------------------------------------------

    async def setup(self) -> None:
        args = self.args
        cert = key = ""
        client_tls = None
        if args.https:
            cert, key = make_cert(self.tmp)
            client_tls = ssl.create_default_context(cafile=cert)
        log(f"bench: temp dir {self.tmp}")
        self.upstream, up_port = start_upstream(self.tmp, cert, key)
        direct = Target("direct", up_port, client_tls, self.upstream, key=UPSTREAM_KEY)
        self.targets.append(direct)
        upstream_url = f"{'https' if args.https else 'http'}://{HOST}:{up_port}"

        if args.nginx and shutil.which("nginx"):
            port = free_port()
            target = Target("nginx", port)
            target.start_fn = lambda port=port: nginx_proc(self.tmp, port, up_port, args.https)
            self.targets.append(target)
        elif args.nginx:
            self.notes.append("nginx is not on PATH: no reverse-proxy baseline (install it to get one).")
            log("bench: " + self.notes[-1])

        workers = [("worker", {"bench": {"key": CLIENT_KEY}}, self.worker)]
        if args.baseline:
            # The same user on another worker.py (an earlier checkout's), measured
            # in the same run: "before and after" with the machine's drift shared.
            workers.append(("baseline", {"bench": {"key": CLIENT_KEY}},
                            os.path.abspath(args.baseline)))
        if args.budget:
            # A user with a monthly budget (and a price looked up for every
            # request): what checking and pricing spend costs per request.
            workers.append(("worker-budget", {"bench": {
                "key": CLIENT_KEY, "budget": 10 ** 18, "period": "month"}}, self.worker))
        if args.many_users:
            workers.append((f"worker-{args.many_users // 1000}k-users", many_users(args.many_users),
                            self.worker))
        for name, users, worker in workers:
            env = worker_env(os.path.join(self.tmp, name + ".db"), free_port(), upstream_url, cert)
            self.add_worker(name, env, users, worker)
        if args.redis:
            self.add_redis_workers(upstream_url, cert)

    def add_worker(self, name: str, env: Dict[str, str], users: Dict[str, Any],
                   worker: str = "") -> None:
        """A worker.py target (this checkout's, or ``worker``): its users imported
        now, started (and restarted) by start_all."""
        worker = worker or self.worker
        took = import_users(worker, env, users, self.tmp, name)
        log(f"bench: imported {len(users):,} users for {name} in {took:.2f} s")
        target = Target(name, int(env["PORT"]))
        target.start_fn = lambda: Proc(name, [sys.executable, worker], env=env,
                                       cwd=os.path.dirname(worker),
                                       log_path=os.path.join(self.tmp, name + ".log"))
        self.targets.append(target)

    def add_redis_workers(self, upstream_url: str, cert: str) -> None:
        """worker.py with KV_URL (one process, then WORKERS=2) on a redis-server of its own."""
        try:
            import redis  # noqa: F401  (worker.py needs it for KV_URL)
        except ImportError:
            redis = None
        if not shutil.which("redis-server") or redis is None:
            self.notes.append("redis-server or redis-py is missing: no KV_URL columns "
                              "(apt install redis-server; pip install redis).")
            log("bench: " + self.notes[-1])
            return
        port = free_port()
        Proc("redis", ["redis-server", "--port", str(port), "--bind", HOST, "--save", "",
                       "--appendonly", "yes", "--appendfsync", "everysec", "--dir", self.tmp],
             log_path=os.path.join(self.tmp, "redis.log")).start()
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((HOST, port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("redis-server did not start") from None
                time.sleep(0.05)
        for db, (name, processes) in enumerate((("worker-redis", 1), ("worker-redis-2p", 2)), 1):
            env = worker_env(os.path.join(self.tmp, name + ".db"), free_port(), upstream_url, cert)
            env.update({"KV_URL": f"redis://{HOST}:{port}/{db}", "WORKERS": str(processes)})
            self.add_worker(name, env, {"bench": {"key": CLIENT_KEY}})

    async def start_all(self) -> None:
        """(d): start-up time and idle RSS, each rep on a fresh process; the last one stays."""
        for rep in range(self.args.start_reps):
            for target in self.order(rep):
                if target.start_fn is None:
                    continue
                if target.proc is not None:
                    target.proc.stop()
                proc = target.start_fn().start()
                target.proc = proc
                try:
                    took = await first_200(target, proc, 20)
                except RuntimeError as e:
                    if target.name == "nginx":
                        self.notes.append(f"nginx did not start ({e}); skipped.")
                        log("bench: " + self.notes[-1])
                        proc.stop()
                        self.targets.remove(target)
                        continue
                    raise
                await asyncio.sleep(1.0)
                self.put(target.name, "start", took)
                self.put(target.name, "idle_rss", proc.rss_mb())
        for target in self.targets:
            if target.start_fn is not None:
                log(f"  {target.name}: start {fmt(med(self.get(target.name, 'start')))} s, "
                    f"idle RSS {fmt(med(self.get(target.name, 'idle_rss')))} MB")

    async def checks(self) -> None:
        for target in self.targets:
            status, _ = await one_request(target, target.request(
                "POST", "/v1/chat/completions", CHAT_REQUEST, key="sk-cfw" + "Wrong" * 9))
            self.put(target.name, "wrong_key", status)
            status, body = await one_request(target, target.request("POST", "/v1/chat/completions", CHAT_REQUEST))
            if status != 200 or b'"usage"' not in body:
                raise SystemExit(f"{target.name}: a chat completion answered {status}: {body[:200]!r}")
            ok, worst = await unbuffered_check(target, gap_ms=self.args.gap_ms)
            self.put(target.name, "unbuffered", (ok, worst))

    # -- the phases ---------------------------------------------------------

    async def nonstream(self) -> None:
        args = self.args
        use_wrk = args.load == "wrk" or (args.load == "auto" and shutil.which("wrk"))
        self.load_tool = "wrk -t1 (Lua POST script)" if use_wrk else "asyncio keep-alive client"
        scripts = {t.name: wrk_script(self.tmp, t, args.max_requests) for t in self.targets} if use_wrk else {}

        async def load(target: Target, c: int, duration: float) -> Dict[str, Any]:
            if use_wrk:
                return await wrk_load(target, c, duration, args.max_requests, scripts[target.name])
            return await python_load(target, c, duration, args.max_requests)

        for target in self.targets:  # warm-up: connections, pools, caches
            await load(target, 16, args.warmup)
        for rep in range(args.reps):
            for c in args.levels:
                for target in self.order(rep):
                    cpu0, up0 = self._cpu(target), self.upstream.cpu_seconds()
                    wall0 = time.monotonic()
                    r = await load(target, c, args.duration)
                    wall = time.monotonic() - wall0
                    cpu, up = self._cpu(target) - cpu0, self.upstream.cpu_seconds() - up0
                    self.put(target.name, f"rps{c}", r["rps"])
                    self.put(target.name, f"p50_{c}", r["p50"])
                    self.put(target.name, f"p99_{c}", r["p99"])
                    self.put(target.name, "errors", r["errors"])
                    if r["requests"]:
                        self.put(target.name, f"cpu_us{c}", cpu / r["requests"] * 1e6)
                        self.put(target.name, f"upbusy{c}", up / wall)
                    log(f"  rep {rep + 1} c={c:<3} {target.name:<18} {r['rps']:>9,.0f} req/s  "
                        f"p50 {fmt_ms(r['p50'])} ms  p99 {fmt_ms(r['p99'])} ms  errors {r['errors']}")

    def rss_mark(self, metric: str) -> None:
        for target in self.targets:
            if target.name != "direct" and target.proc is not None:
                self.put(target.name, metric, target.proc.rss_mb())

    def read_logs(self) -> None:
        """Warnings and errors the proxies logged, by message (timestamps and timings cut)."""
        for target in self.targets:
            if target.proc is None or target.name == "direct":
                continue
            paths = [target.proc.log_path or ""]
            if target.name == "nginx":
                paths.append(os.path.join(self.tmp, "nginx", "nginx-error.log"))
            counts: Dict[str, int] = {}
            for path in paths:
                try:
                    with open(path, errors="replace") as f:
                        lines = f.read().splitlines()
                except OSError:
                    continue
                for line in lines:
                    if not re.search(r"WARNING|ERROR|\[(warn|error|crit|alert|emerg)\]", line):
                        continue
                    msg = re.sub(r"^[\d/: ,.-]+", "", line)
                    msg = re.sub(r"\d+(\.\d+)?ms\b|#\d+|\*\d+|client: [^,]+|\d+\.\d+\.\d+\.\d+:\d+", "…", msg)
                    counts[msg[:90]] = counts.get(msg[:90], 0) + 1
            self.put(target.name, "log", counts)

    def _cpu(self, target: Target) -> float:
        return target.proc.cpu_seconds() if target.proc is not None and target.name != "direct" else 0.0

    async def streams(self) -> None:
        args = self.args
        limit = args.per_client * (args.chunks * args.gap_ms / 1000 + 10) + 20
        for rep in range(args.stream_reps):
            for target in self.order(rep):
                cpu0, wall0 = self._cpu(target), time.monotonic()
                r = await stream_phase(target, args.streams, args.per_client, args.chunks, args.gap_ms, limit)
                if target.name != "direct":
                    used = self._cpu(target) - cpu0
                    r["cpu"] = used / (time.monotonic() - wall0)
                    r["cpu_chunk"] = used / max(1, r["complete"] * (args.chunks + 3)) * 1e6
                for k, v in r.items():
                    self.put(target.name, "s_" + k, v)
                log(f"  rep {rep + 1} {args.streams} streams {target.name:<18} TTFB p50 {fmt_ms(r['ttfb50'])} "
                    f"ms, chunk delay p50 {fmt_ms(r['delay50'])} / p99 {fmt_ms(r['delay99'])} ms, "
                    f"bunched {r['bunched'] * 100:.1f}%, {r['complete']}/{r['total']} ok, "
                    f"listen overflows {r['overflows']}" + (f", failures: {r['reasons']}" if r["reasons"] else ""))
                await asyncio.sleep(0.3)

    async def bodies(self) -> None:
        args = self.args
        body, content_type = multipart_body(args.upload_mb * MIB)
        for rep in range(args.body_reps):
            for target in self.order(rep):
                proc = target.proc if target.name != "direct" else None
                for kind in ("up", "down"):
                    if proc is not None:
                        await asyncio.sleep(0.2)
                        before = proc.rss_mb()
                        proc.reset_peak()
                    if kind == "up":
                        took, ok = await upload(target, body, content_type, 120)
                    else:
                        took, ok = await download(target, args.download_mb, 120)
                    self.put(target.name, kind + "_time", took)
                    self.put(target.name, kind + "_ok", ok)
                    if proc is not None:
                        self.put(target.name, kind + "_rss", proc.rss_mb("VmHWM") - before)
                log(f"  rep {rep + 1} bodies {target.name:<18} up {self.get(target.name, 'up_time')[-1]:.3f} s, "
                    f"down {self.get(target.name, 'down_time')[-1]:.3f} s, intact "
                    f"{self.get(target.name, 'up_ok')[-1] and self.get(target.name, 'down_ok')[-1]}")

    async def run(self) -> str:
        args = self.args
        t0 = time.monotonic()
        await self.setup()
        log("bench: (d) start-up and idle RSS")
        await self.start_all()
        await self.checks()
        log(f"bench: (a) non-streaming chat completions, c={','.join(map(str, args.levels))}")
        await self.nonstream()
        self.rss_mark("rss_nonstream")
        log(f"bench: (b) {args.streams} concurrent streams x {args.per_client}, "
            f"{args.chunks} chunks {args.gap_ms:g} ms apart")
        await self.streams()
        self.rss_mark("rss_streams")
        log(f"bench: (c) {args.upload_mb} MiB upload, {args.download_mb} MiB download")
        await self.bodies()
        await asyncio.sleep(0.5)
        self.rss_mark("rss_after")
        for target in self.targets:
            if target.name != "direct" and target.proc is not None and not target.proc.alive():
                self.notes.append(f"{target.name} exited during the run.")
        self.read_logs()
        self.elapsed = time.monotonic() - t0
        return self.table()

    # -- the table ----------------------------------------------------------

    def ratio(self, name: str, metric: str, base: str) -> float:
        """The median over reps of name ÷ base within the same rep."""
        pairs = [a / b for a, b in zip(self.get(name, metric), self.get(base, metric))
                 if a == a and b == b and b]
        return med(pairs)

    def added(self, name: str, metric: str, base: str) -> float:
        return med([a - b for a, b in zip(self.get(name, metric), self.get(base, metric))])

    def table(self) -> str:
        args = self.args
        names = [t.name for t in self.targets]
        has_nginx = "nginx" in names
        rows: List[Tuple[str, List[str]]] = []

        def vs(name: str, metric: str, digits: int = 2) -> str:
            if name == "direct":
                return ""
            parts = [f"×{fmt(self.ratio(name, metric, 'direct'), digits)}"]
            if has_nginx and name != "nginx":
                parts.append(f"×{fmt(self.ratio(name, metric, 'nginx'), digits)} nginx")
            return " (" + ", ".join(parts) + ")"

        def row(label: str, cell: Any) -> None:
            rows.append((label, [cell(n) for n in names]))

        def value(metric: str, f: Any = fmt, proxies_only: bool = False) -> Any:
            return lambda n: "–" if (proxies_only and n == "direct") or not self.get(n, metric) \
                else f(med(self.get(n, metric)))

        row("start → first 200 (s)", value("start", proxies_only=True))
        row("idle RSS (MB)", value("idle_rss", lambda v: f"{v:.1f}", True))
        for c in args.levels:
            row(f"**req/s c={c}** (non-stream)",
                lambda n, c=c: fmt(med(self.get(n, f"rps{c}"))) + vs(n, f"rps{c}"))
        for c in args.levels:
            row(f"latency p50 / p99 c={c} (ms)",
                lambda n, c=c: f"{fmt_ms(med(self.get(n, f'p50_{c}')))} / {fmt_ms(med(self.get(n, f'p99_{c}')))}")
        c1 = args.levels[0]
        row(f"added latency p50 c={c1} (ms vs direct)",
            lambda n: "–" if n == "direct" else signed(self.added(n, f"p50_{c1}", "direct")))
        cmax = args.levels[-1]
        row(f"proxy CPU per request c={cmax} (µs)", value(f"cpu_us{cmax}", lambda v: f"{v:,.0f}", True))
        row(f"fake upstream CPU busy c={cmax}", value(f"upbusy{cmax}", lambda v: f"{v * 100:.0f}%"))
        row("non-stream errors (all reps)", lambda n: str(sum(self.get(n, "errors"))))
        s = args.streams
        row(f"**stream TTFB p50 / p99 @{s}** (ms)",
            lambda n: f"{fmt_ms(med(self.get(n, 's_ttfb50')))} / {fmt_ms(med(self.get(n, 's_ttfb99')))}"
            + ("" if n == "direct" else f" (×{fmt(self.ratio(n, 's_ttfb50', 'direct'), 2)})"))
        for p in ("50", "99"):
            row(f"chunk delay p{p} @{s} (ms, added vs direct)",
                lambda n, p=p: fmt_ms(med(self.get(n, f"s_delay{p}"))) + (
                    "" if n == "direct" else f" ({signed(self.added(n, f's_delay{p}', 'direct'))})"))
        row(f"inter-chunk gap p50 @{s} (ms; sent every {args.gap_ms:g})", value("s_gap50", fmt_ms))
        row(f"bunched chunks @{s} (gap < {args.gap_ms / 4:g} ms)",
            value("s_bunched", lambda v: f"{v * 100:.1f}%"))
        def complete(n: str) -> str:
            reasons: Dict[str, int] = {}
            for r in self.get(n, "s_reasons"):
                for k, v in r.items():
                    reasons[k] = reasons.get(k, 0) + v
            text = f"{sum(self.get(n, 's_complete'))}/{sum(self.get(n, 's_total'))}"
            return text + (" (" + "; ".join(f"{v}× {k}" for k, v in reasons.items()) + ")" if reasons else "")

        row(f"streams complete @{s} (all reps)", complete)
        row(f"proxy CPU during {s} streams: % of one core, µs per SSE event",
            lambda n: "–" if n == "direct" or not self.get(n, "s_cpu") else
            f"{med(self.get(n, 's_cpu')) * 100:.0f}%, {med(self.get(n, 's_cpu_chunk')):.0f} µs")
        row(f"listen-queue overflows @{s} (all reps)", lambda n: str(sum(self.get(n, "s_overflows"))))
        row("single stream unbuffered (3 in a row, one connection)",
            lambda n: "–" if not self.get(n, "unbuffered") else
            ("yes" if self.get(n, "unbuffered")[0][0] else "NO: held")
            + f" (max chunk delay {fmt_ms(self.get(n, 'unbuffered')[0][1])} ms)")
        row(f"**upload {args.upload_mb} MiB multipart (s)**",
            lambda n: fmt_s(med(self.get(n, "up_time"))) + vs(n, "up_time"))
        row("peak RSS growth during upload (MB)", value("up_rss", lambda v: f"+{v:.1f}", True))
        row(f"**download {args.download_mb} MiB (s)**",
            lambda n: fmt_s(med(self.get(n, "down_time"))) + vs(n, "down_time"))
        row("peak RSS growth during download (MB)", value("down_rss", lambda v: f"+{v:.1f}", True))
        row("bodies intact (sha256, all reps)",
            lambda n: f"{sum(self.get(n, 'up_ok')) + sum(self.get(n, 'down_ok'))}/"
                      f"{len(self.get(n, 'up_ok')) + len(self.get(n, 'down_ok'))}")
        row("RSS after non-stream / streams / bodies (MB)",
            lambda n: "–" if n == "direct" or not self.get(n, "rss_after") else " / ".join(
                f"{med(self.get(n, m)):.1f}" for m in ("rss_nonstream", "rss_streams", "rss_after")))

        def logged(n: str) -> str:
            if n == "direct" or not self.get(n, "log"):
                return "–"
            counts = self.get(n, "log")[0]
            if not counts:
                return "none"
            top = sorted(counts.items(), key=lambda kv: -kv[1])[:2]
            return f"{sum(counts.values())}: " + "; ".join(f"{v}× `{k}`" for k, v in top)

        row("warnings/errors in the proxy's log", logged)
        row("wrong client key → status",
            lambda n: str(self.get(n, "wrong_key")[0]) + (" (passed on)" if n == "nginx" else ""))

        out = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        out += ["| " + label + " | " + " | ".join(cells) + " |" for label, cells in rows]
        return "\n".join(out)

    def header(self) -> str:
        args = self.args
        try:
            import tornado
            tornado_version = tornado.version
        except ImportError:
            tornado_version = "?"
        nginx_version = ""
        if any(t.name == "nginx" for t in self.targets):
            done = subprocess.run(["nginx", "-v"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=10)
            nginx_version = ", " + done.stdout.decode().strip().replace("nginx version: ", "")
        lines = [
            f"`python bench/bench.py {' '.join(sys.argv[1:])}`".replace("  ", " "),
            "",
            f"- {time.strftime('%Y-%m-%d %H:%M')}, {platform.platform()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}, tornado {tornado_version}{nginx_version}; "
            f"upstream over {'HTTPS (self-signed, RSA 2048)' if args.https else 'plain HTTP'}; "
            f"run took {self.elapsed:.0f} s.",
            f"- Non-stream load: {self.load_tool}, {args.duration:g} s per level (≤ {args.max_requests:,} "
            f"requests), {args.reps} reps interleaved; each cell is the median over reps, each ratio the "
            f"median of per-rep ratios (×r vs the fake upstream called directly; ×n vs nginx).",
            f"- Streams: {args.streams} clients at once × {args.per_client} streams each on one keep-alive "
            f"connection, {args.chunks} chunks {args.gap_ms:g} ms apart with include_usage, "
            f"{args.stream_reps} reps. Chunk delay = client read time − the upstream's write time "
            f"(CLOCK_MONOTONIC); TTFB of a client's first stream includes its connect.",
            f"- Bodies: {args.body_reps} reps; RSS growth = VmHWM (reset with clear_refs) − VmRSS before.",
        ]
        if args.https:
            lines.append("- With --https only the upstream leg is TLS (worker.py and nginx listen on plain HTTP), "
                         "but \"direct\" is the bench client talking TLS to the upstream itself: its TTFB "
                         "includes a client handshake per connection. Compare the proxies with nginx there.")
        if args.many_users:
            lines.append(f"- worker-{args.many_users // 1000}k-users: the same worker.py with "
                         f"{args.many_users:,} imported users; the client's key is one of them.")
        if any(t.name.startswith("worker-redis") for t in self.targets):
            lines.append("- worker-redis: worker.py with KV_URL on a local redis-server (appendonly, "
                         "fsync every second); worker-redis-2p: the same with WORKERS=2. Redis's own "
                         "CPU is not in their CPU per request.")
        lines += [f"- Note: {n}" for n in self.notes]
        return "\n".join(lines)


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark worker.py against a fake OpenAI upstream, "
                                            "the upstream called directly, and nginx.")
    p.add_argument("--quick", action="store_true", help="a short smoke run (1 rep, short levels, 100 streams)")
    p.add_argument("--https", action="store_true", help="the fake upstream serves TLS (self-signed, made now)")
    p.add_argument("--out", help="also write the table (markdown) to this file")
    p.add_argument("--worker", default=os.path.join(ROOT, "worker.py"), help="the worker.py to run")
    p.add_argument("--load", choices=("auto", "wrk", "python"), default="auto",
                   help="non-stream load generator: wrk when installed (auto), or the built-in asyncio one")
    p.add_argument("--no-nginx", dest="nginx", action="store_false", help="leave nginx out")
    p.add_argument("--no-redis", dest="redis", action="store_false",
                   help="leave out worker.py with KV_URL (on when redis-server and redis-py are there)")
    p.add_argument("--many-users", type=int, default=10000, help="users of the second worker (0: none)")
    p.add_argument("--baseline", help="another worker.py (say, an earlier checkout's) measured "
                                      "beside this one, as the target 'baseline'")
    p.add_argument("--budget", action="store_true",
                   help="also a worker whose user has a monthly budget (target 'worker-budget')")
    p.add_argument("--reps", type=int, help="non-stream reps (default 3; quick 1)")
    p.add_argument("--levels", default="1,16,64", help="non-stream concurrency levels")
    p.add_argument("--duration", type=float, help="seconds per level (default 2; quick 0.5)")
    p.add_argument("--warmup", type=float, help="warm-up seconds per target at c=16 (default 1; quick 0.3)")
    p.add_argument("--max-requests", type=int, default=300000, help="request cap per level")
    p.add_argument("--streams", type=int, help="concurrent streaming clients (default 200; quick 100)")
    p.add_argument("--per-client", type=int, help="streams per client, one after another (default 2; quick 1)")
    p.add_argument("--chunks", type=int, default=20, help="chunks per stream")
    p.add_argument("--gap-ms", type=float, default=20.0, help="ms between chunks")
    p.add_argument("--stream-reps", type=int, help="stream reps (default 3; quick 1)")
    p.add_argument("--upload-mb", type=int, default=25)
    p.add_argument("--download-mb", type=int, default=20)
    p.add_argument("--body-reps", type=int, help="upload/download reps (default 3; quick 1)")
    p.add_argument("--start-reps", type=int, help="fresh starts for start-up time (default 3; quick 1)")
    p.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--auth", default=UPSTREAM_KEY, help=argparse.SUPPRESS)
    p.add_argument("--cert", default="", help=argparse.SUPPRESS)
    p.add_argument("--key", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"reps": (3, 1), "duration": (2.0, 0.5), "warmup": (1.0, 0.3), "streams": (200, 100),
                "per_client": (2, 1), "stream_reps": (3, 1), "body_reps": (3, 1), "start_reps": (3, 1)}
    for name, (full, short) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, short if quick else full)
    args.levels = [int(x) for x in args.levels.split(",")]
    return args


def main(argv: List[str]) -> int:
    args = parse_args(argv)
    if args.serve_upstream:
        return upstream_main(args)
    if not os.path.exists(args.worker):
        print(f"bench.py: no worker.py at {args.worker}", file=sys.stderr)
        return 2
    def on_sigterm(*_: Any) -> None:
        raise KeyboardInterrupt()

    signal.signal(signal.SIGTERM, on_sigterm)
    bench = Bench(args)
    try:
        table = asyncio.run(bench.run())
    except KeyboardInterrupt:
        log("bench: interrupted")
        return 130
    finally:
        Proc.stop_all()
        if not os.environ.get("BENCH_KEEP_TMP"):
            shutil.rmtree(bench.tmp, ignore_errors=True)
    text = bench.header() + "\n\n" + table + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        log(f"bench: table written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
