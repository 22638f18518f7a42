#!/usr/bin/env python3
"""worker.py: share one OpenAI API key with friends, family or a small team.

Each user gets a key of their own (``sk-cfw…``); the owner hands them out with
curl; every OpenAI API passes through unchanged. The Python port of
janlay/openai-cloudflare, in one file, with Tornado as its only dependency.

Run it (in a venv, as Debian and Raspberry Pi OS ask; or with
``sudo apt install python3-tornado`` and ``python3 worker.py``)::

    python3 -m venv .venv && .venv/bin/pip install -r requirements.txt
    OPENAPI_API_KEY=sk-... ACCESS_TOKEN=Une9f2ijwe .venv/bin/python worker.py

Give a friend a key, then let them use it from any OpenAI SDK::

    curl http://localhost:8787/Une9f2ijwe/register/janlay      # prints sk-cfw…

    from openai import OpenAI
    client = OpenAI(base_url="http://localhost:8787/v1", api_key="sk-cfw…")
    client.chat.completions.create(model="gpt-4o-mini", messages=[...])

Past one core, or on several hosts: keep the store in Redis (``pip install redis``)::

    KV_URL=redis://127.0.0.1:6379/0 WORKERS=4 ... python worker.py

Other commands::

    python worker.py --help          # every setting
    python worker.py import FILE     # users exported from the Cloudflare version (or from export)
    python worker.py export          # every user as JSON (key hashes, never keys)
    python worker.py prices          # the price of each model, built in or from PRICES_FILE

Reading this file: its sections follow a request. A proxied request's plan
is made once, by ``plan_request`` (a ``RequestPlan``: what to read, inspect,
claim, strip and count), and ``ProxyHandler`` follows it; its answer is read
by ``UpstreamConnection`` and handed to the handler through one interface,
``UpstreamReceiver`` (``on_upstream_headers``, ``on_upstream_chunk``); it is
counted in one place, ``ProxyHandler.account`` (a WebSocket's responses in
``RealtimeHandler.account``), and the access log line only reports that.
"""

import asyncio
import base64
import binascii
import collections
import concurrent.futures
import dataclasses
import datetime
import dbm
import decimal
import errno
import functools
import gc
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import math
import operator
import os
import posixpath
import re
import secrets
import select
import signal
import socket
import ssl
import sys
import time
import urllib.parse
import zlib
from typing import (Any, Awaitable, Callable, Dict, Iterable, List, NamedTuple, Optional, Protocol, Tuple,
                    Union, cast)

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows
    fcntl = None  # type: ignore[assignment]  # (typeshed's fcntl is a module, never None)

import tornado.escape
import tornado.gen
import tornado.http1connection
import tornado.httpclient
import tornado.httpserver
import tornado.httputil
import tornado.ioloop
import tornado.iostream
import tornado.netutil
import tornado.routing
import tornado.simple_httpclient
import tornado.util
import tornado.web
import tornado.websocket

log = logging.getLogger("worker")

# Tornado's private names this file uses: only where Tornado has no public way.
# Each checked on Tornado 6.2, 6.3.3, 6.4.2, 6.5.2 and 6.6.1;
# test_worker.py's TestTornadoPrivateNames fails loudly if one disappears.
#   RequestHandler._finished          read: whether the answer has finished (no
#                                     public getter); ProxyHandler's body and finish.
#   RequestHandler._headers_written   read: whether the answer's head has gone out
#                                     (no public getter): a failure before it is a 502.
#   RequestHandler._request_summary   overridden: Tornado's own error logs print
#                                     it, with the full URI (the admin token).
#   HTTPServer.conn_params.header_timeout
#                                     set to None: no timer per request (the
#                                     public idle_connection_timeout arms one);
#                                     App.watch_clients times connections out.
# Public but undocumented attributes, checked the same way: HTTP1Connection.stream
# (a request's connection, as http1() types it) and IOStream.socket.
TORNADO_PRIVATE_NAMES = {
    "RequestHandler": ("_finished", "_headers_written", "_request_summary"),
    "HTTPServer": ("conn_params",),
    "HTTP1ConnectionParameters": ("header_timeout",),
    "HTTP1Connection": ("stream",),
    "IOStream": ("socket",),
}


# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

KEY_PREFIX = "sk-cfw"
KEY_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
KEY_LENGTH = 45  # characters after the prefix, as in the seed

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}\Z")
# Words that are routes, so never a user name nor the admin token.
ROUTE_WORDS = frozenset(
    "register reset set users stats objects admin me healthz dashboard v1".split()
)

# RFC 9110 §7.6.1 connection-specific headers, plus those that must not cross
# the proxy: the client's own credentials, and headers that would pick another
# upstream account or host.
HOP_BY_HOP = frozenset(
    "connection keep-alive proxy-authenticate proxy-authorization proxy-connection "
    "te trailer trailers transfer-encoding upgrade".split()
)
NOT_FORWARDED_UP = HOP_BY_HOP | {
    "host", "authorization", "api-key", "openai-organization", "openai-project",
    "expect", "cookie",
}
NOT_FORWARDED_DOWN = HOP_BY_HOP | {
    "access-control-allow-origin", "access-control-allow-credentials",
    "access-control-allow-methods", "access-control-allow-headers",
    "access-control-expose-headers", "access-control-max-age", "set-cookie",
}

# Paths OpenAI serves below /v1; asked for without the version, they get a
# hint to fix the base URL instead of a bare 403.
OPENAI_ROOTS = frozenset(
    "chat completions embeddings models responses files uploads images audio "
    "batches fine_tuning fine-tunes assistants threads vector_stores moderations "
    "realtime conversations containers evals videos organization engines edits "
    "chatkit".split()
)

CORS_ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
# What the OpenAI SDKs send from a browser; a preflight that names others gets
# them echoed back.
CORS_DEFAULT_HEADERS = (
    "authorization, api-key, content-type, openai-beta, openai-organization, "
    "openai-project, x-stainless-arch, x-stainless-lang, x-stainless-os, "
    "x-stainless-package-version, x-stainless-retry-count, x-stainless-runtime, "
    "x-stainless-runtime-version, x-stainless-timeout, x-stainless-helper-method"
)

ADMIN_FAILURES_ALLOWED = 10  # wrong admin tokens per client per window ...
ADMIN_LOCKOUT_SECONDS = 60  # ... before it gets 429 for this long
SHUTDOWN_GRACE_SECONDS = 25  # in-flight requests get this long after SIGTERM
CLIENT_IDLE_SECONDS = 120.0  # a client connection idle between requests, or sending its headers
CLIENT_BODY_SECONDS = 60.0  # a small body read whole; a proxied upload that sends nothing this long
UPSTREAM_CONNECT_TIMEOUT = 30.0
JOURNAL_CHECKPOINT_BYTES = 4 << 20
SNAPSHOT_CACHE_ENTRIES = 20000  # reads of the immutable dbm snapshot kept in memory
WS_MAX_MESSAGE_BYTES = 64 << 20  # a realtime message with a long audio chunk
STREAMED_BODY_METHODS = ("POST", "PUT", "PATCH")
IDEMPOTENT_METHODS = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE")  # safe to send twice (RFC 9110 §9.2.2)
SMALL_BODY_BYTES = 256 << 10  # request bodies up to this are read whole, then sent
FORM_FIELDS_MAX_BYTES = 1 << 20  # a large form's fields before its file, held to read its model
REQUEST_MEMBERS_MAX = 1000  # gzip members in a compressed request body this proxy reads
IO_CHUNK_BYTES = 256 << 10  # bodies move in pieces of up to this (Tornado's default: 64 KB)
USAGE_FLUSH_SECONDS = 5.0  # usage counted in memory reaches the disk this often
SHARED_FLUSH_SECONDS = 1.0  # ... and a shared store (Redis), so instances agree soon
SHARED_CACHE_SECONDS = 1.0  # the longest a key read from Redis is trusted unasked
REDIS_CONNECTIONS = 64  # per process
REDIS_BATCH = 500  # counters read by one script (its reply is parsed without a pause)
EXIT_FLUSH_SECONDS = 5.0  # at exit, how long to keep trying to write the last usage
RATE_WINDOW_SECONDS = 60.0
ACCEPT_BACKOFF_SECONDS = 0.5  # out of file descriptors: how long to stop accepting
LINGER_SECONDS = 30.0  # a client refused mid-upload: how long its body is read and dropped …
LINGER_IDLE_SECONDS = 5.0  # … and how long without a byte of it (as nginx's lingering_*)


# ---------------------------------------------------------------------------
# Settings: read once from the environment
# ---------------------------------------------------------------------------

class ConfigError(Exception):
    """A bad setting: main() prints it as one line and exits 2."""


def _required(value: str, name: str) -> str:
    if not value:
        raise ConfigError(f"{name} is required")
    return value


def _secret(value: str, name: str) -> str:
    """A required secret, and not deploy/worker.env.example's placeholder: an
    owner who edits only the key must not serve a token everyone can read."""
    _required(value, name)
    if "replace-me" in value:
        raise ConfigError(f"{name} is still the placeholder of worker.env.example; "
                          f"set your own")
    return value


def _access_token(value: str, name: str) -> str:
    _secret(value, name)
    if len(value) < 8:
        raise ConfigError(f"{name} must be at least 8 characters")
    if value in ROUTE_WORDS or value in OPENAI_ROOTS or "/" in value:
        raise ConfigError(f"{name} must not be a route word or an OpenAI path, nor contain '/'")
    return value


def _upstream_url(value: str, name: str) -> str:
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name} must be an http:// or https:// URL, got {value!r}")
    if parts.query or parts.fragment:
        raise ConfigError(f"{name} must not have a query or fragment")
    # Every request's own path starts with /v1: a base written as LiteLLM, vLLM
    # or Ollama document theirs (…/v1) would make it /v1/v1/… (see main).
    path = re.sub(r"/v1\Z", "", parts.path.rstrip("/"))
    return f"{parts.scheme}://{parts.netloc}{path}"


def upstream_url_notes(environ: Dict[str, str]) -> List[str]:
    """What the log should say about how UPSTREAM_URL was taken."""
    written = environ.get("UPSTREAM_URL", "").strip().rstrip("/")
    if re.search(r"/v1\Z", written):
        return [("UPSTREAM_URL ends in /v1, which every request's path brings: "
                 "taken as the base without it (/v1/chat/completions goes to …/v1/chat/"
                 "completions, not …/v1/v1/…)")]
    return []


def _port(value: str, name: str) -> int:
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise ConfigError(f"{name} must be a port number (1-65535), got {value!r}")
    return int(value)


def _positive_number(value: str, name: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number > 0 or number != number or number == float("inf"):
        raise ConfigError(f"{name} must be a positive number, got {value!r}")
    return number


def _positive_int(value: str, name: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{name} must be a whole number of at least 1, got {value!r}")
    return int(value)


def _log_level(value: str, name: str) -> str:
    if value.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"{name} must be debug, info, warning or error, got {value!r}")
    return value.lower()


def _origins(value: str, name: str) -> Tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/") for o in value.split(",") if o.strip())
    if not origins:
        raise ConfigError(f"{name} must list origins, or be *")
    for origin in origins:
        if origin != "*" and not re.match(r"https?://[^/\s]+\Z", origin):
            raise ConfigError(f"{name}: {origin!r} is not an origin like https://app.example")
    return origins


def _optional(value: str, name: str) -> str:
    return value


def _kv_url(value: str, name: str) -> str:
    try:
        scheme = urllib.parse.urlsplit(value).scheme
    except ValueError:  # an unclosed [IPv6 address
        scheme = None
    if value and scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"{name} must be a redis://, rediss:// or unix:// URL")
    return value


def _networks(value: str, name: str) -> Tuple[Any, ...]:
    """Comma-separated addresses or CIDRs (``10.0.0.0/8, ::1``)."""
    networks = []
    for item in (i.strip() for i in value.split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(f"{name}: {item!r} is not an address or CIDR like 10.0.0.0/8") from None
    return tuple(networks)


def url_passwords(url: str) -> Tuple[str, ...]:
    """The password in a URL, as written and as meant (percent-decoded)."""
    try:
        parts = urllib.parse.urlsplit(url)
        written = parts.password or ""
        query = urllib.parse.parse_qs(parts.query).get("password", [])
    except ValueError:
        return ()
    return tuple({written, urllib.parse.unquote(written), *query} - {""})


USAGE = "python worker.py [import FILE | export | prices [json] | --help]"

# (variable, default, parser, help): the one table behind Settings and --help.
SETTINGS_TABLE = (
    ("OPENAPI_API_KEY", "", _secret, "the owner's upstream key (alias: OPENAI_API_KEY); required"),
    ("ACCESS_TOKEN", "", _access_token, "the admin password, 8+ characters; required"),
    ("UPSTREAM_URL", "https://api.openai.com", _upstream_url, "any OpenAI-compatible base; a path prefix is kept, a final /v1 dropped"),
    ("HOST", "0.0.0.0", _optional, "address to listen on"),
    ("PORT", "8787", _port, "port to listen on"),
    ("DB_PATH", "worker.db", _required, "folder of the embedded store (stdlib dbm + journal)"),
    ("KV_URL", "", _kv_url, "redis://[:PASSWORD@]HOST[:PORT][/DB] (or rediss://): share the store"),
    ("WORKERS", "1", _positive_int, "processes sharing the port (needs KV_URL)"),
    ("TLS_CERT", "", _optional, "PEM certificate (chain) file: serve HTTPS directly"),
    ("TLS_KEY", "", _optional, "PEM private key file for TLS_CERT"),
    ("CORS_ORIGINS", "*", _origins, "comma-separated origins allowed from browsers"),
    ("MAX_BODY_MB", "512", _positive_number, "largest request body, in MB"),
    ("UPSTREAM_TIMEOUT", "600", _positive_number, "seconds for one upstream request"),
    ("LOG_LEVEL", "info", _log_level, "debug, info, warning or error"),
    ("PRICES_FILE", "", _optional, "JSON prices (LiteLLM's model_prices_and_context_window.json) "
                                   "over the built-in ones; see: python worker.py prices"),
    ("TRUSTED_PROXIES", "", _networks, "comma-separated addresses/CIDRs of reverse proxies in "
                                       "front: only from them is X-Forwarded-For believed"),
)


@dataclasses.dataclass(frozen=True)
class Settings:
    openapi_api_key: str
    access_token: str
    upstream_url: str
    host: str
    port: int
    db_path: str
    kv_url: str
    workers: int
    tls_cert: str
    tls_key: str
    cors_origins: Tuple[str, ...]
    max_body_mb: float
    upstream_timeout: float
    log_level: str
    prices_file: str
    prices: "PriceTable"  # the built-in prices, and PRICES_FILE's
    trusted_proxies: Tuple[Any, ...]  # ipaddress networks

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"

    @property
    def connect_timeout(self) -> float:
        """How long connecting upstream may take: UPSTREAM_CONNECT_TIMEOUT, at most UPSTREAM_TIMEOUT."""
        return min(UPSTREAM_CONNECT_TIMEOUT, self.upstream_timeout)


def load_settings(environ: Dict[str, str]) -> Settings:
    """Parse every setting from ``environ``; raise ConfigError naming the first bad one."""
    environ = dict(environ)
    if not environ.get("OPENAPI_API_KEY") and environ.get("OPENAI_API_KEY"):
        environ["OPENAPI_API_KEY"] = environ["OPENAI_API_KEY"]
    values: Dict[str, Any] = {}
    for name, default, parse, _ in SETTINGS_TABLE:
        raw = environ.get(name, "").strip() or default
        values[name.lower()] = parse(raw, name)
    values["prices"] = load_prices(values["prices_file"])
    settings = Settings(**values)
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise ConfigError("TLS_CERT and TLS_KEY must be set together")
    if settings.workers > 1 and not settings.kv_url:
        raise ConfigError("WORKERS above 1 needs KV_URL (the dbm store is single-process)")
    return settings


def settings_help() -> str:
    rows = [("variable", "default", "meaning")]
    rows += [(name, default or "-", text) for name, default, _, text in SETTINGS_TABLE]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = [f"  {a:<{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in rows]
    return (
        f"usage: {USAGE}\n\n"
        "Settings are read from the environment:\n" + "\n".join(lines) + "\n"
    )


# ---------------------------------------------------------------------------
# Errors: each knows its response
# ---------------------------------------------------------------------------

class ApiError(tornado.web.HTTPError):
    """An error on the API routes, rendered in OpenAI's shape so SDKs show it."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: Optional[str] = None, headers: Optional[Dict[str, str]] = None):
        super().__init__(status)
        self.message, self.type, self.code = message, type_, code
        self.param: Optional[str] = None
        self.headers = headers or {}

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


class AdminError(tornado.web.HTTPError):
    """An error on the admin routes: ``error: …`` for curl, or JSON."""

    def __init__(self, status: int, message: str, headers: Optional[Dict[str, str]] = None):
        super().__init__(status)
        self.message = message
        self.headers = headers or {}


KEY_IN_TEXT = re.compile(KEY_PREFIX + "[A-Za-z0-9]+")
# An API key of OpenAI's (sk-proj-…, sk-…) or of this proxy's, as a value would hold it.
LOOKS_LIKE_KEY = re.compile(r"sk-[A-Za-z0-9_-]{16,}")


class Redactor:
    """Takes ACCESS_TOKEN, the upstream key and user keys out of text: every log
    line (see RedactingFormatter) and every error message this proxy writes,
    wherever a path, a model name or a field value carried them."""

    def __init__(self, *secrets_: str):
        self.secrets = [s for s in secrets_ if s]

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return KEY_IN_TEXT.sub(KEY_PREFIX + "***", text)


class RedactingFormatter(logging.Formatter):
    """A log handler's formatter, with the secrets taken out of all it wrote:
    the message and its arguments, and a traceback's text (``exc_text``,
    ``stack_info``), where an exception may quote a key or the token."""

    def __init__(self, inner: Optional[logging.Formatter], redactor: Redactor):
        super().__init__()
        self.inner = inner or logging.Formatter()
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        return self.redactor.redact(self.inner.format(record))


def redact_logs(redactor: Redactor) -> None:
    """Every handler of the root logger writes through a RedactingFormatter."""
    for handler in logging.getLogger().handlers:
        inner = handler.formatter
        if isinstance(inner, RedactingFormatter):
            inner = inner.inner
        handler.setFormatter(RedactingFormatter(inner, redactor))


def invalid_api_key(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key")


def insufficient_quota(message: str) -> ApiError:
    """429 for a quota or budget used up: no retry can succeed before the period
    resets, so it says so (the OpenAI SDKs honour ``x-should-retry``)."""
    return ApiError(429, message, "insufficient_quota", "insufficient_quota",
                    headers={"x-should-retry": "false"})


class StoreError(Exception):
    """The store refused a write: a conflict or a missing user. Handlers let it
    rise: ``BaseHandler.api_error`` answers it with its status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


STORE_ERROR_CODES = {404: "not_found", 409: "conflict"}


class StoreUnavailable(ApiError):
    """The store cannot be used: the shared store (Redis) does not answer, or
    the embedded one cannot write (a full disk). 503 until it can again."""

    def __init__(self, message: str = "This proxy's store is unavailable for the moment; "
                                      "try again shortly.") -> None:
        super().__init__(503, message, "server_error", "store_unavailable",
                         headers={"Retry-After": "1"})


# ---------------------------------------------------------------------------
# The store: a key-value store over dbm, made crash-safe by a journal
# ---------------------------------------------------------------------------

class DbmKV:
    """Cloudflare-KV-like string store: get, put, delete, list by prefix.

    The standard library's dbm backends are not crash-safe (``dbm.dumb``
    rewrites its whole index in place on every delete; none of them fsyncs),
    so a dbm file is only ever written whole, as a snapshot, and never
    modified afterwards. Writes go to an append-only journal (fsync'd before
    they are acknowledged) and to an in-memory overlay that reads consult
    first. When the journal grows, a checkpoint writes snapshot + overlay to a
    new generation in a thread and switches to it by renaming one small file,
    ``CURRENT``. Recovery loads the current snapshot and replays the journals
    of its generation and later; a torn last journal line is ignored.

    Files in the folder: ``CURRENT``, ``snap-N*`` (dbm), ``wal-N`` (journal),
    ``LOCK`` (held while a process writes).

    The interface it shares with ``RedisKV``: ``get``, ``scan``
    (strings); ``keys``; ``counts``, ``scan_counts``, ``add`` (counters: lists of
    integers); ``write`` (puts, deletes and counters together, optionally only
    if some keys still hold what the caller read); ``follow`` (a key whose
    value names another); ``take_slot`` (a sliding-window rate limit);
    ``ping``; ``aclose``. One process owns a dbm store, so its rate windows
    live in memory and nothing read from it needs a cache.
    """

    flush_seconds = USAGE_FLUSH_SECONDS
    cache_seconds = 0.0

    def __init__(self, path: str, readonly: bool = False):
        self.path = path
        self.readonly = readonly
        self._gen = 0
        self._snapshot: Optional["dbm._Database"] = None  # the dbm of generation self._gen, read-only
        self._overlay: Dict[str, Optional[str]] = {}  # key -> value, None = deleted
        self._frozen: Dict[str, Optional[str]] = {}  # overlay being checkpointed
        self._snapshot_cache: Dict[str, Optional[str]] = {}  # reads of the snapshot
        self._journal: Optional[io.FileIO] = None  # None when read-only or closed
        self._journal_gen = 0
        self._lock_file: Optional[io.TextIOWrapper] = None
        self._checkpointing: Optional[asyncio.Future] = None
        self._windows: Dict[str, "collections.deque[float]"] = {}  # take_slot's
        # The journal's fsyncs, in order, off the event loop (see _synced);
        # its thread starts with the first.
        self._syncer = concurrent.futures.ThreadPoolExecutor(1, "store-fsync")
        self.failing: Optional[str] = None  # why writes fail (said once), or None

    # -- opening and recovery -------------------------------------------------

    def open(self) -> "DbmKV":
        """Open (creating the folder) and recover; ConfigError names DB_PATH if it cannot."""
        try:
            return self._open()
        except OSError as e:
            raise ConfigError(f"DB_PATH: cannot use {self.path} for the store: "
                              f"{e.strerror or e}") from None

    def _open(self) -> "DbmKV":
        if not self.readonly:
            os.makedirs(self.path, exist_ok=True)
            self._lock()
        elif not os.path.isdir(self.path):
            return self
        self._gen = self._read_current()
        if self._gen:
            self._snapshot = dbm.open(self._file(f"snap-{self._gen}"), "r")
        journals = sorted(g for g in self._generations("wal-") if g >= self._gen)
        for gen in journals:
            self._replay(gen)
        if not self.readonly:
            self._remove_stale_files()
            self._journal_gen = max(journals + [self._gen])
            self._journal = open(self._file(f"wal-{self._journal_gen}"), "ab", buffering=0)
            _fsync_dir(self.path)
        return self

    def _lock(self) -> None:
        if fcntl is None:
            return
        self._lock_file = open(self._file("LOCK"), "a")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigError(f"DB_PATH {self.path} is in use by another worker.py process") from None

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _read_current(self) -> int:
        try:
            with open(self._file("CURRENT")) as f:
                return int(f.read().strip() or 0)
        except FileNotFoundError:
            return 0

    def _generations(self, prefix: str) -> List[int]:
        found = set()
        for name in os.listdir(self.path):
            match = re.match(re.escape(prefix) + r"(\d+)", name)
            if match:
                found.add(int(match.group(1)))
        return sorted(found)

    def _replay(self, gen: int) -> None:
        """Apply every whole, checksummed journal line; cut a torn tail off."""
        name = self._file(f"wal-{gen}")
        good = 0
        with open(name, "rb") as f:
            for line in f:
                ops = _decode_journal_line(line)
                if ops is None:
                    break
                self._overlay.update(ops)
                good += len(line)
        if not self.readonly and good != os.path.getsize(name):
            log.warning("store: ignored a torn write at the end of %s", name)
            with open(name, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())

    def _remove_stale_files(self) -> None:
        for name in os.listdir(self.path):
            match = re.match(r"(snap|wal)-(\d+)", name)
            if match:
                kind, gen = match.group(1), int(match.group(2))
                if (kind == "snap" and gen != self._gen) or (kind == "wal" and gen < self._gen):
                    os.remove(self._file(name))
            elif name.endswith(".tmp"):
                os.remove(self._file(name))

    # -- reads ----------------------------------------------------------------

    def _get(self, key: str) -> Optional[str]:
        for layer in (self._overlay, self._frozen, self._snapshot_cache):
            if key in layer:
                return layer[key]
        if self._snapshot is None:
            return None
        value = self._snapshot.get(key.encode())
        if len(self._snapshot_cache) >= SNAPSHOT_CACHE_ENTRIES:
            self._snapshot_cache.clear()
        # A snapshot never changes, so what it said stays true until the next one.
        self._snapshot_cache[key] = text = None if value is None else value.decode()
        return text

    async def get(self, key: str) -> Optional[str]:
        return self._get(key)

    async def scan(self, prefix: str) -> Dict[str, str]:
        """Every key starting with ``prefix``, with its value, sorted by key."""
        return dict(sorted((await self._scan(prefix, None)).items()))

    async def keys(self, prefix: str) -> List[str]:
        """Every key starting with ``prefix`` (in no order), without reading a value."""
        found: Dict[str, Optional[str]] = dict.fromkeys(
            await self._from_snapshot(self._snapshot_keys, prefix, None), "")
        for layer in (self._frozen, self._overlay):
            found.update((k, v) for k, v in layer.items() if k.startswith(prefix))
        return [key for key, value in found.items() if value is not None]

    async def _scan(self, prefix: str, decode: Optional[Callable[[str], Any]],
                    keep: Optional[Callable[[str], bool]] = None) -> Dict[str, Any]:
        """``scan``, each value through ``decode`` if given, only the keys that
        ``keep`` keeps (if given: decided before their values are read), in no order."""
        found: Dict[str, Any] = await self._from_snapshot(self._read_snapshot, prefix, decode, keep)
        for layer in (self._frozen, self._overlay):
            found.update((k, v if v is None or decode is None else decode(v))
                         for k, v in layer.items()
                         if k.startswith(prefix) and (keep is None or keep(k)))
        return {key: value for key, value in found.items() if value is not None}

    async def _from_snapshot(self, read: Callable[..., Any], *args: Any) -> Any:
        """``read(snapshot, *args)`` in a thread (empty without a snapshot): the
        snapshot never changes, and a scan of every user's usage reads a hundred
        thousand keys (dbm.dumb opens its file once per key), which on the event
        loop would hold up every request for seconds."""
        if self._snapshot is None:
            return {}
        snapshot: Any = self._snapshot
        try:
            found = await asyncio.get_running_loop().run_in_executor(None, read, snapshot, *args)
        except Exception:  # a checkpoint closed that snapshot meanwhile
            snapshot = None
        if snapshot is not self._snapshot:  # read the one now current, here
            found = read(self._snapshot, *args)
        return found

    @staticmethod
    def _snapshot_keys(snapshot: Any, prefix: str,
                       keep: Optional[Callable[[str], bool]]) -> List[str]:
        raw = prefix.encode()
        keys = [key.decode() for key in snapshot.keys() if key.startswith(raw)]
        return keys if keep is None else [key for key in keys if keep(key)]

    @classmethod
    def _read_snapshot(cls, snapshot: Any, prefix: str, decode: Optional[Callable[[str], Any]],
                       keep: Optional[Callable[[str], bool]]) -> Dict[str, Any]:
        values = {key: snapshot[key.encode()].decode()
                  for key in cls._snapshot_keys(snapshot, prefix, keep)}
        return values if decode is None else {key: decode(value) for key, value in values.items()}

    async def follow(self, key: str, prefix: str) -> Tuple[Optional[str], Optional[str]]:
        """The value of ``key``, and the value of ``prefix`` + that value."""
        value = self._get(key)
        return value, None if value is None else self._get(prefix + value)

    async def counts(self, keys: Iterable[str]) -> List[Optional[List[int]]]:
        return [None if value is None else json.loads(value)
                for value in (self._get(key) for key in keys)]

    async def scan_counts(self, prefix: str, keep: Optional[Callable[[str], bool]] = None
                          ) -> Dict[str, List[int]]:
        """The counters whose keys start with ``prefix`` (and that ``keep`` keeps)."""
        return await self._scan(prefix, json.loads, keep)

    async def ping(self) -> bool:
        return True

    async def check(self) -> None:
        """At start: nothing to say (opening checked it all)."""

    # -- writes ---------------------------------------------------------------

    async def add(self, counts: Dict[str, List[int]], batch_id: str) -> None:
        """Add to counters, all in one durable write (one process: no one else adds)."""
        ops: Dict[str, Any] = {}
        for key, values in counts.items():
            stored = json.loads(self._get(key) or "[]")
            stored += [0] * (len(values) - len(stored))
            ops[key] = [a + b for a, b in zip(stored, values)] + stored[len(values):]
        await self.write(ops)

    async def take_slot(self, key: str, limit: int, window: float) -> Optional[float]:
        """Count a request against ``limit`` per ``window`` seconds: None if it
        may go, else the seconds until a slot frees up."""
        now = time.monotonic()
        times = self._windows.setdefault(key, collections.deque())
        while times and now - times[0] >= window:
            times.popleft()
        if len(times) < limit:
            times.append(now)
            return None
        return window - (now - times[0])

    async def write(self, ops: Dict[str, Any], durable: bool = True,
                    expect: Optional[Dict[str, Optional[str]]] = None) -> bool:
        """Apply puts (str), counters (lists of int) and deletes (None) together:
        all or none survive a crash. With ``expect``, only if each of those
        keys still holds the value given (None: absent); False if one does not.

        With ``durable`` the journal is fsync'd before this returns, so a write
        the caller acknowledges survives kill -9 and a power cut. Raises
        StoreUnavailable (503) if the disk refuses it (full): nothing is written.
        """
        if expect and any(self._get(key) != value for key, value in expect.items()):
            return False
        if not ops:
            return True
        ops = {key: _dump(value) if isinstance(value, list) else value
               for key, value in ops.items()}
        assert self._journal is not None, "a read-only or closed store takes no writes"
        self._append(_encode_journal_line(ops))
        # Seen at once (the next write's ``expect`` and read-modify-writes build
        # on it), acknowledged by the caller only once on disk.
        self._overlay.update(ops)
        if durable:
            await self._synced()
        if self._journal.tell() > JOURNAL_CHECKPOINT_BYTES and self._checkpointing is None:
            self._checkpointing = asyncio.ensure_future(self.checkpoint())
        return True

    def _append(self, line: bytes) -> None:
        journal = self._journal
        assert journal is not None, "a read-only or closed store takes no writes"
        start = journal.tell()
        try:
            written = 0
            while written < len(line):  # an unbuffered file may take part of it
                written += journal.write(line[written:])
        except BaseException as e:
            # Take a part-written line back out, or every later line would sit
            # behind it and be cut off with it at the next start.
            os.ftruncate(journal.fileno(), start)
            journal.seek(start)  # (truncating leaves the position where it was)
            if isinstance(e, OSError):
                raise self._cannot_write(e) from None
            raise
        if self.failing:
            self.failing = None
            log.info("store: writing again")

    async def _synced(self) -> None:
        """The journal on disk, fsync'd in the store's one fsync thread: an fsync
        takes milliseconds on an SSD and tens of them on an SD card, and every
        stream would wait for it on the event loop. One thread keeps the order."""
        loop = asyncio.get_running_loop()
        assert self._journal is not None, "a read-only or closed store takes no writes"
        try:
            await loop.run_in_executor(self._syncer, os.fsync, self._journal.fileno())
        except OSError as e:
            # (The write is in memory already, and may or may not survive a crash.)
            raise self._cannot_write(e) from None

    def _cannot_write(self, error: OSError) -> StoreUnavailable:
        """The 503 for a write the disk refused (full, most likely), logged once."""
        full = error.errno in (errno.ENOSPC, errno.EDQUOT)
        reason = "its disk is full" if full else str(error.strerror or error)
        if self.failing != reason:
            self.failing = reason
            log.error("store: cannot write to DB_PATH: %s; admin writes get 503, and usage "
                      "is kept in memory until it can be written", reason)
        return StoreUnavailable(f"This proxy's store cannot write: {reason}. "
                                + ("Try again once the owner has freed space." if full
                                   else "Try again shortly."))

    async def checkpoint(self) -> None:
        """Fold the overlay into a new snapshot generation, off the event loop."""
        try:
            old_gen, new_gen = self._gen, self._journal_gen + 1
            self._rotate_journal(new_gen)
            self._frozen, self._overlay = {**self._frozen, **self._overlay}, {}
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, self._write_snapshot, old_gen, new_gen, self._frozen)
            self._switch_to(new_gen)
        except OSError as e:  # (a full disk): the journals still hold every write
            log.error("store: no snapshot written (%s); the journal keeps every write",
                      e.strerror or e)
        finally:
            self._checkpointing = None

    def checkpoint_now(self) -> None:
        """The blocking checkpoint used at shutdown, with nothing else running."""
        if self.readonly or self._journal is None:
            return
        if self._journal.tell() == 0 and not self._overlay and not self._frozen:
            return
        new_gen = self._journal_gen + 1
        self._rotate_journal(new_gen)
        merged = {**self._frozen, **self._overlay}
        self._write_snapshot(self._gen, new_gen, merged)
        self._frozen, self._overlay = merged, {}
        self._switch_to(new_gen)

    def _rotate_journal(self, new_gen: int) -> None:
        old, self._journal = self._journal, open(self._file(f"wal-{new_gen}"), "ab", buffering=0)
        assert old is not None, "a read-only or closed store has no journal"
        self._journal_gen = new_gen
        self._syncer.submit(old.close)  # after the fsyncs still waiting on it
        _fsync_dir(self.path)

    def _write_snapshot(self, old_gen: int, new_gen: int, changes: Dict[str, Optional[str]]) -> None:
        """Write generation ``new_gen`` = snapshot ``old_gen`` + ``changes``, then fsync it."""
        target = self._file(f"snap-{new_gen}")
        with dbm.open(target, "n") as new:
            if old_gen:
                with dbm.open(self._file(f"snap-{old_gen}"), "r") as old:
                    for stored in cast(List[bytes], old.keys()):  # (typeshed: str | bytes)
                        if stored.decode() not in changes:
                            new[stored] = old[stored]
            for key, value in changes.items():
                if value is not None:
                    new[key.encode()] = value.encode()
        for name in os.listdir(self.path):
            if name.startswith(f"snap-{new_gen}"):
                with open(self._file(name), "rb") as f:
                    os.fsync(f.fileno())
        _atomic_write(self._file("CURRENT"), f"{new_gen}\n")

    def _switch_to(self, new_gen: int) -> None:
        if self._snapshot is not None:
            self._snapshot.close()
        self._gen = new_gen
        self._snapshot = dbm.open(self._file(f"snap-{new_gen}"), "r")
        self._snapshot_cache = {}
        self._frozen = {}
        self._remove_stale_files()

    async def aclose(self) -> None:
        """Close, after any checkpoint in progress: two at once would race for CURRENT."""
        if self._checkpointing is not None:
            await self._checkpointing
        self.close()

    def close(self) -> None:
        assert self._checkpointing is None, "use aclose() while a checkpoint may run"
        if self._journal is not None:
            try:
                self.checkpoint_now()
            except OSError as e:  # (a full disk): the journals still hold every write
                log.warning("store: no snapshot written at exit (%s); the journal keeps "
                            "every write", e.strerror or e)
            self._syncer.shutdown(wait=True)
            self._journal.close()
            self._journal = None
        if self._snapshot is not None:
            self._snapshot.close()
            self._snapshot = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None


def _encode_journal_line(ops: Dict[str, Optional[str]]) -> bytes:
    payload = json.dumps(ops, separators=(",", ":"), ensure_ascii=True).encode()
    return b"%08x %s\n" % (binascii.crc32(payload), payload)


def _decode_journal_line(line: bytes) -> Optional[Dict[str, Optional[str]]]:
    """The ops of one journal line, or None if it is torn or corrupt."""
    if not line.endswith(b"\n") or len(line) < 10 or line[8:9] != b" ":
        return None
    payload = line[9:-1]
    try:
        if int(line[:8], 16) != binascii.crc32(payload):
            return None
        ops = json.loads(payload)
    except ValueError:
        return None
    return ops if isinstance(ops, dict) else None


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


# ---------------------------------------------------------------------------
# The shared store: the same interface over Redis, for several instances
# ---------------------------------------------------------------------------

ABSENT = "\x00"  # in a script's arguments: no value (JSON and names never hold NUL)

# Every script reads and writes only what its arguments name, atomically.
REDIS_SCRIPTS = {
    # follow: KEYS[1]'s value, and the value of ARGV[1] .. that value.
    "follow": """
        local value = redis.call('GET', KEYS[1])
        if not value then return {} end
        local target = redis.call('GET', ARGV[1] .. value)
        if not target then return {value} end
        return {value, target}""",
    # write_if: when KEYS[1..n] hold ARGV[2..n+1] (n = ARGV[1]), set the other
    # keys to the other values (ABSENT deletes) and answer 1; else answer 0.
    "write_if": """
        local n = tonumber(ARGV[1])
        for i = 1, n do
            local value = redis.call('GET', KEYS[i])
            if ARGV[i + 1] == '\\0' then
                if value then return 0 end
            elseif value ~= ARGV[i + 1] then
                return 0
            end
        end
        for i = n + 1, #KEYS do
            if ARGV[i + 1] == '\\0' then
                redis.call('DEL', KEYS[i])
            else
                redis.call('SET', KEYS[i], ARGV[i + 1])
            end
        end
        return 1""",
    # add: once per batch KEYS[1] (a retried batch is not counted twice), add
    # to the hash fields 0.. of each of KEYS[2..] the numbers ARGV holds for
    # it: how many, then each.
    "add": """
        if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', 86400) then return 0 end
        local at = 1
        for i = 2, #KEYS do
            local n = tonumber(ARGV[at])
            for j = 1, n do redis.call('HINCRBY', KEYS[i], j - 1, ARGV[at + j]) end
            at = at + n + 1
        end
        return 1""",
    # hashes: the fields and values of each hash KEYS names, as one JSON text
    # (an array of [field, value, ...] arrays; an empty one may come as {}).
    "hashes": """
        local found = {}
        for i, key in ipairs(KEYS) do found[i] = redis.call('HGETALL', key) end
        return cjson.encode(found)""",
    # take_slot: a sliding window of ARGV[2] ms holding at most ARGV[1]
    # requests, timed by Redis's clock so every instance agrees; -1 if this
    # one fits, else the milliseconds until one does.
    "take_slot": """
        pcall(redis.replicate_commands)  -- (Redis < 5: TIME before a write)
        local t = redis.call('TIME')
        local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
        local limit, window = tonumber(ARGV[1]), tonumber(ARGV[2])
        redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
        if redis.call('ZCARD', KEYS[1]) < limit then
            redis.call('ZADD', KEYS[1], now, ARGV[3])
            redis.call('PEXPIRE', KEYS[1], window)
            return -1
        end
        local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
        return tonumber(oldest[2]) + window - now""",
}


def import_redis() -> Any:
    """redis-py's asyncio client, which only ``KV_URL`` needs."""
    try:
        import redis.asyncio
        import redis.exceptions
    except ImportError:
        raise ConfigError("KV_URL needs the redis package: pip install redis") from None
    return redis


class RedisKV:
    """The store's interface over Redis (``KV_URL``), shared by every instance.

    Strings are Redis strings and counters Redis hashes (field ``i`` holds
    element ``i``), under the prefix ``cfw:``. Whatever must be atomic across
    instances is: counters grow with HINCRBY inside a script that also marks
    the batch as counted, rate windows are sorted sets trimmed and grown by a
    script on Redis's own clock, and read-modify-writes of a user record are
    compare-and-set. A Redis that does not answer makes every call raise
    ``StoreUnavailable`` (503) until it does again.
    """

    flush_seconds = SHARED_FLUSH_SECONDS
    cache_seconds = SHARED_CACHE_SECONDS
    PREFIX = "cfw:"

    def __init__(self, url: str):
        self.url = url
        self.client: Any = None
        self.down = False
        self._scripts: Dict[str, Any] = {}

    def open(self) -> "RedisKV":
        redis = import_redis()
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        self._errors = (redis.exceptions.RedisError, OSError, asyncio.TimeoutError)
        try:
            # A bounded pool that makes a request wait for a connection (up to
            # 5 s) rather than fail when hundreds arrive at once.
            pool = redis.asyncio.BlockingConnectionPool.from_url(
                self.url, max_connections=REDIS_CONNECTIONS, timeout=5,
                decode_responses=True, socket_connect_timeout=2, socket_timeout=5,
                # One retry on a fresh connection: after Redis restarts, the pooled
                # ones are dead, and the first use of each would fail otherwise.
                retry=Retry(NoBackoff(), 1),
                # (not after a timeout: the command may have run, and must not run twice)
                retry_on_error=[redis.exceptions.ConnectionError])
            self.client = redis.asyncio.Redis(connection_pool=pool)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"KV_URL: {e}") from None
        self._scripts = {name: self.client.register_script(source)
                         for name, source in REDIS_SCRIPTS.items()}
        return self

    @property
    def where(self) -> str:
        """Host and port (or socket) for logs: never the password."""
        kwargs = self.client.connection_pool.connection_kwargs
        if "path" in kwargs:
            return kwargs["path"]
        return f"{kwargs.get('host')}:{kwargs.get('port')}/{kwargs.get('db', 0)}"

    async def _do(self, awaitable: Awaitable[Any]) -> Any:
        try:
            result = await awaitable
        except self._errors as e:
            if not self.down:
                log.warning("store: Redis at %s failed: %s: %s", self.where, type(e).__name__, e)
                self.down = True
            raise StoreUnavailable() from None
        if self.down:
            log.info("store: Redis at %s answers again", self.where)
            self.down = False
        return result

    def _key(self, key: str) -> str:
        return self.PREFIX + key

    async def _keys(self, prefix: str) -> List[str]:
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self._key(prefix)) + "*"

        async def collect() -> List[str]:
            return [key async for key in self.client.scan_iter(match=pattern, count=1000)]
        return sorted(await self._do(collect()))

    # -- reads ----------------------------------------------------------------

    async def get(self, key: str) -> Optional[str]:
        return await self._do(self.client.get(self._key(key)))

    async def scan(self, prefix: str) -> Dict[str, str]:
        keys = await self._keys(prefix)
        values = await self._do(self.client.mget(keys)) if keys else []
        start = len(self.PREFIX)
        return {key[start:]: value for key, value in zip(keys, values) if value is not None}

    async def keys(self, prefix: str) -> List[str]:
        start = len(self.PREFIX)
        return [key[start:] for key in await self._keys(prefix)]

    async def follow(self, key: str, prefix: str) -> Tuple[Optional[str], Optional[str]]:
        found = await self._do(self._scripts["follow"](keys=[self._key(key)],
                                                       args=[self._key(prefix)]))
        found = list(found) + [None, None]
        return found[0], found[1]

    async def _hashes(self, keys: List[str]) -> List[Optional[List[int]]]:
        if not keys:
            return []

        async def fetch() -> List[Dict[str, str]]:
            async with self.client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hgetall(key)
                return await pipe.execute()
        return [_counter(fields) for fields in await self._do(fetch())]

    async def _many_hashes(self, keys: List[str]) -> List[Optional[List[int]]]:
        """The counters at ``keys`` (thousands: a month of every user's usage),
        ``REDIS_BATCH`` at a time, each batch one JSON reply made by a script:
        redis-py parses the fields of that many hashes slowly, and without a
        pause of the event loop within one reply."""
        counters: List[Optional[List[int]]] = []
        for start in range(0, len(keys), REDIS_BATCH):
            text = await self._do(self._scripts["hashes"](keys=keys[start:start + REDIS_BATCH]))
            counters += [_counter(dict(zip(flat[0::2], flat[1::2]))) if flat else None
                         for flat in json.loads(text)]
        return counters

    async def counts(self, keys: Iterable[str]) -> List[Optional[List[int]]]:
        return await self._hashes([self._key(key) for key in keys])

    async def scan_counts(self, prefix: str, keep: Optional[Callable[[str], bool]] = None
                          ) -> Dict[str, List[int]]:
        start = len(self.PREFIX)
        keys = [key for key in await self._keys(prefix) if keep is None or keep(key[start:])]
        return {key[start:]: counter for key, counter in zip(keys, await self._many_hashes(keys))
                if counter is not None}

    async def ping(self) -> bool:
        try:
            return bool(await self._do(self.client.ping()))
        except StoreUnavailable:
            return False

    async def check(self) -> None:
        """At start: say if Redis is not there yet, or keeps admin writes only
        until its next snapshot (they survive a crash only with appendonly)."""
        if not await self.ping():
            log.warning("store: requests get 503 until Redis at %s answers", self.where)
            return
        try:
            config = await self.client.config_get("appendonly")
        except Exception:  # CONFIG may be renamed away (managed Redis): say nothing
            return
        if config.get("appendonly") == "no":
            log.warning("store: Redis at %s has appendonly off, so a crash of Redis can lose "
                        "users and keys written since its last snapshot (see the README)",
                        self.where)

    # -- writes ---------------------------------------------------------------

    async def write(self, ops: Dict[str, Any], durable: bool = True,
                    expect: Optional[Dict[str, Optional[str]]] = None) -> bool:
        """As ``DbmKV.write``; durability is Redis's own (its append-only file)."""
        if expect:
            if any(isinstance(value, list) for value in ops.values()):
                raise ValueError("a conditional write takes strings and deletes only")
            keys = [self._key(key) for key in [*expect, *ops]]
            args = [len(expect)] + [ABSENT if value is None else value
                                    for value in [*expect.values(), *ops.values()]]
            return bool(await self._do(self._scripts["write_if"](keys=keys, args=args)))
        if not ops:
            return True

        async def apply() -> None:
            async with self.client.pipeline(transaction=True) as pipe:
                for key, value in ops.items():
                    key = self._key(key)
                    if value is None or isinstance(value, list):
                        pipe.delete(key)
                    if isinstance(value, list) and value:
                        pipe.hset(key, mapping={str(i): n for i, n in enumerate(value)})
                    elif isinstance(value, str):
                        pipe.set(key, value)
                await pipe.execute()
        await self._do(apply())
        return True

    async def add(self, counts: Dict[str, List[int]], batch_id: str) -> None:
        """Add to counters atomically; a batch retried after a lost answer counts once."""
        if not counts:
            return
        keys = [self._key("batch:" + batch_id)] + [self._key(key) for key in counts]
        args = [n for values in counts.values() for n in [len(values), *values]]
        await self._do(self._scripts["add"](keys=keys, args=args))

    async def take_slot(self, key: str, limit: int, window: float) -> Optional[float]:
        wait = await self._do(self._scripts["take_slot"](
            keys=[self._key(key)], args=[limit, int(window * 1000), secrets.token_hex(8)]))
        return None if int(wait) < 0 else int(wait) / 1000

    async def aclose(self) -> None:
        close = getattr(self.client, "aclose", None) or self.client.close
        await close()


def _counter(fields: Dict[str, str]) -> Optional[List[int]]:
    """A Redis hash ``{"0": "3", "1": "5"}`` as the counter ``[3, 5]``."""
    if not fields:
        return None
    values = [0] * (max(int(i) for i in fields) + 1)
    for i, n in fields.items():
        values[int(i)] = int(n)
    return values


def open_kv(settings: "Settings", readonly: bool = False) -> Union[DbmKV, RedisKV]:
    """The store ``KV_URL`` names, else the embedded one at ``DB_PATH``."""
    if settings.kv_url:
        return RedisKV(settings.kv_url).open()
    return DbmKV(settings.db_path, readonly=readonly).open()


# ---------------------------------------------------------------------------
# Keys and users
# ---------------------------------------------------------------------------

def new_key() -> str:
    return KEY_PREFIX + "".join(secrets.choice(KEY_ALPHABET) for _ in range(KEY_LENGTH))


def hash_key(key: str) -> str:
    """What the store keeps instead of a key: its SHA-256 (keys carry 268 random bits)."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def check_name(name: str) -> str:
    if not NAME_RE.match(name) or name in ROUTE_WORDS:
        raise AdminError(400, "invalid name: use 1-64 of A-Z a-z 0-9 . _ @ -, "
                              "starting with a letter or digit, and not a route word")
    return name


# -- limits: what register and set take ----------------------------------------

LIMIT_DEFAULTS: Dict[str, Any] = {"expires": None, "quota": 0, "rpm": 0, "models": ["*"],
                                  "scope": "own", "budget": 0, "period": "all"}
LIMIT_FIELDS = ("days", "expires", "quota", "budget", "period", "rpm", "models", "scope")
# The windows a quota and a budget count over: calendar UTC, weeks from Monday.
PERIODS = ("all", "day", "week", "month")
PERIOD_WORDS = {"all": "", "day": " today", "week": " this week", "month": " this month"}


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def iso(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime.datetime:
    """A date (the end of that day, UTC) or an ISO-8601 time (UTC if it names no zone)."""
    if re.match(r"\d{4}-\d{2}-\d{2}\Z", text):
        day = datetime.datetime.strptime(text, "%Y-%m-%d")
        return day.replace(hour=23, minute=59, second=59, tzinfo=datetime.timezone.utc)
    moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.timezone.utc)


def parse_limits(fields: Dict[str, str]) -> Dict[str, Any]:
    """The limits named in a register or set request; AdminError 400 names a bad field."""
    unknown = sorted(set(fields) - set(LIMIT_FIELDS) - {"format"})
    if unknown:
        raise AdminError(400, f"unknown field {unknown[0]}; fields are {', '.join(LIMIT_FIELDS)}")
    limits: Dict[str, Any] = {}
    if "days" in fields and "expires" in fields:
        raise AdminError(400, "days and expires: give one of them")
    if "days" in fields:
        days = _whole_number(fields["days"], "days")
        if days < 1 or days > 36500:
            raise AdminError(400, "days must be a whole number from 1 to 36500")
        limits["expires"] = iso(utcnow() + datetime.timedelta(days=days))
    if "expires" in fields:
        text = fields["expires"].strip()
        if text.lower() == "never":
            limits["expires"] = None
        else:
            try:
                limits["expires"] = iso(parse_time(text))
            except (ValueError, OverflowError):
                raise AdminError(400, "expires must be YYYY-MM-DD, an ISO-8601 time, or never") from None
    for field in ("quota", "rpm"):
        if field in fields:
            limits[field] = _whole_number(fields[field], field)
    if "budget" in fields:
        limits["budget"] = parse_dollars(fields["budget"], "budget")
    if "period" in fields:
        if fields["period"] not in PERIODS:
            raise AdminError(400, "period must be day, week, month or all")
        limits["period"] = fields["period"]
    if "models" in fields:
        models = [m.strip() for m in fields["models"].split(",") if m.strip()]
        if not models or any(not re.match(r"[\w.:/*-]{1,128}\Z", m) for m in models):
            raise AdminError(400, "models must be a comma-separated list of model names, or *")
        limits["models"] = ["*"] if "*" in models else models
    if "scope" in fields:
        if fields["scope"] not in ("own", "all"):
            raise AdminError(400, "scope must be own or all")
        limits["scope"] = fields["scope"]
    return limits


def _whole_number(text: str, field: str) -> int:
    if not re.match(r"\d{1,15}\Z", text.strip()):
        raise AdminError(400, f"{field} must be a whole number of 0 or more, got {text!r}")
    return int(text)


def parse_dollars(text: str, field: str) -> int:
    """US dollars (``5``, ``2.50``, ``0.005``) as integer cost units, exactly."""
    if not re.match(r"\d{1,9}(?:\.\d{0,12})?\Z", text.strip()):
        raise AdminError(400, f"{field} must be an amount of US dollars of 0 or more, "
                              f"such as 5 or 2.50, got {text!r}")
    return usd_units(text)  # (exact: at most 12 decimals, the cost units' own)


def usd(units: int) -> float:
    """Cost units as US dollars, for JSON (the nearest double to the exact amount)."""
    return units / COST_UNITS_PER_USD


def dollar_text(units: int) -> str:
    """Cost units as dollars for people: cents at least, up to 8 decimals (``0.00000525``)."""
    amount = (decimal.Decimal(units) / COST_UNITS_PER_USD).quantize(
        decimal.Decimal("1e-8"), rounding=decimal.ROUND_HALF_UP)
    return _decimal_text(amount)


def period_key(period: str, day: datetime.date) -> str:
    """The name of the ``period`` that holds ``day``: ``d2026-12-05``,
    ``w2026-11-30`` (its Monday), ``m2026-12``, or ``all``."""
    if period == "day":
        return "d" + day.isoformat()
    if period == "week":
        return "w" + (day - datetime.timedelta(days=day.weekday())).isoformat()
    if period == "month":
        return "m" + day.isoformat()[:7]
    return "all"


def period_resets(period: str, day: datetime.date) -> Optional[datetime.datetime]:
    """When the ``period`` holding ``day`` ends (UTC midnight), None for ``all``."""
    if period == "day":
        end = day + datetime.timedelta(days=1)
    elif period == "week":
        end = day + datetime.timedelta(days=7 - day.weekday())
    elif period == "month":
        end = (day.replace(day=28) + datetime.timedelta(days=4)).replace(day=1)
    else:
        return None
    return datetime.datetime(end.year, end.month, end.day, tzinfo=datetime.timezone.utc)


def period_counter(name: str, period: str, day: datetime.date) -> str:
    """The store's counter ``[requests, tokens, cost]`` of the user's ``period`` holding ``day``."""
    return "total:" + name if period == "all" else f"spend:{name}:{period_key(period, day)}"


def expiry_passed(record: Dict[str, Any]) -> bool:
    """Whether a user's (or an object's, or new limits') ``expires`` has passed."""
    return bool(record.get("expires")) and record["expires"] <= iso(utcnow())


def allows_model(user: Dict[str, Any], model: str) -> bool:
    return not has_allowlist(user) or model in user["models"]


def has_allowlist(user: Dict[str, Any]) -> bool:
    """Whether the key may use only some models (its ``models`` is not ``*``)."""
    return "*" not in (user.get("models") or ["*"])


def sees_own_only(user: Dict[str, Any]) -> bool:
    """Whether the key sees only its own objects (``scope`` own, the default)."""
    return user.get("scope", "own") != "all"


class Store:
    """Users, keys and usage over a KV (``DbmKV`` or ``RedisKV``), one small record each:

    - ``user:NAME``: the user's record (JSON: key hash, created, limits);
    - ``key:SHA256``: the name, so a key is found in O(1) and never kept in clear;
    - ``usage:NAME:DAY:MODEL``: counter ``[requests, input, output, total, cost,
      cached input, audio input, audio output]`` (tokens; cost in ``COST_UNITS_PER_USD``;
      a row written before costs were kept has the first four);
    - ``total:NAME``: counter ``[requests, tokens, cost]`` over all time, and
      ``spend:NAME:PERIOD`` the same for each day, week and month (``period_key``),
      so a quota or budget is checked with one read;
    - ``own:ID``: who created an object (user, kind, created, expires; and
      ``counted: false`` while its usage is still to be seen: ``count_once``);
    - ``rate:NAME``: the user's requests of the last minute (``take_slot``).

    A shared store is read at most every ``kv.cache_seconds`` per key for
    the request path; this process's own writes drop what it remembered.
    """

    def __init__(self, kv: Union[DbmKV, RedisKV]):
        self.kv = kv
        self._remembered: Dict[str, Tuple[float, Any]] = {}
        self._changes = 0  # own writes so far: a lookup begun before one is not remembered
        self._lookups: Dict[Tuple[str, int], "asyncio.Future[Optional[Dict[str, Any]]]"] = {}
        self._scans: Dict[Tuple[Optional[str], str, str, int], "asyncio.Future[Dict[str, List[int]]]"] = {}

    def _recall(self, key: str) -> Any:
        if self.kv.cache_seconds:
            hit = self._remembered.get(key)
            if hit is not None and time.monotonic() - hit[0] < self.kv.cache_seconds:
                return hit[1]
        return None

    def _remember(self, key: str, value: Any) -> Any:
        if self.kv.cache_seconds:
            if len(self._remembered) >= SNAPSHOT_CACHE_ENTRIES:
                self._remembered.clear()
            self._remembered[key] = (time.monotonic(), value)
        return value

    def _forget(self, names: Optional[Iterable[str]] = None) -> None:
        """Drop what was remembered: all of it, or only these users' totals."""
        if names is None:
            self._remembered.clear()
        else:
            today = utcnow().date()
            for name in names:
                for period in PERIODS:
                    self._remembered.pop(period_counter(name, period, today), None)
        self._changes += 1

    # -- users and keys -----------------------------------------------------------

    async def user_for_key(self, key: str) -> Optional[Dict[str, Any]]:
        digest = hash_key(key)
        user = self._recall("key:" + digest)
        if user is None and not self.kv.cache_seconds:
            user = await self._look_up(digest)
        elif user is None:
            # One lookup per key at a time: a burst of requests shares it.
            # (A lookup begun before an own write is not joined: it may find the old key.)
            pending = (digest, self._changes)
            lookup = self._lookups.get(pending)
            if lookup is None:
                lookup = self._lookups[pending] = asyncio.ensure_future(self._look_up(digest))
                lookup.add_done_callback(lambda _: self._lookups.pop(pending, None))
            user = await asyncio.shield(lookup)
        return None if user is None else dict(user)

    async def _look_up(self, digest: str) -> Optional[Dict[str, Any]]:
        changes = self._changes
        _, record = await self.kv.follow("key:" + digest, "user:")
        user = None if record is None else json.loads(record)
        # A key left behind by a reset that raced another is no key.
        if user is None or not hmac.compare_digest(user["key_hash"], digest):
            return None  # (not remembered: a key registered elsewhere works at once)
        if changes == self._changes:
            self._remember("key:" + digest, user)
        return user

    async def get_user(self, name: str) -> Optional[Dict[str, Any]]:
        record = await self.kv.get("user:" + name)
        return None if record is None else json.loads(record)

    async def require_user(self, name: str) -> Dict[str, Any]:
        user = await self.get_user(name)
        if user is None:
            raise StoreError(404, f"no user {name}")
        return user

    async def _change_user(self, name: str,
                           change: Callable[[Dict[str, Any]], Dict[str, Optional[str]]]) -> Dict[str, Any]:
        """Read the user, let ``change`` edit it and name other writes, and write
        both only if no one (another instance) changed the user meanwhile."""
        for _ in range(10):
            record = await self.kv.get("user:" + name)
            if record is None:
                raise StoreError(404, f"no user {name}")
            user = json.loads(record)
            ops = change(user)
            ops.setdefault("user:" + name, _dump(user))
            if await self.kv.write(ops, expect={"user:" + name: record}):
                self._forget()
                return user
        raise StoreError(409, f"user {name} is being changed elsewhere; try again")

    async def create_user(self, name: str, limits: Dict[str, Any]) -> str:
        key = new_key()
        user = {"name": name, "key_hash": hash_key(key), "created": iso(utcnow()),
                **LIMIT_DEFAULTS, **limits}
        created = await self.kv.write(
            {"user:" + name: _dump(user), "key:" + user["key_hash"]: name,
             **dict.fromkeys(current_counters(name))}, expect={"user:" + name: None})
        if not created:
            raise StoreError(409, f"user {name} exists")
        self._forget()
        return key

    async def reset_key(self, name: str) -> str:
        key = new_key()

        def change(user: Dict[str, Any]) -> Dict[str, Optional[str]]:
            old_hash, user["key_hash"] = user["key_hash"], hash_key(key)
            return {"key:" + old_hash: None, "key:" + user["key_hash"]: name}
        await self._change_user(name, change)
        return key

    async def set_limits(self, name: str, limits: Dict[str, Any]) -> Dict[str, Any]:
        return await self._change_user(name, lambda user: user.update(limits) or {})

    async def delete_user(self, name: str) -> None:
        """Delete the user, its key and its objects' records; its past usage stays in the stats."""
        objects = {"own:" + record["id"]: None for record in await self.objects_of(name)}
        await self._change_user(name, lambda user: {
            "key:" + user["key_hash"]: None, "user:" + name: None,
            **dict.fromkeys(current_counters(name)), **objects})

    async def list_users(self) -> List[Dict[str, Any]]:
        return [json.loads(value) for value in (await self.kv.scan("user:")).values()]

    # -- usage ----------------------------------------------------------------

    async def total(self, name: str, fresh: bool = True, period: str = "all") -> List[int]:
        """``[requests, tokens, cost]`` counted for the user in the current
        ``period`` (over all time by default); with ``fresh=False`` as read up
        to ``kv.cache_seconds`` ago."""
        key = period_counter(name, period, utcnow().date())
        total = None if fresh else self._recall(key)
        if total is None:
            changes = self._changes
            total = ((await self.kv.counts([key]))[0] or []) + [0, 0, 0]
            total = total[:3]
            if changes == self._changes:  # (not a total read before a write landed)
                self._remember(key, total)
        return total

    async def add_usage(self, batch: Dict[Tuple[str, str, str], List[int]], batch_id: str) -> None:
        """Add counts per (name, day, model) to the stored ones, and to the
        user's period counters, as one write; the same ``batch_id`` again (a
        retry after a lost answer) adds nothing."""
        counts: Dict[str, List[int]] = {}
        for (name, day, model), row in batch.items():
            counts[f"usage:{name}:{day}:{model}"] = list(row)
            add_to_periods(counts, name, day, row)
        await self.kv.add(counts, batch_id)
        self._forget({name for name, _, _ in batch})

    async def last_used(self, name: Optional[str] = None) -> Dict[str, str]:
        """The last day each user (or this one) has usage on."""
        keys = await self.kv.keys("usage:" + (f"{name}:" if name else ""))
        return await asyncio.get_running_loop().run_in_executor(None, last_days, keys)

    async def count_once(self, object_id: str) -> bool:
        """Whether the usage now seen of an object whose creation showed none
        (a background response, a batch) is to be counted: True once only,
        for the request that marks its record counted."""
        for _ in range(10):
            old = await self.kv.get("own:" + object_id)
            record = None if old is None else json.loads(old)
            if record is None or record.get("counted", True):
                return False
            if await self.kv.write({"own:" + object_id: _dump({**record, "counted": True})},
                                   expect={"own:" + object_id: old}):
                return True
        return False

    async def usage_rows(self, name: Optional[str], first_day: str,
                         last_day: str) -> List[Dict[str, Any]]:
        """Stored usage per day, user and model, oldest first."""
        return (await self.usage_sums(name, first_day, last_day, USAGE_GROUPS))[0]

    async def usage_sums(self, name: Optional[str], first_day: str, last_day: str,
                         group: Tuple[str, ...], top: int = 0) -> Tuple[List[Dict[str, Any]], int]:
        """Stored usage summed per ``group`` (``sum_usage``), in a thread: a month
        of a thousand users is forty thousand counters."""
        counters = await self.usage_counters(name, first_day, last_day)
        return await asyncio.get_running_loop().run_in_executor(
            None, sum_usage, counters, group, top)

    async def usage_counters(self, name: Optional[str], first_day: str,
                             last_day: str) -> Dict[str, List[int]]:
        """The usage counters of the user (or everyone's) from ``first_day`` to
        ``last_day`` (the other days' are never read), as a dict not to change.
        Calls for the same days at the same time share one read (the dashboard's)."""
        pending = (name, first_day, last_day, self._changes)
        scan = self._scans.get(pending)
        if scan is None:
            def in_period(key: str) -> bool:
                return first_day <= key.split(":", 3)[2] <= last_day
            scan = self._scans[pending] = asyncio.ensure_future(
                self.kv.scan_counts("usage:" + (f"{name}:" if name else ""), in_period))
            scan.add_done_callback(lambda _: self._scans.pop(pending, None))
        return await asyncio.shield(scan)

    # -- objects: who created what ----------------------------------------------

    async def object_record(self, object_id: str) -> Optional[Dict[str, Any]]:
        record = await self.kv.get("own:" + object_id)
        return None if record is None else json.loads(record)

    async def write_objects(self, records: Dict[str, Optional[Dict[str, Any]]],
                            durable: bool = True) -> None:
        await self.kv.write({"own:" + object_id: None if record is None else _dump(record)
                             for object_id, record in records.items()}, durable=durable)

    async def objects_of(self, name: Optional[str] = None) -> List[Dict[str, Any]]:
        """Object records, the user's (or everyone's), oldest first; expired ones left out."""
        now = iso(utcnow())
        found = []
        for key, value in (await self.kv.scan("own:")).items():
            record = json.loads(value)
            if (name is None or record["user"] == name) and not (
                    record.get("expires") and record["expires"] <= now):
                found.append({"id": key[len("own:"):], **record})
        return sorted(found, key=lambda r: (r["created"], r["id"]))

    async def purge_expired_objects(self) -> None:
        now = iso(utcnow())
        try:
            expired = {key: None for key, value in (await self.kv.scan("own:")).items()
                       if (json.loads(value).get("expires") or "9999") <= now}
            await self.kv.write(expired, durable=False)
        except StoreUnavailable:
            pass  # the next hour's try

    async def purge_past_periods(self) -> None:
        """Drop the period counters of periods that are over (only the current
        ones are read), so a store does not grow by three counters a user a day."""
        today = utcnow().date()
        current = {period_key(period, today) for period in PERIODS}
        try:
            past = {key: None for key in await self.kv.scan_counts("spend:")
                    if key.rsplit(":", 1)[1] not in current}
            await self.kv.write(past, durable=False)
        except StoreUnavailable:
            pass  # the next hour's try

    # -- moving between stores --------------------------------------------------

    async def import_users(self, users: Dict[str, Any]) -> int:
        """Take ``{name: {"key": "sk-…"}}`` (Cloudflare) or this program's export."""
        ops: Dict[str, Any] = {}
        for name, entry in users.items():
            if not isinstance(entry, dict) or not NAME_RE.match(name) or name in ROUTE_WORDS:
                raise ValueError(f"user {name!r}: needs a valid name and an object")
            record = {k: v for k, v in entry.items() if k not in ("key", "usage", "total", "objects")}
            if isinstance(entry.get("key"), str) and entry["key"]:
                record["key_hash"] = hash_key(entry["key"])
            if not re.match(r"[0-9a-f]{64}\Z", str(record.get("key_hash", ""))):
                raise ValueError(f"user {name!r}: needs a key or a key_hash")
            record = {**LIMIT_DEFAULTS, **record, "name": name,
                      "created": record.get("created") or iso(utcnow())}
            check_imported_limits(name, record)
            old = await self.get_user(name)
            if old is not None and old["key_hash"] != record["key_hash"]:
                ops["key:" + old["key_hash"]] = None
            ops["user:" + name] = _dump(record)
            ops["key:" + record["key_hash"]] = name
            periods: Dict[str, List[int]] = {}
            for row in imported_rows(name, entry.get("usage", [])):
                key = f"usage:{name}:{row['day']}:{row['model']}"
                ops[key] = [row.get(field, 0) for field in USAGE_FIELDS]
                add_to_periods(periods, name, row["day"], ops[key])
            total = imported_total(name, entry.get("total") or [])
            if total:  # (an export from before costs were kept has two)
                periods["total:" + name] = (total + periods.get("total:" + name, [0] * 3)[2:])[:3]
            ops.update(periods)
            for obj in imported_objects(name, entry.get("objects", [])):
                ops["own:" + obj["id"]] = _dump({"user": name, **{
                    k: obj.get(k) for k in ("kind", "created", "expires", "counted") if k in obj}})
        await self.kv.write(ops)
        self._forget()
        return len(users)

    async def export_users(self) -> Dict[str, Any]:
        users = {user["name"]: user for user in await self.list_users()}
        for name, user in users.items():
            user["usage"] = [{k: v for k, v in row.items() if k != "user"}
                             for row in await self.usage_rows(name, "", "9999")]
            user["total"] = await self.total(name)
        for record in await self.objects_of():
            if record["user"] in users:
                users[record["user"]].setdefault("objects", []).append(
                    {k: record.get(k) for k in ("id", "kind", "created", "expires", "counted")
                     if k in record})
        return users


def check_imported_limits(name: str, record: Dict[str, Any]) -> None:
    """An imported user's limits must be what ``parse_limits`` would have made
    (a date for ``expires`` is written as register writes it)."""
    def wrong(field: str) -> ValueError:
        return ValueError(f"user {name!r}: {field} {record.get(field)!r} is not valid")
    for field in ("quota", "rpm", "budget"):
        if type(record.get(field)) is not int or record[field] < 0:
            raise wrong(field)
    if record.get("period") not in PERIODS:
        raise wrong("period")
    if record.get("expires") is not None:
        if not isinstance(record["expires"], str):
            raise wrong("expires")
        try:
            record["expires"] = iso(parse_time(record["expires"]))
        except ValueError:
            raise wrong("expires") from None
    models = record.get("models")
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise wrong("models")
    if record.get("scope", "own") not in ("own", "all"):
        raise wrong("scope")


def imported_rows(name: str, rows: Any) -> List[Dict[str, Any]]:
    """An imported user's usage rows, as export writes them (a day, a model,
    counts that are whole numbers of 0 or more: a negative cost would hand out
    budget); ValueError naming the user otherwise."""
    if not isinstance(rows, list):
        raise ValueError(f"user {name!r}: usage must be a list of rows")
    for row in rows:
        if not (isinstance(row, dict) and isinstance(row.get("model"), str)
                and _is_day(row.get("day"))):
            raise ValueError(f"user {name!r}: each usage row needs a day (YYYY-MM-DD) "
                             f"and a model, got {str(row)[:80]}")
        if not all(_is_count(row.get(field, 0)) for field in USAGE_FIELDS):
            raise ValueError(f"user {name!r}: the usage row of {row['day']} {row['model']!r} "
                             f"must count in whole numbers of 0 or more")
    return rows


def imported_total(name: str, total: Any) -> List[int]:
    """An imported user's total: requests, tokens and (since costs are kept) cost."""
    if not (isinstance(total, list) and len(total) <= 3 and all(map(_is_count, total))):
        raise ValueError(f"user {name!r}: total must be up to 3 whole numbers of 0 or more")
    return total


def imported_objects(name: str, objects: Any) -> List[Dict[str, Any]]:
    """An imported user's objects: each with its id."""
    if not (isinstance(objects, list) and all(
            isinstance(obj, dict) and isinstance(obj.get("id"), str) and obj["id"]
            for obj in objects)):
        raise ValueError(f"user {name!r}: objects must be a list of objects with an id")
    return objects


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _is_day(value: Any) -> bool:
    try:
        return (isinstance(value, str) and bool(re.match(r"\d{4}-\d{2}-\d{2}\Z", value))
                and bool(datetime.date.fromisoformat(value)))
    except ValueError:
        return False


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


# A usage row's counters, in the order the store keeps them.
USAGE_FIELDS = ("requests", "input_tokens", "output_tokens", "total_tokens", "cost",
                "cached_tokens", "audio_input_tokens", "audio_output_tokens")


def last_days(keys: List[str]) -> Dict[str, str]:
    """The last day in each user's usage keys (``usage:USER:DAY:MODEL``)."""
    last: Dict[str, str] = {}
    for key in keys:
        _, user, day, _ = key.split(":", 3)
        if day > last.get(user, ""):
            last[user] = day
    return last


# What usage can be summed per (the stats' ``group=``), in the order rows show them.
USAGE_GROUPS = ("day", "user", "model")


def sum_usage(counters: Dict[str, List[int]], group: Tuple[str, ...],
              top: int = 0) -> Tuple[List[Dict[str, Any]], int]:
    """Usage counters (``usage:USER:DAY:MODEL``) summed per ``group`` (some of
    ``USAGE_GROUPS``): rows of the group's fields and every ``USAGE_FIELDS``,
    ordered by the group's fields. With ``top``, only the ``top`` users or
    models (or pairs) that cost most keep their names (``_keep_top``). Returns
    the rows and how many users or models were summed under None."""
    fields = tuple(name for name in USAGE_GROUPS if name in group)
    pick = _picker([{"user": 1, "day": 2, "model": 3}[name] for name in fields])
    sums: Dict[Tuple[Optional[str], ...], List[int]] = {}
    for key, values in counters.items():
        _add(sums, pick(key.split(":", 3)), values)
    named = [i for i, name in enumerate(fields) if name != "day"]
    others = 0
    if top and named:
        sums, others = _keep_top(sums, named, top)
    # (By the key alone: comparing (key, counter) pairs in one C call holds the GIL longer.)
    rows = sorted(sums.items(), key=(lambda item: [(part is None, part or "") for part in item[0]])
                  if others else (lambda item: item[0]))
    columns = fields + USAGE_FIELDS
    return [dict(zip(columns, (*key, *values))) for key, values in rows], others


def _picker(at: List[int]) -> Callable[[Any], Tuple[Any, ...]]:
    """A function that takes the items at ``at`` out of a sequence, as a tuple."""
    if len(at) == 1:
        return lambda parts: (parts[at[0]],)
    return operator.itemgetter(*at)


def _add(sums: Dict[Tuple[Optional[str], ...], List[int]], key: Tuple[Optional[str], ...],
         values: List[int]) -> None:
    """Add a counter to the sum at ``key`` (new lists: counters may be shared)."""
    if len(values) != len(USAGE_FIELDS):  # (a counter from before costs were kept has 4)
        values = (values + [0] * len(USAGE_FIELDS))[:len(USAGE_FIELDS)]
    total = sums.get(key)
    sums[key] = values if total is None else list(map(operator.add, total, values))


def _keep_top(sums: Dict[Tuple[Optional[str], ...], List[int]], named: List[int],
              top: int) -> Tuple[Dict[Tuple[Optional[str], ...], List[int]], int]:
    """Keep the names (the key's parts at ``named``) of the ``top`` that cost most
    over all the rows, then used most tokens; sum the others' rows into rows
    with None there. Returns those rows and how many names were folded."""
    pick = _picker(named)
    per_name: Dict[Tuple[Optional[str], ...], List[int]] = {}
    for key, values in sums.items():
        _add(per_name, pick(key), values)
    cost, tokens = USAGE_FIELDS.index("cost"), USAGE_FIELDS.index("total_tokens")
    ranked = sorted(per_name, key=lambda name: (-per_name[name][cost], -per_name[name][tokens], name))
    kept = set(ranked[:top])
    folded: Dict[Tuple[Optional[str], ...], List[int]] = {}
    for key, values in sums.items():
        if pick(key) not in kept:
            key = tuple(None if i in named else part for i, part in enumerate(key))
        _add(folded, key, values)
    return folded, len(ranked) - len(kept)


def add_to_periods(counts: Dict[str, List[int]], name: str, day: str, row: List[int]) -> None:
    """Add a usage row of ``day`` to the user's counters of every period holding it."""
    date = datetime.date.fromisoformat(day)
    for period in PERIODS:
        total = counts.setdefault(period_counter(name, period, date), [0, 0, 0])
        total[0] += row[0]
        total[1] += row[3]
        total[2] += row[4] if len(row) > 4 else 0


def current_counters(name: str) -> List[str]:
    """The user's period counters that count now (dropped with the user)."""
    today = utcnow().date()
    return [period_counter(name, period, today) for period in PERIODS]


# ---------------------------------------------------------------------------
# Usage: read from the upstream's own answers, counted per user, day, model
# ---------------------------------------------------------------------------

try:  # optional: with it, brotli-compressed answers are counted too
    import brotli
except ImportError:
    brotli = None

USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')  # (and not "usage":null)
MODEL_NEAR_START = re.compile(rb'"model"\s*:\s*"([^"\\]{1,200})"')
JSON_DECODER = json.JSONDecoder()
BLANK_LINE = re.compile(rb"\r?\n\r?\n")  # ends an event of a stream, and an HTTP head


def usage_counts(prices: "PriceTable", model: str, usage: Any) -> List[int]:
    """A request's usage row fields after ``requests``: tokens, the cost of
    every kind at its price (0 where the model has none), cached and audio
    tokens. ``usage`` is the upstream's usage object, or ``TokenCounts``."""
    if usage is None:
        return [0] * (len(USAGE_FIELDS) - 1)
    kinds = usage if isinstance(usage, TokenCounts) else token_counts_of(usage)
    total = _whole(usage, "total_tokens") or kinds.input + kinds.output
    cost = prices.cost(model, kinds) or 0
    return [kinds.input, kinds.output, total, cost, kinds.cached, kinds.audio_input,
            kinds.audio_output]


def usage_in(obj: Any) -> Optional[Tuple[Optional[str], Dict[str, Any]]]:
    """(model, usage object) from an answer, a stream chunk or an event that carries usage."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("usage"), dict):
        model = obj.get("model")
        return (model if isinstance(model, str) else None), obj["usage"]
    if isinstance(obj.get("response"), dict):  # response.completed, response.done
        return usage_in(obj["response"])
    return None


def sse_data(event: bytes) -> Any:
    """The JSON of an SSE event's data lines, or None."""
    lines = [line[5:].lstrip() for line in event.splitlines() if line.startswith(b"data:")]
    try:
        return json.loads(b"\n".join(lines))
    except ValueError:
        return None


def sse_field(event: bytes, name: bytes) -> Optional[bytes]:
    """The value of an SSE event's first ``name:`` field (``event``, ``data``), or None."""
    for line in event.splitlines():
        if line.startswith(name + b":"):
            return line[len(name) + 1:].strip()
    return None


def with_data(event: bytes, data: Any) -> bytes:
    """An SSE event with its data replaced by ``data`` (its other fields kept)."""
    fields = [line for line in event.splitlines() if line and not line.startswith(b"data:")]
    line = b"data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
    return b"\n".join(fields + [line]) + b"\n\n"


# What every chunk of a streamed chat completion repeats: a chunk that has only
# these besides empty choices carries nothing but its usage.
CHUNK_ENVELOPE = frozenset(
    "id object created model system_fingerprint service_tier choices usage obfuscation".split())


def is_empty(value: Any) -> bool:
    """Whether a chunk's value says nothing (``null``, ``""``, ``[]``, a delta of those)."""
    if isinstance(value, dict):
        return all(is_empty(v) for v in value.values())
    return value is None or value == "" or value == []


def carries_only_usage(chunk: Dict[str, Any]) -> bool:
    """A chunk that is there for its usage alone: OpenAI's with ``"choices": []``,
    LiteLLM's with ``"choices": [{"index": 0, "delta": {}}]``."""
    choices = chunk.get("choices")
    return (isinstance(choices, list)
            and all(isinstance(c, dict) and all(k == "index" or is_empty(v) for k, v in c.items())
                    for c in choices)
            and all(k in CHUNK_ENVELOPE or is_empty(v) for k, v in chunk.items()))


# The events that end a stream: the client that has one has the whole answer.
STREAM_END_EVENTS = frozenset([b"response.completed", b"response.incomplete", b"response.failed"])


def decoder_for(content_encoding: str) -> Any:
    encoding = content_encoding.strip().lower()
    if encoding in ("gzip", "x-gzip", "deflate"):
        return zlib.decompressobj(47 if encoding != "deflate" else 15)
    if encoding == "br" and brotli is not None:
        return brotli.Decompressor()
    return None


def readable_encodings(accept_encoding: str) -> str:
    """Accept-Encoding minus what this proxy could not decode to read usage."""
    readable = {"gzip", "x-gzip", "deflate", "identity", "*"} | ({"br"} if brotli else set())
    kept = [part for part in accept_encoding.split(",")
            if part.split(";")[0].strip().lower() in readable]
    return ",".join(kept).strip() or "identity"


class UsageReader:
    """Finds the usage in an answer as it streams past, without holding it.

    JSON answers up to WHOLE: parsed whole, their top-level ``usage`` (an
    upstream may put it before echoed objects that have a "usage" of their
    own). Longer ones: the last ``"usage": {…}`` in the body's last 64 KB and
    the first ``"model"`` in its first 8 KB, so a 50 MB embeddings answer
    costs no more than a small one. Event streams: the last event that
    carries a usage object (a chat completion's usage chunk,
    ``response.completed``). With ``strip``, the usage the proxy asked for on
    the client's behalf is taken out of whichever chunk carries it (the chunk
    dropped if that is all it carries), and so is the ``"usage":null`` it adds
    to every other chunk. ``ended``: the stream's last event (``[DONE]``,
    ``response.completed``) has passed.
    """

    HEAD, TAIL = 8192, 65536
    WHOLE = 1 << 20  # JSON answers up to this are parsed whole (a few ms), longer ones scanned
    EVENT_LIMIT = 32 << 20  # an event longer than this is passed on unparsed but for its tail

    def __init__(self, content_type: str, content_encoding: str, strip: bool):
        self.sse = content_type.lower().startswith("text/event-stream")
        self.whole: Optional[List[bytes]] = [] if "json" in content_type.lower() else None
        self.decoder = decoder_for(content_encoding) if content_encoding else None
        self.compressed = bool(content_encoding) and content_encoding.lower() != "identity"
        self.strip = strip and self.sse and not self.compressed
        self.head = self.tail = b""
        self.held: List[bytes] = []  # the event not yet ended, in the pieces it came in
        self.held_size = 0
        self.seam = b""  # its last 3 bytes, where an event end may begin
        self.size = 0
        self.deltas = 0  # streamed events that carry a delta: about a token each
        self.usage_event: Optional[bytes] = None
        self.usage_data: Any = None  # usage_event's JSON, once parsed
        self.ended = False

    def feed(self, chunk: bytes) -> bytes:
        """Read a chunk; return what the client gets of it."""
        if self.compressed:
            self._read(self._decode(chunk))
            return chunk
        return self._read(chunk)

    def _decode(self, chunk: bytes) -> bytes:
        if self.decoder is None:
            return b""
        try:
            return self.decoder.decompress(chunk)
        except Exception:  # a corrupt body: pass it on, count no tokens
            self.decoder = None
            return b""

    def whole_in_head(self) -> bool:
        """Whether the answer was short enough to be all in ``head``."""
        return self.size <= self.HEAD

    def _read(self, data: bytes) -> bytes:
        self.size += len(data)
        if len(self.head) < self.HEAD:
            self.head += data[: self.HEAD - len(self.head)]
        if not self.sse:
            self._hold_json(data)
            return data
        if not self.held and data.endswith(b"\n\n") and data.find(b"\n\n") == len(data) - 2 \
                and b"\r" not in data:
            # One whole event, as an upstream usually sends them: nothing to split
            # (and nothing held, so no seam to look at next time).
            self.seam = b""
            event = self._pass(data)
            return data if not self.strip else strip_usage_nulls(event) if event else b""
        # Pieces are joined only once an event ends among them: each byte is
        # looked at twice at most, however long the event.
        ended = BLANK_LINE.search(data) or BLANK_LINE.search(self.seam + data[:3])
        self.seam = (self.seam + data[-3:])[-3:]
        self.held.append(data)
        self.held_size += len(data)
        if ended is None:
            if self.held_size > self.EVENT_LIMIT:
                held = self._let_go()  # (stripped like any event the proxy asked usage for)
                return strip_usage_nulls(held) if self.strip else data
            return b"" if self.strip else data
        text = b"".join(self.held)
        ends = [match.end() for match in BLANK_LINE.finditer(text)]
        rest = text[ends[-1]:]
        self.held, self.held_size = ([rest], len(rest)) if rest else ([], 0)
        self.seam = rest[-3:]
        kept = [self._pass(event) for event in (text[a:b] for a, b in zip([0] + ends, ends))]
        if not self.strip:
            return data
        return b"".join(strip_usage_nulls(event) for event in kept if event)

    def _hold_json(self, data: bytes) -> None:
        """A JSON answer's bytes: all of them up to WHOLE, then only the tail."""
        if self.whole is not None:
            self.whole.append(data)
            if self.size <= self.WHOLE:
                return
            data, self.whole = b"".join(self.whole), None
        self.tail = (self.tail + data)[-self.TAIL:]

    def _let_go(self) -> bytes:
        """An event too long to hold: keep its tail (for the usage, which ends
        an answer), and give up the rest."""
        text = b"".join(self.held)
        self.held, self.held_size = [text[-self.TAIL:]], self.TAIL
        return text[:-self.TAIL]

    def _pass(self, event: bytes) -> Optional[bytes]:
        """Read an event; return it as the client gets it (None: not at all).
        Only an event that can carry usage (a byte check) is parsed."""
        self.deltas += b'"delta"' in event
        if b"[DONE]" in event and sse_field(event, b"data") == b"[DONE]":
            self.ended = True
        if USAGE_OBJECT.search(event) is None:
            return event
        self.usage_event, self.usage_data = event, sse_data(event)
        name = sse_field(event, b"event")
        if name is None and isinstance(self.usage_data, dict):  # (a data-only stream)
            name = str(self.usage_data.get("type")).encode()
        self.ended = self.ended or name in STREAM_END_EVENTS
        if self.strip and isinstance(self.usage_data, dict) \
                and isinstance(self.usage_data.get("usage"), dict):
            if carries_only_usage(self.usage_data):
                return None
            return with_data(event, {k: v for k, v in self.usage_data.items() if k != "usage"})
        return event

    def flush(self) -> bytes:
        """What is left for the client once the upstream is done."""
        rest, self.held, self.held_size = b"".join(self.held), [], 0
        kept = self._pass(rest) if rest and self.sse else rest
        return strip_usage_nulls(kept) if self.strip and kept else b""

    def result(self) -> Optional[Tuple[Optional[str], Dict[str, Any]]]:
        if not self.sse:
            if self.whole is not None:
                found = usage_in_json(b"".join(self.whole))
                if found is not False:
                    return found
            return usage_in_tail(self.tail or b"".join(self.whole or []), self.head)
        if self.usage_event is None:
            return None
        if self.usage_data is None:  # the tail of an event too long to hold: read as a tail
            return usage_in_tail(self.usage_event, self.head)
        return usage_in(self.usage_data)


def usage_in_json(body: bytes) -> Any:
    """usage_in for a whole JSON answer; False if it is not JSON (a cut answer).
    Parsed only if it may hold a usage (a byte check): 10 ms a 0.5 MB embeddings
    answer on the build machine."""
    if not may_name(body, b'"usage"'):
        return None
    try:
        return usage_in(json.loads(body))
    except (ValueError, RecursionError):
        return False


def may_name(body: bytes, key: bytes) -> bool:
    """Whether a JSON body may have ``key`` (quoted): written plainly, or spelled
    with a \\u escape, which is the only other way to write its letters."""
    return key in body or b"\\u" in body


def usage_in_tail(tail: bytes, head: bytes) -> Optional[Tuple[Optional[str], Dict[str, Any]]]:
    """The last ``"usage": {…}`` in ``tail``, and the first ``"model"`` in ``head``."""
    starts = [m.start() for m in USAGE_OBJECT.finditer(tail)]
    if not starts:
        return None
    text = tail[starts[-1]:].decode("utf-8", "replace")
    try:
        usage, _ = JSON_DECODER.raw_decode(text[text.index("{"):])
    except ValueError:
        return None
    match = MODEL_NEAR_START.search(head)
    return (match.group(1).decode() if match else None), usage


def strip_usage_nulls(data: bytes) -> bytes:
    """What OpenAI adds to every chunk once include_usage is on."""
    return data.replace(b',"usage":null', b"").replace(b'"usage":null,', b"")


class UsageBook:
    """Counts in memory, written to the store in one batch every few seconds.

    The request path only adds to a dict; the store is written by ``flush``,
    which a timer calls every ``kv.flush_seconds`` and ``serve`` calls once
    more on SIGTERM/SIGINT. A batch whose write fails is kept, under its id,
    and sent again as it was, so the store counts it exactly once.
    """

    def __init__(self, store: Store):
        self.store = store
        self.pending: Dict[Tuple[str, str, str], List[int]] = {}
        self.unsent: Optional[Tuple[str, Dict[Tuple[str, str, str], List[int]]]] = None
        self._flushing = asyncio.Lock()
        self.day, self.day_ends = "", 0.0

    def record(self, name: str, model: str, counts: List[int]) -> None:
        """Count a request: ``counts`` are the usage row's fields after ``requests``."""
        row = self.pending.setdefault((name, self.today(), model), [0] * len(USAGE_FIELDS))
        row[0] += 1
        for i, value in enumerate(counts, 1):
            row[i] += value

    def today(self) -> str:
        """The UTC date rows are counted under, made once a day (POSIX days are 86,400 s)."""
        now = time.time()
        if now >= self.day_ends:
            self.day = time.strftime("%Y-%m-%d", time.gmtime(now))
            self.day_ends = (now // 86400 + 1) * 86400
        return self.day

    def unwritten(self) -> List[Tuple[Tuple[str, str, str], List[int]]]:
        """The rows counted but not yet written: pending, and a batch that failed."""
        batches = [self.pending] + ([self.unsent[1]] if self.unsent else [])
        return [item for batch in batches for item in batch.items()]

    def pending_for(self, name: str, period: str = "all") -> List[int]:
        """``[requests, tokens, cost]`` counted for the user in the current
        ``period`` but not yet written."""
        def in_period(day: str) -> bool:
            return period_key(period, datetime.date.fromisoformat(day)) == now
        now = period_key(period, datetime.date.fromisoformat(self.today()))
        rows = [row for (user, day, _), row in self.unwritten()
                if user == name and (period == "all" or in_period(day))]
        return [sum(row[0] for row in rows), sum(row[3] for row in rows),
                sum(row[4] for row in rows)]

    async def used(self, name: str, period: str = "all", fresh: bool = False) -> List[int]:
        """``[requests, tokens, cost]`` in the current ``period``, as the request
        path checks a quota or budget: the stored counter as recently read (one
        lookup), and what this process has not written yet."""
        stored = await self.store.total(name, fresh=fresh, period=period)
        return [a + b for a, b in zip(stored, self.pending_for(name, period))]

    async def flush(self) -> None:
        async with self._flushing:  # one batch in the air at a time
            if self.unsent is None:
                if not self.pending:
                    return
                self.unsent, self.pending = (secrets.token_hex(12), self.pending), {}
            batch_id, batch = self.unsent
            try:
                await self.store.add_usage(batch, batch_id)
            except StoreUnavailable:
                return  # (said once by the store) kept for the next try
            except Exception:
                log.exception("usage: writing failed; keeping the counts for the next try")
                return
            self.unsent = None


class RateLimiter:
    """Requests per minute per user, over a sliding 60-second window kept by
    the store, so that instances sharing one count together."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def admit(self, name: str, rpm: int) -> Optional[ApiError]:
        """None if the request may go; else the 429 to answer."""
        wait = await self.store.kv.take_slot("rate:" + name, rpm, RATE_WINDOW_SECONDS)
        if wait is None:
            return None
        return ApiError(
            429, f"Rate limit reached for requests: {rpm} per minute for this key. "
                 f"Please try again in {wait:.1f}s.", "requests", "rate_limit_exceeded",
            headers={"Retry-After": str(max(1, math.ceil(wait))),
                     "x-ratelimit-limit-requests": str(rpm),
                     "x-ratelimit-remaining-requests": "0",
                     "x-ratelimit-reset-requests": f"{wait:.3f}s"})


# ---------------------------------------------------------------------------
# Prices: what each token kind costs
# ---------------------------------------------------------------------------
#
# The interface the rest of worker.py uses (extend it, do not rename):
#
#   COST_UNITS_PER_USD           costs are ints of 1e-12 USD (picodollars): exact,
#                                fine enough for $0.0025 per 1M tokens; a 64-bit
#                                Redis counter holds up to $9.2 million of them
#   TokenCounts(input, cached, audio_input, image_input, output, audio_output,
#               image_output, seconds, characters, images, cached_audio, cached_image)
#                                what one answer used, by kind (frozen; the kinds
#                                are PARTS of input/output, as OpenAI reports them;
#                                characters and images are set by the caller)
#   token_counts_of(usage)       -> TokenCounts, from any OpenAI usage object; never raises
#   Settings.prices              the PriceTable in effect (load_settings loads it once)
#   PriceTable.lookup(model)     -> Optional[Price]: a dated snapshot falls back to
#                                its model, "openai/gpt-4o" to "gpt-4o"
#   PriceTable.cost(model, counts) -> Optional[int]: None if the model has no price
#   PriceTable.has_price(model)  -> bool
#   Price.cost(counts)           -> int, for a Price already looked up
#   load_prices(path)            -> PriceTable: the built-in table, extended and
#                                overridden by a LiteLLM price file; ConfigError
#                                naming PRICES_FILE on a bad one
#   image_price_name(model, size, quality) -> the table's name of a DALL-E image
#                                price ("hd/1024-x-1792/dall-e-3"), to price
#                                TokenCounts(images=n) with
#   usd_units(text) / usd_text(units)  "5.00" <-> 5 * COST_UNITS_PER_USD, exactly

COST_UNITS_PER_USD = 10 ** 12

PRICES_DATE = "2026-12-05"
PRICES_SOURCE = ("https://developers.openai.com/api/docs/pricing (Standard tier); the "
                 "newest models from LiteLLM's model_prices_and_context_window.json")

# USD per 1M tokens: input, cached input, output ("-": no price of its own, so
# cached input costs as input); then, where the model has them, audio and image
# tokens as IN/CACHED/OUT, and the prices of what is not counted in tokens:
# per minute of audio (a transcription that reports its duration), per 1M
# characters (tts-1), per image (DALL-E, by quality/size as LiteLLM names them);
# over-272K: a request with more input tokens costs these prices instead (all of it).
# The models after DALL-E-2 are newer than the copies of OpenAI's page at hand:
# their prices are LiteLLM's (model_prices_and_context_window.json of litellm
# 1.110.2), as read on PRICES_DATE.
BUILTIN_PRICES = """
gpt-5.5                             5       0.50    30                                                over-272K 10/1/45
gpt-5.5-pro                         30      -       180                                               over-272K 60/-/270
gpt-5.4                             2.50    0.25    15                                                over-272K 5/0.50/22.50
gpt-5.4-mini                        0.75    0.075   4.50
gpt-5.4-nano                        0.20    0.02    1.25
gpt-5.4-pro                         30      -       180                                               over-272K 60/-/270
gpt-5.2                             1.75    0.175   14
gpt-5.1                             1.25    0.125   10
gpt-5.1-codex                       1.25    0.125   10
gpt-5.1-codex-mini                  0.25    0.025   2
gpt-5                               1.25    0.125   10
gpt-5-mini                          0.25    0.025   2
gpt-5-nano                          0.05    0.005   0.40
gpt-5-chat-latest                   1.25    0.125   10
gpt-5-codex                         1.25    0.125   10
gpt-5-pro                           15      -       120
gpt-4.1                             2       0.50    8
gpt-4.1-mini                        0.40    0.10    1.60
gpt-4.1-nano                        0.10    0.025   0.40
gpt-4o                              2.50    1.25    10
gpt-4o-2024-05-13                   5       -       15
gpt-4o-mini                         0.15    0.075   0.60
chatgpt-4o-latest                   5       -       15
gpt-4o-search-preview               2.50    -       10
gpt-4o-mini-search-preview          0.15    -       0.60
computer-use-preview                3       -       12
codex-mini-latest                   1.50    0.375   6
o1                                  15      7.50    60
o1-mini                             1.10    0.55    4.40
o1-pro                              150     -       600
o3                                  2       0.50    8
o3-pro                              20      -       80
o3-mini                             1.10    0.55    4.40
o3-deep-research                    10      2.50    40
o4-mini                             1.10    0.275   4.40
o4-mini-deep-research               2       0.50    8
gpt-audio                           2.50    -       10      audio 32/-/64
gpt-audio-mini                      0.60    -       2.40    audio 10/-/20
gpt-4o-audio-preview                2.50    -       10      audio 40/-/80
gpt-4o-audio-preview-2024-10-01     2.50    -       10      audio 100/-/200
gpt-4o-mini-audio-preview           0.15    -       0.60    audio 10/-/20
gpt-realtime                        4       0.40    16      audio 32/0.40/64     image 5/0.50/-
gpt-realtime-1.5                    4       0.40    16      audio 32/0.40/64     image 5/0.50/-
gpt-realtime-mini                   0.60    0.06    2.40    audio 10/0.30/20     image 0.80/0.08/-
gpt-4o-realtime-preview             5       2.50    20      audio 40/2.50/80
gpt-4o-realtime-preview-2024-10-01  5       2.50    20      audio 100/20/200
gpt-4o-mini-realtime-preview        0.60    0.30    2.40    audio 10/0.30/20
gpt-image-1                         5       1.25    40      image 10/2.50/40
gpt-image-1-mini                    2       0.20    8       image 2.50/0.25/8
text-embedding-3-small              0.02    -       -
text-embedding-3-large              0.13    -       -
text-embedding-ada-002              0.10    -       -
whisper-1                           -       -       -       per-minute 0.006
gpt-4o-transcribe                   2.50    -       10      audio 6/-/-          per-minute 0.006
gpt-4o-mini-transcribe              1.25    -       5       audio 3/-/-          per-minute 0.003
tts-1                               -       -       -       per-1M-chars 15
tts-1-hd                            -       -       -       per-1M-chars 30
gpt-4o-mini-tts                     0.60    -       12      audio -/-/12
omni-moderation-latest              0       0       0
omni-moderation                     0       0       0
text-moderation-latest              0       0       0
gpt-3.5-turbo                       0.50    -       1.50
gpt-3.5-turbo-instruct              1.50    -       2
gpt-4-turbo                         10      -       30
gpt-4-turbo-preview                 10      -       30
gpt-4                               30      -       60
gpt-4-32k                           60      -       120
dall-e-3                            -       -       -       per-image 0.04
standard/1024-x-1024/dall-e-3       -       -       -       per-image 0.04
standard/1024-x-1792/dall-e-3       -       -       -       per-image 0.08
standard/1792-x-1024/dall-e-3       -       -       -       per-image 0.08
hd/1024-x-1024/dall-e-3             -       -       -       per-image 0.08
hd/1024-x-1792/dall-e-3             -       -       -       per-image 0.12
hd/1792-x-1024/dall-e-3             -       -       -       per-image 0.12
dall-e-2                            -       -       -       per-image 0.02
256-x-256/dall-e-2                  -       -       -       per-image 0.016
512-x-512/dall-e-2                  -       -       -       per-image 0.018
1024-x-1024/dall-e-2                -       -       -       per-image 0.02
gpt-6.1-sol                         2       0.10    10                                                over-272K 4/0.20/15
gpt-6.1-terra                       1       0.05    5                                                 over-272K 2/0.10/7.50
gpt-6-sol                           2       0.20    10                                                over-272K 4/0.40/15
gpt-6-luna                          0.10    0.01    0.50                                              over-272K 0.20/0.02/0.75
gpt-6-astra                         10      1       50                                                over-272K 20/2/75
gpt-5.6                             4       0.40    20                                                over-272K 8/0.80/30
gpt-5.6-sol                         4       0.40    20                                                over-272K 8/0.80/30
gpt-5.6-terra                       2       0.20    12                                                over-272K 4/0.40/18
gpt-5.6-luna                        0.20    0.02    1.20                                              over-272K 0.40/0.04/1.80
gpt-5.3-codex                       1.75    0.175   14
gpt-5.2-codex                       1.75    0.175   14
gpt-5.2-pro                         21      -       168
gpt-5.1-codex-max                   1.25    0.125   10
gpt-realtime-2                      4       0.40    24      audio 32/0.40/64     image 5/0.50/-
gpt-realtime-2.1                    4       0.40    24      audio 32/0.40/64     image 5/0.50/-
gpt-realtime-2.1-mini               0.60    0.06    2.40    audio 10/0.30/20     image 0.80/0.08/-
gpt-audio-1.5                       2.50    -       10      audio 32/-/64
gpt-image-1.5                       5       1.25    10      image 8/2/32
gpt-image-2                         5       1.25    -       image 8/2/30
gpt-transcribe                      -       -       -       per-minute 0.0045
"""

# A dated snapshot's suffix: gpt-4o-2024-08-06, gpt-4-0613, claude-…-20240620.
SNAPSHOT_SUFFIX = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{4}|\d{8})\Z")
# LiteLLM's providers whose entries are named as OpenAI names its models.
OPENAI_PROVIDERS = frozenset({"openai", "text-completion-openai"})


@dataclasses.dataclass(frozen=True)
class TokenCounts:
    """What one answer used, by kind. ``cached``, ``audio_input`` and
    ``image_input`` are parts of ``input`` (``cached_audio``, ``cached_image``
    parts of ``cached`` and of ``audio_input``/``image_input``), as
    ``audio_output`` and ``image_output`` are of ``output``: reasoning tokens are
    plain output tokens. ``seconds``, ``characters`` and ``images`` are for what
    an endpoint does not count in tokens (``characters`` and ``images`` set by
    the caller, from the request)."""

    input: int = 0
    cached: int = 0
    audio_input: int = 0
    image_input: int = 0
    output: int = 0
    audio_output: int = 0
    image_output: int = 0
    seconds: float = 0
    characters: int = 0
    images: int = 0
    cached_audio: int = 0
    cached_image: int = 0


def _whole(obj: Any, *names: str) -> int:
    """The first of ``names`` in ``obj`` that is a whole number of 0 or more; else 0."""
    if isinstance(obj, dict):
        for name in names:
            value = obj.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
    return 0


def _part(obj: Any, *names: str) -> Any:
    """The first of ``names`` in ``obj`` that is an object (token details); else {}."""
    if isinstance(obj, dict):
        for name in names:
            if isinstance(obj.get(name), dict):
                return obj[name]
    return {}


def token_counts_of(usage: Any) -> TokenCounts:
    """The token kinds of a usage object of any OpenAI API: chat completions
    (``prompt_tokens_details``), Responses and image generation
    (``input_tokens_details``), realtime ``response.done`` and transcriptions
    (``input_token_details``), embeddings, and a transcription's
    ``{"type": "duration", "seconds": …}``. What is not a count counts 0."""
    if not isinstance(usage, dict):
        return TokenCounts()
    if usage.get("type") == "duration":
        seconds = usage.get("seconds")
        if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) \
                and 0 <= seconds < float("inf"):
            return TokenCounts(seconds=float(seconds))
        return TokenCounts()
    inputs = _part(usage, "prompt_tokens_details", "input_tokens_details", "input_token_details")
    outputs = _part(usage, "completion_tokens_details", "output_tokens_details",
                    "output_token_details")
    cached = _part(inputs, "cached_tokens_details")
    return TokenCounts(
        input=_whole(usage, "prompt_tokens", "input_tokens"),
        cached=_whole(inputs, "cached_tokens"),
        audio_input=_whole(inputs, "audio_tokens"),
        image_input=_whole(inputs, "image_tokens"),
        output=_whole(usage, "completion_tokens", "output_tokens"),
        audio_output=_whole(outputs, "audio_tokens"),
        image_output=_whole(outputs, "image_tokens"),
        cached_audio=_whole(cached, "audio_tokens"),
        cached_image=_whole(cached, "image_tokens"),
    )


def _first(*prices: Optional[int]) -> int:
    """The first price that is set: a kind without its own costs as the next."""
    for price in prices:
        if price is not None:
            return price
    return 0


class Price(NamedTuple):
    """One model's prices, in COST_UNITS_PER_USD per token (per second, per
    character, per image for the last three), None where it has none; and
    ``long``: (tokens, Price) for a request whose input is over that many
    tokens, billed whole at other prices (GPT-5.4 and 5.5 over 272K). A plain
    tuple, so the 2,500 models of a LiteLLM file cost a few hundred KB."""

    input: Optional[int] = None
    cached: Optional[int] = None
    output: Optional[int] = None
    audio_input: Optional[int] = None
    cached_audio: Optional[int] = None
    audio_output: Optional[int] = None
    image_input: Optional[int] = None
    cached_image: Optional[int] = None
    image_output: Optional[int] = None
    second: Optional[int] = None
    character: Optional[int] = None
    image: Optional[int] = None
    long: Optional[Tuple[int, "Price"]] = None

    def cost(self, counts: TokenCounts) -> int:
        """What ``counts`` cost, each kind at its own price (exact, integer).
        Counts that contradict each other (more cached than input) are bounded
        by the whole they are parts of, so no token is priced twice."""
        if self.long is not None and counts.input > self.long[0]:
            return self.long[1].cost(counts)
        (p_input, p_cached, p_output, p_audio, p_cached_audio, p_audio_out,
         p_image, p_cached_image, p_image_out, p_second, p_character, p_image_each, _) = self
        audio = min(counts.audio_input, counts.input)
        image = min(counts.image_input, counts.input - audio)
        text = counts.input - audio - image
        cached = min(counts.cached, counts.input)
        cached_audio = min(counts.cached_audio, audio, cached)
        cached_image = min(counts.cached_image, image, cached - cached_audio)
        cached_text = min(cached - cached_audio - cached_image, text)
        # Cached tokens without their details, more than the text: audio, then image.
        spare = cached - cached_audio - cached_image - cached_text
        more = min(spare, audio - cached_audio)
        cached_audio += more
        cached_image += min(spare - more, image - cached_image)
        audio_out = min(counts.audio_output, counts.output)
        image_out = min(counts.image_output, counts.output - audio_out)
        # A model without a price for text prices its unlabelled tokens as its
        # other kind (LiteLLM's gpt-image-1 has only output_cost_per_image_token).
        cost = ((text - cached_text) * _first(p_input, p_image, p_audio)
                + cached_text * _first(p_cached, p_input, p_image, p_audio)
                + (audio - cached_audio) * _first(p_audio, p_input)
                + cached_audio * _first(p_cached_audio, p_cached, p_audio, p_input)
                + (image - cached_image) * _first(p_image, p_input)
                + cached_image * _first(p_cached_image, p_cached, p_image, p_input)
                + (counts.output - audio_out - image_out) * _first(p_output, p_image_out, p_audio_out)
                + audio_out * _first(p_audio_out, p_output)
                + image_out * _first(p_image_out, p_output)
                + counts.characters * _first(p_character)
                + counts.images * _first(p_image_each))
        if counts.seconds and p_second:
            seconds = decimal.Decimal(repr(float(counts.seconds)))
            cost += int((seconds * p_second).to_integral_value(decimal.ROUND_HALF_UP))
        return cost


class PriceTable:
    """Model name -> Price. ``models`` take part in the fallbacks (a dated
    snapshot priced as its model, a provider prefix ignored); ``exact`` (other
    providers' entries of a LiteLLM file) match only by their exact name."""

    def __init__(self, models: Dict[str, Price], exact: Optional[Dict[str, Price]] = None,
                 sources: Tuple[str, ...] = ()):
        self.models = models
        self.exact = exact or {}
        self.sources = sources

    def __len__(self) -> int:
        return len(self.models) + len(self.exact)

    def lookup(self, model: str) -> Optional[Price]:
        if not isinstance(model, str):
            return None
        price = self.models.get(model)
        if price is None:
            price = self.exact.get(model)
        if price is None:
            for name in self._fallbacks(model):
                price = self.models.get(name)
                if price is not None:
                    break
        return price

    @staticmethod
    def _fallbacks(model: str) -> List[str]:
        """"openai/gpt-4o-2024-08-06" -> "gpt-4o-2024-08-06", "gpt-4o"."""
        bare = model.rsplit("/", 1)[-1]
        names = [bare] if bare != model else []
        undated = SNAPSHOT_SUFFIX.sub("", bare)
        return names + [undated] if undated != bare else names

    def has_price(self, model: str) -> bool:
        return self.lookup(model) is not None

    def cost(self, model: str, counts: TokenCounts) -> Optional[int]:
        """What ``counts`` cost on ``model``, in COST_UNITS_PER_USD; None if it has no price."""
        price = self.lookup(model)
        return None if price is None else price.cost(counts)

    def items(self) -> List[Tuple[str, Price]]:
        return sorted({**self.exact, **self.models}.items())


def usd_units(text: str) -> int:
    """A dollar amount ("5", "0.25", "$5.00") as COST_UNITS_PER_USD, exactly; raises ValueError."""
    try:
        amount = decimal.Decimal(str(text).strip().lstrip("$"))
    except decimal.InvalidOperation:
        raise ValueError(f"not a dollar amount: {text!r}") from None
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"not a dollar amount: {text!r}")
    return int((amount * COST_UNITS_PER_USD).to_integral_value(decimal.ROUND_HALF_UP))


def usd_text(units: int, places: int = 2) -> str:
    """COST_UNITS_PER_USD as dollars with at least ``places`` decimals: "$5.00", "$0.000123"."""
    amount = decimal.Decimal(units) / COST_UNITS_PER_USD
    return "$" + _decimal_text(amount, places)


def _decimal_text(amount: decimal.Decimal, places: int = 2) -> str:
    """At least ``places`` decimals, more only where the amount has them."""
    text = format(amount.normalize(), "f")
    whole, _, fraction = text.partition(".")
    return whole + "." + fraction.ljust(places, "0") if places or fraction else whole


def image_price_name(model: str, size: Optional[str], quality: Optional[str]) -> str:
    """The name DALL-E's per-image price of a size and quality has in the table
    (LiteLLM's: "hd/1024-x-1792/dall-e-3", "256-x-256/dall-e-2"); a name it
    lacks falls back to the model's own price."""
    size_part = (size or "1024x1024").lower().replace("x", "-x-")
    if model.endswith("dall-e-3"):
        return f"{'hd' if quality == 'hd' else 'standard'}/{size_part}/{model}"
    if model.endswith("dall-e-2"):
        return f"{size_part}/{model}"
    return model


# -- the built-in table, and LiteLLM's file -----------------------------------------

# The built-in table's units: how many of what a price is kept per (per token,
# per second, per character, per image) each of its prices is for.
_PER = {"token": 10 ** 6, "per-minute": 60, "per-1M-chars": 10 ** 6, "per-image": 1}
_UNIT_KIND = {"per-minute": "second", "per-1M-chars": "character", "per-image": "image"}


def _units(amount: decimal.Decimal, per: int = 1) -> int:
    """USD ``amount`` for ``per`` of a thing as COST_UNITS_PER_USD for one."""
    return int((amount * COST_UNITS_PER_USD / per).to_integral_value(decimal.ROUND_HALF_UP))


def builtin_prices() -> Dict[str, Price]:
    """BUILTIN_PRICES, parsed."""
    def token(text: str) -> Optional[int]:
        return None if text == "-" else _units(decimal.Decimal(text), _PER["token"])

    models = {}
    for line in BUILTIN_PRICES.strip().splitlines():
        name, *words = line.split()
        prices = dict(zip(("input", "cached", "output"), map(token, words[:3])))
        above: Dict[str, Any] = {}
        for label, value in zip(words[3::2], words[4::2]):
            if label in ("audio", "image"):
                kinds = (label + "_input", "cached_" + label, label + "_output")
                prices.update(zip(kinds, map(token, value.split("/"))))
            elif label.startswith("over-"):  # over-272K: input/cached/output
                above = dict(zip(("input", "cached", "output"), map(token, value.split("/"))))
                above["long"] = int(label[5:-1]) * 1000
            else:
                prices[_UNIT_KIND[label]] = _units(decimal.Decimal(value), _PER[label])
        models[name] = _with_long(prices, above)
    return models


def _with_long(prices: Dict[str, Any], above: Dict[str, Any]) -> Price:
    """A Price of ``prices``; with ``above`` (its "long" the number of input
    tokens), the prices a longer request costs instead, where they differ."""
    if not above:
        return Price(**prices)
    tokens = above.pop("long")
    return Price(**prices, long=(tokens, Price(**{**prices, **above})))


# LiteLLM's field -> the kind it prices (its prices are USD per token, second,
# character or image).
LITELLM_FIELDS = {
    "input_cost_per_token": "input",
    "cache_read_input_token_cost": "cached",
    "output_cost_per_token": "output",
    "input_cost_per_audio_token": "audio_input",
    "cache_read_input_audio_token_cost": "cached_audio",
    "output_cost_per_audio_token": "audio_output",
    "input_cost_per_image_token": "image_input",
    "cache_read_input_image_token_cost": "cached_image",
    "output_cost_per_image_token": "image_output",
    "input_cost_per_second": "second",
    "output_cost_per_second": "second",  # (when there is no input_cost_per_second)
    "input_cost_per_character": "character",
    "output_cost_per_image": "image",
    "input_cost_per_pixel": "image",  # DALL-E: times the pixels its name says
}
LITELLM_KEPT = frozenset(LITELLM_FIELDS) | {"litellm_provider"}
# input_cost_per_token_above_272k_tokens: a request with more input tokens costs this.
LITELLM_LONG = re.compile(r"(\w+?)_above_(\d+)k_tokens\Z")
PIXELS_IN_NAME = re.compile(r"(?:^|/)(\d+)-x-(\d+)/")


def _kept(key: str) -> bool:
    if key in LITELLM_KEPT:
        return True
    long = LITELLM_LONG.match(key) if key.endswith("k_tokens") else None
    return long is not None and long.group(1) in LITELLM_FIELDS


def _only_prices(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    """json's object hook: each object keeps only the values prices need (and
    the entries themselves; other keys say None), so a 2,000-model file is
    never whole in memory."""
    return {key: value if isinstance(value, dict) or _kept(key) else None
            for key, value in pairs}


def _litellm_amount(value: Any, where: str) -> Optional[decimal.Decimal]:
    """A price of the file as an exact Decimal (1.5e-07 is 0.00000015, not the
    float's binary neighbour); None for null; ConfigError if not a number >= 0."""
    if value is None:
        return None
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise decimal.InvalidOperation
        amount = decimal.Decimal(repr(value) if isinstance(value, float) else str(value).strip())
    except decimal.InvalidOperation:
        amount = decimal.Decimal("NaN")
    if not amount.is_finite() or amount < 0:
        raise ConfigError(f"PRICES_FILE: {where} must be a number of 0 or more, got {value!r}"[:300])
    return amount


def litellm_price(name: str, entry: Dict[str, Any]) -> Optional[Price]:
    """One entry of LiteLLM's file as a Price; None if it prices nothing worker.py
    counts. Of its long-context tiers (``…_above_272k_tokens``), the first."""
    prices = _litellm_prices(name, entry, "")
    if not prices:
        return None
    tiers = [LITELLM_LONG.match(key) for key in entry if key.endswith("k_tokens")]
    thousands = sorted(int(tier.group(2)) for tier in tiers if tier is not None)
    above = _litellm_prices(name, entry, f"_above_{thousands[0]}k_tokens") if thousands else {}
    return _with_long(prices, dict(above, long=thousands[0] * 1000) if above else {})


def _litellm_prices(name: str, entry: Dict[str, Any], suffix: str) -> Dict[str, int]:
    """The kinds an entry prices (with ``suffix``: those of a long-context tier)."""
    prices: Dict[str, int] = {}
    for field in sorted(LITELLM_FIELDS, key=lambda f: f.startswith("output_cost_per_second")):
        field += suffix
        amount = _litellm_amount(entry.get(field), f"{name!r}: {field}"[:200])
        kind = LITELLM_FIELDS[field[:len(field) - len(suffix)]]
        if amount is None or kind in prices:
            continue
        if field == "input_cost_per_pixel":
            pixels = PIXELS_IN_NAME.search(name)
            if pixels is None:
                continue
            amount *= int(pixels.group(1)) * int(pixels.group(2))
        prices[kind] = _units(amount)
    return prices


def read_price_file(path: str) -> Dict[str, Any]:
    """The JSON object of a price file, reduced to what prices need; ConfigError if bad."""
    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not a number")

    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(), object_pairs_hook=_only_prices,
                              parse_constant=no_constants)
    except OSError as e:
        raise ConfigError(f"PRICES_FILE: cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:  # (UnicodeDecodeError and JSONDecodeError too)
        raise ConfigError(f"PRICES_FILE: {path} is not JSON: {e}".splitlines()[0][:300]) from None
    if not isinstance(data, dict):
        raise ConfigError(f"PRICES_FILE: {path} must hold a JSON object of models and prices")
    return data


def _sharing(price: Price, shared: Dict[int, int]) -> Price:
    """``price`` with its ints taken from ``shared``: one object per distinct price."""
    long = price.long and (price.long[0], _sharing(price.long[1], shared))
    return Price._make([None if value is None else shared.setdefault(value, value)
                        for value in price[:-1]] + [long])


def load_prices(path: Optional[str]) -> PriceTable:
    """The built-in prices, extended and overridden by the LiteLLM-format file
    at ``path`` if any (its "sample_spec" skipped; entries of providers other
    than OpenAI kept by their exact name only). ConfigError naming PRICES_FILE
    on a file that cannot be read, is not a JSON object, or has a bad price."""
    models = builtin_prices()
    sources = [f"built-in: OpenAI's prices of {PRICES_DATE}, {PRICES_SOURCE}"]
    exact: Dict[str, Price] = {}
    if path:
        shared: Dict[int, int] = {}  # one int object per distinct price
        count = 0
        for name, entry in read_price_file(path).items():
            if name == "sample_spec":
                continue
            if not isinstance(entry, dict):
                raise ConfigError(f"PRICES_FILE: {name!r} must be an object of prices"[:300])
            price = litellm_price(name, entry)
            if price is None:
                continue
            price = _sharing(price, shared)
            provider = entry.get("litellm_provider")
            if provider is None or provider in OPENAI_PROVIDERS:
                models[name] = price
            else:
                exact[name] = price
            count += 1
        sources.append(f"PRICES_FILE {path}: {count} models")
    return PriceTable(models, exact, tuple(sources))


# -- `python worker.py prices` ---------------------------------------------------------

def _per_million(units: Optional[int], unit: str = "token") -> str:
    if units is None:
        return "-"
    return _decimal_text(decimal.Decimal(units * _PER[unit]) / COST_UNITS_PER_USD)


def price_row(name: str, price: Price) -> List[str]:
    """One model's line of `prices`: USD per 1M tokens, per minute, per 1M characters, per image."""
    def triple(label: str) -> str:
        kinds = (label + "_input", "cached_" + label, label + "_output")
        values = [getattr(price, kind) for kind in kinds]
        return "" if values == [None] * 3 else "/".join(map(_per_million, values))

    def long() -> str:
        if price.long is None:
            return ""
        tokens, above = price.long
        return f"over-{tokens // 1000}K " + "/".join(
            map(_per_million, (above.input, above.cached, above.output)))

    return [name, _per_million(price.input), _per_million(price.cached),
            _per_million(price.output), triple("audio"), triple("image"),
            "" if price.second is None else _per_million(price.second, "per-minute"),
            "" if price.character is None else _per_million(price.character, "per-1M-chars"),
            "" if price.image is None else _per_million(price.image, "per-image"), long()]


def prices_text(table: PriceTable) -> str:
    """The table in effect, one aligned line per model."""
    rows = [["model", "input", "cached", "output", "audio in/cached/out",
             "image in/cached/out", "per-minute", "per-1M-chars", "per-image",
             "longer input: in/cached/out"]]
    rows += [price_row(name, price) for name, price in table.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in rows]
    head = [f"# prices in effect ({len(table)} models), in USD per 1M tokens: input, cached input, "
            f"output, audio and image tokens in/cached/out;",
            "# per minute of audio, per 1M characters, per image. '-': as input (output). "
            "over-N: the prices of a request with more input tokens."]
    head += [f"# {source}" for source in table.sources]
    return "\n".join(head + lines) + "\n"


def prices_json(table: PriceTable) -> str:
    """The table in effect in LiteLLM's format (USD per token…): PRICES_FILE takes it back."""
    fields = {kind: field for field, kind in LITELLM_FIELDS.items()
              if field not in ("output_cost_per_second", "input_cost_per_pixel")}

    def entry(price: Price) -> Dict[str, float]:
        usd = {fields[kind]: float(decimal.Decimal(units) / COST_UNITS_PER_USD)
               for kind, units in zip(Price._fields, price[:-1]) if units is not None}
        if price.long is not None:
            tokens, above = price.long
            usd.update((f"{field}_above_{tokens // 1000}k_tokens", value)
                       for field, value in entry(above).items() if usd.get(field) != value)
        return usd

    models = {name: entry(price) for name, price in table.items()}
    return json.dumps({"sample_spec": {"date": PRICES_DATE, "sources": list(table.sources)},
                       **models}, indent=1) + "\n"


# ---------------------------------------------------------------------------
# Isolation: who created which object, and who may see it
# ---------------------------------------------------------------------------

# The collections whose objects OpenAI keeps (docs/openai-endpoints.tsv),
# with the kind its 404 names. An object created through the proxy belongs to
# its creator; one that was not belongs to nobody.
OWNED_COLLECTIONS = {
    "files": "File", "uploads": "Upload", "batches": "Batch",
    "fine_tuning/jobs": "FineTuningJob", "assistants": "Assistant", "threads": "Thread",
    "vector_stores": "VectorStore", "chat/completions": "ChatCompletion", "responses": "Response",
    "conversations": "Conversation", "containers": "Container", "evals": "Eval", "videos": "Video",
    "videos/characters": "Character", "skills": "Skill", "audio/voice_consents": "VoiceConsent",
}
LISTED_COLLECTIONS = frozenset(
    "files batches fine_tuning/jobs assistants vector_stores chat/completions containers evals "
    "videos conversations skills audio/voice_consents".split())
COLLECTION_PATH = re.compile(
    r"/v\d+/(fine_tuning/jobs|chat/completions|videos/characters|audio/voice_consents|files"
    r"|uploads|batches|assistants|threads|vector_stores|responses|conversations|containers|evals"
    r"|videos|skills)(?:/([^/]+))?(/.*)?\Z")
NOT_AN_ID = {("responses", "input_tokens"), ("responses", "compact"), ("threads", "runs"),
             ("videos", "edits"), ("videos", "extensions")}
# POSTs that make an object of a collection other than the path's: the run's
# thread, an edited, extended or remixed video.
MAKES_OTHER = {("threads", "runs"): "threads", ("videos", "edits"): "videos",
               ("videos", "extensions"): "videos", ("videos", "/remix"): "videos"}
# What OpenAI deletes by itself after 30 days, and so does the record of it.
EXPIRING_COLLECTIONS = {"responses": 30, "chat/completions": 30}
# The account's administration (the Admin API: /organization/…, /projects/…
# roles; the rows marked [admin: …] in openai-endpoints.tsv), and ChatKit
# threads, which ChatKit's widgets create for their end users, so no user of
# this proxy can be named owner.
ADMIN_ONLY_PATH = re.compile(
    r"/v\d+/(organization|projects|fine_tuning/checkpoints|chatkit/threads)(/|\Z)")
# Keys of request bodies whose values are ids of objects (openai-endpoints.tsv).
REFERENCE_KEYS = frozenset(
    "file_id file_ids input_file_id training_file validation_file vector_store_ids "
    "previous_response_id assistant_id conversation container".split())
# A body is parsed for references only if one of these is in it; a \u escape
# could spell a key otherwise unseen.
REFERENCE_MARKERS = tuple(f'"{key}"'.encode() for key in REFERENCE_KEYS) + (b"\\u",)
ID_PREFIXES = (("file-", "File"), ("vs_", "VectorStore"), ("resp_", "Response"),
               ("asst_", "Assistant"), ("conv_", "Conversation"), ("thread_", "Thread"),
               ("batch_", "Batch"), ("ftjob-", "FineTuningJob"), ("chatcmpl-", "ChatCompletion"),
               ("cntr_", "Container"), ("eval_", "Eval"), ("video_", "Video"), ("upload_", "Upload"))
FIRST_ID = re.compile(rb'"id"\s*:\s*"([^"\\]{1,200})"')
THREAD_ID = re.compile(rb'"thread_id"\s*:\s*"([^"\\]{1,200})"')
LIST_PAGE_LIMIT = 100  # upstream list pages are asked for this big ...
LIST_PAGES_MAX = 1000  # ... and at most this many read for one client page (a safety valve)


def no_such_object(object_id: str, kind: Optional[str] = None) -> ApiError:
    """OpenAI's answer for an id it does not know, which is what another user's is."""
    if kind is None:
        kind = next((k for prefix, k in ID_PREFIXES if object_id.startswith(prefix)), "")
    error = ApiError(404, f"No such {kind} object: {object_id}".replace("  ", " "))
    error.param = "id"
    return error


def referenced_ids(obj: Any) -> List[str]:
    """Every id a request body refers to, by the keys that hold ids, at any depth."""
    found: List[str] = []
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            for key, value in item.items():
                if key in REFERENCE_KEYS:
                    if isinstance(value, str):
                        found.append(value)
                    elif isinstance(value, list):
                        found.extend(v for v in value if isinstance(v, str))
                    elif isinstance(value, dict) and isinstance(value.get("id"), str):
                        found.append(value["id"])  # "conversation": {"id": …}
                if isinstance(value, (dict, list)):
                    stack.append(value)
            if item.get("type") == "file_id" and isinstance(item.get("id"), str):
                found.append(item["id"])  # an eval run's data source
    return found


def produced_files(obj: Any) -> List[str]:
    """The files an owned object says were made for it: a batch's results, a
    fine-tuning job's, a completed upload's file. Top-level fields only: ids
    in metadata are the caller's words, not OpenAI's."""
    if not isinstance(obj, dict):
        return []
    files = [obj.get("output_file_id"), obj.get("error_file_id")]
    if isinstance(obj.get("result_files"), list):
        files += obj["result_files"]
    if obj.get("object") == "upload" and isinstance(obj.get("file"), dict):
        files.append(obj["file"].get("id"))
    return [f for f in files if isinstance(f, str) and f]


def route_path(path: str) -> str:
    """The path as an upstream that decodes and normalises it would read it, so
    ``/v1/%66iles/…``, ``/v1//files/…`` and ``/v1/x/../files/…`` are checked as
    ``/v1/files/…``; a doubled ``/v1/v1`` counts once."""
    return without_doubled_version(posixpath.normpath("/" + urllib.parse.unquote(path).lstrip("/")))


DOUBLED_VERSION = re.compile(r"/v\d+/v\d+(/|\Z)")


def without_doubled_version(path: str) -> str:
    """``/v1/v1/…`` (a base URL that had /v1 and got it again) as ``/v1/…``."""
    while DOUBLED_VERSION.match(path):
        path = path[path.index("/", 1):]
    return path


class Ownership:
    """Which user created which object. A proxied request writes its claims
    before its answer ends (so another instance knows the object as soon as
    the client does); the others' are written with the usage."""

    def __init__(self, store: "Store"):
        self.store = store
        self.pending: Dict[str, Optional[Dict[str, Any]]] = {}  # id -> record, None = released
        self._flushing = asyncio.Lock()

    async def owner(self, object_id: str) -> Optional[str]:
        record = (self.pending[object_id] if object_id in self.pending
                  else await self.store.object_record(object_id))
        if record is None or expiry_passed(record):
            return None
        return record["user"]

    def claim(self, name: str, object_id: str, kind: str, days: Optional[int] = None,
              counted: bool = True) -> None:
        """``counted=False``: its usage is not known yet (``count_once``)."""
        now = utcnow()
        expires = iso(now + datetime.timedelta(days=days)) if days else None
        self.pending[object_id] = {"user": name, "kind": kind, "created": iso(now),
                                   "expires": expires, **({} if counted else {"counted": False})}

    def release(self, object_id: str) -> None:
        self.pending[object_id] = None

    async def count_once(self, object_id: str) -> bool:
        """``Store.count_once`` for a record that may not be written yet (an
        object fetched a moment after its creation): written first."""
        if object_id in self.pending:
            await self.flush()
        return await self.store.count_once(object_id)

    async def flush(self, durable: bool = True) -> None:
        async with self._flushing:  # (so a last flush at exit sees what one in the air kept)
            batch, self.pending = self.pending, {}
            if not batch:
                return
            try:
                await self.store.write_objects(batch, durable)
            except Exception as e:
                if not isinstance(e, StoreUnavailable):  # (that one the store has said)
                    log.exception("ownership: writing failed; keeping the records for the next try")
                self.pending = {**batch, **self.pending}


# ---------------------------------------------------------------------------
# The shared base handler: CORS, error bodies, the access log
# ---------------------------------------------------------------------------

def http1(request: tornado.httputil.HTTPServerRequest) -> tornado.http1connection.HTTP1Connection:
    """The request's connection: Tornado's HTTP/1 server makes every one (its
    type says only an HTTPConnection, or None)."""
    return cast(tornado.http1connection.HTTP1Connection, request.connection)


class BaseHandler(tornado.web.RequestHandler):
    """Owns what every route shares: CORS headers, errors, and the log line."""

    @property
    def app(self) -> "App":
        return self.application.settings["app"]

    def initialize(self) -> None:
        self.log_user = "-"
        self.log_model = "-"
        self.log_tokens = "-"
        self.log_cost = "-"
        self.app.active.add(self)
        self.app.idle_clients.pop(http1(self.request).stream, None)  # busy now

    def on_finish(self) -> None:
        self.app.active.discard(self)
        stream = getattr(self.request.connection, "stream", None)  # (None once a WebSocket)
        if stream is not None and not stream.closed():  # kept alive for its next request
            self.app.idle_clients[stream] = time.monotonic()

    def on_connection_close(self) -> None:
        self.app.active.discard(self)
        super().on_connection_close()

    def set_default_headers(self) -> None:
        self.clear_header("Server")
        origin = self.app.cors_origin(self.request.headers.get("Origin"))
        if origin:
            self.set_header("Access-Control-Allow-Origin", origin)
            self.set_header("Access-Control-Expose-Headers", "*")
            if origin != "*":
                self.set_header("Vary", "Origin")

    def compute_etag(self) -> Optional[str]:
        return None  # answers are passed through or freshly made: never 304

    def answer_preflight(self) -> None:
        """CORS preflight, answered here: browsers send no key with it."""
        self.set_status(204)
        self.set_header("Access-Control-Allow-Methods", CORS_ALLOW_METHODS)
        self.set_header("Access-Control-Allow-Headers",
                        self.request.headers.get("Access-Control-Request-Headers")
                        or CORS_DEFAULT_HEADERS)
        self.set_header("Access-Control-Max-Age", "86400")

    @property
    def log_path(self) -> str:
        """The request path as logs may show it: no query string, no token."""
        return self.request.path

    def _request_summary(self) -> str:
        # Tornado's own logs (uncaught exceptions) print this; keep secrets out.
        return f"{self.request.method} {self.log_path} ({self.app.client_address(self.request)})"

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        """Tornado's version also prints ``repr(request)``, whose URI can hold the
        admin token or a key in a query string: this one prints the summary only."""
        if isinstance(value, (tornado.web.HTTPError, StoreError)):
            return  # answered with its own status; nothing went wrong here
        log.error("uncaught exception in %s", self._request_summary(), exc_info=(typ, value, tb))

    def api_error(self, status_code: int, error: Optional[BaseException]) -> ApiError:
        """What to answer for ``error``: the one place where the store's
        refusals (a user deleted or changed meanwhile) become their status."""
        if isinstance(error, ApiError):
            return error
        if isinstance(error, StoreError):
            return ApiError(error.status, str(error), code=STORE_ERROR_CODES.get(error.status))
        kind = "server_error" if status_code >= 500 else "invalid_request_error"
        reason = getattr(error, "reason", None) or tornado.httputil.responses.get(status_code, "Unknown")
        return ApiError(status_code, reason, kind)

    def finish_json(self, data: Dict[str, Any]) -> None:
        """A JSON answer, ending in a newline as every answer curl shows."""
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(json.dumps(data) + "\n")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None))[1]
        if not isinstance(error, ApiError) and status_code == 405:
            error = method_not_allowed(self.request.method, self.log_path, self.allowed_methods())
        else:
            error = self.api_error(status_code, error)
        self.set_status(error.status_code)
        for name, value in error.headers.items():
            self.set_header(name, value)
        self.set_header("Content-Type", "application/json")
        self.finish(self.app.redactor.redact(json.dumps(error.body())) + "\n")


    def allowed_methods(self) -> str:
        """The methods this route answers: a 405's ``Allow`` (RFC 9110 §10.2.1)."""
        base = tornado.web.RequestHandler
        return ", ".join(m for m in HTTP_METHODS
                         if getattr(type(self), m.lower()) is not getattr(base, m.lower()))


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def method_not_allowed(method: str, path: str, allowed: str) -> ApiError:
    """A method the route does not take (``PUT /me``), or Tornado refuses before
    any handler runs (``PROPFIND``, ``get``)."""
    return ApiError(405, f"Invalid method for URL ({method[:20]} {path}): it takes "
                         f"{allowed}.", code="method_not_allowed", headers={"Allow": allowed})


class ForbiddenHandler(BaseHandler):
    """Anything that is not a route: 403, as in the seed."""

    @property
    def log_path(self) -> str:
        return "/***"  # it may be the admin token, near-missed or not

    def prepare(self) -> None:
        self.set_status(403)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish("Access forbidden\n")


class HealthHandler(BaseHandler):
    """``ok``; ``degraded`` with 503 while the shared store does not answer."""

    async def get(self) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        if await self.app.store.kv.ping():
            self.finish("ok")
        else:
            self.set_status(503)
            self.finish("degraded")

    head = get


class MissingVersionHandler(BaseHandler):
    """``/chat/completions`` and friends: say how to fix the base URL."""

    def prepare(self) -> None:
        if self.request.method == "OPTIONS":
            return
        base = f"{self.request.protocol}://{self.request.host}/v1"
        raise ApiError(404, f"Invalid URL ({self.request.method} {self.request.path}): "
                            f"this proxy serves the OpenAI API below /v1, so the base URL "
                            f"must end in /v1 ({base})", code="unknown_url")

    def options(self, *args: str) -> None:
        self.answer_preflight()


# ---------------------------------------------------------------------------
# Authentication of user keys
# ---------------------------------------------------------------------------

def bearer(headers: tornado.httputil.HTTPHeaders) -> Optional[str]:
    """What follows ``Authorization: Bearer`` ("" if nothing); None for no such header."""
    scheme, _, value = headers.get("Authorization", "").strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def key_from_headers(headers: tornado.httputil.HTTPHeaders) -> Optional[str]:
    """The caller's key from ``Authorization: Bearer …`` or ``api-key: …``."""
    return bearer(headers) or headers.get("api-key", "").strip() or None


async def authenticate(store: Store, headers: tornado.httputil.HTTPHeaders,
                       key: Optional[str] = None) -> Dict[str, Any]:
    """The user the request's key belongs to; raises 401 in OpenAI's shape."""
    key = key_from_headers(headers) or key
    if key is None:
        raise invalid_api_key(
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
    user = await store.user_for_key(key)
    if user is None:
        raise invalid_api_key(
            "Incorrect API key provided. Ask the owner of this proxy for a valid key.")
    if expiry_passed(user):
        raise invalid_api_key(f"This API key expired at {user['expires']}. "
                              "Ask the owner of this proxy to extend it.")
    return user


# ---------------------------------------------------------------------------
# The upstream client: kept-alive connections, back-pressure, cancel
# ---------------------------------------------------------------------------

class UpstreamClient(tornado.httpclient.AsyncHTTPClient):
    """An ``AsyncHTTPClient`` for one purpose: talking to the upstream API.

    Tornado's simple_httpclient opens a new connection for every request (and
    against OpenAI, a new TLS handshake). This one keeps finished connections
    open for the next request (HTTP/1.1 keep-alive, ``MAX_IDLE_PER_HOST``
    of them, closed after ``IDLE_SECONDS``), hands an answer to the
    ``UpstreamReceiver`` given to ``send`` as it arrives (one that returns an
    awaitable pauses reading until it is done: back-pressure from a slow
    client), and can ``cancel`` a request at once, also before the upstream
    has sent a byte (tornado issue #157). Its connections are
    asyncio protocols (``UpstreamConnection``), not Tornado IOStreams: an
    IOStream pays a future and a reader toggle for every read, which cost
    more than the rest of a small request. Installed with
    ``AsyncHTTPClient.configure(UpstreamClient)``.
    """

    MAX_IDLE_PER_HOST = 256
    IDLE_SECONDS = 30.0

    def initialize(self, defaults: Optional[Dict[str, Any]] = None) -> None:
        super().initialize(defaults)
        self.tls: Optional[ssl.SSLContext] = None  # made when first needed: loading CAs takes 30 ms
        self.idle: Dict[Tuple[str, str, int], List["UpstreamConnection"]] = {}
        # Requests in flight, by id(request): their connection once they have one.
        self.in_flight: Dict[int, Optional["UpstreamConnection"]] = {}
        self.connecting: Dict[int, "asyncio.Future[Any]"] = {}  # ... those still connecting
        self.cancelled: set = set()
        self.sweeper = tornado.ioloop.PeriodicCallback(self._close_idle, 5000)
        self.sweeper.start()

    def close(self) -> None:
        self.sweeper.stop()
        for idle in self.idle.values():
            for connection in idle:
                connection.close()
        self.idle.clear()
        super().close()

    def cancel(self, request: tornado.httpclient.HTTPRequest) -> None:
        """End ``request`` now: its connection is closed, its fetch fails with 599."""
        if id(request) not in self.in_flight:
            return  # done already (and its id may soon be another request's)
        self.cancelled.add(id(request))
        connection = self.in_flight[id(request)]
        if connection is not None:
            connection.abort()
        elif id(request) in self.connecting:
            self.connecting[id(request)].cancel()

    def fetch_impl(self, request: tornado.httpclient.HTTPRequest,
                   callback: Callable[[tornado.httpclient.HTTPResponse], None]) -> None:
        task = asyncio.ensure_future(self.send(request))
        task.add_done_callback(lambda done: callback(done.result()))

    def start(self, request: tornado.httpclient.HTTPRequest,
              receiver: "UpstreamReceiver") -> "asyncio.Future[Any]":
        """``send(request, receiver)`` in a task of its own, for a request whose
        body is sent as it arrives, while its caller goes on receiving it."""
        return asyncio.ensure_future(self.send(request, receiver))

    async def send(self, request: tornado.httpclient.HTTPRequest,
                   receiver: Optional["UpstreamReceiver"] = None) -> tornado.httpclient.HTTPResponse:
        """``fetch(request, raise_error=False)`` for the proxy's own requests,
        without fetch's copy of the headers, its wrapper and its task (awaited
        in the caller's: two loop turns fewer): ``request`` has every setting it
        needs, and its headers are made for it alone. The answer's head and
        body go to ``receiver`` as they arrive (the response returned has no
        body then); its end is this call's return."""
        start = time.monotonic()
        self.in_flight[id(request)] = None
        timed_out = []

        def on_timeout() -> None:
            timed_out.append(True)
            self.cancel(request)

        loop = asyncio.get_running_loop()
        deadline = loop.call_later(request.request_timeout or 1e9, on_timeout)
        try:
            return await self._exchange(request, receiver, start)
        except Exception as caught:
            error = tornado.simple_httpclient.HTTPTimeoutError("Timeout") if timed_out else caught
            # Its traceback's frames hold the futures that hold it: a cycle, left
            # to the cyclic GC. Only the error's kind is ever shown, so let go.
            error.__traceback__ = error.__context__ = None
            return tornado.httpclient.HTTPResponse(
                request, 599, error=error, request_time=time.monotonic() - start)
        finally:
            deadline.cancel()
            self.cancelled.discard(id(request))
            self.in_flight.pop(id(request), None)

    async def _exchange(self, request: tornado.httpclient.HTTPRequest,
                        receiver: Optional["UpstreamReceiver"],
                        start: float) -> tornado.httpclient.HTTPResponse:
        url = urllib.parse.urlsplit(request.url)
        key = (url.scheme, url.hostname or "", url.port or (443 if url.scheme == "https" else 80))
        head, chunked = request_head(request, url)
        # A streamed body cannot be sent twice, so it never risks a stale connection.
        replayable = request.body_producer is None
        for attempt in range(2):
            connection = self._idle_connection(key) if replayable else None
            reused = connection is not None
            if connection is None:
                connection = await self._connect(key, request)
            self.in_flight[id(request)] = connection
            if id(request) in self.cancelled:
                connection.abort()
            answer = _UpstreamAnswer(request, receiver)
            try:
                await connection.exchange(head, request, chunked, answer)
            except (tornado.iostream.StreamClosedError, OSError):
                # The upstream had closed the idle connection as this request
                # went out: once more, on a new one, if that cannot run it twice.
                if (reused and not answer.started and attempt == 0
                        and id(request) not in self.cancelled
                        and request.method in IDEMPOTENT_METHODS):
                    continue
                raise
            if connection.reusable:
                self._release(key, connection)
            else:
                connection.abort()  # (nothing left to say on it, nor to send)
            assert answer.code is not None, "an exchange ends after its answer's head"
            return tornado.httpclient.HTTPResponse(
                request, answer.code, reason=answer.reason, headers=answer.headers,
                buffer=io.BytesIO(b"".join(answer.body)),
                effective_url=request.url, request_time=time.monotonic() - start)
        raise AssertionError("unreachable")

    async def _connect(self, key: Tuple[str, str, int],
                       request: tornado.httpclient.HTTPRequest) -> "UpstreamConnection":
        """A new connection; ``cancel(request)`` stops the attempt at once."""
        scheme, host, port = key
        timeout = min(request.connect_timeout or 1e9, request.request_timeout or 1e9)
        if scheme == "https" and self.tls is None:
            self.tls = ssl.create_default_context()
        tls = self.tls if scheme == "https" else None
        attempt = asyncio.ensure_future(asyncio.get_running_loop().create_connection(
            UpstreamConnection, host, port, ssl=tls, server_hostname=host if tls else None,
            happy_eyeballs_delay=0.3))
        self.connecting[id(request)] = attempt
        try:
            done, _ = await asyncio.wait([attempt], timeout=timeout)
        finally:
            self.connecting.pop(id(request), None)
        if not done:
            attempt.cancel()
            attempt.add_done_callback(_close_late_connection)
            raise tornado.simple_httpclient.HTTPTimeoutError("Timeout while connecting")
        if attempt.cancelled():
            raise tornado.iostream.StreamClosedError()  # cancel()
        _, connection = attempt.result()
        return connection

    def _idle_connection(self, key: Tuple[str, str, int]) -> Optional["UpstreamConnection"]:
        idle = self.idle.get(key)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if now - connection.idle_since < self.IDLE_SECONDS and connection.usable():
                return connection
            connection.close()
        return None

    def _release(self, key: Tuple[str, str, int], connection: "UpstreamConnection") -> None:
        idle = self.idle.setdefault(key, [])
        if len(idle) < self.MAX_IDLE_PER_HOST:
            connection.idle_since = time.monotonic()
            idle.append(connection)
        else:
            connection.close()

    def _close_idle(self) -> None:
        now = time.monotonic()
        for key, idle in self.idle.items():
            self.idle[key] = []
            for connection in idle:
                if now - connection.idle_since < self.IDLE_SECONDS and not connection.ended:
                    self.idle[key].append(connection)
                else:
                    connection.close()


def _close_late_connection(attempt: "asyncio.Future[Any]") -> None:
    """A connection that came after its request gave up on it."""
    if not attempt.cancelled() and attempt.exception() is None:
        attempt.result()[0].abort()


def request_head(request: tornado.httpclient.HTTPRequest,
                 url: urllib.parse.SplitResult) -> Tuple[bytes, bool]:
    """The request line and headers to send, and whether the body goes chunked
    (a streamed POST, PUT or PATCH body of unknown length)."""
    headers = request.headers  # the caller's to give: no copy
    if "Host" not in headers:
        headers["Host"] = url.netloc.rpartition("@")[2]
    body, producer, method = request.body, request.body_producer, request.method
    chunked = False
    if body is not None or (producer is None and method in STREAMED_BODY_METHODS):
        headers["Content-Length"] = str(len(body or b""))
    elif producer is not None and "Content-Length" not in headers:
        if method not in STREAMED_BODY_METHODS:
            raise ValueError(f"a streamed {method} body needs a Content-Length")
        headers["Transfer-Encoding"] = "chunked"
        chunked = True
    target = (url.path or "/") + (f"?{url.query}" if url.query else "")
    lines = [f"{method} {target} HTTP/1.1"]
    lines.extend(f"{name}: {value}" for name, value in headers.get_all())
    text = "\r\n".join(lines)
    if text.count("\n") != len(lines) - 1 or text.count("\r") != len(lines) - 1:
        raise ValueError("a line break inside a request header")
    return (text + "\r\n\r\n").encode("latin-1"), chunked


HEAD_LIMIT = 65536  # an upstream answer's status line and headers
CHUNK_SIZE_LINE = re.compile(rb"([0-9a-fA-F]{1,15})(?:[ \t]*;[^\r\n]*)?\r\n")


# One header field line: its name, and its value (the spaces around it are
# stripped after: a pattern that left them to the regex would backtrack).
FIELD_LINE = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+):([^\x00-\x08\x0a-\x1f\x7f]*)\r*\n")


def parse_fields(text: str) -> tornado.httputil.HTTPHeaders:
    """Header fields as the upstream sent them. Each line is checked once, here
    (Tornado's ``HTTPHeaders.parse`` checks each in three steps, and ``add``
    twice more: an OpenAI answer has twenty-odd fields), in time linear in its
    length. A folded line (obsolete) is refused too: RFC 9112 §5.2 lets a proxy
    answer 502 for it."""
    headers = tornado.httputil.HTTPHeaders()
    text, at = text + "\n" if text else "", 0  # (the head's last line comes without its end)
    while at < len(text):
        field = FIELD_LINE.match(text, at)
        if field is None:
            raise tornado.httputil.HTTPInputError("a malformed header line from the upstream")
        add_checked_field(headers, field.group(1), field.group(2).strip(" \t"))
        at = field.end()
    return headers


def add_checked_field(headers: tornado.httputil.HTTPHeaders, name: str, value: str) -> None:
    """``headers.add`` for a field already checked as it was parsed (by Tornado,
    or by parse_fields), without ``add``'s second check of it."""
    if name in headers:
        headers.add(name, value)  # (a repeated field, as Set-Cookie may be)
    else:
        headers[name] = value


class UpstreamConnection(asyncio.Protocol):
    """One upstream connection: a request written, its answer parsed as bytes
    arrive and handed to an ``_UpstreamAnswer``, then the next request.

    Reading pauses while the answer's consumer is behind (its callback
    returned an awaitable) and the connection stays registered for reading
    while idle, so an upstream that closes it is noticed at once. Nothing
    past an answer's end is taken as the next one's start: a connection with
    bytes left over is not reused."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.fileno = -1
        self.buffer = b""
        self.searched = 0  # how much of the buffer holds no head's (or trailers') end
        self.answer: Optional[_UpstreamAnswer] = None  # the exchange in progress
        self.done: Optional["asyncio.Future[None]"] = None
        self.step: Callable[[], bool] = self._read_head  # what the next bytes are
        self.left = 0  # body bytes (or the current chunk's) still to come
        self.crlf = False  # a chunk's data is done: its CRLF comes next
        self.waiting = False  # on the answer's consumer: reading paused
        self.ended = False  # the upstream closed its side (or all of it)
        self.aborted = False
        self.sending = False
        self.reusable = False
        self.writable: Optional["asyncio.Future[None]"] = None  # while the socket is full
        self.idle_since = 0.0

    # -- asyncio's calls ------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        self.fileno = sock.fileno() if sock is not None else -1

    def data_received(self, data: bytes) -> None:
        if self.answer is None:
            self.abort()  # between exchanges: a peer talking out of turn
            return
        self.buffer = self.buffer + data if self.buffer else data
        if not self.waiting:
            self._advance()

    def eof_received(self) -> Optional[bool]:
        self._end()
        return None  # (the transport closes)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._end()

    def pause_writing(self) -> None:
        self.writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        self.writable = None

    # -- used by UpstreamClient -----------------------------------------------

    def usable(self) -> bool:
        """Idle, open, and with nothing to read (the upstream may have closed it
        a moment ago: its FIN would be waiting in the socket)."""
        if self.ended or self.transport.is_closing():
            return False
        poll = select.poll()  # (select.select refuses descriptors past 1023)
        poll.register(self.fileno, select.POLLIN)
        try:
            return not poll.poll(0)
        except OSError:
            return False

    async def exchange(self, head: bytes, request: tornado.httpclient.HTTPRequest,
                       chunked: bool, answer: "_UpstreamAnswer") -> None:
        """Send ``request`` (``head`` made by ``request_head``); its answer goes to
        ``answer``. Raises StreamClosedError (or HTTPInputError) if it does not
        come whole."""
        self.answer, self.step, self.reusable, self.searched = answer, self._read_head, False, 0
        done = self.done = asyncio.get_running_loop().create_future()
        if self.ended or self.aborted:  # (cancelled while connecting, or lost since)
            self._fail(tornado.iostream.StreamClosedError())
            await done
        body = request.body
        if request.body_producer is not None:
            self.transport.write(head)
            self.sending = True
            try:
                await request.body_producer(  # (Tornado types write() as returning None, not a Future)
                    self.write_chunked if chunked else self.write)  # type: ignore[arg-type]
                if chunked:
                    await self.write(b"0\r\n\r\n")
            except Exception:
                if done.done() and done.exception() is None:
                    return  # answered before the whole body was sent (not reused)
                self.abort()
                _retrieve(done)  # (the producer's error is the one to raise)
                raise
            finally:
                self.sending = False
        elif body and len(body) > 65536:
            self.transport.write(head)
            self.transport.write(body)
        else:
            self.transport.write(head + body if body else head)
        await done

    async def write(self, data: bytes) -> None:
        """A piece of a streamed body; returns once the socket has taken it."""
        if self.answer is None or self.ended or self.transport.is_closing():
            raise tornado.iostream.StreamClosedError()
        self.transport.write(data)
        if self.writable is not None:
            await self.writable

    async def write_chunked(self, data: bytes) -> None:
        if data:
            await self.write(b"%x\r\n%b\r\n" % (len(data), data))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection now, mid-answer or not."""
        self.aborted = True
        if self.transport is not None:
            self.transport.abort()  # (connection_lost follows, on the next loop turn)
        self._fail(tornado.iostream.StreamClosedError())

    # -- reading an answer ------------------------------------------------------

    def _end(self) -> None:
        self.ended = True
        if self.writable is not None and not self.writable.done():
            self.writable.set_exception(tornado.iostream.StreamClosedError())
            self.writable.exception()  # (seen: no warning if no one waits)
        if self.answer is not None and not self.waiting:
            self._advance()

    def _advance(self) -> None:
        """Parse what has arrived, as far as it goes."""
        try:
            while self.answer is not None and not self.waiting:
                if not self.step():
                    if self.ended and not self.waiting:  # no more is coming
                        self._at_end()
                    return
        except Exception as error:
            self._fail(error)

    def _deliver(self, data: bytes) -> None:
        assert self.answer is not None, "steps run during an exchange"
        waited = self.answer.data_received(data)
        if waited is not None:
            self.waiting = True
            self._reading(False)
            asyncio.ensure_future(waited).add_done_callback(self._resume)

    def _resume(self, waited: "asyncio.Future[Any]") -> None:
        _retrieve(waited)
        self.waiting = False
        if self.answer is not None:
            self._reading(True)
            self._advance()

    def _reading(self, on: bool) -> None:
        """Resume or pause reading, if there is still something to read (the
        TLS transport of Python 3.9 and 3.10 raises once its socket is gone)."""
        if self.ended:
            return
        try:
            self.transport.resume_reading() if on else self.transport.pause_reading()
        except (AttributeError, RuntimeError):
            pass

    def _read_head(self) -> bool:
        # Searched from where the last search stopped (less the 3 bytes an end
        # could have begun in): a head that arrives a byte at a time is read in
        # linear time, not searched from its start on every byte.
        found = BLANK_LINE.search(self.buffer, max(0, self.searched - 3), HEAD_LIMIT)
        if found is None:
            if len(self.buffer) >= HEAD_LIMIT:
                raise tornado.httputil.HTTPInputError("the upstream's answer head is too long")
            self.searched = len(self.buffer)
            return False
        self.searched = 0
        text = self.buffer[:found.start()].decode("latin-1").lstrip("\r\n")
        self.buffer = self.buffer[found.end():]
        line, _, fields = text.partition("\n")
        start_line = tornado.httputil.parse_response_start_line(line.rstrip("\r"))
        headers = parse_fields(fields)
        assert self.answer is not None, "steps run during an exchange"
        self.answer.started = True
        code = start_line.code
        if code < 200:  # 100 Continue and friends: the answer follows
            if "Content-Length" in headers or "Transfer-Encoding" in headers:
                raise tornado.httputil.HTTPInputError(f"an answer {code} with a body")
            return True
        self.step = self._body_reader(code, headers)
        self.answer.headers_received(start_line, headers)
        return True

    def _body_reader(self, code: int, headers: tornado.httputil.HTTPHeaders) -> Callable[[], bool]:
        """What reads this answer's body (RFC 9112 §6.3)."""
        assert self.answer is not None, "steps run during an exchange"
        if self.answer.request.method == "HEAD" or code == 304:
            return self._complete
        try:
            chunked, length = body_framing(headers)
        except ValueError as e:
            raise tornado.httputil.HTTPInputError(f"the upstream's answer: {e}") from None
        if code == 204:
            if chunked or length:
                raise tornado.httputil.HTTPInputError("an answer 204 with a body")
            return self._complete
        if chunked:
            self.left, self.crlf = 0, False
            return self._read_chunks
        if length is not None:
            self.left = length
            headers["Content-Length"] = str(length)  # ("2, 2" is passed on as 2)
            return self._read_length if length else self._complete
        return self._read_until_close

    def _read_length(self) -> bool:
        if not self.buffer:
            return False
        piece, self.buffer = self.buffer[:self.left], self.buffer[self.left:]
        self.left -= len(piece)
        if not self.left:
            self.step = self._complete
        self._deliver(piece)
        return not self.left or bool(self.buffer)  # (False: all read, more to come)

    def _read_until_close(self) -> bool:
        if not self.buffer:
            return False
        piece, self.buffer = self.buffer, b""
        self._deliver(piece)
        return True

    def _read_chunks(self) -> bool:
        """Every whole piece of chunk data that has arrived, passed on as one."""
        buffer, at, pieces, error = self.buffer, 0, [], None
        while True:
            if self.left:
                piece = buffer[at:at + self.left]
                pieces.append(piece)
                at += len(piece)
                self.left -= len(piece)
                if self.left:
                    break
                self.crlf = True
            if self.crlf:
                if len(buffer) - at < 2:
                    break
                if not buffer.startswith(b"\r\n", at):
                    error = "improperly terminated chunk"
                    break
                at, self.crlf = at + 2, False
            line = CHUNK_SIZE_LINE.match(buffer, at)
            if line is None:
                if b"\r\n" in buffer[at:at + 256] or len(buffer) - at > 256:
                    error = "invalid chunk size"
                break
            at, self.left = line.end(), int(line.group(1), 16)
            if not self.left:
                self.step = self._read_trailers
                break
        self.buffer = buffer[at:] if at else buffer
        data = b"".join(pieces) if len(pieces) > 1 else pieces[0] if pieces else b""
        if data:  # (what came whole before an error too)
            self._deliver(data)
        if error:
            raise tornado.httputil.HTTPInputError(error)
        return at > 0 and (bool(self.buffer) or self.step != self._read_chunks)

    def _read_trailers(self) -> bool:
        """After the last chunk: trailer fields (skipped), then an empty line."""
        buffer = self.buffer
        found = buffer.find(b"\r\n\r\n", max(0, self.searched - 3))  # (linear, as for the head)
        if buffer.startswith(b"\r\n"):
            end = 2
        elif found >= 0:
            end = found + 4
        elif len(buffer) > HEAD_LIMIT:
            raise tornado.httputil.HTTPInputError("chunked trailers too long")
        else:
            self.searched = len(buffer)
            return False
        self.searched = 0
        self.buffer = buffer[end:]
        self.step = self._complete
        return True

    def _complete(self) -> bool:
        answer, done = self.answer, self.done
        assert answer is not None, "steps run during an exchange"
        # Reused only when nothing more than this answer came (a byte more
        # would be taken as the start of the next request's answer).
        self.reusable = (answer.keep_alive and not self.buffer and not self.ended
                         and not self.aborted and not self.sending)
        self.answer = self.done = None
        if done is not None and not done.done():
            done.set_result(None)
        return True

    def _at_end(self) -> None:
        """The upstream closed: the end of an answer framed by closing, else a cut one."""
        if self.step == self._read_until_close and not self.buffer:
            self._complete()
        else:
            raise tornado.iostream.StreamClosedError()

    def _fail(self, error: BaseException) -> None:
        done = self.done
        self.answer = self.done = None
        self.reusable = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()
        if done is not None and not done.done():
            done.set_exception(error)


class UpstreamReceiver(Protocol):
    """Where an upstream answer goes as it arrives (``UpstreamClient.send``'s
    ``receiver``; ProxyHandler is one). Its end is ``send``'s return."""

    def on_upstream_headers(self, code: int, reason: str,
                            headers: tornado.httputil.HTTPHeaders) -> None:
        """The answer's status and header fields (parsed, interim answers skipped)."""

    def on_upstream_chunk(self, chunk: bytes) -> Optional[Awaitable[Any]]:
        """A piece of its body; the upstream is read again once what it returns is done."""


class _UpstreamAnswer(tornado.httputil.HTTPMessageDelegate):
    """Hands an upstream answer to its receiver as it arrives (or, for a
    ``fetch``, to the request's callbacks, or keeps its body)."""

    def __init__(self, request: tornado.httpclient.HTTPRequest,
                 receiver: Optional[UpstreamReceiver] = None):
        self.request = request
        self.receiver = receiver
        self.code: Optional[int] = None
        self.reason = ""
        self.headers = tornado.httputil.HTTPHeaders()
        self.started = False
        self.keep_alive = False
        self.body: List[bytes] = []  # kept only without a streaming_callback

    def headers_received(self, start_line: Any, headers: tornado.httputil.HTTPHeaders) -> None:
        self.started = True
        if start_line.code < 200:
            return  # 100 Continue and friends: the answer follows
        self.code, self.reason, self.headers = start_line.code, start_line.reason, headers
        # (Transfer-Encoding can only be chunked here: _body_reader saw to it.)
        delimited = ("Content-Length" in headers or "Transfer-Encoding" in headers
                     or self.request.method == "HEAD" or start_line.code in (204, 304))
        self.keep_alive = (start_line.version == "HTTP/1.1" and delimited
                           and "close" not in connection_tokens(headers))
        if self.receiver is not None:  # parsed already: no round trip through lines
            self.receiver.on_upstream_headers(start_line.code, start_line.reason, headers)
            return
        callback = self.request.header_callback
        if callback is not None:
            callback("%s %s %s\r\n" % (start_line.version, start_line.code, start_line.reason))
            for name, value in headers.get_all():
                callback(f"{name}: {value}\r\n")
            callback("\r\n")

    def data_received(self, chunk: bytes) -> Optional[Awaitable[Any]]:
        if self.receiver is not None:
            return self.receiver.on_upstream_chunk(chunk)
        if self.request.streaming_callback is not None:
            return self.request.streaming_callback(chunk)
        self.body.append(chunk)
        return None


# ---------------------------------------------------------------------------
# The HTTP proxy: /v<N>/…
# ---------------------------------------------------------------------------

# POST endpoints whose body names a model (docs/openai-endpoints.tsv):
# read before sending, for users with a model allowlist.
MODEL_IN_BODY = re.compile(
    r"/v\d+/(chat/completions|completions|responses(/input_tokens|/compact)?|embeddings"
    r"|moderations|audio/(speech|transcriptions|translations)|images/(edits|generations|variations)"
    r"|fine_tuning/jobs|assistants(/[^/]+)?|threads(/[^/]+)?/runs|videos"
    r"|realtime/(calls(/[^/]+/accept)?|client_secrets|translations/client_secrets|sessions"
    r"|transcription_sessions))\Z")
# Endpoints that hand out a short-lived upstream key: what it is used for never
# passes this proxy, so a key with limits may not have one.
EPHEMERAL_KEYS = re.compile(
    r"/v\d+/realtime/(client_secrets|sessions|transcription_sessions|translations/client_secrets)\Z")
# Streams whose usage OpenAI sends only when asked (stream_options.include_usage).
USAGE_ON_REQUEST = re.compile(r"/v\d+/(chat/completions|completions)\Z")
# Text to speech answers audio, with no usage: priced by the input's characters.
SPEECH = re.compile(r"/v\d+/audio/speech\Z")
# Images: DALL-E reports no usage, and is priced per image (by size and quality).
IMAGES = re.compile(r"/v\d+/images/(edits|generations|variations)\Z")
# Answers that do not name their model: the request's is read, to price them.
MODEL_NOT_IN_ANSWER = re.compile(
    r"/v\d+/(audio/(speech|transcriptions|translations)|images/(edits|generations|variations))\Z")
MODELS_LIST = re.compile(r"/v\d+/models\Z")
MODEL_IN_PATH = re.compile(r"/v\d+/models/(.+)\Z")


# Work the upstream does where this proxy never sees its usage (fine-tuning,
# video, evals and graders, Assistants runs, WebRTC/SIP calls, realtime
# translation): refused to a key with a budget. Batches and background
# responses are counted when their result passes (METERED_LATER).
UNMETERED = re.compile(
    r"/v\d+/(fine_tuning/(jobs(/[^/]+/resume)?|alpha/graders/run)"
    r"|videos(/edits|/extensions|/characters|/[^/]+/remix)?|evals/[^/]+/runs"
    r"|threads(/[^/]+)?/runs(/[^/]+/submit_tool_outputs)?|realtime/calls(/[^/]+/accept)?"
    r"|images/variations|realtime/translations)\Z")
# Collections whose objects may be made after their creation's answer, their
# usage shown when they are fetched: counted then, once (the batch at the
# Batch API's half price).
METERED_LATER = {"responses": 1, "batches": 2}


# -- The request plan: what the proxy does with a request, decided once -------

# How a request's body is read (RequestPlan.body).
NO_BODY = "none"  # it has none
READ_WHOLE = "whole"  # read whole (and inspected, if the plan says), then sent
SNIFF = "sniff"  # read whole if its first bytes may start JSON, whatever its label; else streamed
HOLD_MODEL = "hold_model"  # a large form: held until its first file part, its model checked; then streamed
STREAM = "stream"  # sent upstream as it arrives
DROP = "drop"  # dropped as it arrives: the answer is made here (the user's own list)


@dataclasses.dataclass(frozen=True)
class RequestPlan:
    """Everything ProxyHandler does with one request, made once by plan_request
    before its body is read, then followed. What only the body can tell is
    decided once, as it is read (BodyFacts)."""

    method: str
    route: str  # the path as the checks read it (route_path), not as it is sent
    refusal: Optional[ApiError] = None  # what the route refuses this user, whatever the body says
    body: str = NO_BODY  # NO_BODY, READ_WHOLE, SNIFF, HOLD_MODEL, STREAM or DROP
    inspect: bool = False  # a body read whole is parsed (inspect_body)
    checks_models: bool = False  # the models it names must be allowed (allowlist) and priced (budget)
    model_in_body: bool = False  # the endpoint's body names a model (MODEL_IN_BODY)
    isolated: bool = False  # the user sees only their own objects
    asks_usage: bool = False  # a stream's usage is asked for, and taken out again (USAGE_ON_REQUEST)
    priced_by_request: bool = False  # the answer names no model: the request's prices it
    priced_per: Optional[str] = None  # "characters" (speech) or "images" (DALL-E): not per token
    costs_nothing: bool = False  # listing or retrieving models: no quota, rpm or price applies
    filters_models: bool = False  # a model list, shown through the allowlist
    path_model: Optional[str] = None  # /v1/models/NAME
    counted: bool = False  # its answer's usage is counted (a POST that is no update; fetched_later)
    # Owned objects (isolation): what the request creates, reads, lists, updates or deletes.
    collection: Optional[str] = None  # the path's owned collection (OWNED_COLLECTIONS)
    object_id: Optional[str] = None  # the object the path names
    checks_owner: bool = False  # that object must be the user's: 404 otherwise
    creates: Optional[str] = None  # the collection whose object a 2xx answer makes
    lists: Optional[str] = None  # a list answered here, with the user's own objects only
    deletes: bool = False
    updates: bool = False
    makes_files: bool = False  # its answer may name files made for it (batch, job, upload)
    fetched_later: Optional[str] = None  # a METERED_LATER object: its usage counted when seen, once


NO_PLAN = RequestPlan(method="", route="")  # before prepare has made one (and for OPTIONS)


def plan_request(method: str, route: str, headers: tornado.httputil.HTTPHeaders,
                 user: Dict[str, Any]) -> RequestPlan:
    """What the proxy will do with a request: a pure function of its method,
    its route (route_path), its headers and the authenticated user."""
    isolated = sees_own_only(user)
    allowlist = has_allowlist(user)
    checks_models = allowlist or bool(user.get("budget"))
    model_in_body = bool(MODEL_IN_BODY.match(route))
    usage_route = bool(USAGE_ON_REQUEST.match(route))
    priced_by_request = bool(MODEL_NOT_IN_ANSWER.match(route))
    content_type = headers.get("Content-Type", "application/json").lower()
    declared_json = content_type.startswith("application/json")
    length = headers.get("Content-Length", "")
    small = length.isdigit() and int(length) <= SMALL_BODY_BYTES
    may_be_json = not content_type.startswith("multipart/") or small  # (to an upstream that reads bytes)
    inspect = method == "POST" and (
        usage_route or priced_by_request or (allowlist and (model_in_body or declared_json))
        or (bool(user.get("budget")) and model_in_body) or (isolated and may_be_json))
    sniffs = (isolated and not declared_json and not small and not usage_route
              and not (checks_models and model_in_body))
    # A large form whose model is read only to check or price it: its fields come first.
    holds_model = (method == "POST" and not small and not usage_route
                   and content_type.startswith("multipart/form-data")
                   and headers.get("Content-Encoding", "identity").strip().lower() == "identity"
                   and (priced_by_request or (checks_models and model_in_body)))
    objects = object_plan(method, route, isolated)
    model_path = MODEL_IN_PATH.match(route)
    updates = objects.get("updates", False)
    return RequestPlan(
        method, route,
        refusal=route_refusal(method, route, user),
        body=body_plan(method, headers, inspect, sniffs, objects.get("lists") is not None,
                       holds_model),
        inspect=inspect, checks_models=checks_models, model_in_body=model_in_body,
        isolated=isolated, asks_usage=method == "POST" and usage_route,
        priced_by_request=priced_by_request,
        priced_per="characters" if SPEECH.match(route) else "images" if IMAGES.match(route) else None,
        costs_nothing=method in ("GET", "HEAD") and bool(MODELS_LIST.match(route) or model_path),
        filters_models=allowlist and method == "GET" and bool(MODELS_LIST.match(route)),
        path_model=model_path.group(1) if model_path else None,
        counted=objects.get("fetched_later") is not None or (method == "POST" and not updates),
        **objects)


def body_plan(method: str, headers: tornado.httputil.HTTPHeaders, inspect: bool,
              sniffs: bool, answered_here: bool, holds_model: bool = False) -> str:
    """How to read the body. Whole first: small ones (so a kept-alive connection
    that went stale can be retried with it), those to inspect, and a chunked
    one on a method other than POST, PUT or PATCH (which the upstream would not
    see framed: sent on as it came, its bytes would be read as a request of
    their own). ``sniffs``: a large one read whole only if it may be JSON.
    ``holds_model``: a large form, held only until its fields before its file
    are in (ProxyHandler.check_held_form)."""
    if not has_body(headers):
        return NO_BODY
    if holds_model:
        return HOLD_MODEL
    length = headers.get("Content-Length", "")
    small = length.isdigit() and int(length) <= SMALL_BODY_BYTES
    if small or inspect or (not length.isdigit() and method not in STREAMED_BODY_METHODS):
        return SNIFF if sniffs else READ_WHOLE
    return DROP if answered_here else STREAM


def object_plan(method: str, route: str, isolated: bool) -> Dict[str, Any]:
    """RequestPlan's fields for the owned object the route names, makes or lists."""
    match = COLLECTION_PATH.match(route)
    if match is None:
        return {}
    collection, object_id, rest = match.groups()
    if names_object(match):
        later = collection in METERED_LATER and (method, rest) in (("GET", None), ("POST", "/cancel"))
        return {"collection": collection, "object_id": object_id, "checks_owner": isolated,
                "deletes": method == "DELETE" and rest is None,
                "updates": method == "POST" and rest is None,
                "makes_files": collection in ("batches", "fine_tuning/jobs", "uploads"),
                "fetched_later": collection if later else None,
                "creates": MAKES_OTHER.get((collection, rest or "")) if method == "POST" else None}
    if object_id is None and method == "GET" and collection in LISTED_COLLECTIONS:
        return {"collection": collection, "lists": collection if isolated else None}
    if method == "POST":
        made = collection if object_id is None else MAKES_OTHER.get((collection, object_id))
        return {"collection": collection, "creates": made}
    return {"collection": collection}


def route_refusal(method: str, route: str, user: Dict[str, Any]) -> Optional[ApiError]:
    """What ``user`` may not do at ``route`` whatever the body says (the first
    rule broken), or None."""
    try:
        refuse_ephemeral_keys(user, route)
        refuse_unmetered(user, method, route)
        refuse_closed_paths(user, route, method)
    except ApiError as error:
        return error
    return None


@dataclasses.dataclass(frozen=True)
class BodyFacts:
    """What a body read whole decided for the rest of its request (inspect_body)."""

    size: int = 0  # its bytes (a cut stream's estimate counts a token per 4)
    stores: Any = None  # its "store", as given (chat completions are kept only with true)
    strips_usage: bool = False  # a stream whose usage this proxy asked for: taken out of the answer
    characters: int = 0  # text to speech: priced per character of its input
    images: Optional[Tuple[int, Optional[str], Optional[str]]] = None  # DALL-E's n, size, quality


NO_FACTS = BodyFacts()  # a body streamed, or none


def body_facts(plan: RequestPlan, obj: Dict[str, Any], size: int) -> BodyFacts:
    """BodyFacts of a JSON body (a form's fields read as {}: 1 image)."""
    characters = images = None
    if plan.priced_per == "characters" and isinstance(obj.get("input"), str):
        characters = len(obj["input"])
    if plan.priced_per == "images":
        n, size_asked, quality = obj.get("n", 1), obj.get("size"), obj.get("quality")
        images = (n if isinstance(n, int) and n > 0 else 1,
                  size_asked if isinstance(size_asked, str) else None,
                  quality if isinstance(quality, str) else None)
    return BodyFacts(size, obj.get("store"), plan.asks_usage and must_ask_usage(obj),
                     characters or 0, images)


def must_ask_usage(obj: Dict[str, Any]) -> bool:
    """Whether a chat or completions body streams without asking for its usage
    (OpenAI sends a stream's usage only when asked). A stream_options that is
    not an object is the upstream's to refuse (400)."""
    options = obj.get("stream_options")
    if obj.get("stream") is not True or (options is not None and not isinstance(options, dict)):
        return False
    return not (options or {}).get("include_usage")


def asking_usage(obj: Dict[str, Any]) -> bytes:
    """The body, asking for its stream's usage (taken out of the answer again,
    so the client gets what it asked for)."""
    obj["stream_options"] = {**(obj.get("stream_options") or {}), "include_usage": True}
    return json.dumps(obj, separators=(",", ":")).encode()


# -- The checks a request's plan names (each raises its ApiError) ------------

async def check_limits(app: "App", user: Dict[str, Any], models: List[str]) -> None:
    """The models named (the allowlist, and a price for a key with a budget),
    then the quota and budget. Requests per minute come last (take_rpm_slot),
    so a request refused here takes no slot."""
    for model in models:
        refuse_model(app, user, model)
    await refuse_over_limits(app, user)


def refuse_model(app: "App", user: Dict[str, Any], model: str, priced: bool = True) -> None:
    """404 for a model off the key's allowlist; then, if ``priced``, refuse_unpriced."""
    if not allows_model(user, model):
        raise model_not_found(model)
    if priced:
        refuse_unpriced(app, user, model)


async def take_rpm_slot(app: "App", user: Dict[str, Any]) -> None:
    """Requests per minute: taken just before a request goes upstream, once
    every local check has passed (only requests sent upstream count)."""
    if user.get("rpm"):
        refusal = await app.limiter.admit(user["name"], user["rpm"])
        if refusal is not None:
            raise refusal


async def refuse_over_limits(app: "App", user: Dict[str, Any]) -> None:
    """429 once the quota or budget of the current period is used up: one
    lookup of the period's counter, cached like a key."""
    quota, budget = user.get("quota") or 0, user.get("budget") or 0
    if not (quota or budget):
        return
    period = user.get("period") or "all"
    _, tokens, cost = await app.usage.used(user["name"], period)
    if quota and tokens >= quota:
        raise insufficient_quota(over_limit(f"quota of {quota} tokens", f"{tokens} used", period))
    if budget and cost >= budget:
        raise insufficient_quota(over_limit(f"budget of ${dollar_text(budget)}",
                                            f"${dollar_text(cost)} used", period))


def over_limit(limit: str, used: str, period: str) -> str:
    """What the 429 of a used-up quota or budget says: the limit, the use, the reset."""
    resets = period_resets(period, utcnow().date())
    if resets is None:
        return (f"You exceeded your {limit} for this key ({used}). "
                "Ask the owner of this proxy to raise it.")
    return f"You exceeded your {limit}{PERIOD_WORDS[period]} ({used}); it resets {iso(resets)}."


def refuse_unpriced(app: "App", user: Dict[str, Any], model: str) -> None:
    """For a key with a budget, a model without a price is 400: it would cost nothing."""
    if user.get("budget") and not app.settings.prices.has_price(model):
        raise ApiError(400, f"The model `{model}` has no price in this proxy's price table, "
                            "and this key has a budget. Ask the owner of this proxy to add "
                            "its price (PRICES_FILE).", code="model_not_priced")


def refuse_unmetered(user: Dict[str, Any], method: str, route: str) -> None:
    """For a key with a budget, 403 for work whose usage this proxy never sees."""
    if user.get("budget") and method in ("POST", "WS") and UNMETERED.match(route):
        raise ApiError(403, "This key has a budget, and what this endpoint costs never passes "
                            "through this proxy, so it may not use it.", code="forbidden")


# What the paths of ADMIN_ONLY_PATH that are not administration are, for their 403.
CLOSED_PATHS = {
    "fine_tuning/checkpoints": "manage fine-tuning checkpoint permissions, which are the "
                               "whole account's",
    "chatkit/threads": "use ChatKit threads, which belong to the end users of ChatKit's "
                       "widgets, not to a key",
}


def refuse_closed_paths(user: Dict[str, Any], route: str, method: str) -> None:
    """For a user who sees only their own objects: no administration endpoints."""
    isolated = sees_own_only(user)
    closed = ADMIN_ONLY_PATH.match(route)
    if isolated and closed:
        what = CLOSED_PATHS.get(closed.group(1), "use the account's administration endpoints")
        raise ApiError(403, f"This key may not {what}.", code="forbidden")
    if isolated and method == "DELETE" and MODEL_IN_PATH.match(route):
        raise ApiError(403, "This key may not delete models: a fine-tuned model is the whole "
                            "account's.", code="forbidden")


async def refuse_unless_owner(app: "App", user: Dict[str, Any], collection: str,
                              object_id: str) -> None:
    """404 for another user's object, as OpenAI answers an unknown id."""
    if await app.owners.owner(object_id) != user["name"]:
        raise no_such_object(object_id, OWNED_COLLECTIONS[collection])


async def refuse_others_ids(app: "App", user: Dict[str, Any], obj: Any) -> None:
    """404 for the first object ``obj`` refers to (a request body, a client event)
    that is not the user's own."""
    for object_id in referenced_ids(obj):
        if await app.owners.owner(object_id) != user["name"]:
            raise no_such_object(object_id)


async def check_path_access(app: "App", user: Dict[str, Any], route: str, method: str) -> None:
    """The path rules for a WebSocket (the HTTP proxy's are in its plan): no
    administration endpoints, no one else's object, for a user who sees only
    their own."""
    refuse_closed_paths(user, route, method)
    match = COLLECTION_PATH.match(route)
    if match is not None and sees_own_only(user) and names_object(match):
        collection, object_id, _ = match.groups()
        await refuse_unless_owner(app, user, collection, object_id)


def names_object(match: "re.Match[str]") -> bool:
    """Whether a COLLECTION_PATH match names an object (not a sub-collection)."""
    collection, object_id, _ = match.groups()
    return object_id is not None and (collection, object_id) not in NOT_AN_ID


def refuse_ephemeral_keys(user: Dict[str, Any], path: str) -> None:
    limited = (user.get("quota") or user.get("budget") or user.get("rpm")
               or has_allowlist(user))
    if limited and EPHEMERAL_KEYS.match(path):
        raise ApiError(403, "This key has limits, so it may not get a short-lived upstream key "
                            "(its use would bypass them): connect through this proxy instead.",
                       code="forbidden")


def connection_tokens(headers: tornado.httputil.HTTPHeaders) -> set:
    """Headers a message's ``Connection`` names: hop-by-hop too (RFC 9110 §7.6.1)."""
    return {token.strip().lower() for token in headers.get("Connection", "").split(",")}


def body_framing(headers: tornado.httputil.HTTPHeaders) -> Tuple[bool, Optional[int]]:
    """How a message's body is framed (RFC 9112 §6.1, §6.3): whether chunked,
    else its length (None: not given). ValueError for a framing that is neither."""
    encoding = headers.get("Transfer-Encoding")
    if encoding is not None:
        if encoding.strip().lower() != "chunked" or "Content-Length" in headers:
            raise ValueError("Transfer-Encoding must be chunked alone (without Content-Length).")
        return True, None
    if "Content-Length" not in headers:
        return False, None
    lengths = {value.strip() for value in headers["Content-Length"].split(",")}  # ("2, 2" is 2)
    if len(lengths) != 1 or not next(iter(lengths)).isdigit():
        raise ValueError("Content-Length must be one whole number.")
    return False, int(lengths.pop())


def refuse_bad_framing(headers: tornado.httputil.HTTPHeaders) -> None:
    """400 for a body framing Tornado would refuse only once this handler has
    started: before anything goes upstream, not after."""
    try:
        body_framing(headers)
    except ValueError as e:
        raise ApiError(400, str(e)) from None


def model_not_found(model: str) -> ApiError:
    return ApiError(404, f"The model `{model}` does not exist or you do not have access to it.",
                    code="model_not_found")


def models_in_body(content_type: str, body: bytes) -> Tuple[List[str], Any]:
    """(every model a request body names, its parsed JSON if it is JSON).

    Every one, not the first: a body that names two (a repeated form field, a
    repeated JSON key) would otherwise pass the allowlist with one and reach
    an upstream that reads the other. A form's body is read as JSON too: an
    upstream may go by the bytes, not by the Content-Type."""
    if content_type.lower().startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        fields: Dict[str, List[bytes]] = {}
        try:
            tornado.httputil.parse_body_arguments(content_type, body, fields, {})
        except Exception:
            return [], None
        if not fields.get("model") and b'name="model"' in body:
            return [], None  # a model field Tornado could not read (it only logs why)
        as_json, obj = _models_in_json(body) if body.lstrip()[:1] == b"{" else ([], None)
        models = [v.decode("utf-8", "replace") for v in fields.get("model", [])] + as_json
        return models, obj if isinstance(obj, dict) else {}
    return _models_in_json(body)


# A form part's header naming it "model" (not "filename=model"), quoted or not,
# or as RFC 2231 spells it (name*=UTF-8''model), as Tornado's parser reads it too.
MODEL_FIELD = re.compile(rb'(?<![\w*])(?i:name)\*?[ \t]*=[ \t]*"?(?:[\w-]*\'\w*\')?model(?=["; \t\r\n])')
MODEL_FIELD_WINDOW = 32  # bytes before a "model" in which its header's name= must be
FILE_PART = re.compile(rb'(?i)\bfilename\*?[ \t]*=')


def form_boundary(content_type: str) -> Optional[bytes]:
    """A multipart body's boundary, as Tornado's parse_body_arguments reads it."""
    for field in content_type.split(";"):
        key, _, value = field.strip().partition("=")
        if key == "boundary" and value:
            boundary = value.encode("utf-8", "replace")
            return boundary[1:-1] if boundary[:1] == b'"' == boundary[-1:] and len(boundary) > 1 else boundary
    return None


def form_fields_end(body: bytes, boundary: bytes) -> Optional[int]:
    """Where the fields at the start of a multipart body end: the offset of the
    delimiter that opens its first file part (or closes it); None while ``body``,
    its first bytes, reaches neither. Only the headers of each part are read."""
    delimiter = b"--" + boundary
    at = body.find(delimiter)
    while at >= 0:
        after = at + len(delimiter)
        if body[after:after + 2] == b"--":
            return at  # the closing delimiter: a form without a file
        headers_end = body.find(b"\r\n\r\n", after)
        if headers_end < 0:
            return None
        if FILE_PART.search(body, after, headers_end):
            return at
        at = body.find(b"\r\n" + delimiter, headers_end)
        at = at + 2 if at >= 0 else -1
    return None


def closed_form(fields: bytes, boundary: bytes) -> bytes:
    """The fields before a form's file (form_fields_end) as a whole form, to parse."""
    return fields + b"--" + boundary + b"--\r\n"


def names_model_field(before: bytes, chunk: bytes) -> bool:
    """Whether ``chunk`` (after ``before``, the last MODEL_FIELD_WINDOW bytes
    before it) holds the header of a form part named model. A find per chunk:
    the pattern is tried only where "model" is."""
    if MODEL_FIELD.search(before + chunk[:MODEL_FIELD_WINDOW]):
        return True
    at = chunk.find(b"model")
    while at >= 0:
        if MODEL_FIELD.search(chunk[max(0, at - MODEL_FIELD_WINDOW):at + 7]):
            return True
        at = chunk.find(b"model", at + 1)
    return False


def may_start_json(start: bytes) -> bool:
    """Whether a body that begins with ``start`` (4 bytes or more) may be a JSON
    object or array, in any of the encodings RFC 8259 §8.1 lets a parser accept."""
    text = start[:64].decode(json.detect_encoding(start), "replace").lstrip(" \t\r\n\ufeff")
    return text[:1] in ("{", "[", "")


def as_utf8(body: bytes) -> bytes:
    """A JSON text in UTF-16 or UTF-32 (told by its BOM or its zero bytes, as
    RFC 8259 §8.1 lets a parser accept it) in UTF-8, so that it is checked as
    an upstream that reads it will read it; any other body unchanged."""
    encoding = json.detect_encoding(body)
    if encoding == "utf-8":
        return body
    try:
        return body.decode(encoding).encode()
    except UnicodeDecodeError:
        return body


def _models_in_json(body: bytes) -> Tuple[List[str], Any]:
    """models_in_body for a JSON body: (every model it names, the parsed JSON or None)."""
    per_object: List[List[Any]] = []  # the "model" values of each JSON object, inner first

    def collect(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
        per_object.append([value for key, value in pairs if key == "model"])
        return dict(pairs)

    try:
        obj = json.loads(body, object_pairs_hook=collect)
    except (ValueError, RecursionError):
        return [], None
    if not isinstance(obj, dict):
        return [], obj
    models = list(per_object[-1])  # the outermost object is decoded last
    if isinstance(obj.get("session"), dict):  # realtime client secrets: session.model
        models.append(obj["session"].get("model"))
    return [str(m) for m in models if m is not None], obj


class ProxyHandler(BaseHandler):
    """Passes one API request through, streaming both ways, as its plan says.

    Its life, in the order of this class: prepare (authenticate; plan_request
    makes the request's plan; the checks it names; the upstream request opened
    at once if the body streams) → data_received (the body: read whole, or on
    to the upstream with back-pressure) → _pass_through (a body read whole
    inspected and sent; the answer awaited) → on_upstream_headers and
    on_upstream_chunk (the answer, as UpstreamClient.send hands it over, its
    usage read on the way) → finish → account (the one place a request is
    counted; the log line reports what it counted). Isolation between users
    refuses another user's objects and answers list endpoints with the
    caller's own objects only.
    """

    BODY_QUEUE_CHUNKS = 4  # body chunks in flight between client and upstream
    # A request's state, declared once; the defaults hold until prepare sets
    # them (a connection may close before it runs; a method Tornado refuses
    # never reaches it).
    user: Optional[Dict[str, Any]] = None  # authenticated in prepare
    plan = NO_PLAN  # made in prepare
    facts = NO_FACTS  # what a body read whole told (inspect_body)
    request_model: Optional[str] = None  # the model it names (path, query, body): logged if refused
    body_chunks: Optional[List[bytes]] = None  # a body being read whole
    sniffing = False  # a SNIFF body whose first bytes are not in yet
    holding_form = False  # a HOLD_MODEL body whose fields before its file are not in yet
    form_tail: Optional[bytes] = None  # a held form sent on: its last bytes, watched for a late model
    body_received = 0  # the body's bytes so far (MAX_BODY_MB)
    body_queue: "asyncio.Queue[Optional[bytes]]"  # a streamed body, on its way upstream
    uploading = False  # watched by App.watch_clients (upload_stalled)
    body_seen = 0.0  # when its last chunk came
    body_held = False  # the upstream is behind: the client is not to blame
    body_complete = False
    upstream_request: Optional[tornado.httpclient.HTTPRequest] = None  # once sent
    fetch: Optional["asyncio.Future[Any]"] = None  # a streamed body's exchange, in a task of its own
    reader: Optional["UsageReader"] = None  # the answer's usage, read on the way (from its head)
    models_list: Optional[List[bytes]] = None  # a model list, held for the allowlist (from its head)
    client_gone = False
    counts_later = False  # a fetched_later object's usage, seen now, is to be counted
    accounted = False  # account() has counted it

    async def prepare(self) -> None:
        if self.request.method == "OPTIONS":
            return
        # Tornado's own limit answers a bare 400; ours, counted as the body
        # streams, answers OpenAI's 413, so Tornado's is set past it.
        http1(self.request).set_max_body_size(2 * self.app.settings.max_body_bytes + (1 << 20))
        refuse_bad_framing(self.request.headers)
        self.user = user = await authenticate(self.app.store, self.request.headers)
        self.log_user = user["name"]
        self._check_body_size()
        self.plan = plan = plan_request(self.request.method, route_path(self.request.path),
                                        self.request.headers, user)
        self.check_named_models(plan, user)
        if plan.refusal is not None:
            raise plan.refusal
        if plan.checks_owner:
            assert plan.collection is not None and plan.object_id is not None
            await refuse_unless_owner(self.app, user, plan.collection, plan.object_id)
        await self.expect_body(plan)

    def _check_body_size(self) -> None:
        length = self.request.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.app.settings.max_body_bytes:
            raise self.body_too_large()

    def body_too_large(self) -> ApiError:
        return ApiError(413, "The request body is over this proxy's limit of "
                             f"{self.app.settings.max_body_mb:g} MB (MAX_BODY_MB).",
                        code="request_too_large")

    async def expect_body(self, plan: RequestPlan) -> None:
        """Get ready for the body as the plan reads it: whole, sniffed, dropped,
        or streamed upstream as it comes (the request sent now)."""
        if plan.body == NO_BODY:
            return
        if plan.body == STREAM:
            await self.admit()  # now: the body goes upstream as it comes
        self.watch_upload()
        if plan.body in (READ_WHOLE, SNIFF, HOLD_MODEL):
            self.body_chunks = []
            self.sniffing = plan.body == SNIFF
            self.holding_form = plan.body == HOLD_MODEL
        elif plan.body == STREAM:
            self.start_streamed_upstream()

    # -- limits ---------------------------------------------------------------

    def check_named_models(self, plan: RequestPlan, user: Dict[str, Any]) -> None:
        """The models named in the path or query against the allowlist (and a
        price, for a budget: not a model in the path, which is retrieved or
        deleted, at no cost)."""
        named = [plan.path_model] if plan.path_model else []
        queried = self.get_query_arguments("model")  # every one: see models_in_body
        for model in named + queried:
            self.request_model = model  # (the log names the one refused)
            refuse_model(self.app, user, model,
                         priced=model in queried and not plan.costs_nothing)
        models = named + queried
        self.request_model = models[0] if models else None

    def refuse_body_models(self, models: List[str]) -> None:
        """The models a body names against the allowlist, and a price for a budget."""
        assert self.user is not None  # (authenticated in prepare)
        for model in models:
            if not allows_model(self.user, model):
                self.request_model = model  # (the log names the one refused)
            refuse_model(self.app, self.user, model)

    async def admit(self) -> None:
        """The last checks, just before the request goes upstream: the quota,
        then requests per minute (a request refused for anything else takes no
        slot). Listing and retrieving models cost nothing upstream: neither
        applies to them (GUI apps list models on every page load)."""
        if self.plan.costs_nothing:
            return
        assert self.user is not None  # (authenticated in prepare)
        await check_limits(self.app, self.user, [])
        await take_rpm_slot(self.app, self.user)

    # -- isolation --------------------------------------------------------------

    async def refuse_others_objects(self, obj: Any) -> None:
        assert self.user is not None  # (authenticated in prepare)
        await refuse_others_ids(self.app, self.user, obj)

    def note_objects(self, status: int) -> bool:
        """After a 2xx answer: the objects it made are the caller's; a deleted
        one is no one's. Whether claims now wait to be written."""
        plan = self.plan
        if not 200 <= status < 300 or self.reader is None:
            return False
        assert self.user is not None  # (authenticated in prepare)
        owners, name = self.app.owners, self.user["name"]
        if plan.creates is not None and self.object_is_kept():
            pattern = THREAD_ID if plan.route.endswith("/threads/runs") else FIRST_ID
            match = pattern.search(self.reader.head)
            if match:
                # Made later (in the background, a batch): its usage is counted when seen.
                later = plan.creates in METERED_LATER and self.reader.result() is None
                owners.claim(name, match.group(1).decode(), OWNED_COLLECTIONS[plan.creates],
                             EXPIRING_COLLECTIONS.get(plan.creates), counted=not later)
        if plan.makes_files and self.reader.whole_in_head():
            for file_id in produced_files(_json_or_none(self.reader.head)):
                owners.claim(name, file_id, "File")
        if plan.deletes and plan.object_id is not None:
            owners.release(plan.object_id)
        return bool(owners.pending)

    def object_is_kept(self) -> bool:
        """Whether OpenAI keeps what this request creates (chat: only with store)."""
        if self.plan.creates == "chat/completions":
            return self.facts.stores is True
        return self.facts.stores is not False

    async def answer_own_list(self) -> None:
        """A list as the caller sees it: its own objects only, paged through upstream
        pages one at a time until the client's ``limit`` is filled."""
        assert self.user is not None  # (authenticated in prepare)
        query = {k: v for k, v in self.request.query_arguments.items() if k not in ("limit", "after")}
        limit_text = self.get_query_argument("limit", "20")
        limit = min(int(limit_text), 1000) if limit_text.isdigit() and int(limit_text) > 0 else 20
        after = self.get_query_argument("after", None)
        mine: List[Dict[str, Any]] = []
        first_page: Dict[str, Any] = {}
        has_more = False
        for _ in range(LIST_PAGES_MAX):
            page_query = {**query, "limit": [str(LIST_PAGE_LIMIT)], **({"after": [after]} if after else {})}
            try:
                response = await self.app.http_client.fetch(tornado.httpclient.HTTPRequest(
                    self.app.settings.upstream_url + self.plan.route + "?"
                    + urllib.parse.urlencode(page_query, doseq=True),
                    headers=self.upstream_request_headers(identity=True),
                    request_timeout=self.app.settings.upstream_timeout), raise_error=False)
            except Exception as error:
                raise self.upstream_error(error) from None
            if response.code == 599:
                raise self.upstream_error(response.error)
            page = _json_or_none(response.body) if response.code == 200 else None
            if not (isinstance(page, dict) and isinstance(page.get("data"), list)):
                self.set_status(response.code, response.reason)
                self.set_header("Content-Type", response.headers.get("Content-Type", "application/json"))
                self.finish(response.body or b"")
                return
            first_page = first_page or page
            items = [item for item in page["data"] if isinstance(item, dict)]
            for index, item in enumerate(items):
                if await self.app.owners.owner(str(item.get("id"))) == self.user["name"]:
                    mine.append(item)
                    for file_id in produced_files(item):
                        self.app.owners.claim(self.user["name"], file_id, "File")
                    if len(mine) == limit:
                        has_more = index < len(items) - 1 or bool(page.get("has_more"))
                        break
            else:
                has_more = bool(page.get("has_more"))
                if has_more and items:
                    after = str(items[-1].get("id"))
                    continue
            break
        self.finish_json({**{k: v for k, v in first_page.items() if k not in ("data",)},
                          "object": "list", "data": mine,
                          "first_id": mine[0].get("id") if mine else None,
                          "last_id": mine[-1].get("id") if mine else None,
                          "has_more": has_more})


    # -- the body: read whole, sniffed, or streamed (as the plan says) ----------

    async def sniff_body(self) -> None:
        """Send a large body on as it comes after all, unless it starts as JSON may."""
        self.sniffing = False
        held = b"".join(self.body_chunks or [])
        if may_start_json(held):
            return
        self.body_chunks = None  # (from here on, to the upstream or nowhere)
        try:
            await self.admit()  # now: the body goes upstream as it comes
        except ApiError as error:
            self.send_error(error.status_code, exc_info=(ApiError, error, None))
            return
        self.start_streamed_upstream()
        await self.body_queue.put(held)

    async def check_held_form(self) -> None:
        """A HOLD_MODEL body, as it comes: once the fields before its first file
        are in, the models they name are checked (and priced by), and the body
        is sent on as it comes. One that starts as JSON may is read whole (as
        SNIFF does); one that ends before its file is read whole (inspect_body)."""
        held = b"".join(self.body_chunks or [])
        self.body_chunks = [held]
        if len(held) < 4:
            return
        if may_start_json(held):
            self.holding_form = False
            return
        boundary = form_boundary(self.request.headers.get("Content-Type", ""))
        end = form_fields_end(held, boundary) if boundary else None
        if boundary and end is None and len(held) < FORM_FIELDS_MAX_BYTES:
            return  # hold on
        if self.plan.checks_models and (end is None or not names_model_field(b"", held[:end])):
            # No model before the file (curl -F file=@… -F model=…, as OpenAI's
            # own examples write it): read whole and checked at its end, as before.
            self.holding_form = False
            return
        self.holding_form, self.body_chunks = False, None  # (from here on, to the upstream or nowhere)
        try:
            self.check_form_fields(None if end is None else held[:end], boundary)
            if self.form_tail is not None and names_model_field(b"", held[end:]):
                raise self.late_model()
            await self.admit()  # now: the body goes upstream as it comes
        except ApiError as error:
            self.send_error(error.status_code, exc_info=(ApiError, error, None))
            return
        if self.form_tail is not None:
            self.form_tail = held[-MODEL_FIELD_WINDOW:]
        self.start_streamed_upstream()
        await self.body_queue.put(held)

    def check_form_fields(self, fields: Optional[bytes], boundary: Optional[bytes]) -> None:
        """The models named by a form's fields before its file (None: not found
        in its first FORM_FIELDS_MAX_BYTES), as inspect_body checks a whole body.
        A key with limits watches the rest for a late one (refused_late_model)."""
        plan = self.plan
        if fields is None or boundary is None:
            if plan.checks_models:
                raise self.late_model()
            return
        content_type = self.request.headers.get("Content-Type", "")
        models, obj = models_in_body(content_type, closed_form(fields, boundary))
        if plan.checks_models and obj is None:
            raise ApiError(400, "This key may use only some models, or has a budget, and the "
                                "model named in this request body could not be read.",
                           code="invalid_body")
        self.request_model = models[0] if models else None
        self.refuse_body_models(models)
        length = self.request.headers.get("Content-Length", "")
        self.facts = body_facts(plan, {}, int(length) if length.isdigit() else len(fields))
        if plan.checks_models:
            self.form_tail = b""

    def late_model(self) -> ApiError:
        return ApiError(400, "This key may use only some models, or has a budget: this multipart "
                             "body names a model again after its file, and an upstream may read "
                             "either one. Send one model field, before the file.",
                        code="invalid_body")

    def refused_late_model(self, chunk: bytes) -> bool:
        """A held form sent on after its model was checked: a part named model
        in what follows is refused before the body is complete upstream."""
        assert self.form_tail is not None
        if not names_model_field(self.form_tail, chunk):
            self.form_tail = (self.form_tail + chunk[-MODEL_FIELD_WINDOW:])[-MODEL_FIELD_WINDOW:]
            return False
        self.form_tail = None
        self.abort_upstream()
        error = self.late_model()
        self.send_error(error.status_code, exc_info=(ApiError, error, None))
        return True

    async def inspect_body(self, sent: bytes) -> Tuple[bytes, BodyFacts]:
        """Look at a body read whole, if the plan says so: the models it names,
        the objects it refers to, what it decides for the rest of the request
        (BodyFacts). Returns what to send (``sent`` itself unless the usage
        request was added to it) and those facts."""
        plan = self.plan
        if not plan.inspect:
            return sent, BodyFacts(len(sent))
        body = as_utf8(self.decoded(sent))
        refers = plan.isolated and any(m in body for m in REFERENCE_MARKERS)
        if not (plan.checks_models or refers or may_name(body, b'"stream"')
                or may_name(body, b'"store"') or plan.priced_by_request):
            # Not a stream, nothing stored, no model to check or to price by:
            # no need to parse it, whatever it is labelled. The model, for
            # counting a failed request, is usually near the start.
            match = MODEL_NEAR_START.search(body, 0, 4096)
            self.request_model = match.group(1).decode("utf-8", "replace") if match else None
            return sent, BodyFacts(len(sent))
        # Lower-cased for the media type only: a multipart boundary is case-sensitive.
        content_type = self.request.headers.get("Content-Type", "application/json")
        models, obj = models_in_body(content_type, body)
        declared_json = content_type.lower().startswith("application/json")
        if plan.checks_models and obj is None and (plan.model_in_body or declared_json):
            raise ApiError(400, "This key may use only some models, or has a budget, and the "
                                "model named in this request body could not be read.",
                           code="invalid_body")
        self.request_model = models[0] if models else None
        self.refuse_body_models(models)
        if refers:
            await self.refuse_others_objects(obj)
        if not isinstance(obj, dict):
            return sent, BodyFacts(len(sent))
        facts = body_facts(plan, obj, len(sent))
        # (A compressed body that asks for usage goes on uncompressed: upstream_request_headers.)
        return asking_usage(obj) if facts.strips_usage else sent, facts

    def decoded(self, body: bytes) -> bytes:
        """A compressed request body as the upstream will read it (sent on unchanged,
        unless the usage request is added to it). Decompressed up to MAX_BODY_MB: 413 past it."""
        encoding = self.request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding == "identity":
            return body
        decoder = decoder_for(encoding) if encoding in ("gzip", "x-gzip", "deflate") else None
        if decoder is None:
            raise ApiError(415, f"Content-Encoding {encoding} cannot be read by this proxy, which "
                                "must check what a body names: send it uncompressed or gzip.",
                           code="unsupported_encoding")
        limit, pieces, size, rest = self.app.settings.max_body_bytes, [], 0, body
        try:
            # Members one after another (RFC 1952 §2.2) are one body to a reader
            # that decompresses them all, so the checks read them all too.
            for _ in range(REQUEST_MEMBERS_MAX):
                pieces.append(decoder.decompress(rest, limit + 1 - size))
                size += len(pieces[-1])
                if size > limit:
                    raise self.body_too_large()
                rest = decoder.unused_data if decoder.eof else b""
                if not rest:
                    return b"".join(pieces)
                decoder = decoder_for(encoding)
        except ApiError:
            raise
        except Exception:
            pass
        raise ApiError(400, f"The request body is not valid {encoding} "
                            f"(or has over {REQUEST_MEMBERS_MAX} members).")

    # -- request: client → upstream -------------------------------------------


    # -- request: client → upstream -------------------------------------------

    def upstream_url(self) -> str:
        """Where the request goes: its own path (not the checked, decoded one) and query."""
        query = self.request.query
        path = without_doubled_version(self.request.path)
        return self.app.settings.upstream_url + path + (f"?{query}" if query else "")

    def upstream_request_headers(self, identity: bool = False) -> tornado.httputil.HTTPHeaders:
        headers = tornado.httputil.HTTPHeaders()
        # Headers the client's Connection names are hop-by-hop, but never the
        # body's length: dropping it would leave the body unframed upstream.
        named_by_connection = connection_tokens(self.request.headers) - {"content-length"}
        for name, value in self.request.headers.get_all():
            lower = name.lower()
            if lower not in NOT_FORWARDED_UP and lower not in named_by_connection:
                add_checked_field(headers, name, value)
        headers["Authorization"] = "Bearer " + self.app.settings.openapi_api_key
        if "Accept-Encoding" in headers:  # only what the usage reader can decode
            headers["Accept-Encoding"] = readable_encodings(headers["Accept-Encoding"])
        strips_usage = self.facts.strips_usage
        if strips_usage or self.plan.filters_models or identity:  # answers this proxy rewrites
            headers["Accept-Encoding"] = "identity"
        if strips_usage:  # its body was rewritten, and goes on uncompressed
            headers.pop("Content-Encoding", None)
        return headers

    def start_streamed_upstream(self) -> None:
        """Send the request upstream now, its body as it arrives (through
        ``body_queue``), in a task of its own."""
        self.body_queue = asyncio.Queue(self.BODY_QUEUE_CHUNKS)
        request = self.new_upstream_request(None, streamed=True)
        self.fetch = self.app.http_client.start(request, self)
        self.fetch.add_done_callback(self._on_fetch_done)

    def new_upstream_request(self, body: Optional[bytes],
                             streamed: bool = False) -> tornado.httpclient.HTTPRequest:
        """The request to send upstream: ``body`` read whole, none, or ``streamed``
        from ``body_queue`` as it arrives. It holds nothing of this handler (its
        answer comes to the receiver UpstreamClient.send is given)."""
        headers = self.upstream_request_headers()
        if body is not None:
            headers.pop("Content-Length", None)  # set again from the body sent
        request = tornado.httpclient.HTTPRequest(
            self.upstream_url(),
            method=self.request.method,
            headers=headers,
            body=body,
            # (Tornado's type has write() return None, not a Future, and no coroutine here.)
            body_producer=(functools.partial(send_queued, self.body_queue)  # type: ignore[arg-type]
                           if streamed else None),
            decompress_response=False,
            follow_redirects=False,
            allow_nonstandard_methods=True,
            connect_timeout=self.app.settings.connect_timeout,
            request_timeout=self.app.settings.upstream_timeout,
        )
        self.upstream_request = request
        return request

    def watch_upload(self) -> None:
        """An upload may take as long as it needs, but not stop: one that sends
        nothing for CLIENT_BODY_SECONDS (while not held back by the upstream) is
        cut (by ``App.watch_clients``, once a second for all: no timer per
        request), so a slow or stalled client cannot hold a connection forever."""
        # A 512 MB upload may take hours. (Tornado types the timeout as a float; None is none.)
        http1(self.request).set_body_timeout(None)  # type: ignore[arg-type]
        self.body_seen, self.body_held = time.monotonic(), False
        self.uploading = True

    def stop_watching_upload(self) -> None:
        self.uploading = False

    def upload_stalled(self, now: float) -> bool:
        return (self.uploading and not self.body_held and now - self.body_seen >= CLIENT_BODY_SECONDS
                and not (self.body_complete or self.client_gone or self._finished))

    async def data_received(self, chunk: bytes) -> None:
        self.body_seen = time.monotonic()
        if self._finished or self.user is None:
            return
        if self.body_chunks is None and (self.fetch is None or self.fetch.done()):
            return  # the answer is decided (or made here): the rest of the body goes nowhere
        self.body_received += len(chunk)
        if self.body_received > self.app.settings.max_body_bytes:
            self.abort_upstream()
            error = self.body_too_large()
            self.send_error(error.status_code, exc_info=(ApiError, error, None))
        elif self.body_chunks is not None:
            self.body_chunks.append(chunk)
            if self.sniffing and self.body_received >= 4:
                await self.sniff_body()
            elif self.holding_form:
                await self.check_held_form()
        else:
            if self.form_tail is not None and self.refused_late_model(chunk):
                return
            self.body_held = True  # the upstream is behind: the client is not to blame
            await self.body_queue.put(chunk)
            self.body_held, self.body_seen = False, time.monotonic()

    def _on_fetch_done(self, fetch: "asyncio.Future[Any]") -> None:
        _retrieve(fetch)  # an abandoned fetch logs no warning
        self._drain_body_queue()

    def _drain_body_queue(self) -> None:
        """Unblock a data_received waiting on a full queue."""
        while not self.body_queue.empty():
            self.body_queue.get_nowait()

    def abort_upstream(self) -> None:
        """End the upstream request now, wherever it is."""
        if self.fetch is not None and not self.fetch.done():
            self._drain_body_queue()
            self.body_queue.put_nowait(ABORT)
        if self.upstream_request is not None:
            self.app.http_client.cancel(self.upstream_request)  # (nothing if it has ended)

    # -- the exchange: the request sent, its answer awaited ---------------------

    async def _pass_through(self, *args: str) -> None:
        self.body_complete = True
        self.stop_watching_upload()
        if self._finished:
            return
        if self.plan.lists is not None:
            await self.admit()
            await self.answer_own_list()
            return
        failure = await self.exchange()
        if self.client_gone and not self.read_to_its_end():
            self.set_status(499, "Client Closed Request")  # as nginx logs it
            return
        if self.reader is None or (failure is not None and not self._headers_written):
            raise self.upstream_error(failure)  # (nothing has reached the client yet)
        if self.note_objects(self.get_status()):
            await self.app.owners.flush(durable=False)  # fsync'd with the next usage flush
        if self.client_gone:
            return  # after the whole answer: logged with its status
        if failure is not None:
            # The upstream broke off mid-answer: end the client's answer the
            # same way, so it never mistakes a cut stream for a whole one.
            http1(self.request).stream.close()
            return
        await self.end_answer()
        self.finish()

    async def exchange(self) -> Optional[BaseException]:
        """Send the request (a body read whole inspected first; a streamed one is
        on its way already), and wait for its answer to end: the failure, if any."""
        exchange: Awaitable[tornado.httpclient.HTTPResponse]
        if self.fetch is None:  # no body, or one read whole: sent now, awaited in this task
            body = None
            if self.body_chunks is not None:
                body, self.facts = await self.inspect_body(b"".join(self.body_chunks))
                self.body_chunks = None
            await self.admit()
            exchange = self.app.http_client.send(self.new_upstream_request(body), self)
        else:
            if not self.fetch.done():
                await self.body_queue.put(None)  # the client's body is complete
            exchange = self.fetch
        try:
            response = await exchange
        except Exception as e:  # raise_error=False still raises for a failed connection
            return e
        return response.error if response.code == 599 else None

    def read_to_its_end(self) -> bool:
        """Whether the client had the whole answer: a client may close as soon as
        it has ``data: [DONE]`` or ``response.completed`` (openai-python does),
        before the upstream's chunked terminator arrives."""
        return self.reader is not None and self.reader.ended

    def upstream_error(self, error: Optional[BaseException]) -> ApiError:
        if isinstance(error, tornado.simple_httpclient.HTTPTimeoutError):
            return ApiError(504, "The upstream API did not answer in time "
                                 f"(UPSTREAM_TIMEOUT={self.app.settings.upstream_timeout:g} s).",
                            "server_error", "upstream_timeout")
        log.warning("upstream failed: %s", type(error).__name__ if error else "no answer")
        return ApiError(502, "The upstream API could not be reached.",
                        "server_error", "upstream_unreachable")

    get = post = put = patch = delete = head = _pass_through

    def options(self, *args: str) -> None:
        self.answer_preflight()

    # -- the answer: upstream → client (this handler is the UpstreamReceiver) ---

    def on_upstream_headers(self, code: int, reason: str,
                            headers: tornado.httputil.HTTPHeaders) -> None:
        if self.client_gone:
            return
        self.set_status(code, reason or None)
        self.take_upstream_fields(headers)
        if "Content-Length" not in headers:
            # A stream: each piece goes out as it comes (with a length, Tornado
            # sends the last piece unheld when the answer finishes).
            http1(self.request).stream.set_nodelay(True)
        self.reader = UsageReader(headers.get("Content-Type", ""),
                                  headers.get("Content-Encoding", ""), strip=self.facts.strips_usage)
        if self.plan.filters_models and code == 200:
            self.models_list = []
        if self.reader.strip or self.models_list is not None:
            self.clear_header("Content-Length")  # this proxy changes the body

    def take_upstream_fields(self, headers: tornado.httputil.HTTPHeaders) -> None:
        """The upstream's answer fields as the client's: without the hop-by-hop
        ones and the upstream's CORS fields, beside this proxy's own (CORS,
        Vary), its Content-Type and Date instead of Tornado's."""
        named_by_connection = connection_tokens(headers)
        self.clear_header("Content-Type")
        self.clear_header("Date")
        for name, value in headers.get_all():
            lower = name.lower()
            if lower not in NOT_FORWARDED_DOWN and lower not in named_by_connection:
                try:
                    self.add_header(name, value)
                except ValueError:  # (Tornado 6.2 refuses a tab inside a value: dropped)
                    pass

    def on_upstream_chunk(self, chunk: bytes) -> Optional[Awaitable[Any]]:
        """Pass a chunk on; the upstream is read again once the client took it."""
        if self.client_gone:
            return None
        if self.models_list is not None:
            self.models_list.append(chunk)
            return None
        assert self.reader is not None, "made by on_upstream_headers unless the client was gone"
        data = self.reader.feed(chunk)
        if not data:
            return None
        self.write(data)
        # (Tornado's HTTP write futures never hold an error no one has seen.)
        return unless_taken(self.flush(), http1(self.request).stream, seen=True)

    async def end_answer(self) -> None:
        """The answer's end: a model list filtered, what the usage reader held."""
        if self.models_list is not None:
            assert self.user is not None  # (authenticated in prepare)
            self.write(allowed_models_only(b"".join(self.models_list), self.user))
        elif self.reader is not None:
            rest = self.reader.flush()
            if rest:  # (nothing at all may be written for a 204 or 304)
                self.write(rest)
            if self.plan.fetched_later and self.plan.object_id and self.reader.result() is not None:
                self.counts_later = await self.app.owners.count_once(self.plan.object_id)

    def finish(self, chunk: Optional[Union[str, bytes, dict]] = None) -> "asyncio.Future[None]":
        self.account()  # (before Tornado writes the log line, which reports it)
        stream = http1(self.request).stream
        if self._finished or self.body_complete or self.client_gone or stream.closed() \
                or not has_body(self.request.headers):  # (also before a plan is made: a 401)
            return super().finish(chunk)
        # Answered before the body is in (401, 413 …): Tornado closes the
        # connection once the answer is written, and a close with unread data
        # resets it, so a client still sending gets a broken pipe, not the
        # answer. Say the close, and end as RFC 9112 §9.6 says: half-close, and
        # read what still comes (bounded) before closing.
        if not self._headers_written:
            self.set_header("Connection", "close")
        sock = socket.socket(fileno=os.dup(stream.socket.fileno()))  # (Tornado closes its own)
        written = super().finish(chunk)
        task = asyncio.ensure_future(linger(sock, written, self.app.settings.max_body_bytes))
        self.app.lingering.add(task)
        task.add_done_callback(self.app.lingering.discard)
        return written

    def on_finish(self) -> None:
        super().on_finish()
        self.stop_watching_upload()  # answered before the body was in (413, 404…)

    def on_connection_close(self) -> None:
        super().on_connection_close()
        self.client_gone = True
        self.stop_watching_upload()
        self.abort_upstream()
        if self.user is not None and not self.body_complete and not self._finished:
            # Gone mid-upload: Tornado will not finish this request, so it is
            # counted and its line logged here.
            self.set_status(499, "Client Closed Request")
            self.account()
            self.app.log_request(self)

    # -- accounting: where a request is counted ---------------------------------

    def account(self) -> None:
        """Count the request, once, with the usage its answer reported (or an
        estimate); set what the log line reports. Called at every end: finish
        (an answer, an error, a refusal, a client gone mid-answer) and a client
        gone mid-upload. A request refused before it went upstream costs nothing."""
        if self.accounted or self.user is None:
            return
        self.accounted = True
        if self.upstream_request is None:  # refused here: the log names the model
            self.log_model = self.app.model_label(self.request_model or "-")
            return
        model, usage, price_name = self.usage_found() or (None, None, None)
        model = self.app.model_label(model or self.request_model or "-")
        counts = usage_counts(self.app.settings.prices, price_name or model, usage)
        if self.plan.fetched_later is not None:
            counts[3] //= METERED_LATER[self.plan.fetched_later]  # (the Batch API's price)
        self.app.usage.record(self.user["name"], model, counts)
        self.log_model = model
        if usage is not None:
            self.log_tokens, self.log_cost = str(counts[2]), "$" + dollar_text(counts[3])

    def usage_found(self) -> Optional[Tuple[Optional[str], Any, Optional[str]]]:
        """(model, usage, the name of its price if not the model's) the answer
        showed, or an estimate: None if it costs nothing.

        A POST's answer is counted (not an update of an object); a fetched
        object's only if it was made after its creation's answer, once."""
        reader, plan, facts = self.reader, self.plan, self.facts
        if reader is None or not plan.counted or (plan.fetched_later and not self.counts_later):
            return None
        found = reader.result()
        if found is not None:
            return found[0], found[1], None
        answered = 200 <= self.get_status() < 300
        if (self.client_gone or reader.ended) and reader.deltas:
            # Gone before the usage event, or a stream that ended without one
            # (an upstream that ignored the proxy's include_usage): the upstream
            # bills what it made, so count an estimate (else hanging up would
            # dodge any quota): a token per delta passed, a token per 4 bytes
            # of the request body.
            return None, {"prompt_tokens": facts.size // 4, "completion_tokens": reader.deltas}, None
        if facts.characters and answered:
            return None, TokenCounts(characters=facts.characters), None
        if facts.images and answered:
            n, size, quality = facts.images
            return None, TokenCounts(images=n), image_price_name(self.request_model or "-", size, quality)
        return None


@tornado.web.stream_request_body
class UploadProxyHandler(ProxyHandler):
    """ProxyHandler for a request with a body, which passes as it arrives. (A
    request without one is not streamed: Tornado closes a streamed request's
    connection when it is answered before its body was read, prepare's
    refusals included, and a request pipelined after it would go unanswered.)"""


class WithBody(tornado.routing.PathMatches):
    """Matches the path only for requests that have a body."""

    def match(self, request: tornado.httputil.HTTPServerRequest) -> Optional[Dict[str, Any]]:
        return super().match(request) if has_body(request.headers) else None


def has_body(headers: tornado.httputil.HTTPHeaders) -> bool:
    """Whether a request says it has a body (any Transfer-Encoding does: one
    other than chunked is refused in ProxyHandler.prepare, in OpenAI's shape)."""
    if "Transfer-Encoding" in headers:
        return True
    length = headers.get("Content-Length")
    return length is not None and length.strip() != "0"


async def linger(sock: socket.socket, written: "asyncio.Future[None]", max_bytes: int) -> None:
    """Once an answer is ``written``: half-close the connection, then read and
    drop what the client still sends (at most ``max_bytes``, LINGER_SECONDS in
    all, LINGER_IDLE_SECONDS without a byte) before closing it (RFC 9112 §9.6)."""
    stream = tornado.iostream.IOStream(sock)
    deadline = time.monotonic() + LINGER_SECONDS
    try:
        await written
        sock.shutdown(socket.SHUT_WR)  # after the answer: the client reads it, then an end
        while max_bytes > 0:
            wait = min(LINGER_IDLE_SECONDS, deadline - time.monotonic())
            read = stream.read_bytes(IO_CHUNK_BYTES, partial=True)
            max_bytes -= len(await tornado.gen.with_timeout(
                datetime.timedelta(seconds=max(0.0, wait)), read,
                quiet_exceptions=tornado.iostream.StreamClosedError))
    except (tornado.iostream.StreamClosedError, tornado.util.TimeoutError, OSError):
        pass
    finally:
        stream.close()


def _json_or_none(data: Optional[bytes]) -> Any:
    try:
        return json.loads(data) if data else None
    except ValueError:
        return None


def allowed_models_only(body: bytes, user: Dict[str, Any]) -> bytes:
    """``GET /v1/models`` as the user's allowlist sees it."""
    try:
        listing = json.loads(body)
        listing["data"] = [m for m in listing["data"] if allows_model(user, m.get("id", ""))]
    except (ValueError, KeyError, TypeError, AttributeError):
        return body
    return json.dumps(listing).encode()


ABORT = b"abort"  # a body-queue sentinel, compared by identity


async def send_queued(queue: "asyncio.Queue[Optional[bytes]]",
                      write: Callable[[bytes], "asyncio.Future[None]"]) -> None:
    """A streamed body's producer: the chunks ``queue`` gets, until None (the
    end) or ABORT (the upstream request ended with StreamClosedError)."""
    while True:
        chunk = await queue.get()
        if chunk is None:
            return
        if chunk is ABORT:
            raise tornado.iostream.StreamClosedError()
        await write(chunk)


def _retrieve(future: "asyncio.Future[Any]") -> None:
    """Mark a future's exception as seen, so asyncio does not log it."""
    if not future.cancelled():
        future.exception()


def unless_taken(written: "asyncio.Future[None]", stream: tornado.iostream.IOStream,
                 seen: bool = False) -> Optional[Awaitable[bool]]:
    """None if all of a write to the client went to its socket (read the
    upstream on at once); else what to wait for before reading on: the client
    is behind. A client gone is the disconnect path's business. ``seen``: the
    write's error, if any, needs no marking as seen."""
    if not stream.writing():
        if not seen:
            written.add_done_callback(_retrieve)
        return None
    return _quietly(written)


async def _quietly(written: "asyncio.Future[None]") -> bool:
    """Wait for a write to the client: whether it took it (False: it has gone)."""
    try:
        await written
    except (tornado.iostream.StreamClosedError, tornado.websocket.WebSocketClosedError):
        return False
    return True


# ---------------------------------------------------------------------------
# The WebSocket proxy: /v1/realtime and any other /v<N>/… upgrade
# ---------------------------------------------------------------------------

KEY_SUBPROTOCOL = "openai-insecure-api-key."  # how browsers send a key: no headers there
NOT_FORWARDED_WS = NOT_FORWARDED_UP | {
    "origin", "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
    "sec-websocket-protocol",
}


# Server events that carry usage: a realtime response, the Responses API's in
# WebSocket mode, and a transcription of input audio.
TRANSCRIBED = "conversation.item.input_audio_transcription.completed"
USAGE_EVENTS = ('"response.done"', '"response.completed"', f'"{TRANSCRIBED}"')
# Server events that carry the session's settings (its transcription model).
SESSION_EVENTS = ('"session.created"', '"session.updated"', '"transcription_session.')


def transcription_model(session: Dict[str, Any]) -> Optional[str]:
    """The input audio transcription model of a realtime session's settings
    (``audio.input.transcription``, or the beta's ``input_audio_transcription``)."""
    audio = session.get("audio")
    places = [session.get("input_audio_transcription")]
    if isinstance(audio, dict) and isinstance(audio.get("input"), dict):
        places.insert(0, audio["input"].get("transcription"))
    for place in places:
        if isinstance(place, dict) and isinstance(place.get("model"), str):
            return place["model"]
    return None


class WebSocketUpgrade(tornado.routing.PathMatches):
    """Matches the path only for requests that ask to become a WebSocket."""

    def match(self, request: tornado.httputil.HTTPServerRequest) -> Optional[Dict[str, Any]]:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return None
        return super().match(request)


class RealtimeHandler(BaseHandler, tornado.websocket.WebSocketHandler):
    """Joins a client WebSocket to one the proxy opens upstream, frame for frame.

    The key is checked and the upstream connected before the client's upgrade
    is accepted, so a bad key or an unreachable upstream gets an HTTP answer
    in OpenAI's shape. Usage in ``response.done`` events is counted (account).
    """

    upstream: Optional[tornado.websocket.WebSocketClientConnection] = None
    client_stream: Optional[tornado.iostream.IOStream] = None  # the client's, once upgraded
    user: Optional[Dict[str, Any]] = None
    transcription_model: Optional[str] = None  # the session's, for its transcriptions

    async def get(self, *args: Any, **kwargs: Any) -> None:
        origin = self.request.headers.get("Origin")
        if origin is not None and not self.check_origin(origin):
            # Before anything else: a refused page must not reach the upstream.
            error = ApiError(403, f"Origin {origin} is not allowed (CORS_ORIGINS).",
                             code="forbidden")
            self.send_error(403, exc_info=(ApiError, error, None))
            return
        try:
            self.user = await authenticate(self.app.store, self.request.headers,
                                           self.subprotocol_key())
            self.log_user = self.user["name"]
            await check_limits(self.app, self.user, self.get_query_arguments("model"))
            refuse_unmetered(self.user, "WS", route_path(self.request.path))
            await check_path_access(self.app, self.user, route_path(self.request.path), "GET")
            await take_rpm_slot(self.app, self.user)
            self.upstream = await self.connect_upstream()
        except ApiError as error:
            self.send_error(error.status_code, exc_info=(ApiError, error, None))
            return
        self.client_stream = http1(self.request).stream  # (the WebSocket's, once upgraded)
        await super().get(*args, **kwargs)

    def isolated(self) -> bool:
        return self.user is not None and sees_own_only(self.user)

    async def refusal(self, message: str) -> Optional[ApiError]:
        """What a client event may not do: name a model outside the key's list (or
        without a price, for a budget), another user's object, or start a
        response once the quota or budget is used up."""
        user = self.user
        assert user is not None, "authenticated in get, before the upgrade"
        limited = has_allowlist(user) or bool(user.get("budget"))
        if not (limited or self.isolated() or user.get("quota")):
            return None
        if not any(marker in message for marker in ('"model"', '"response.create"', "\\u")
                   + tuple(m.decode() for m in REFERENCE_MARKERS)):
            return None
        event = _json_or_none(message.encode())
        if not isinstance(event, dict):
            return None
        try:
            if event.get("type") == "response.create":
                await refuse_over_limits(self.app, user)
            for part in (event, event.get("response"), event.get("session")):
                model = part.get("model") if isinstance(part, dict) else None
                if isinstance(model, str):
                    refuse_model(self.app, user, model)
            if self.isolated():
                await refuse_others_ids(self.app, user, event)
        except ApiError as error:
            return error
        return None

    def subprotocols(self) -> List[str]:
        value = self.request.headers.get("Sec-WebSocket-Protocol", "")
        return [p.strip() for p in value.split(",") if p.strip()]

    def subprotocol_key(self) -> Optional[str]:
        for protocol in self.subprotocols():
            if protocol.startswith(KEY_SUBPROTOCOL):
                return protocol[len(KEY_SUBPROTOCOL):]
        return None

    async def connect_upstream(self) -> tornado.websocket.WebSocketClientConnection:
        base = self.app.settings.upstream_url
        url = "ws" + base[len("http"):] + without_doubled_version(self.request.path)
        if self.request.query:
            url += "?" + self.request.query
        headers = tornado.httputil.HTTPHeaders()
        for name, value in self.request.headers.get_all():
            if name.lower() not in NOT_FORWARDED_WS:
                headers.add(name, value)
        headers["Authorization"] = "Bearer " + self.app.settings.openapi_api_key
        request = tornado.httpclient.HTTPRequest(
            url, headers=headers, request_timeout=self.app.settings.upstream_timeout,
            connect_timeout=self.app.settings.connect_timeout)
        protocols = [p for p in self.subprotocols() if not p.startswith(KEY_SUBPROTOCOL)]
        try:
            return await tornado.websocket.websocket_connect(
                request,  # read by pump_upstream: no callback, so reading waits for it
                subprotocols=protocols or None, max_message_size=WS_MAX_MESSAGE_BYTES)
        except tornado.httpclient.HTTPClientError as error:
            if error.code == 599:
                raise ApiError(504, "The upstream API did not answer in time.", "server_error",
                               "upstream_timeout") from None
            raise ApiError(error.code, f"The upstream refused the WebSocket ({error.code}).",
                           "server_error" if error.code >= 500 else "invalid_request_error") from None
        except Exception as error:
            log.warning("upstream WebSocket failed: %s", type(error).__name__)
            raise ApiError(502, "The upstream API could not be reached.", "server_error",
                           "upstream_unreachable") from None

    def select_subprotocol(self, subprotocols: List[str]) -> Optional[str]:
        return self.upstream.selected_subprotocol if self.upstream else None

    def check_origin(self, origin: str) -> bool:
        return self.app.cors_origin(origin) is not None

    def open(self, *args: Any, **kwargs: Any) -> None:
        self.set_nodelay(True)
        self.pump = asyncio.ensure_future(self.pump_upstream())

    async def pump_upstream(self) -> None:
        """Upstream → client, a message at a time: the upstream is read again once
        the client's socket has taken the last one, so a slow client slows the
        upstream instead of making this process buffer for it."""
        upstream = self.upstream
        while upstream is not None:
            message = await upstream.read_message()
            written = self.on_upstream_message(message)
            if message is None:
                return
            if written is None:
                continue
            if self.client_stream is None or self.client_stream.closed():
                written.add_done_callback(_retrieve)
                continue
            behind = unless_taken(written, self.client_stream)
            if behind is not None and not await behind:
                return

    async def on_message(self, message: Union[str, bytes]) -> None:
        if isinstance(message, str):
            refused = await self.refusal(message)
            if refused is not None:  # answered as OpenAI answers a bad event; not sent on
                self.write_message(json.dumps({"type": "error", **refused.body()}))
                return
        if self.upstream is not None:
            try:
                await self.upstream.write_message(message, binary=isinstance(message, bytes))
            except tornado.websocket.WebSocketClosedError:
                self.close(1011, "upstream closed")

    def on_upstream_message(self, message: Union[str, bytes, None]) -> Optional["asyncio.Future[None]"]:
        """Pass one upstream message on; returns the write, done once the client took it."""
        if message is None:  # the upstream closed: close the client the same way
            code = getattr(self.upstream, "close_code", None)
            reason = getattr(self.upstream, "close_reason", None)
            if code is None:  # gone without a close frame (RFC 6455 §7.4.1: 1011)
                code, reason = 1011, "upstream connection lost"
            self.close(code, reason or "")
            return None
        if isinstance(message, str) and any(kind in message[:200] for kind in USAGE_EVENTS):
            self.account(message)
        elif isinstance(message, str) and any(kind in message[:200] for kind in SESSION_EVENTS):
            self.note_transcription_model(message)
        elif isinstance(message, str) and '"response.created"' in message[:200] and self.user:
            # Responses in WebSocket mode are stored like POSTed ones: the caller's.
            match = FIRST_ID.search(message.encode()[:4096])
            if match and route_path(self.request.path).endswith("/responses"):
                self.app.owners.claim(self.user["name"], match.group(1).decode(), "Response",
                                      EXPIRING_COLLECTIONS["responses"])
        try:
            return self.write_message(message, binary=isinstance(message, bytes))
        except tornado.websocket.WebSocketClosedError:
            self.on_close()
            return None

    def account(self, message: str) -> None:
        """Count one response's usage as its event passes: a session is counted
        as it goes (so its quota applies mid-session), and nothing is left to
        count when it ends."""
        try:
            event = json.loads(message)
            found = usage_in(event)
        except ValueError:
            return
        if found is not None and self.user is not None:
            model, usage = found
            if event.get("type") == TRANSCRIBED:  # (by the session's transcription model)
                model = model or self.transcription_model
            model = self.app.model_label(model or self.get_query_argument("model", "-"))
            self.app.usage.record(self.user["name"], model,
                                  usage_counts(self.app.settings.prices, model, usage))

    def note_transcription_model(self, message: str) -> None:
        """The model the session transcribes input audio with, from its
        ``session.created``/``updated``: the transcription events do not name it."""
        event = _json_or_none(message.encode())
        session = event.get("session") if isinstance(event, dict) else None
        model = transcription_model(session) if isinstance(session, dict) else None
        if model is not None:
            self.transcription_model = model

    def on_close(self) -> None:
        if self.upstream is not None:
            upstream, self.upstream = self.upstream, None
            upstream.close(self.close_code or 1000, self.close_reason or "")


# ---------------------------------------------------------------------------
# Self-service: /me, /me/reset and the billing views, with the user's own key
# ---------------------------------------------------------------------------

class UserHandler(BaseHandler):
    """A route answered here for the caller's own key."""

    async def prepare(self) -> None:
        if self.request.method != "OPTIONS":
            self.user = await authenticate(self.app.store, self.request.headers)
            self.log_user = self.user["name"]

    def options(self, *args: Optional[str]) -> None:
        self.answer_preflight()


class MeHandler(UserHandler):
    """``GET /me``: the caller's own record and usage (in a browser with no key:
    the page that asks for the key and shows them). ``POST /me/reset``: a new key."""

    async def prepare(self) -> None:
        self.page = (self.request.method == "GET" and not self.path_args[0]
                     and is_page_request(self.request))
        if not self.page:
            await super().prepare()

    async def get(self, action: Optional[str]) -> None:
        if self.page:
            ME_PAGE.render(self)
            return
        if action:
            raise ApiError(404, f"Invalid URL (GET /me/{action}): try GET /me or POST /me/reset",
                           code="unknown_url")
        name = self.user["name"]
        await self.app.usage.flush()
        requests = (await self.app.store.total(name))[0]
        today = utcnow().date()
        first = (today - datetime.timedelta(days=29)).isoformat()
        usage = await self.app.store.usage_rows(name, first, today.isoformat())
        spend = await spend_in_period(self.app, self.user)
        budget = self.user.get("budget") or 0
        left = usd(max(0, budget - spend["spent_units"])) if budget else None
        self.finish_json({
            "name": name, "created": self.user.get("created"),
            "expires": self.user.get("expires"), "quota": self.user.get("quota", 0),
            "used": spend["used"], "period": spend["period"], "budget": usd(budget),
            "spent": spend["spent"], "budget_left": left,
            "resets_at": spend["resets_at"], "rpm": self.user.get("rpm", 0),
            "models": self.user.get("models", ["*"]), "requests": requests,
            "usage": [in_dollars({k: v for k, v in row.items() if k != "user"}) for row in usage]})

    async def post(self, action: Optional[str]) -> None:
        if action != "reset":
            path = "/me" + (f"/{action}" if action else "")
            raise ApiError(404, f"Invalid URL (POST {path}): try POST /me/reset",
                           code="unknown_url")
        key = await self.app.store.reset_key(self.user["name"])
        log.info("self-service: %s reset their key", self.user["name"])
        self.finish_json({"name": self.user["name"], "key": key})


class BillingHandler(UserHandler):
    """``/dashboard/billing/subscription`` and ``/usage`` (also below ``/v1``):
    OpenAI's retired billing endpoints, which some GUI apps still call to show
    what is used and left, answered from the caller's own budget and cost: the
    budget as the hard limit in dollars (1,000,000 without a budget), the cost
    in cents, as OpenAI answered."""

    NO_BUDGET_USD = 1_000_000

    async def get(self, what: str) -> None:
        name = self.user["name"]
        if what == "subscription":
            budget = self.user.get("budget") or 0
            limit = usd(budget) if budget else self.NO_BUDGET_USD
            expires = self.user.get("expires")
            self.finish_json({
                "object": "billing_subscription", "has_payment_method": True,
                "canceled": False, "canceled_at": None, "delinquent": None,
                "access_until": int(parse_time(expires).timestamp()) if expires else 0,
                "soft_limit_usd": limit, "hard_limit_usd": limit, "system_hard_limit_usd": limit,
                "plan": {"title": "worker.py", "id": "worker.py"}, "account_name": name})
            return
        today = utcnow().date()
        first = self.get_query_argument("start_date", (today - datetime.timedelta(days=99)).isoformat())
        end = self.get_query_argument("end_date", (today + datetime.timedelta(days=1)).isoformat())
        if not all(re.match(r"\d{4}-\d{2}-\d{2}\Z", day) for day in (first, end)):
            raise ApiError(400, "start_date and end_date must be days as YYYY-MM-DD")
        await self.app.usage.flush()
        rows = [row for row in await self.app.store.usage_rows(name, first, end) if row["day"] < end]
        days: Dict[str, List[Dict[str, Any]]] = {}
        for row in rows:
            days.setdefault(row["day"], []).append(
                {"name": row["model"], "cost": usd(row["cost"] * 100)})
        self.finish_json({
            "object": "list", "total_usage": usd(sum(row["cost"] for row in rows) * 100),
            "daily_costs": [{"timestamp": int(datetime.datetime.strptime(
                day, "%Y-%m-%d").replace(tzinfo=datetime.timezone.utc).timestamp()),
                "line_items": items} for day, items in sorted(days.items())]})


# ---------------------------------------------------------------------------
# Admin: /ACCESS_TOKEN/… and /admin/… (Bearer)
# ---------------------------------------------------------------------------

# The first path word of every admin command (DELETE /TOKEN/NAME aside): only a
# request that names one counts as a try at the token (CONTRACT.md §6).
ADMIN_COMMANDS = frozenset("register reset set users stats objects delete".split())


class AdminHandler(BaseHandler):
    """The owner's commands: register, reset, set and delete users; users; stats.

    The token comes from the path (``/TOKEN/register/NAME``, as in the seed)
    or from ``Authorization: Bearer TOKEN`` on ``/admin/…``.
    """

    def initialize(self, token_in_path: bool) -> None:  # type: ignore[override]  # (the route's kwargs)
        super().initialize()
        self.token_in_path = token_in_path

    @property
    def log_path(self) -> str:
        if self.token_in_path:
            return "/***" + self.request.path[self.request.path.find("/", 1):]
        return self.request.path

    def prepare(self) -> None:
        if self.authorised_by_session():
            return
        if not self.names_a_command():
            # What scanners try on every open port (/wp-admin/…, /.git/config):
            # no try at the token, so no step towards locking the owner out.
            raise AdminError(403, "Access forbidden")
        client = self.app.client_address(self.request)
        wait = self.app.admin_locked_out(client)
        if wait:
            raise AdminError(429, "too many wrong tokens; try again in a minute",
                             headers={"Retry-After": str(math.ceil(wait))})
        given = self.path_args[0] if self.token_in_path else bearer(self.request.headers) or ""
        if not self.app.is_access_token(given):
            self.app.note_admin_failure(client)
            raise AdminError(403, "Access forbidden")

    def names_a_command(self) -> bool:
        """Whether the request names an admin command, so counts as a try at the token."""
        if not self.token_in_path:  # a Bearer on /admin/… (a scanner's Basic is not one)
            return bearer(self.request.headers) is not None
        command, name = self._split()
        return command in ADMIN_COMMANDS or (self.request.method == "DELETE" and name is None)
    def authorised_by_session(self) -> bool:
        """The dashboard's own request: its session cookie (sent to ``/admin/…``
        only) and that session's XSRF token in a header, which a page from
        another origin cannot know; a session without it gets 403."""
        if self.token_in_path or "Authorization" in self.request.headers:
            return False
        session = read_session(self)
        if session is None:
            return False
        if not hmac.compare_digest(self.request.headers.get(XSRF_HEADER, ""),
                                   xsrf_token(self, session)):
            raise AdminError(403, "Access forbidden")
        return True

    def wants_json(self) -> bool:
        return (self.get_query_argument("format", "") == "json"
                or "application/json" in self.request.headers.get("Accept", ""))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None))[1]
        if not isinstance(error, AdminError):
            error = self.api_error(status_code, error)
        for name, value in error.headers.items():  # (Retry-After on the lockout's 429)
            self.set_header(name, value)
        self.set_status(error.status_code)
        message = error.message
        if error.status_code == 403:
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            self.finish("Access forbidden\n")
        elif self.wants_json():
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({"error": self.app.redactor.redact(message)}) + "\n")
        else:
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            self.finish(f"error: {self.app.redactor.redact(message)}\n")

    def answer(self, text: str, data: Dict[str, Any]) -> None:
        self.send_answer(json.dumps(data) if self.wants_json() else text)

    def send_answer(self, body: str) -> None:
        """The answer's text table, or its JSON if the client asked for JSON."""
        self.set_header("Content-Type", "application/json" if self.wants_json()
                        else "text/plain; charset=utf-8")
        self.finish(body + "\n")

    async def run_command(self, command: str, name: Optional[str]) -> None:
        store = self.app.store
        self.refuse_secrets(name)
        if command == "users" and name is None:
            await self.show_users()
        elif command == "stats":
            await self.show_stats(None if name is None else check_name(name))
        elif command == "objects" and name is not None:
            await self.show_objects(check_name(name))
        elif name is None:
            raise AdminError(404, "unknown command; see the README for the admin commands")
        elif command == "register":
            limits = parse_limits(self.fields())
            if expiry_passed(limits):
                # A key that could never work: say so rather than hand it out.
                raise AdminError(400, f"expires {limits['expires']} is in the past")
            await self.app.usage.flush()  # a name's unsaved usage is not the new user's
            key = await store.create_user(check_name(name), limits)
            self.done(command, name, key, {"name": name, "key": key})
        elif command == "reset":
            key = await store.reset_key(check_name(name))
            self.done(command, name, key, {"name": name, "key": key})
        elif command == "set":
            user = await store.set_limits(check_name(name), parse_limits(self.fields()))
            await self.app.owners.flush()
            row = {**await self.user_row(user), "objects": len(await store.objects_of(name))}
            self.done(command, name, render_table([money_cells(row)]), row)
        elif command == "delete":
            check_name(name)
            await self.app.flush()  # usage into the stats, where it stays; records to drop
            await store.delete_user(name)
            self.done(command, name, "ok", {"name": name, "deleted": True})
        else:
            raise AdminError(404, "unknown command; see the README for the admin commands")

    def refuse_secrets(self, name: Optional[str]) -> None:
        """A name or model that is the admin token or looks like an API key (one
        pasted by mistake) would be stored, and shown in tables, in clear: 400."""
        values = [("name", name or "")] + [("models", m) for m in
                                            self.get_argument("models", "").split(",")]
        for field, value in values:
            if self.app.settings.access_token in value:
                raise AdminError(400, f"invalid {field}: it may not hold the admin token")
            if LOOKS_LIKE_KEY.search(value):
                raise AdminError(400, f"invalid {field}: it looks like an API key (sk-…); "
                                      f"use a name that is not a secret")

    def fields(self) -> Dict[str, str]:
        """Query and form fields, one value each."""
        return {name: self.get_argument(name) for name in self.request.arguments}

    def done(self, command: str, name: str, text: str, data: Dict[str, Any]) -> None:
        log.info("admin: %s %s", command, name)
        self.answer(text, data)

    async def user_row(self, user: Dict[str, Any],
                       last_used: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
        """A user's line: limits, and what is used of them in the current period."""
        name = user["name"]
        if last_used is None:
            await self.app.usage.flush()  # (the day of the last request may not be written)
            last_used = await self.app.store.last_used(name)
        spend = await spend_in_period(self.app, user)
        # (All-time requests: the period's counter when the period is all time.)
        requests = (spend["requests"] if spend["period"] == "all"
                    else (await self.app.usage.used(name, fresh=True))[0])
        return {"name": name, "created": user.get("created"),
                "expires": user.get("expires"), "quota": user.get("quota", 0),
                "used": spend["used"], "period": spend["period"],
                "budget": usd(user.get("budget") or 0), "spent": spend["spent"],
                "resets_at": spend["resets_at"], "rpm": user.get("rpm", 0),
                "models": user.get("models") or ["*"],
                "scope": user.get("scope", "own"), "requests": requests,
                "last_used": last_used.get(name)}

    async def show_objects(self, name: str) -> None:
        await self.app.store.require_user(name)
        await self.app.owners.flush()
        rows = [{"id": r["id"], "kind": r["kind"], "created": r["created"], "expires": r.get("expires")}
                for r in await self.app.store.objects_of(name)]
        self.answer(render_table(rows) if rows else f"{name} owns no objects", {"objects": rows})

    async def show_users(self) -> None:
        await self.app.owners.flush()
        counts = collections.Counter(r["user"] for r in await self.app.store.objects_of())
        await self.app.usage.flush()
        last_used = await self.app.store.last_used()
        rows = []
        for user in await self.app.store.list_users():
            rows.append({**await self.user_row(user, last_used), "objects": counts[user["name"]]})
            if len(rows) % 100 == 0:  # (the embedded store answers at once: let others in)
                await asyncio.sleep(0)
        self.answer(render_table([money_cells(row) for row in rows]) if rows else "no users",
                    {"users": rows})

    async def show_stats(self, name: Optional[str]) -> None:
        """``stats``: usage per day, user and model; with ``group=``, summed per
        some of them (``top=N``: the N users or models that cost most, and others)."""
        first_day, last_day = self.stats_period()
        group, top = self.stats_group()
        await self.app.usage.flush()  # so the table includes the last seconds
        rows, others = await self.app.store.usage_sums(name, first_day, last_day,
                                                       group or USAGE_GROUPS, top)
        as_json = self.wants_json()
        # (A month of a thousand users is megabytes of text: made in a thread.)
        self.send_answer(await asyncio.get_running_loop().run_in_executor(
            None, stats_answer, rows, first_day, last_day, group, others if top else None, as_json))

    def stats_group(self) -> Tuple[Tuple[str, ...], int]:
        """``?group=`` (some of day, user, model, comma-separated) and ``?top=N``."""
        fields = self.fields()
        group = tuple(word.strip() for word in fields.get("group", "").split(",") if word.strip())
        wrong = [word for word in group if word not in USAGE_GROUPS]
        if wrong or ("group" in fields and not group):
            raise AdminError(400, "group must name day, user or model, or several of them "
                                  "separated by commas" + (f"; {wrong[0]!r} is none of them"
                                                           if wrong else ""))
        if "top" not in fields:
            return group, 0
        top = _whole_number(fields["top"], "top")
        if not 1 <= top <= 100000:
            raise AdminError(400, "top must be a whole number from 1 to 100000")
        if not set(group) & {"user", "model"}:
            raise AdminError(400, "top needs user or model in group (e.g. group=day,user&top=7)")
        return group, top

    def stats_period(self) -> Tuple[str, str]:
        """``?days=N`` (default 30, today included) or ``?from=&to=`` as UTC days."""
        fields = self.fields()
        unknown = sorted(set(fields) - {"days", "from", "to", "format", "group", "top"})
        if unknown:
            raise AdminError(400, f"unknown field {unknown[0]}; fields are days, from, to, "
                                  f"group, top")
        today = utcnow().date()
        if "days" in fields and ("from" in fields or "to" in fields):
            raise AdminError(400, "days and from/to: give one of them")
        days = _whole_number(fields.get("days", "30"), "days")
        if not 1 <= days <= 36500:
            raise AdminError(400, "days must be a whole number from 1 to 36500")
        first, last = today - datetime.timedelta(days=days - 1), today
        for field in ("from", "to"):
            if field in fields:
                try:
                    day = datetime.datetime.strptime(fields[field], "%Y-%m-%d").date()
                except ValueError:
                    raise AdminError(400, f"{field} must be a day as YYYY-MM-DD") from None
                first, last = (day, last) if field == "from" else (first, day)
        if first > last:
            raise AdminError(400, "from must not be after to")
        return first.isoformat(), last.isoformat()

    def _split(self) -> Tuple[str, Optional[str]]:
        rest = self.path_args[-1]
        command, _, name = rest.partition("/")
        return command, (name or None)

    async def get(self, *args: str) -> None:
        command, name = self._split()
        if command == "delete":  # a link preview of a pasted URL would run it
            raise AdminError(404, "unknown command: GET and POST never delete; delete a "
                                  "user with DELETE /TOKEN/NAME (curl -X DELETE …)")
        await self.run_command(command, name)

    post = get

    async def delete(self, *args: str) -> None:
        command, name = self._split()
        if name is not None:
            raise AdminError(404, "unknown command; delete is DELETE /TOKEN/NAME")
        await self.run_command("delete", command)


# The stats table's columns after day, user and model (JSON has every USAGE_FIELDS).
STATS_COLUMNS = ("requests", "input_tokens", "output_tokens", "total_tokens", "cost")
MONEY_FIELDS = ("budget", "spent", "cost")


class Dollars(str):
    """A table cell that is an amount of dollars: right-aligned like numbers."""


def money_cells(row: Dict[str, Any], units: bool = False) -> Dict[str, Any]:
    """A row for a text table: its amounts (in USD, or in cost ``units``) as dollars."""
    return {k: Dollars(dollar_text(v if units else round(v * COST_UNITS_PER_USD)))
            if k in MONEY_FIELDS else v for k, v in row.items()}


def in_dollars(row: Dict[str, Any]) -> Dict[str, Any]:
    """A usage row for JSON: its cost in US dollars."""
    return {**row, "cost": usd(row["cost"])} if "cost" in row else row


async def spend_in_period(app: "App", user: Dict[str, Any]) -> Dict[str, Any]:
    """What the user used in the current period: ``period``, ``requests``,
    ``used`` (tokens), ``spent`` (USD) and ``spent_units``, ``resets_at``."""
    period = user.get("period") or "all"
    requests, tokens, cost = await app.usage.used(user["name"], period, fresh=True)
    resets = period_resets(period, utcnow().date())
    return {"period": period, "requests": requests, "used": tokens, "spent": usd(cost),
            "spent_units": cost, "resets_at": iso(resets) if resets else None}


def stats_answer(rows: List[Dict[str, Any]], first_day: str, last_day: str,
                 group: Tuple[str, ...], others: Optional[int], as_json: bool) -> str:
    """The stats as a table for curl or as JSON: its rows (of the ``group``'s
    fields, or day, user and model) and their total; ``others`` with ``top``."""
    fields = [field for field in USAGE_GROUPS if field in group] if group else list(USAGE_GROUPS)
    total = {field: sum(row[field] for row in rows) for field in USAGE_FIELDS}
    if as_json:
        data: Dict[str, Any] = {"from": first_day, "to": last_day}
        if group:
            data["group"] = fields
        data.update(usage=[in_dollars(row) for row in rows], total=in_dollars(total))
        if others is not None:
            data["others"] = others
        return json_in_pieces(data)
    if not rows:
        return f"no usage from {first_day} to {last_day}"
    label = {field: "total" if field == fields[0] else "" for field in fields}
    shown = (*fields, *STATS_COLUMNS)
    return render_table([money_cells({k: "(others)" if row[k] is None else row[k] for k in shown},
                                     units=True) for row in rows + [{**label, **total}]])


def json_in_pieces(data: Dict[str, Any], items: int = 1000) -> str:
    """``json.dumps(data)``, its lists encoded ``items`` at a time: one json.dumps
    of megabytes holds the GIL, so the event loop too, until it ends."""
    def encode(value: Any) -> str:
        if not isinstance(value, list):
            return json.dumps(value)
        return "[%s]" % ", ".join(json.dumps(value[i:i + items])[1:-1]
                                  for i in range(0, len(value), items))
    return "{%s}" % ", ".join(f"{json.dumps(key)}: {encode(value)}" for key, value in data.items())


def render_table(rows: List[Dict[str, Any]]) -> str:
    """Rows as aligned text columns for curl; numbers right-aligned, None as -."""
    columns = list(rows[0])
    cells = [[str(c) for c in columns]]
    cells += [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    numeric = [all(isinstance(row[c], (int, Dollars)) for row in rows) for c in columns]
    return "\n".join(
        "  ".join(cell.rjust(w) if num else cell.ljust(w)
                  for cell, w, num in zip(line, widths, numeric)).rstrip()
        for line in cells)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return ",".join(value) if isinstance(value, list) else str(value)


# ---------------------------------------------------------------------------
# Web pages: /admin and /me in a browser
# ---------------------------------------------------------------------------

# The owner's session: a signed cookie holding a random session id, valid this
# long (the cookie's Expires and the signature's age both). Its secret is
# derived from ACCESS_TOKEN, so a new token and a restart end every session.
SESSION_COOKIE = "worker_session"
SESSION_DAYS = 0.5
XSRF_HEADER = "X-XSRF-Token"  # the dashboard's fetches carry it beside the cookie


def cookie_secret(access_token: str) -> str:
    """HKDF (RFC 5869) from the token: a key for the cookies, never the token itself."""
    prk = hmac.new(b"worker.py web pages", access_token.encode("utf-8", "surrogateescape"),
                   hashlib.sha256).digest()
    return hmac.new(prk, b"session cookie\x01", hashlib.sha256).hexdigest()


def xsrf_token(handler: tornado.web.RequestHandler, session: str) -> str:
    """The session's XSRF token: only a page this server sent holds it."""
    secret = handler.application.settings["cookie_secret"].encode()
    return hmac.new(secret, b"xsrf:" + session.encode(), hashlib.sha256).hexdigest()


def read_session(handler: tornado.web.RequestHandler) -> Optional[str]:
    """The session id of a valid, unexpired session cookie, or None."""
    # Tornado 6.3 renamed get_secure_cookie to get_signed_cookie.
    get = getattr(handler, "get_signed_cookie", None) or handler.get_secure_cookie
    value = get(SESSION_COOKIE, max_age_days=SESSION_DAYS)
    return value.decode() if value else None


def start_session(handler: tornado.web.RequestHandler, secure: bool) -> None:
    """The session cookie; ``secure`` when the browser came over HTTPS."""
    put = getattr(handler, "set_signed_cookie", None) or handler.set_secure_cookie
    put(SESSION_COOKIE, secrets.token_urlsafe(24), expires_days=SESSION_DAYS, path="/admin",
        httponly=True, samesite="Strict", secure=secure)


def is_page_request(request: tornado.httputil.HTTPServerRequest) -> bool:
    """A browser's navigation: it accepts HTML and carries no key (API clients do)."""
    return ("text/html" in request.headers.get("Accept", "")
            and key_from_headers(request.headers) is None)


def csp_hash(text: str) -> str:
    return "'sha256-%s'" % base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


class WebPage:
    """One page: HTML around a constant style sheet and script, allowed by their
    hashes in its Content-Security-Policy (no inline script or style otherwise)."""

    def __init__(self, title: str, body: str, script: str):
        self.title, self.body, self.script = title, body, PAGE_SCRIPT + script
        self.csp = ("default-src 'none'; script-src %s; style-src %s; connect-src 'self'; "
                    "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; "
                    "base-uri 'none'" % (csp_hash(self.script), csp_hash(PAGE_STYLE)))

    def render(self, handler: tornado.web.RequestHandler, status: int = 200, **values: str) -> None:
        body = self.body
        for name, value in values.items():  # every value is escaped for HTML
            body = body.replace("{%s}" % name, tornado.escape.xhtml_escape(value))
        for name in ("Access-Control-Allow-Origin", "Access-Control-Expose-Headers", "Vary"):
            handler.clear_header(name)
        handler.set_status(status)
        handler.set_header("Content-Type", "text/html; charset=utf-8")
        handler.set_header("Content-Security-Policy", self.csp)
        handler.set_header("X-Content-Type-Options", "nosniff")
        handler.set_header("X-Frame-Options", "DENY")
        handler.set_header("Referrer-Policy", "no-referrer")
        handler.set_header("Cache-Control", "no-store")
        handler.finish(
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<meta name="color-scheme" content="light dark"><meta name="referrer" content="no-referrer">'
            f'<title>{self.title}</title><link rel="icon" href="data:,">'
            f'<style>{PAGE_STYLE}</style></head><body>{body}<script>{self.script}</script>'
            '</body></html>')


class AdminPageHandler(BaseHandler):
    """``/admin``: the login form, or the owner's dashboard for a session.
    ``POST`` logs in (field ``token``; a wrong one counts toward the lockout) or,
    with ``action=logout``, out. The dashboard calls the admin API itself."""

    def get(self) -> None:
        session = read_session(self)
        if session is None:
            LOGIN_PAGE.render(self, message="")
        else:
            DASHBOARD_PAGE.render(self, xsrf=xsrf_token(self, session))

    def post(self) -> None:
        if self.request.headers.get("Sec-Fetch-Site") == "cross-site":
            # Another site's form (browsers say so, and a page cannot forge it):
            # no try at the token, so no step towards locking the owner out.
            raise AdminError(403, "Access forbidden")
        if self.get_body_argument("action", "") == "logout":
            session = read_session(self)
            if session is not None and not hmac.compare_digest(
                    self.get_body_argument("xsrf", ""), xsrf_token(self, session)):
                raise AdminError(403, "Access forbidden")  # another site's form
            self.clear_cookie(SESSION_COOKIE, path="/admin")
            self.redirect("/admin/", status=303)
            return
        client = self.app.client_address(self.request)
        wait = self.app.admin_locked_out(client)
        if wait:
            self.set_header("Retry-After", str(math.ceil(wait)))
            LOGIN_PAGE.render(self, 429, message="Too many wrong tokens: try again in a minute.")
        elif not self.app.is_access_token(self.get_body_argument("token", "")):
            self.app.note_admin_failure(client)
            LOGIN_PAGE.render(self, 403, message="That is not the access token.")
        else:
            log.info("admin: signed in from the web page")
            start_session(self, self.app.came_over_https(self.request))
            self.redirect("/admin/", status=303)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None))[1]
        if isinstance(error, AdminError):  # (a sign-out without the XSRF token)
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            self.finish(error.message + "\n")
        else:
            super().write_error(status_code, **kwargs)


PAGE_STYLE = r"""
:root{--bg:#f4f6fa;--card:#fff;--text:#1b2030;--muted:#5b6477;--line:#e2e6ee;--accent:#3461d9;
--accent-text:#fff;--ok:#17875a;--warn:#b86e00;--bad:#c62f45;--track:#e7eaf1;--focus:#3461d9;
--shadow:0 1px 2px rgba(20,30,60,.06),0 4px 16px rgba(20,30,60,.05)}
@media (prefers-color-scheme:dark){:root{--bg:#0f131a;--card:#181e28;--text:#e6e9ef;--muted:#9aa4b5;
--line:#2a3240;--accent:#7fa2ff;--accent-text:#0b1020;--ok:#3ccf8e;--warn:#f2b53d;--bad:#ff7489;
--track:#273041;--focus:#9db8ff;--shadow:none}}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;background:var(--bg);color:var(--text);font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,Ubuntu,sans-serif}
header{display:flex;align-items:center;justify-content:space-between;gap:12px;padding:14px 20px;
background:var(--card);border-bottom:1px solid var(--line)}
header h1,h1.title{font-size:17px;margin:0;font-weight:650}
header h1 span,h1.title span{color:var(--muted);font-weight:400}
main{max-width:1120px;margin:0 auto;padding:20px 16px 48px;display:grid;gap:16px}
.card{background:var(--card);border:1px solid var(--line);border-radius:14px;padding:18px 20px;box-shadow:var(--shadow);min-width:0}
.card h2{font-size:15px;margin:0 0 12px;font-weight:650}
.row{display:flex;flex-wrap:wrap;align-items:center;justify-content:space-between;gap:10px}
.row h2{margin:0}
.tools{display:flex;gap:8px;flex-wrap:wrap;flex:1;justify-content:flex-end}
.tools input{width:auto;flex:0 1 220px;min-width:0}
.stats{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:16px}
.stat .label{color:var(--muted);font-size:13px}
.stat .value{font-size:26px;font-weight:650;letter-spacing:-.01em;font-variant-numeric:tabular-nums}
.stat .sub{color:var(--muted);font-size:13px}
.muted{color:var(--muted)}
.small{font-size:13px}
button,.button{font:inherit;font-size:14px;border-radius:9px;padding:7px 14px;border:1px solid var(--line);
background:var(--card);color:var(--text);cursor:pointer;min-height:36px}
button.primary{background:var(--accent);border-color:var(--accent);color:var(--accent-text);font-weight:600}
button.danger{color:var(--bad)}
button.danger.primary{background:var(--bad);border-color:var(--bad);color:#fff}
button:hover{filter:brightness(.97)}
:focus-visible{outline:3px solid var(--focus);outline-offset:2px}
input,select{font:inherit;font-size:15px;width:100%;padding:8px 10px;border-radius:9px;border:1px solid var(--muted);
background:var(--bg);color:var(--text);min-height:38px}
label{display:block;font-size:13px;font-weight:600;margin:0 0 4px}
.field{margin:0 0 12px}
.grid2{display:grid;grid-template-columns:1fr 1fr;gap:0 12px;align-items:end}
.actions{display:flex;gap:8px;flex-wrap:wrap;justify-content:flex-end;margin-top:8px}
.error{color:var(--bad);font-weight:600;min-height:1.5em;margin:4px 0}
.bar{height:8px;border-radius:5px;background:var(--track);overflow:hidden;min-width:80px}
.bar>div{height:100%;border-radius:5px;background:var(--ok)}
.bar.warn>div{background:var(--warn)}.bar.bad>div{background:var(--bad)}
.big .bar{height:12px;border-radius:8px;margin:8px 0 6px}
table{width:100%;border-collapse:collapse;font-size:14px}
th{text-align:left;font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:var(--muted);font-weight:600;
padding:8px 10px;border-bottom:1px solid var(--line)}
td{padding:10px;border-bottom:1px solid var(--line);vertical-align:top}
tr:last-child td{border-bottom:0}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td .bar{margin-top:6px}
.name{font-weight:650;overflow-wrap:anywhere}
td.date{white-space:nowrap}
td .actions{flex-wrap:nowrap;margin:0}
td .actions button{padding:4px 10px;min-height:32px;font-size:13px;white-space:nowrap}
.stat .value small{font-size:60%;font-weight:500;color:var(--muted)}
.tag{display:inline-block;font-size:12px;padding:1px 8px;border-radius:99px;background:var(--track);margin:2px 4px 0 0}
.tablewrap{overflow-x:auto}
.chart svg{display:block;width:100%;height:auto}
.chart text{fill:var(--muted);font-size:11px}
.chart line{stroke:var(--line)}
.legend{display:flex;flex-wrap:wrap;gap:6px 14px;list-style:none;margin:10px 0 0;padding:0;font-size:13px;color:var(--muted)}
.legend i{display:inline-block;width:10px;height:10px;border-radius:3px;margin-right:6px;vertical-align:-1px}
dialog{border:1px solid var(--line);border-radius:14px;background:var(--card);color:var(--text);
padding:20px;width:min(520px,calc(100vw - 24px));box-shadow:0 10px 40px rgba(0,0,0,.25)}
dialog::backdrop{background:rgba(10,14,22,.45)}
dialog h2{margin:0 0 12px;font-size:17px}
.key{display:flex;gap:8px}
.key input{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:13px}
.notice{background:var(--track);border-radius:9px;padding:10px 12px;font-size:14px;margin:0 0 12px}
.login{max-width:400px;margin:10vh auto;padding:0 16px}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:13px;overflow-wrap:anywhere}
dl{display:grid;grid-template-columns:auto 1fr;gap:6px 16px;margin:0}
dt{color:var(--muted)}dd{margin:0;font-variant-numeric:tabular-nums}
[hidden]{display:none!important}
#problem:empty{display:none}
#mine{display:grid;gap:16px}
.sr{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0);white-space:nowrap}
@media (max-width:700px){
 header{padding:12px 14px}main{padding:12px 10px 40px;gap:12px}.card{padding:14px}#mine{gap:12px}
 .stats{grid-template-columns:1fr 1fr;gap:12px}.stats .stat:last-child:nth-child(odd){grid-column:1/-1}
 .stat .value{font-size:21px}
 table.stack thead{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0)}
 table.stack,table.stack tbody,table.stack tr,table.stack td{display:block;width:100%}
 table.stack tr{border-bottom:1px solid var(--line);padding:8px 0}
 table.stack td{border:0;padding:3px 0;display:flex;justify-content:space-between;gap:12px;text-align:right}
 table.stack td::before{content:attr(data-label);color:var(--muted);font-size:13px;text-align:left}
 table.stack td.name{font-size:16px}table.stack td.name::before{content:none}
 table.stack td.wide{display:block;text-align:left}table.stack td.wide::before{display:block}
 .tablewrap{overflow:visible}
}
"""

# Shared by both pages: DOM helpers, number formats, the stacked bar chart,
# dialogs, and the copy button.
PAGE_SCRIPT = r"""'use strict';
const $ = (s) => document.querySelector(s);
function h(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'text') e.textContent = v; else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : v);
  }
  for (const k of kids.flat()) if (k !== null && k !== undefined) e.append(k);
  return e;
}
const compact = new Intl.NumberFormat('en', { notation: 'compact', maximumFractionDigits: 1 });
const tokens = (n) => compact.format(n || 0);
function money(v) {
  v = v || 0;
  if (Number.isInteger(v)) return '$' + v.toLocaleString('en');
  if (v >= 100) return '$' + v.toFixed(0);
  if (v >= 1) return '$' + v.toFixed(2);
  return '$' + v.toPrecision(2).replace(/0+$/, '');
}
const day = (iso) => iso ? new Date(iso.length === 10 ? iso + 'T00:00:00Z' : iso)
  .toLocaleDateString('en', { month: 'short', day: 'numeric', year: 'numeric', timeZone: 'UTC' }) : '—';
const when = (iso) => iso ? new Date(iso).toLocaleString('en', { month: 'short', day: 'numeric',
  hour: '2-digit', minute: '2-digit', timeZone: 'UTC', timeZoneName: 'short' }) : '—';
function lastDays(n) {
  const out = [], now = Date.now();
  for (let i = n - 1; i >= 0; i--) out.push(new Date(now - i * 864e5).toISOString().slice(0, 10));
  return out;
}
const COLORS = ['#4f7cff', '#1fa97a', '#f0a132', '#e2557a', '#8b6cf0', '#23a9bd', '#c27a3c', '#8e98aa'];
function meter(used, limit, label) {
  const share = limit > 0 ? Math.min(1, used / limit) : 0;
  const fill = h('div');
  fill.style.width = (share * 100).toFixed(1) + '%';
  return h('div', { class: 'bar' + (share >= 0.9 ? ' bad' : share >= 0.7 ? ' warn' : ''), role: 'progressbar',
    'aria-label': label, 'aria-valuemin': 0, 'aria-valuemax': 100,
    'aria-valuenow': Math.round(share * 100) }, fill);
}
// A stacked bar per day; series: [{name, values: [per day]}]; draws into host.
function chart(host, days, series, fmt, label) {
  const NS = 'http://www.w3.org/2000/svg';
  const s = (tag, attrs, text) => { const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text; return e; };
  const totals = days.map((_, i) => series.reduce((a, x) => a + x.values[i], 0));
  const raw = Math.max(...totals, 0), step = raw > 0 ? Math.pow(10, Math.floor(Math.log10(raw))) : 1;
  const top = raw > 0 ? Math.ceil(raw / step) * step : 1;
  const W = Math.max(280, host.clientWidth || 600), H = W < 500 ? 180 : 220, B = 22, T = 8;
  const L = 12 + 7 * Math.max(...[0, top / 2, top].map((v) => fmt(v).length));
  const svg = s('svg', { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: 'img', 'aria-label': label });
  const y = (v) => T + (H - T - B) * (1 - v / top);
  for (const v of [0, top / 2, top]) {
    svg.append(s('line', { x1: L, x2: W, y1: y(v), y2: y(v) }));
    svg.append(s('text', { x: L - 6, y: y(v) + 4, 'text-anchor': 'end' }, fmt(v)));
  }
  const bw = (W - L) / days.length;
  days.forEach((d, i) => {
    let base = 0;
    series.forEach((x, j) => {
      const v = x.values[i];
      if (v > 0) {
        const r = s('rect', { x: L + i * bw + bw * 0.15, width: Math.max(1, bw * 0.7), y: y(base + v),
          height: Math.max(1, y(base) - y(base + v)), rx: 2, fill: x.color || COLORS[j % COLORS.length] });
        r.append(s('title', {}, `${d} · ${x.name}: ${fmt(v)}`));
        svg.append(r);
      }
      base += v;
    });
    const last = i === days.length - 1;
    if (i % 7 === (days.length - 1) % 7) svg.append(s('text', { x: last ? W : L + (i + 0.5) * bw, y: H - 5,
      'text-anchor': last ? 'end' : 'middle' }, day(d).replace(/, \d+$/, '')));
  });
  host.replaceChildren(svg, h('ul', { class: 'legend', 'aria-hidden': 'true' }, series.map((x, j) => {
    const dot = h('i'); dot.style.background = x.color || COLORS[j % COLORS.length];
    return h('li', {}, dot, x.name);
  })));
}
// Series per day for the keys that spend most; the rest (and rows whose key is
// null: the server's own "others") as "others".
function stacked(rows, days, keyOf, valueOf, most) {
  const sums = new Map();
  for (const r of rows) if (keyOf(r) !== null) sums.set(keyOf(r), (sums.get(keyOf(r)) || 0) + valueOf(r));
  const names = [...sums.keys()].sort((a, b) => sums.get(b) - sums.get(a));
  const shown = names.slice(0, names.length > most ? most - 1 : most);
  const index = new Map(days.map((d, i) => [d, i]));
  const series = shown.map((name) => ({ name, values: days.map(() => 0) }));
  const others = { name: 'others', values: days.map(() => 0), color: COLORS[7] };
  for (const r of rows) {
    const i = index.get(r.day);
    if (i === undefined) continue;
    const j = keyOf(r) === null ? -1 : shown.indexOf(keyOf(r));
    (j < 0 ? others : series[j]).values[i] += valueOf(r);
  }
  return names.length > shown.length || rows.some((r) => keyOf(r) === null) ? series.concat([others]) : series;
}
function ask(dialog) {
  return new Promise((resolve) => {
    dialog.returnValue = '';
    dialog.addEventListener('close', () => resolve(dialog.returnValue), { once: true });
    dialog.showModal();
  });
}
function confirmAction(title, text, action) {
  const d = $('#confirm');
  d.querySelector('h2').textContent = title;
  d.querySelector('p').textContent = text;
  d.querySelector('.go').textContent = action;
  return ask(d).then((v) => v === 'go');
}
async function copy(input, button) {
  try { await navigator.clipboard.writeText(input.value); }
  catch (e) { input.select(); document.execCommand('copy'); }
  button.textContent = 'Copied';
  setTimeout(() => { button.textContent = 'Copy'; }, 2000);
}
function showKey(name, key) {
  const d = $('#keydialog');
  d.querySelector('.who').textContent = name;
  const input = d.querySelector('input');
  input.value = key;
  ask(d).then(() => { input.value = ''; });
  input.select();
}
for (const b of document.querySelectorAll('button[data-copy]'))
  b.addEventListener('click', () => copy($(b.dataset.copy), b));
for (const b of document.querySelectorAll('dialog button[value]'))
  b.addEventListener('click', (e) => { e.preventDefault(); b.closest('dialog').close(b.value); });
function say(text) { $('#status').textContent = text; }
function setValue(el, text, unit) { el.replaceChildren(text + (unit ? ' ' : ''), unit ? h('small', { text: unit }) : ''); }
"""

DIALOGS = r"""
<dialog id="confirm" aria-labelledby="confirm-title"><h2 id="confirm-title"></h2><p></p>
<div class="actions"><button value="cancel">Cancel</button><button value="go" class="go danger primary"></button></div></dialog>
<dialog id="keydialog" aria-labelledby="key-title"><h2 id="key-title">New key for <span class="who"></span></h2>
<p class="notice" role="note"><strong>Shown once.</strong> Copy it now and keep it safe: it is stored only as a
hash and cannot be shown again (a reset makes a new one).</p>
<label for="newkey">API key</label><div class="key"><input id="newkey" readonly autocomplete="off" spellcheck="false">
<button type="button" data-copy="#newkey">Copy</button></div>
<div class="actions"><button value="done" class="primary">Done</button></div></dialog>
<p id="status" class="sr" role="status" aria-live="polite"></p>
"""

LOGIN_PAGE = WebPage("Sign in · worker.py", r"""
<main class="login"><form class="card" method="post" action="/admin/">
<h1 class="title">worker.py <span>dashboard</span></h1>
<p class="muted small">Sign in with the <code>ACCESS_TOKEN</code> this server was started with.</p>
<input type="text" name="username" value="owner" autocomplete="username" hidden>
<div class="field"><label for="token">Access token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus></div>
<p class="error" role="alert">{message}</p>
<div class="actions"><button class="primary" type="submit">Sign in</button></div></form></main>
""", "")

DASHBOARD_PAGE = WebPage("Dashboard · worker.py", r"""
<header><h1>worker.py <span>dashboard</span></h1>
<form method="post" action="/admin/"><input type="hidden" name="action" value="logout">
<input type="hidden" name="xsrf" value="{xsrf}">
<button type="submit">Sign out</button></form></header>
<main data-xsrf="{xsrf}">
<p id="problem" class="error" role="alert"></p>
<section class="stats" aria-label="Totals">
<div class="card stat"><div class="label">Today</div><div class="value" id="today">…</div><div class="sub" id="today-sub"></div></div>
<div class="card stat"><div class="label">This month</div><div class="value" id="month">…</div><div class="sub" id="month-sub"></div></div>
<div class="card stat"><div class="label">Users</div><div class="value" id="count">…</div><div class="sub" id="count-sub"></div></div>
</section>
<section class="card" aria-labelledby="chart-title"><h2 id="chart-title">Spend per day, last 30 days</h2>
<div class="chart" id="chart"></div></section>
<section class="card" aria-labelledby="users-title"><div class="row"><h2 id="users-title">Users</h2>
<div class="tools"><input type="search" id="filter" aria-label="Filter users by name" placeholder="Filter by name"
autocomplete="off" spellcheck="false"><button class="primary" id="add">Register a user</button></div></div>
<div class="tablewrap"><table class="stack"><thead><tr><th>Name</th><th>Limits</th><th>This period</th>
<th class="num">Requests</th><th>Last use</th><th>Expires</th><th><span class="sr">Actions</span></th></tr></thead>
<tbody id="users"></tbody></table></div></section>
<section class="card" aria-labelledby="models-title"><h2 id="models-title">By model, last 30 days</h2>
<div class="tablewrap"><table class="stack"><thead><tr><th>Model</th><th class="num">Requests</th>
<th class="num">Input</th><th class="num">Output</th><th class="num">Total tokens</th><th class="num" id="cost-head">Cost</th></tr></thead>
<tbody id="models"></tbody></table></div></section>
</main>
<dialog id="edit" aria-labelledby="edit-title"><form method="dialog"><h2 id="edit-title"></h2>
<div class="field" id="name-field"><label for="f-name">Name</label>
<input id="f-name" name="name" pattern="[A-Za-z0-9][A-Za-z0-9._@\-]{0,63}" autocomplete="off" spellcheck="false"></div>
<div class="grid2">
<div class="field"><label for="f-expires">Expires</label><input id="f-expires" name="expires" placeholder="never or YYYY-MM-DD"></div>
<div class="field"><label for="f-days">Or valid for (days)</label><input id="f-days" name="days" inputmode="numeric" placeholder="30"></div>
<div class="field"><label for="f-budget">Budget (USD)</label><input id="f-budget" name="budget" inputmode="decimal" placeholder="0 = none"></div>
<div class="field"><label for="f-period">Period</label><select id="f-period" name="period" aria-describedby="edit-hint">
<option value="">(default)</option><option value="all">all time</option><option value="day">day</option>
<option value="week">week</option><option value="month">month</option></select></div>
<div class="field"><label for="f-quota">Quota (tokens)</label><input id="f-quota" name="quota" inputmode="numeric" placeholder="0 = none"></div>
<div class="field"><label for="f-rpm">Requests a minute</label><input id="f-rpm" name="rpm" inputmode="numeric" placeholder="0 = none"></div>
<div class="field"><label for="f-models">Models</label><input id="f-models" name="models" spellcheck="false" placeholder="* = all" aria-describedby="edit-hint"></div>
<div class="field"><label for="f-scope">Scope</label><select id="f-scope" name="scope"><option value="">(default)</option>
<option value="own">own objects only</option><option value="all">all objects</option></select></div>
</div><p class="muted small" id="edit-hint">Budget and quota count over the period (calendar UTC). Models: names
separated by commas, <code>*</code> for all. Empty fields keep their value (or the default).</p>
<p class="error" id="edit-error" role="alert"></p>
<div class="actions"><button type="button" value="cancel">Cancel</button><button class="primary" id="save">Save</button></div>
</form></dialog>
""" + DIALOGS, r"""
const xsrf = document.querySelector('main').dataset.xsrf;
let users = [], stats = { byUser: [], byModel: [], total: {} }, money_ = false, lastDay = new Map();
async function api(method, path, fields) {
  const init = { method, credentials: 'same-origin', headers: { Accept: 'application/json', 'X-XSRF-Token': xsrf } };
  if (fields) init.body = new URLSearchParams(fields);
  const res = await fetch(path, init);
  let data = null;
  try { data = await res.json(); } catch (e) { /* not JSON */ }
  if (res.status === 403 && !data) throw new Error('Your session has ended: reload the page to sign in again.');
  if (!res.ok) throw new Error((data && data.error) || `The server answered ${res.status}.`);
  return data;
}
const hasMoney = () => money_;
const spend = (r) => hasMoney() ? (r.cost || 0) : (r.total_tokens || 0);
const amount = (v) => hasMoney() ? money(v) : tokens(v);
const models = (u) => (Array.isArray(u.models) ? u.models : String(u.models || '*').split(',')).join(', ');
function lastUse(u) {
  return day(u.last_used || lastDay.get(u.name));
}
function periodCell(u) {
  const per = { day: ' today', week: ' this week', month: ' this month' }[u.period] || '';
  const resets = u.resets_at ? h('div', { class: 'muted small', text: 'resets ' + day(u.resets_at) }) : null;
  if (u.budget > 0) return [h('div', { text: `${money(u.spent)} of ${money(u.budget)}${per}` }),
    meter(u.spent, u.budget, `${u.name}: budget used`), resets];
  if (u.quota > 0) return [h('div', { text: `${tokens(u.used)} of ${tokens(u.quota)} tokens${per}` }),
    meter(u.used, u.quota, `${u.name}: quota used`), resets];
  return h('div', { text: ('spent' in u ? money(u.spent) + ' · ' : '') + tokens(u.used) + ' tokens',
    class: 'muted' });
}
function userRow(u) {
  const limits = [u.rpm ? u.rpm + ' rpm' : null, 'models ' + models(u), u.scope === 'all' ? 'all objects' : null]
    .filter(Boolean).map((t) => h('span', { class: 'tag', text: t }));
  return h('tr', {},
    h('td', { class: 'name', text: u.name }),
    h('td', { 'data-label': 'Limits', class: 'wide' }, limits),
    h('td', { 'data-label': 'This period', class: 'wide' }, periodCell(u)),
    h('td', { class: 'num', 'data-label': 'Requests', text: compact.format(u.requests || 0) }),
    h('td', { 'data-label': 'Last use', class: 'date', text: lastUse(u) }),
    h('td', { 'data-label': 'Expires', class: 'date', text: u.expires ? day(u.expires) : 'never' }),
    h('td', { 'data-label': 'Actions' }, h('div', { class: 'actions' },
      h('button', { text: 'Edit', 'aria-label': 'Edit limits of ' + u.name, onclick: () => edit(u) }),
      h('button', { text: 'Reset key', 'aria-label': 'Reset key of ' + u.name, onclick: () => reset(u) }),
      h('button', { text: 'Delete', class: 'danger', 'aria-label': 'Delete ' + u.name, onclick: () => remove(u) }))));
}
function sums(rows) {
  const t = { requests: 0, total_tokens: 0, cost: 0, input_tokens: 0, output_tokens: 0 };
  for (const r of rows) for (const k in t) t[k] += r[k] || 0;
  return t;
}
function render() {
  const today = new Date().toISOString().slice(0, 10), month = today.slice(0, 7);
  for (const [id, rows] of [['today', stats.byUser.filter((r) => r.day === today)],
                            ['month', stats.byUser.filter((r) => r.day.startsWith(month))]]) {
    const t = sums(rows);
    if (hasMoney()) setValue($('#' + id), money(t.cost)); else setValue($('#' + id), tokens(t.total_tokens), 'tokens');
    $('#' + id + '-sub').textContent = `${compact.format(t.requests)} requests` +
      (hasMoney() ? ` · ${tokens(t.total_tokens)} tokens` : '');
  }
  $('#count').textContent = users.length.toLocaleString('en');
  const active = users.filter((u) => (u.last_used || '') >= month).length;
  $('#count-sub').textContent = `${active.toLocaleString('en')} active this month`;
  $('#chart-title').textContent = (hasMoney() ? 'Spend' : 'Tokens') + ' per day, last 30 days, by user';
  const days = lastDays(30);
  chart($('#chart'), days, stacked(stats.byUser, days, (r) => r.user, spend, 8), amount,
    'Stacked bar chart of ' + (hasMoney() ? 'spend' : 'tokens') + ' per day by user');
  const find = $('#filter').value.trim().toLowerCase();
  const shown = find ? users.filter((u) => u.name.toLowerCase().includes(find)) : users;
  $('#users').replaceChildren(...(shown.length ? shown.map(userRow) : [h('tr', {}, h('td', { colspan: 7,
    class: 'muted', text: users.length ? 'No user matches.' : 'No users yet: register the first one.' }))]));
  const byModel = new Map();
  for (const r of stats.byModel.filter((r) => r.day >= days[0])) {
    if (!byModel.has(r.model)) byModel.set(r.model, []);
    byModel.get(r.model).push(r);
  }
  $('#cost-head').hidden = !hasMoney();
  const rows = [...byModel].map(([m, rs]) => [m, sums(rs)]).sort((a, b) => spend(b[1]) - spend(a[1]));
  $('#models').replaceChildren(...(rows.length ? rows.map(([m, t]) => h('tr', {},
    h('td', { class: 'name', text: m }),
    h('td', { class: 'num', 'data-label': 'Requests', text: compact.format(t.requests) }),
    h('td', { class: 'num', 'data-label': 'Input', text: tokens(t.input_tokens) }),
    h('td', { class: 'num', 'data-label': 'Output', text: tokens(t.output_tokens) }),
    h('td', { class: 'num', 'data-label': 'Total tokens', text: tokens(t.total_tokens) }),
    hasMoney() ? h('td', { class: 'num', 'data-label': 'Cost', text: money(t.cost) }) : null))
    : [h('tr', {}, h('td', { colspan: 6, class: 'muted', text: 'No usage in the last 30 days.' }))]));
}
// Usage only on opening: register, set and delete change the users, not the stats.
// The server sums it: per day for the 7 users who spent most and the others, and
// per day and model (both over the same days, so the server reads them once).
const STATS = '/admin/stats?format=json&days=31&group=';
async function loadStats() {
  const [byUser, byModel] = await Promise.all([api('GET', STATS + 'day,user&top=7'),
                                               api('GET', STATS + 'day,model')]);
  return { byUser: byUser.usage, byModel: byModel.usage, total: byUser.total };
}
async function load(withStats = true) {
  try {
    [users, stats] = await Promise.all([api('GET', '/admin/users?format=json').then((d) => d.users),
                                        withStats ? loadStats() : stats]);
    money_ = 'cost' in stats.total || stats.byUser.some((r) => 'cost' in r);
    lastDay = new Map(stats.byUser.map((r) => [r.user, r.day]));  // (rows are oldest first)
    $('#problem').textContent = '';
    render();
  } catch (e) { $('#problem').textContent = e.message; }
  document.body.dataset.loaded = String(Date.now());
}
const FIELDS = ['expires', 'days', 'budget', 'period', 'quota', 'rpm', 'models', 'scope'];
let editing = null;
function edit(u) {
  editing = u;
  const form = $('#edit form');
  form.reset();
  $('#edit-title').textContent = u ? 'Change limits of ' + u.name : 'Register a user';
  $('#name-field').hidden = !!u;
  $('#f-name').required = !u;
  $('#save').textContent = u ? 'Save' : 'Register';
  $('#edit-error').textContent = '';
  if (u) {
    const now = { expires: u.expires || 'never', budget: 'budget' in u ? String(u.budget) : '',
      period: u.period || '', quota: String(u.quota || 0), rpm: String(u.rpm || 0), models: models(u).replace(/ /g, ''),
      scope: u.scope || '' };
    for (const k in now) form.elements[k].value = now[k];
  }
  form.dataset.initial = JSON.stringify(Object.fromEntries(FIELDS.map((k) => [k, form.elements[k].value])));
  $('#edit').showModal();
}
$('#edit form').addEventListener('submit', async (e) => {
  e.preventDefault();
  if (e.submitter && e.submitter.value === 'cancel') { $('#edit').close(); return; }
  const form = e.target, initial = JSON.parse(form.dataset.initial), fields = {};
  for (const k of FIELDS) { const v = form.elements[k].value.trim(); if (v !== initial[k].trim() && v !== '') fields[k] = v; }
  try {
    if (editing) {
      if (Object.keys(fields).length) await api('POST', '/admin/set/' + encodeURIComponent(editing.name), fields);
      $('#edit').close();
      say('Saved the limits of ' + editing.name);
    } else {
      const name = form.elements.name.value.trim();
      if (!name) throw new Error('A name is needed.');
      const made = await api('POST', '/admin/register/' + encodeURIComponent(name), fields);
      $('#edit').close();
      showKey(made.name, made.key);
      say('Registered ' + made.name);
    }
    await load(false);
  } catch (err) { $('#edit-error').textContent = err.message; }
});
async function reset(u) {
  if (!await confirmAction('Reset the key of ' + u.name + '?',
    'The current key stops working at once. The new key is shown once.', 'Reset key')) return;
  try { const made = await api('POST', '/admin/reset/' + encodeURIComponent(u.name)); showKey(made.name, made.key); say('Reset the key of ' + u.name); }
  catch (e) { $('#problem').textContent = e.message; }
}
async function remove(u) {
  if (!await confirmAction('Delete ' + u.name + '?',
    'Their key stops working at once. Their past usage stays in the stats.', 'Delete')) return;
  try { await api('DELETE', '/admin/' + encodeURIComponent(u.name)); say('Deleted ' + u.name); await load(false); }
  catch (e) { $('#problem').textContent = e.message; }
}
$('#add').addEventListener('click', () => edit(null));
$('#filter').addEventListener('input', render);
let width = innerWidth;
addEventListener('resize', () => { if (innerWidth !== width) { width = innerWidth; render(); } });
load();
""")

ME_PAGE = WebPage("Your key · worker.py", r"""
<header><h1>worker.py <span>your key</span></h1><button id="forget" hidden>Forget key</button></header>
<main>
<form class="card" id="signin"><h2>See your limits and usage</h2>
<p class="muted small">Paste the API key the owner gave you. It stays in this tab only: it is not saved,
and it goes only to this server.</p>
<div class="field"><label for="key">Your API key</label>
<input id="key" type="password" autocomplete="off" spellcheck="false" placeholder="sk-cfw…" required></div>
<p class="error" id="signin-error" role="alert"></p>
<div class="actions"><button class="primary" type="submit">Show my usage</button></div></form>
<div id="mine" hidden>
<section class="stats" aria-label="Your numbers">
<div class="card stat big"><div class="label" id="use-label">This period</div><div class="value" id="use">…</div>
<div id="use-bar"></div><div class="sub" id="use-sub"></div></div>
<div class="card stat"><div class="label">Requests, last 30 days</div><div class="value" id="requests">…</div>
<div class="sub" id="requests-sub"></div></div>
</section>
<section class="card" aria-labelledby="chart-title"><h2 id="chart-title">Your use per day, last 30 days</h2>
<div class="chart" id="chart"></div></section>
<section class="card" aria-labelledby="limits-title"><h2 id="limits-title"></h2><dl id="limits"></dl></section>
<section class="card" aria-labelledby="base-title"><h2 id="base-title">Use it in your app</h2>
<p class="muted small">Set the base URL (OpenAI SDKs: <code>base_url</code> / <code>baseURL</code>,
or <code>OPENAI_BASE_URL</code>) and use your key as the API key.</p>
<label for="base">Base URL</label><div class="key"><input id="base" readonly>
<button type="button" data-copy="#base">Copy</button></div></section>
<section class="card" aria-labelledby="reset-title"><h2 id="reset-title">Reset your key</h2>
<p class="muted small">If your key leaked: get a new one. The current key stops working at once.</p>
<div class="actions"><button class="danger" id="reset">Reset my key</button></div></section>
</div>
<p id="problem" class="error" role="alert"></p>
</main>
""" + DIALOGS, r"""
let key = null;
$('#base').value = location.origin + '/v1';
async function call(method, path) {
  const res = await fetch(path, { method, headers: { Authorization: 'Bearer ' + key, Accept: 'application/json' },
                                  credentials: 'omit', cache: 'no-store' });
  const data = await res.json().catch(() => null);
  if (!res.ok) throw new Error((data && data.error && data.error.message) || `The server answered ${res.status}.`);
  return data;
}
function show(me) {
  const money_ = 'budget' in me, per = { day: 'Used today', week: 'Used this week', month: 'Used this month' }[me.period] || 'Used so far';
  $('#use-label').textContent = per;
  let used = tokens(me.used), unit = 'tokens', sub = '';
  if (me.budget > 0) {
    used = money(me.spent); unit = ''; sub = `of ${money(me.budget)} · ${money(me.budget_left)} left`;
    $('#use-bar').replaceChildren(meter(me.spent, me.budget, 'Budget used'));
  } else if (me.quota > 0) {
    sub = `of ${tokens(me.quota)} tokens · ${tokens(Math.max(0, me.quota - me.used))} left`;
    $('#use-bar').replaceChildren(meter(me.used, me.quota, 'Quota used'));
  } else {
    if (money_) { used = money(me.spent); unit = ''; }
    sub = 'no limit set';
    $('#use-bar').replaceChildren();
  }
  if (me.resets_at) sub += ` · resets ${when(me.resets_at)}`;
  setValue($('#use'), used, unit);
  $('#use-sub').textContent = sub;
  const t = sums(me.usage || []);
  $('#requests').textContent = compact.format(t.requests);
  $('#requests-sub').textContent = tokens(t.total_tokens) + ' tokens' + ('cost' in ((me.usage || [])[0] || {}) ? ' · ' + money(t.cost) : '');
  const cost = (me.usage || []).some((r) => 'cost' in r), days = lastDays(30);
  $('#chart-title').textContent = (cost ? 'Your spend' : 'Your tokens') + ' per day, last 30 days';
  chart($('#chart'), days, stacked(me.usage || [], days, (r) => r.model, (r) => cost ? r.cost || 0 : r.total_tokens || 0, 6),
    cost ? money : (v) => tokens(v), 'Bar chart of your use per day by model');
  $('#limits-title').textContent = 'Your key: ' + me.name;
  const models = Array.isArray(me.models) ? me.models.join(', ') : String(me.models);
  const items = [['Expires', me.expires ? when(me.expires) : 'never'], ['Created', day(me.created)],
    ['Budget', me.budget > 0 ? money(me.budget) + (me.period && me.period !== 'all' ? ' a ' + me.period : '') : (money_ ? 'none' : null)],
    ['Token quota', me.quota > 0 ? tokens(me.quota) : 'none'], ['Requests per minute', me.rpm > 0 ? String(me.rpm) : 'no limit'],
    ['Models', models === '*' ? 'all' : models], ['Requests so far', compact.format(me.requests || 0)]];
  $('#limits').replaceChildren(...items.filter((i) => i[1] !== null).flatMap(([k, v]) => [h('dt', { text: k }), h('dd', { text: v })]));
}
function sums(rows) {
  const t = { requests: 0, total_tokens: 0, cost: 0 };
  for (const r of rows) for (const k in t) t[k] += r[k] || 0;
  return t;
}
let last = null;
async function refresh() {
  last = await call('GET', '/me');
  $('#signin').hidden = true; $('#mine').hidden = false; $('#forget').hidden = false;
  show(last);
  document.body.dataset.loaded = String(Date.now());
}
$('#signin').addEventListener('submit', async (e) => {
  e.preventDefault();
  key = $('#key').value.trim();
  $('#key').value = '';
  try { await refresh(); $('#signin-error').textContent = ''; }
  catch (err) { key = null; $('#signin-error').textContent = err.message; }
});
$('#forget').addEventListener('click', () => {
  key = null; last = null;
  $('#signin').hidden = false; $('#mine').hidden = true; $('#forget').hidden = true; $('#key').focus();
});
$('#reset').addEventListener('click', async () => {
  if (!await confirmAction('Reset your key?', 'Your current key stops working at once, in every app that uses it. ' +
    'The new key is shown once.', 'Reset key')) return;
  try {
    const made = await call('POST', '/me/reset');
    key = made.key;
    showKey(made.name, made.key);
    await refresh();
  } catch (e) { $('#problem').textContent = e.message; }
});
let width = innerWidth;
addEventListener('resize', () => { if (last && innerWidth !== width) { width = innerWidth; show(last); } });
""")


# ---------------------------------------------------------------------------
# The application
# ---------------------------------------------------------------------------

class App:
    """What the handlers share: settings, the store, the upstream client."""

    def __init__(self, settings: Settings, store: Store):
        self.settings = settings
        self.store = store
        self.http_client = cast(UpstreamClient, tornado.httpclient.AsyncHTTPClient())  # (see serve)
        self._token_digest = hashlib.sha256(settings.access_token.encode()).digest()
        self._admin_failures: Dict[str, List[float]] = {}
        self.usage = UsageBook(store)
        self.owners = Ownership(store)
        self.limiter = RateLimiter(store)
        self.active: "set[BaseHandler]" = set()  # requests in flight, for a graceful stop
        self.lingering: "set[asyncio.Future[None]]" = set()  # see ProxyHandler.finish
        # Client connections between requests, and since when: see watch_clients.
        self.idle_clients: Dict[tornado.iostream.IOStream, float] = {}
        self.redactor = Redactor(settings.access_token, settings.openapi_api_key,
                                 *url_passwords(settings.kv_url))

    def watch_clients(self) -> None:
        """Once a second: close client connections idle (between requests, or
        sending headers) for CLIENT_IDLE_SECONDS, and uploads that sent nothing
        for CLIENT_BODY_SECONDS. (Tornado would arm a timer for every request.)"""
        now = time.monotonic()
        for stream, since in list(self.idle_clients.items()):
            if stream.closed() or now - since >= CLIENT_IDLE_SECONDS:
                del self.idle_clients[stream]
                stream.close()
        for handler in list(self.active):
            if isinstance(handler, ProxyHandler) and handler.upload_stalled(now):
                log.info("closing an upload that sent nothing for %g s", CLIENT_BODY_SECONDS)
                http1(handler.request).stream.close()  # on_connection_close: 499, upstream ended

    async def flush(self) -> None:
        """Write what the request path only noted: usage and object ownership."""
        await self.usage.flush()
        await self.owners.flush()

    def unwritten(self) -> bool:
        return bool(self.usage.unwritten() or self.owners.pending)

    def cors_origin(self, origin: Optional[str]) -> Optional[str]:
        allowed = self.settings.cors_origins
        if "*" in allowed:
            return "*"
        if origin and origin.rstrip("/") in allowed:
            return origin
        return None

    def model_label(self, model: str) -> str:
        """A model name as usage rows keep it: any key in it redacted (a client may
        send anything as a model), at most 200 characters."""
        return self.redactor.redact(model)[:200]

    def is_access_token(self, given: str) -> bool:
        """Constant-time: compares fixed-length digests, so not even length leaks."""
        digest = hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest()
        return hmac.compare_digest(digest, self._token_digest)

    def client_address(self, request: tornado.httputil.HTTPServerRequest) -> str:
        """Who sent ``request``: the peer, or the address a trusted proxy forwarded."""
        return client_address(request.remote_ip or "-", request.headers,
                              self.settings.trusted_proxies)

    def came_over_https(self, request: tornado.httputil.HTTPServerRequest) -> bool:
        """Whether the browser's request came over HTTPS: to this server (TLS_CERT),
        or to a trusted reverse proxy that says so (``X-Forwarded-Proto``)."""
        forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
        return request.protocol == "https" or (
            forwarded == "https" and _is_trusted(request.remote_ip or "-",
                                                 self.settings.trusted_proxies))

    def note_admin_failure(self, client: str) -> None:
        now = time.monotonic()
        recent = [t for t in self._admin_failures.get(client, []) if now - t < ADMIN_LOCKOUT_SECONDS]
        recent.append(now)
        self._admin_failures[client] = recent[-ADMIN_FAILURES_ALLOWED:]
        if len(recent) == ADMIN_FAILURES_ALLOWED:
            log.warning("admin: %d wrong tokens from %s: locked out for %d s",
                        ADMIN_FAILURES_ALLOWED, client, ADMIN_LOCKOUT_SECONDS)
        if len(self._admin_failures) > 10000:  # bound the memory a scan can cost
            self._admin_failures.pop(next(iter(self._admin_failures)))

    def admin_locked_out(self, client: str) -> float:
        """The seconds ``client``'s lockout has left; 0 if it is not locked out."""
        recent = self._admin_failures.get(client, [])
        if len(recent) < ADMIN_FAILURES_ALLOWED:
            return 0.0
        return max(0.0, ADMIN_LOCKOUT_SECONDS - (time.monotonic() - recent[-1]))

    def log_request(self, handler: tornado.web.RequestHandler) -> None:
        """The one log line per request. It only reports: a proxied request is
        counted before it (ProxyHandler.account)."""
        if not isinstance(handler, BaseHandler):
            return
        status = handler.get_status()
        level = logging.WARNING if status >= 500 else logging.INFO
        if log.isEnabledFor(level):
            log.log(level, "%s %s %d user=%s model=%s tokens=%s cost=%s %.1fms client=%s",
                    handler.request.method, handler.log_path, status, handler.log_user,
                    handler.log_model, handler.log_tokens, handler.log_cost,
                    1000 * handler.request.request_time(), self.client_address(handler.request))


def client_address(peer: str, headers: tornado.httputil.HTTPHeaders,
                   trusted: Tuple[Any, ...]) -> str:
    """The client's address: ``peer``, unless the peer is a trusted proxy; then
    the right-most address of X-Forwarded-For that is not itself a trusted
    proxy (the left ones are the client's to write), else X-Real-IP. Tornado's
    ``xheaders`` stays off: it would believe these headers from anyone."""
    if not _is_trusted(peer, trusted):
        return peer
    forwarded = [a.strip() for value in headers.get_list("X-Forwarded-For") for a in value.split(",")]
    if not forwarded and headers.get("X-Real-IP"):
        forwarded = [headers["X-Real-IP"].strip()]
    client = peer
    for address in reversed(forwarded):
        if _ip(address) is None:
            break  # not an address: what follows on the left is not to be believed either
        client = str(_ip(address))
        if not _is_trusted(client, trusted):
            break
    return client


def _ip(text: str) -> Optional[Any]:
    """An address as ``ipaddress`` reads it (an IPv4-mapped IPv6 one as IPv4); None if none."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return getattr(address, "ipv4_mapped", None) or address


def _is_trusted(address: str, trusted: Tuple[Any, ...]) -> bool:
    ip = _ip(address) if trusted else None
    return ip is not None and any(ip in network for network in trusted)


def make_app(app: App) -> tornado.web.Application:
    redact_logs(app.redactor)  # no secret in any log line
    return tornado.web.Application(
        [
            (r"/healthz", HealthHandler),
            (r"/me(?:/(.*))?", MeHandler),
            (r"/(?:v1/)?dashboard/billing/(subscription|usage)", BillingHandler),
            (WebSocketUpgrade(r"/v\d+(?:/.*)?"), RealtimeHandler),
            (WithBody(r"/v\d+(?:/.*)?"), UploadProxyHandler),
            (r"/v\d+(?:/.*)?", ProxyHandler),
            (r"/admin/?", AdminPageHandler),
            (r"/admin/(.*)", AdminHandler, {"token_in_path": False}),
            (r"/(?:%s)(?:/.*)?" % "|".join(sorted(OPENAI_ROOTS)), MissingVersionHandler),
            (r"/([^/]+)/(.+)", AdminHandler, {"token_in_path": True}),
            (r".*", ForbiddenHandler),
        ],
        app=app,
        log_function=app.log_request,
        compress_response=False,
        cookie_secret=cookie_secret(app.settings.access_token),
    )


# ---------------------------------------------------------------------------
# main: serve, import, export
# ---------------------------------------------------------------------------

def configure_logging(level: str, workers: int = 1) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s " + ("[%(process)d] " if workers > 1 else "")
               + "%(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("tornado.access").setLevel(logging.WARNING)


def tls_context(settings: Settings) -> Optional[ssl.SSLContext]:
    if not settings.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"TLS_CERT/TLS_KEY: cannot load the certificate and key: {e}") from e
    return context


def raise_open_file_limit() -> None:
    """The soft limit on open files up to the hard one: every client connection
    is one (a proxied request two), and Debian's default soft limit is 1024."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as e:
        log.debug("open-file limit: %d, cannot raise it to %d: %s", soft, target, e)
        return
    log.debug("open-file limit: raised from %d to %d", soft, target)


OUT_OF_FILES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Listener(socket.socket):
    """A listening socket that, out of file descriptors, stops accepting for a
    moment. Tornado's accept loop (``add_accept_handler``, 6.2 to 6.6) lets
    EMFILE through to the IOLoop, which logs it and, the socket being readable
    still, calls the loop again at once: a busy loop writing megabytes of log.
    Here the socket is unwatched for ACCEPT_BACKOFF_SECONDS (``update_handler``,
    public, leaves Tornado's handler in place), the episode logged once."""

    out_of_files_since: Optional[float] = None

    @classmethod
    def of(cls, sock: socket.socket) -> "Listener":
        return cls(sock.family, sock.type, sock.proto, fileno=sock.detach())

    def accept(self) -> Tuple[socket.socket, Any]:
        try:
            accepted = super().accept()
        except OSError as e:
            if e.errno not in OUT_OF_FILES:
                raise
            self.back_off(e)
            raise BlockingIOError(errno.EAGAIN, "backing off") from None  # (ends Tornado's loop)
        if self.out_of_files_since is not None:
            log.warning("accepting connections again, after %.1f s out of file descriptors",
                        time.monotonic() - self.out_of_files_since)
            self.out_of_files_since = None
        return accepted

    def back_off(self, error: OSError) -> None:
        if self.out_of_files_since is None:
            self.out_of_files_since = time.monotonic()
            log.warning("cannot accept connections: %s (the open-file limit, ulimit -n); "
                        "new clients wait until some close", error.strerror)
        io_loop = tornado.ioloop.IOLoop.current()
        io_loop.update_handler(self, 0)
        io_loop.call_later(ACCEPT_BACKOFF_SECONDS, self.resume)

    def resume(self) -> None:
        if self.fileno() != -1:  # (else closed by server.stop meanwhile)
            tornado.ioloop.IOLoop.current().update_handler(self, tornado.ioloop.IOLoop.READ)


class Server(tornado.httpserver.HTTPServer):
    """Tornado's HTTP server for ``app``, with client connections timed out by
    ``App.watch_clients`` (from when they are accepted, and again after each
    answer) instead of a timer per request."""

    def initialize(self, app: "App", **kwargs: Any) -> None:  # type: ignore[override]
        self.app = app
        super().initialize(make_app(app), **kwargs)
        self.conn_params.header_timeout = None  # (else Tornado arms its own)

    def handle_stream(self, stream: tornado.iostream.IOStream, address: Tuple) -> None:
        self.app.idle_clients[stream] = time.monotonic()
        super().handle_stream(stream, address)


async def serve(settings: Settings, sockets: List[Any], parent: Optional[int] = None) -> None:
    """Serve on ``sockets`` until SIGTERM or SIGINT (or, for a forked worker,
    until its ``parent`` process is gone), then stop gracefully."""
    kv = open_kv(settings)
    await kv.check()
    tornado.httpclient.AsyncHTTPClient.configure(UpstreamClient)
    app = App(settings, Store(kv))
    server = Server(
        app,
        ssl_options=tls_context(settings),
        # Routes answered here take small bodies; the proxy raises its own
        # limit per request (prepare), so no one else can make us hold 512 MB.
        max_body_size=SMALL_BODY_BYTES,
        xheaders=False,  # (Tornado's would believe X-Forwarded-For from anyone: client_address)
        body_timeout=CLIENT_BODY_SECONDS,  # (the proxy's own uploads: ProxyHandler.watch_upload)
        chunk_size=IO_CHUNK_BYTES,
    )
    flusher = tornado.ioloop.PeriodicCallback(app.flush, kv.flush_seconds * 1000)
    flusher.start()
    purger = tornado.ioloop.PeriodicCallback(app.store.purge_expired_objects, 3600 * 1000)
    purger.start()
    period_purger = tornado.ioloop.PeriodicCallback(app.store.purge_past_periods, 3600 * 1000)
    period_purger.start()
    watcher = tornado.ioloop.PeriodicCallback(
        app.watch_clients, min(1.0, CLIENT_IDLE_SECONDS / 4, CLIENT_BODY_SECONDS / 4) * 1000)
    watcher.start()
    # What is made by now lives as long as the process: out of the cyclic GC's
    # sight, its full passes take ~6 ms instead of 20-27 (every stream waits for them).
    gc.freeze()
    server.add_sockets([Listener.of(sock) for sock in sockets])
    log.info("listening on %s://%s:%d", settings.scheme, settings.host, settings.port)

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    if parent is not None:
        def stop_if_orphaned() -> None:
            if os.getppid() != parent and not stopping.is_set():
                log.warning("the parent process is gone: stopping")
                stopping.set()
        orphan_watch = tornado.ioloop.PeriodicCallback(stop_if_orphaned, 1000)
        orphan_watch.start()
    await stopping.wait()

    log.info("stopping: no new connections, waiting for requests in flight")
    server.stop()
    await wait_for_in_flight(app)
    try:
        await asyncio.wait_for(server.close_all_connections(), 5)
    except asyncio.TimeoutError:
        log.warning("stopping: some connections did not close")
    flusher.stop()
    purger.stop()
    watcher.stop()
    await flush_before_exit(app)
    await kv.aclose()
    log.info("stopped")


def run_server(settings: Settings) -> None:
    """Listen, then serve in this process or in ``WORKERS`` forked ones."""
    if settings.kv_url:
        RedisKV(settings.kv_url).open()  # a missing package or bad URL is said before any fork
    tls_context(settings)  # (so is a bad certificate)
    raise_open_file_limit()
    sockets = listen(settings)
    parent = os.getpid() if settings.workers > 1 else None
    if parent is not None and not fork_workers(settings.workers):
        return  # the parent, once every worker has stopped
    asyncio.run(serve(settings, sockets, parent))


def listen(settings: Settings) -> List[Any]:
    """The listening sockets; ConfigError names HOST/PORT and the address if it cannot."""
    where = f"{settings.host}:{settings.port}"
    try:
        return tornado.netutil.bind_sockets(settings.port, settings.host, backlog=1024)
    except socket.gaierror as e:
        raise ConfigError(f"HOST: {settings.host} does not resolve to an address "
                          f"({e.strerror})") from None
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"HOST/PORT: {where} is in use") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise ConfigError(f"HOST: {settings.host} is not an address of this machine") from None
        if e.errno == errno.EACCES:
            raise ConfigError(f"HOST/PORT: {where}: permission denied (ports below 1024 "
                              f"need root or CAP_NET_BIND_SERVICE)") from None
        raise ConfigError(f"HOST/PORT: cannot listen on {where}: {e.strerror or e}") from None


def fork_workers(count: int) -> bool:
    """Fork ``count`` processes that share the listening sockets (as Tornado's
    ``fork_processes``, which does not pass signals on). True in a child. The
    parent passes SIGTERM and SIGINT on, starts a new child for one that dies
    of anything else (at most 5 a minute), and returns False when all are gone.
    """
    children: Dict[int, int] = {}  # pid -> worker number
    number: Optional[int]  # (None: a pid not among them)
    stopping: List[int] = []
    restarts: "collections.deque[float]" = collections.deque(maxlen=5)
    stop_signals = {signal.SIGTERM, signal.SIGINT}

    def start(number: int) -> bool:
        # Signals wait until the child is known here, and has its own handlers.
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        try:
            pid = os.fork()
            if pid == 0:
                for signum in stop_signals:
                    signal.signal(signum, signal.SIG_DFL)
                return True
            children[pid] = number
            return False
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)

    def pass_on(signum: int, frame: Any) -> None:
        stopping.append(signum)
        for pid in list(children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for signum in stop_signals:
        signal.signal(signum, pass_on)
    for number in range(count):
        if stopping:
            break
        if start(number):
            return True
    log.info("started %d workers", count)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        number = children.pop(pid, None)
        code = os.waitstatus_to_exitcode(status)
        if number is None or stopping or code == 0:
            continue
        if len(restarts) == restarts.maxlen and time.monotonic() - restarts[0] < 60:
            log.error("worker %d (pid %d) stopped with status %d: %d deaths within a "
                      "minute, stopping them all", number, pid, code, len(restarts) + 1)
            pass_on(signal.SIGTERM, None)
            raise SystemExit(1)
        log.warning("worker %d (pid %d) stopped with status %d; starting another",
                    number, pid, code)
        restarts.append(time.monotonic())
        if not stopping and start(number):
            return True
    return False


async def flush_before_exit(app: App) -> None:
    """The last usage and ownership, retried for a few seconds if the store is away."""
    deadline = time.monotonic() + EXIT_FLUSH_SECONDS
    while True:
        await app.flush()
        if not app.unwritten():
            return
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    why = getattr(app.store.kv, "failing", None) or "it is unavailable"
    log.error("stopping: the store cannot be written (%s): the usage of %d requests and %d "
              "object records are not written", why,
              sum(row[0] for _, row in app.usage.unwritten()), len(app.owners.pending))


async def wait_for_in_flight(app: App) -> None:
    """Let open requests finish, for a bounded grace period."""
    deadline = time.monotonic() + SHUTDOWN_GRACE_SECONDS
    while app.active and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if app.active:
        log.warning("stopping: closing %d requests still in flight", len(app.active))


async def run_import(settings: Settings, path: str) -> None:
    try:
        with open(path) as f:
            users = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"import: cannot read {path}: {e}") from e
    if not isinstance(users, dict):
        raise ConfigError(f"import: {path} must hold a JSON object of users")
    kv = open_kv(settings)
    try:
        count = await Store(kv).import_users(users)
    except ValueError as e:
        raise ConfigError(f"import: {e}") from e
    finally:
        await kv.aclose()
    print(f"imported {count} users")


async def run_export(settings: Settings) -> None:
    kv = open_kv(settings, readonly=True)
    try:
        users = await Store(kv).export_users()
    finally:
        await kv.aclose()
    json.dump(users, sys.stdout, indent=2, sort_keys=True)
    print()


def run_prices(args: List[str], environ: Dict[str, str]) -> int:
    """`prices [json | --format json|text]`: the table in effect; needs no other setting."""
    formats = {(): prices_text, ("text",): prices_text, ("json",): prices_json,
               ("--format", "text"): prices_text, ("--format", "json"): prices_json}
    if tuple(args) not in formats:
        raise ConfigError(f"usage: {USAGE}")
    table = load_prices(environ.get("PRICES_FILE", "").strip())
    sys.stdout.write(formats[tuple(args)](table))
    return 0


def main(argv: List[str]) -> int:
    if argv[1:2] in (["--help"], ["-h"], ["help"]):
        print(__doc__.split("\n\n")[0] + "\n\n" + settings_help())
        return 0
    try:
        if argv[1:2] == ["prices"]:
            return run_prices(argv[2:], dict(os.environ))
        settings = load_settings(dict(os.environ))
        configure_logging(settings.log_level, settings.workers)
        if argv[1:] == []:
            for note in upstream_url_notes(dict(os.environ)):
                log.info("%s", note)
            run_server(settings)
        elif argv[1] == "import" and len(argv) == 3:
            asyncio.run(run_import(settings, argv[2]))
        elif argv[1:] == ["export"]:
            asyncio.run(run_export(settings))
        else:
            raise ConfigError(f"usage: {USAGE}")
    except ConfigError as e:
        print(f"worker.py: {e}", file=sys.stderr)
        return 2
    except StoreUnavailable:
        print("worker.py: KV_URL: Redis does not answer", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
