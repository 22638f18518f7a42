#!/usr/bin/env python3
"""worker.py: share one OpenAI API key with friends, family or a small team.

Each user gets a key of their own (``sk-cfw…``); the owner hands them out with
curl; every OpenAI API passes through unchanged. The Python port of
janlay/openai-cloudflare, in one file, with Tornado as its only dependency.

Run it::

    pip install -r requirements.txt
    OPENAPI_API_KEY=sk-... ACCESS_TOKEN=Une9f2ijwe python worker.py

Give a friend a key, then let them use it from any OpenAI SDK::

    curl http://localhost:8787/Une9f2ijwe/register/janlay      # prints sk-cfw…

    from openai import OpenAI
    client = OpenAI(base_url="http://localhost:8787/v1", api_key="sk-cfw…")
    client.chat.completions.create(model="gpt-4o-mini", messages=[...])

Other commands::

    python worker.py --help          # every setting
    python worker.py import FILE     # users exported from the Cloudflare version
    python worker.py export          # every user as JSON (key hashes, never keys)
"""

import asyncio
import binascii
import dataclasses
import datetime
import dbm
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import signal
import ssl
import sys
import time
import urllib.parse
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows
    fcntl = None

import tornado.httpclient
import tornado.httpserver
import tornado.httputil
import tornado.ioloop
import tornado.iostream
import tornado.netutil
import tornado.simple_httpclient
import tornado.web

log = logging.getLogger("worker")


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
UPSTREAM_CONNECT_TIMEOUT = 30.0
MAX_UPSTREAM_CLIENTS = 10000  # Tornado's default of 10 would queue the 11th stream
JOURNAL_CHECKPOINT_BYTES = 4 << 20


# ---------------------------------------------------------------------------
# Settings: read once from the environment
# ---------------------------------------------------------------------------

class ConfigError(Exception):
    """A bad setting: main() prints it as one line and exits 2."""


def _required(value: str, name: str) -> str:
    if not value:
        raise ConfigError(f"{name} is required")
    return value


def _access_token(value: str, name: str) -> str:
    _required(value, name)
    if len(value) < 8:
        raise ConfigError(f"{name} must be at least 8 characters")
    if value in ROUTE_WORDS or "/" in value:
        raise ConfigError(f"{name} must not be a route word or contain '/'")
    return value


def _upstream_url(value: str, name: str) -> str:
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name} must be an http:// or https:// URL, got {value!r}")
    if parts.query or parts.fragment:
        raise ConfigError(f"{name} must not have a query or fragment")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


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


# (variable, default, parser, help): the one table behind Settings and --help.
SETTINGS_TABLE = (
    ("OPENAPI_API_KEY", "", _required, "the owner's upstream key (alias: OPENAI_API_KEY); required"),
    ("ACCESS_TOKEN", "", _access_token, "the admin password, 8+ characters; required"),
    ("UPSTREAM_URL", "https://api.openai.com", _upstream_url, "any OpenAI-compatible base; a path prefix is kept"),
    ("HOST", "0.0.0.0", _optional, "address to listen on"),
    ("PORT", "8787", _port, "port to listen on"),
    ("DB_PATH", "worker.db", _required, "folder of the embedded store (stdlib dbm + journal)"),
    ("KV_URL", "", _optional, "redis://… to share the store between instances (not in this version)"),
    ("WORKERS", "1", _positive_int, "processes sharing the port (needs KV_URL)"),
    ("TLS_CERT", "", _optional, "PEM certificate (chain) file: serve HTTPS directly"),
    ("TLS_KEY", "", _optional, "PEM private key file for TLS_CERT"),
    ("CORS_ORIGINS", "*", _origins, "comma-separated origins allowed from browsers"),
    ("MAX_BODY_MB", "512", _positive_number, "largest request body, in MB"),
    ("UPSTREAM_TIMEOUT", "600", _positive_number, "seconds for one upstream request"),
    ("LOG_LEVEL", "info", _log_level, "debug, info, warning or error"),
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

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"


def load_settings(environ: Dict[str, str]) -> Settings:
    """Parse every setting from ``environ``; raise ConfigError naming the first bad one."""
    environ = dict(environ)
    if not environ.get("OPENAPI_API_KEY") and environ.get("OPENAI_API_KEY"):
        environ["OPENAPI_API_KEY"] = environ["OPENAI_API_KEY"]
    values = {}
    for name, default, parse, _ in SETTINGS_TABLE:
        raw = environ.get(name, "").strip() or default
        values[name.lower()] = parse(raw, name)
    settings = Settings(**values)
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise ConfigError("TLS_CERT and TLS_KEY must be set together")
    if settings.kv_url:
        raise ConfigError("KV_URL: the Redis backend is not in this version of worker.py")
    if settings.workers > 1:
        raise ConfigError("WORKERS above 1 needs KV_URL (the dbm store is single-process)")
    return settings


def settings_help() -> str:
    rows = [("variable", "default", "meaning")]
    rows += [(name, default or "-", text) for name, default, _, text in SETTINGS_TABLE]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = [f"  {a:<{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in rows]
    return (
        "usage: python worker.py [import FILE | export | --help]\n\n"
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
        self.headers = headers or {}

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type,
                          "param": None, "code": self.code}}


class AdminError(tornado.web.HTTPError):
    """An error on the admin routes: ``error: …`` for curl, or JSON."""

    def __init__(self, status: int, message: str):
        super().__init__(status)
        self.message = message


def invalid_api_key(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key")


class StoreError(Exception):
    """The store refused a write: a conflict or a missing user."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


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
    """

    def __init__(self, path: str, readonly: bool = False):
        self.path = path
        self.readonly = readonly
        self._gen = 0
        self._snapshot = None  # the dbm of generation self._gen, read-only
        self._overlay: Dict[str, Optional[str]] = {}  # key -> value, None = deleted
        self._frozen: Dict[str, Optional[str]] = {}  # overlay being checkpointed
        self._journal = None
        self._journal_gen = 0
        self._lock_file = None
        self._checkpointing: Optional[asyncio.Future] = None

    # -- opening and recovery -------------------------------------------------

    def open(self) -> "DbmKV":
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
            self._journal = open(self._file(f"wal-{self._journal_gen}"), "ab")
            _fsync_dir(self.path)
        return self

    def _lock(self) -> None:
        if fcntl is None:
            return
        self._lock_file = open(self._file("LOCK"), "a")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigError(f"DB_PATH {self.path} is in use by another worker.py process")

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
        for layer in (self._overlay, self._frozen):
            if key in layer:
                return layer[key]
        if self._snapshot is None:
            return None
        value = self._snapshot.get(key.encode())
        return None if value is None else value.decode()

    async def get(self, key: str) -> Optional[str]:
        return self._get(key)

    async def get_many(self, keys: Iterable[str]) -> List[Optional[str]]:
        return [self._get(key) for key in keys]

    async def scan(self, prefix: str) -> Dict[str, str]:
        """Every key starting with ``prefix``, with its value, sorted by key."""
        found: Dict[str, Optional[str]] = {}
        if self._snapshot is not None:
            raw = prefix.encode()
            for key in self._snapshot.keys():
                if key.startswith(raw):
                    found[key.decode()] = None
        for layer in (self._frozen, self._overlay):
            found.update((k, v) for k, v in layer.items() if k.startswith(prefix))
        result = {}
        for key in sorted(found):
            value = self._get(key)
            if value is not None:
                result[key] = value
        return result

    # -- writes ---------------------------------------------------------------

    async def write(self, ops: Dict[str, Optional[str]], durable: bool = True) -> None:
        """Apply puts (str) and deletes (None) together: all or none survive a crash.

        With ``durable`` the journal is fsync'd before this returns, so a write
        the caller acknowledges survives kill -9 and a power cut.
        """
        if not ops:
            return
        self._journal.write(_encode_journal_line(ops))
        self._journal.flush()
        if durable:
            os.fsync(self._journal.fileno())
        self._overlay.update(ops)
        if self._journal.tell() > JOURNAL_CHECKPOINT_BYTES and self._checkpointing is None:
            self._checkpointing = asyncio.ensure_future(self.checkpoint())

    async def checkpoint(self) -> None:
        """Fold the overlay into a new snapshot generation, off the event loop."""
        try:
            old_gen, new_gen = self._gen, self._journal_gen + 1
            self._rotate_journal(new_gen)
            self._frozen, self._overlay = {**self._frozen, **self._overlay}, {}
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, self._write_snapshot, old_gen, new_gen, self._frozen)
            self._switch_to(new_gen)
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
        self._journal.close()
        self._journal_gen = new_gen
        self._journal = open(self._file(f"wal-{new_gen}"), "ab")
        _fsync_dir(self.path)

    def _write_snapshot(self, old_gen: int, new_gen: int, changes: Dict[str, Optional[str]]) -> None:
        """Write generation ``new_gen`` = snapshot ``old_gen`` + ``changes``, then fsync it."""
        target = self._file(f"snap-{new_gen}")
        with dbm.open(target, "n") as new:
            if old_gen:
                with dbm.open(self._file(f"snap-{old_gen}"), "r") as old:
                    for key in old.keys():
                        if key.decode() not in changes:
                            new[key] = old[key]
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
        self._frozen = {}
        self._remove_stale_files()

    def close(self) -> None:
        if self._journal is not None:
            self.checkpoint_now()
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
# Keys and users
# ---------------------------------------------------------------------------

def new_key() -> str:
    return KEY_PREFIX + "".join(secrets.choice(KEY_ALPHABET) for _ in range(KEY_LENGTH))


def hash_key(key: str) -> str:
    """What the store keeps instead of a key: its SHA-256 (keys carry 268 random bits)."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_name(name: str) -> str:
    if not NAME_RE.match(name) or name in ROUTE_WORDS:
        raise AdminError(400, "invalid name: use 1-64 of A-Z a-z 0-9 . _ @ -, "
                              "starting with a letter or digit, and not a route word")
    return name


class Store:
    """Users and their keys over a KV: ``user:NAME`` (a JSON record) and
    ``key:SHA256`` (the name), so a key is found in O(1) and never kept in clear."""

    def __init__(self, kv: DbmKV):
        self.kv = kv

    async def user_for_key(self, key: str) -> Optional[Dict[str, Any]]:
        name = await self.kv.get("key:" + hash_key(key))
        if name is None:
            return None
        return await self.get_user(name)

    async def get_user(self, name: str) -> Optional[Dict[str, Any]]:
        record = await self.kv.get("user:" + name)
        return None if record is None else json.loads(record)

    async def create_user(self, name: str) -> str:
        if await self.get_user(name) is not None:
            raise StoreError(409, f"user {name} exists")
        key = new_key()
        user = {"name": name, "key_hash": hash_key(key), "created": now_iso()}
        await self.kv.write({"user:" + name: _dump(user), "key:" + user["key_hash"]: name})
        return key

    async def reset_key(self, name: str) -> str:
        user = await self.get_user(name)
        if user is None:
            raise StoreError(404, f"no user {name}")
        key = new_key()
        old_hash, user["key_hash"] = user["key_hash"], hash_key(key)
        await self.kv.write({"key:" + old_hash: None, "key:" + user["key_hash"]: name,
                             "user:" + name: _dump(user)})
        return key

    async def delete_user(self, name: str) -> None:
        user = await self.get_user(name)
        if user is None:
            raise StoreError(404, f"no user {name}")
        await self.kv.write({"key:" + user["key_hash"]: None, "user:" + name: None})

    async def import_users(self, users: Dict[str, Any]) -> int:
        """Take ``{name: {"key": "sk-…"}}`` (Cloudflare) or this program's export."""
        ops: Dict[str, Optional[str]] = {}
        for name, entry in users.items():
            if not isinstance(entry, dict) or not NAME_RE.match(name) or name in ROUTE_WORDS:
                raise ValueError(f"user {name!r}: needs a valid name and an object")
            record = {k: v for k, v in entry.items() if k != "key"}
            if isinstance(entry.get("key"), str) and entry["key"]:
                record["key_hash"] = hash_key(entry["key"])
            if not re.match(r"[0-9a-f]{64}\Z", str(record.get("key_hash", ""))):
                raise ValueError(f"user {name!r}: needs a key or a key_hash")
            record.update(name=name, created=record.get("created") or now_iso())
            old = await self.get_user(name)
            if old is not None and old["key_hash"] != record["key_hash"]:
                ops["key:" + old["key_hash"]] = None
            ops["user:" + name] = _dump(record)
            ops["key:" + record["key_hash"]] = name
        await self.kv.write(ops)
        return len(users)

    async def export_users(self) -> Dict[str, Any]:
        users = await self.kv.scan("user:")
        return {key[len("user:"):]: json.loads(value) for key, value in users.items()}


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


# ---------------------------------------------------------------------------
# The shared base handler: CORS, error bodies, the access log
# ---------------------------------------------------------------------------

class BaseHandler(tornado.web.RequestHandler):
    """Owns what every route shares: CORS headers, errors, and the log line."""

    @property
    def app(self) -> "App":
        return self.application.settings["app"]

    def initialize(self) -> None:
        self.log_user = "-"
        self.log_model = "-"
        self.log_tokens = "-"
        self.app.active.add(self)

    def on_finish(self) -> None:
        self.app.active.discard(self)

    def on_connection_close(self) -> None:
        self.app.active.discard(self)

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

    @property
    def log_path(self) -> str:
        """The request path as logs may show it: no query string, no token."""
        return self.request.path

    def _request_summary(self) -> str:
        # Tornado's own logs (uncaught exceptions) print this; keep secrets out.
        return f"{self.request.method} {self.log_path} ({self.request.remote_ip})"

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None))[1]
        if not isinstance(error, ApiError):
            kind = "server_error" if status_code >= 500 else "invalid_request_error"
            error = ApiError(status_code, self._reason, kind)
        for name, value in error.headers.items():
            self.set_header(name, value)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(error.body()))


class ForbiddenHandler(BaseHandler):
    """Anything that is not a route: 403, as in the seed."""

    def prepare(self) -> None:
        self.set_status(403)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish("Access forbidden")


class HealthHandler(BaseHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish("ok")

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
        self.set_status(204)


# ---------------------------------------------------------------------------
# Authentication of user keys
# ---------------------------------------------------------------------------

def key_from_headers(headers: tornado.httputil.HTTPHeaders) -> Optional[str]:
    """The caller's key from ``Authorization: Bearer …`` or ``api-key: …``."""
    auth = headers.get("Authorization", "")
    scheme, _, value = auth.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return headers.get("api-key", "").strip() or None


async def authenticate(store: Store, headers: tornado.httputil.HTTPHeaders) -> Dict[str, Any]:
    """The user the request's key belongs to; raises 401 in OpenAI's shape."""
    key = key_from_headers(headers)
    if key is None:
        raise invalid_api_key(
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
    user = await store.user_for_key(key)
    if user is None:
        raise invalid_api_key(
            "Incorrect API key provided. Ask the owner of this proxy for a valid key.")
    return user


# ---------------------------------------------------------------------------
# The HTTP proxy: /v<N>/…
# ---------------------------------------------------------------------------

@tornado.web.stream_request_body
class ProxyHandler(BaseHandler):
    """Passes one API request through, streaming both ways.

    Its life: prepare (authenticate, check the size, open the upstream request
    with a body producer) → data_received (body chunks to the upstream, with
    back-pressure) → the method handler (wait for the upstream) →
    on_upstream_headers → on_upstream_chunk → finish.
    """

    BODY_QUEUE_CHUNKS = 4  # body chunks in flight between client and upstream

    async def prepare(self) -> None:
        self.upstream_headers_sent = False
        self.client_gone = False
        self.fetch: Optional[asyncio.Future] = None
        if self.request.method == "OPTIONS":
            return
        # Tornado's own limit answers a bare 400; ours, counted as the body
        # streams, answers OpenAI's 413, so Tornado's is set past it.
        self.request.connection.set_max_body_size(2 * self.app.settings.max_body_bytes + (1 << 20))
        self.body_received = 0
        user = await authenticate(self.app.store, self.request.headers)
        self.log_user = user["name"]
        self._check_body_size()
        self.request.connection.stream.set_nodelay(True)
        self.start_upstream()

    def _check_body_size(self) -> None:
        length = self.request.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.app.settings.max_body_bytes:
            raise self.body_too_large()

    def body_too_large(self) -> ApiError:
        return ApiError(413, "The request body is over this proxy's limit of "
                             f"{self.app.settings.max_body_mb:g} MB (MAX_BODY_MB).",
                        code="request_too_large")

    # -- request: client → upstream -------------------------------------------

    def upstream_url(self) -> str:
        path = self.request.path
        while re.match(r"/v\d+/v\d+(/|$)", path):  # /v1/v1/…: a doubled base URL
            path = path[path.index("/", 1):]
        query = self.request.query
        return self.app.settings.upstream_url + path + (f"?{query}" if query else "")

    def upstream_request_headers(self) -> tornado.httputil.HTTPHeaders:
        headers = tornado.httputil.HTTPHeaders()
        named_by_connection = {
            token.strip().lower()
            for token in self.request.headers.get("Connection", "").split(",")
        }
        for name, value in self.request.headers.get_all():
            lower = name.lower()
            if lower not in NOT_FORWARDED_UP and lower not in named_by_connection:
                headers.add(name, value)
        headers["Authorization"] = "Bearer " + self.app.settings.openapi_api_key
        return headers

    def has_body(self) -> bool:
        length = self.request.headers.get("Content-Length")
        if length is not None:
            return length.strip() != "0"
        return "chunked" in self.request.headers.get("Transfer-Encoding", "").lower()

    def start_upstream(self) -> None:
        self.body_queue: "asyncio.Queue[Optional[bytes]]" = asyncio.Queue(self.BODY_QUEUE_CHUNKS)
        request = tornado.httpclient.HTTPRequest(
            self.upstream_url(),
            method=self.request.method,
            headers=self.upstream_request_headers(),
            body_producer=self.produce_body if self.has_body() else None,
            header_callback=self.on_upstream_header_line,
            streaming_callback=self.on_upstream_chunk,
            decompress_response=False,
            follow_redirects=False,
            allow_nonstandard_methods=True,
            connect_timeout=min(UPSTREAM_CONNECT_TIMEOUT, self.app.settings.upstream_timeout),
            request_timeout=self.app.settings.upstream_timeout,
        )
        self._header_lines: List[str] = []
        self.fetch = self.app.http_client.fetch(request, raise_error=False)
        self.fetch.add_done_callback(self._on_fetch_done)

    async def data_received(self, chunk: bytes) -> None:
        if self.fetch is None or self.fetch.done() or self._finished:
            return  # the answer is decided: the rest of the body goes nowhere
        self.body_received += len(chunk)
        if self.body_received > self.app.settings.max_body_bytes:
            self.abort_upstream()
            error = self.body_too_large()
            self.send_error(error.status_code, exc_info=(ApiError, error, None))
            return
        await self.body_queue.put(chunk)

    async def produce_body(self, write: Callable[[bytes], "asyncio.Future[None]"]) -> None:
        while True:
            chunk = await self.body_queue.get()
            if chunk is None:
                return
            if chunk is ABORT:
                raise tornado.iostream.StreamClosedError()  # ends the upstream request
            await write(chunk)

    def _on_fetch_done(self, fetch: "asyncio.Future[Any]") -> None:
        if not fetch.cancelled():
            fetch.exception()  # seen here, so an abandoned fetch logs no warning
        self._drain_body_queue()

    def _drain_body_queue(self) -> None:
        """Unblock a data_received waiting on a full queue."""
        while not self.body_queue.empty():
            self.body_queue.get_nowait()

    def abort_upstream(self) -> None:
        """Stop the upstream request while the body is still going up."""
        if self.fetch is not None and not self.fetch.done():
            self._drain_body_queue()
            self.body_queue.put_nowait(ABORT)

    # -- response: upstream → client ------------------------------------------

    def on_upstream_header_line(self, line: str) -> None:
        if line != "\r\n":
            self._header_lines.append(line)
            return
        start = tornado.httputil.parse_response_start_line(self._header_lines[0].rstrip())
        headers = tornado.httputil.HTTPHeaders()
        for header_line in self._header_lines[1:]:
            headers.parse_line(header_line.rstrip("\r\n"))
        self._header_lines = []
        self.on_upstream_headers(start.code, start.reason, headers)

    def on_upstream_headers(self, code: int, reason: str,
                            headers: tornado.httputil.HTTPHeaders) -> None:
        if self.client_gone:
            return
        self.set_status(code, reason or None)
        self.clear_header("Content-Type")
        for name, value in headers.get_all():
            if name.lower() not in NOT_FORWARDED_DOWN:
                self.add_header(name, value)
        self.upstream_headers_sent = True

    def on_upstream_chunk(self, chunk: bytes) -> None:
        if self.client_gone:
            # Raising here is the one way to stop a simple_httpclient fetch.
            raise tornado.iostream.StreamClosedError()
        self.write(chunk)
        self.flush().add_done_callback(_ignore_closed_stream)

    async def _pass_through(self, *args: str) -> None:
        if self._finished:
            return
        if not self.fetch.done():
            await self.body_queue.put(None)  # the client's body is complete
        try:
            response = await self.fetch
            failure = response.error if response.code == 599 else None
        except Exception as e:  # raise_error=False still raises for a failed connection
            failure = e
        if self.client_gone:
            return
        if not self.upstream_headers_sent:
            raise self.upstream_error(failure)
        if failure is not None:
            # The upstream broke off mid-answer: end the client's answer the
            # same way, so it never mistakes a cut stream for a whole one.
            self.request.connection.stream.close()
            return
        self.finish()

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
        """CORS preflight, answered here: browsers send no key with it."""
        self.set_status(204)
        self.set_header("Access-Control-Allow-Methods", CORS_ALLOW_METHODS)
        self.set_header("Access-Control-Allow-Headers",
                        self.request.headers.get("Access-Control-Request-Headers")
                        or CORS_DEFAULT_HEADERS)
        self.set_header("Access-Control-Max-Age", "86400")

    def on_connection_close(self) -> None:
        super().on_connection_close()
        self.client_gone = True
        self.abort_upstream()


ABORT = b"abort"  # a body-queue sentinel, compared by identity


def _ignore_closed_stream(future: "asyncio.Future[None]") -> None:
    if not future.cancelled() and future.exception() is not None:
        if not isinstance(future.exception(), tornado.iostream.StreamClosedError):
            log.warning("client write failed: %r", future.exception())


# ---------------------------------------------------------------------------
# Admin: /ACCESS_TOKEN/… and /admin/… (Bearer)
# ---------------------------------------------------------------------------

class AdminHandler(BaseHandler):
    """The owner's commands: register, reset and delete users.

    The token comes from the path (``/TOKEN/register/NAME``, as in the seed)
    or from ``Authorization: Bearer TOKEN`` on ``/admin/…``.
    """

    def initialize(self, token_in_path: bool) -> None:
        super().initialize()
        self.token_in_path = token_in_path

    @property
    def log_path(self) -> str:
        if self.token_in_path:
            return "/***" + self.request.path[self.request.path.find("/", 1):]
        return self.request.path

    def prepare(self) -> None:
        client = self.request.remote_ip or "-"
        if self.app.admin_locked_out(client):
            raise AdminError(429, "too many wrong tokens; try again in a minute")
        if self.token_in_path:
            given = self.path_args[0]
        else:
            scheme, _, given = self.request.headers.get("Authorization", "").strip().partition(" ")
            given = given.strip() if scheme.lower() == "bearer" else ""
        if not self.app.is_access_token(given):
            self.app.note_admin_failure(client)
            raise AdminError(403, "Access forbidden")

    def wants_json(self) -> bool:
        return (self.get_query_argument("format", "") == "json"
                or "application/json" in self.request.headers.get("Accept", ""))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None))[1]
        message = error.message if isinstance(error, AdminError) else self._reason
        if status_code == 403:
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            self.finish("Access forbidden")
        elif self.wants_json():
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({"error": message}))
        else:
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            self.finish(f"error: {message}\n")

    def answer(self, text: str, data: Dict[str, Any]) -> None:
        if self.wants_json():
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps(data))
        else:
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            self.finish(text + "\n")

    async def run_command(self, command: str, name: Optional[str]) -> None:
        store = self.app.store
        try:
            if command in ("register", "reset") and name is not None:
                check_name(name)
                make = store.create_user if command == "register" else store.reset_key
                key = await make(name)
                log.info("admin: %s %s", command, name)
                self.answer(key, {"name": name, "key": key})
            elif command == "delete" and name is not None:
                check_name(name)
                await store.delete_user(name)
                log.info("admin: deleted %s", name)
                self.answer("ok", {"name": name, "deleted": True})
            else:
                raise AdminError(404, "unknown command; see the README for the admin commands")
        except StoreError as e:
            raise AdminError(e.status, str(e))

    def _split(self) -> Tuple[str, Optional[str]]:
        rest = self.path_args[-1]
        command, _, name = rest.partition("/")
        return command, (name or None)

    async def get(self, *args: str) -> None:
        await self.run_command(*self._split())

    post = get

    async def delete(self, *args: str) -> None:
        command, name = self._split()
        if name is not None:
            raise AdminError(404, "unknown command; delete is DELETE /TOKEN/NAME")
        await self.run_command("delete", command)


# ---------------------------------------------------------------------------
# The application
# ---------------------------------------------------------------------------

class App:
    """What the handlers share: settings, the store, the upstream client."""

    def __init__(self, settings: Settings, store: Store):
        self.settings = settings
        self.store = store
        self.http_client = tornado.httpclient.AsyncHTTPClient()
        self._token_digest = hashlib.sha256(settings.access_token.encode()).digest()
        self._admin_failures: Dict[str, List[float]] = {}
        self.active: "set[BaseHandler]" = set()  # requests in flight, for a graceful stop

    def cors_origin(self, origin: Optional[str]) -> Optional[str]:
        allowed = self.settings.cors_origins
        if "*" in allowed:
            return "*"
        if origin and origin.rstrip("/") in allowed:
            return origin
        return None

    def is_access_token(self, given: str) -> bool:
        """Constant-time: compares fixed-length digests, so not even length leaks."""
        digest = hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest()
        return hmac.compare_digest(digest, self._token_digest)

    def note_admin_failure(self, client: str) -> None:
        now = time.monotonic()
        recent = [t for t in self._admin_failures.get(client, []) if now - t < ADMIN_LOCKOUT_SECONDS]
        recent.append(now)
        self._admin_failures[client] = recent[-ADMIN_FAILURES_ALLOWED:]
        if len(self._admin_failures) > 10000:  # bound the memory a scan can cost
            self._admin_failures.pop(next(iter(self._admin_failures)))

    def admin_locked_out(self, client: str) -> bool:
        recent = self._admin_failures.get(client, [])
        return (len(recent) >= ADMIN_FAILURES_ALLOWED
                and time.monotonic() - recent[-1] < ADMIN_LOCKOUT_SECONDS)

    def log_request(self, handler: tornado.web.RequestHandler) -> None:
        if not isinstance(handler, BaseHandler):
            return
        status = handler.get_status()
        level = logging.WARNING if status >= 500 else logging.INFO
        if log.isEnabledFor(level):
            log.log(level, "%s %s %d user=%s model=%s tokens=%s %.1fms",
                    handler.request.method, handler.log_path, status, handler.log_user,
                    handler.log_model, handler.log_tokens, 1000 * handler.request.request_time())


def make_app(app: App) -> tornado.web.Application:
    return tornado.web.Application(
        [
            (r"/healthz", HealthHandler),
            (r"/v\d+(?:/.*)?", ProxyHandler),
            (r"/admin/(.*)", AdminHandler, {"token_in_path": False}),
            (r"/(?:%s)(?:/.*)?" % "|".join(sorted(OPENAI_ROOTS)), MissingVersionHandler),
            (r"/([^/]+)/(.+)", AdminHandler, {"token_in_path": True}),
            (r".*", ForbiddenHandler),
        ],
        app=app,
        log_function=app.log_request,
        compress_response=False,
    )


# ---------------------------------------------------------------------------
# main: serve, import, export
# ---------------------------------------------------------------------------

def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(message)s",
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
        raise ConfigError(f"TLS_CERT/TLS_KEY: cannot load the certificate and key: {e}")
    return context


async def serve(settings: Settings) -> None:
    kv = DbmKV(settings.db_path).open()
    tornado.httpclient.AsyncHTTPClient.configure(
        None, max_clients=MAX_UPSTREAM_CLIENTS, max_body_size=1 << 50)
    app = App(settings, Store(kv))
    server = tornado.httpserver.HTTPServer(
        make_app(app),
        ssl_options=tls_context(settings),
        max_body_size=settings.max_body_bytes,
        idle_connection_timeout=120,
    )
    sockets = tornado.netutil.bind_sockets(settings.port, settings.host, backlog=1024)
    server.add_sockets(sockets)
    log.info("listening on %s://%s:%d", settings.scheme, settings.host, settings.port)

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()

    log.info("stopping: no new connections, waiting for requests in flight")
    server.stop()
    await wait_for_in_flight(app)
    try:
        await asyncio.wait_for(server.close_all_connections(), 5)
    except asyncio.TimeoutError:
        log.warning("stopping: some connections did not close")
    kv.close()
    log.info("stopped")


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
        raise ConfigError(f"import: cannot read {path}: {e}")
    if not isinstance(users, dict):
        raise ConfigError(f"import: {path} must hold a JSON object of users")
    kv = DbmKV(settings.db_path).open()
    try:
        count = await Store(kv).import_users(users)
    except ValueError as e:
        raise ConfigError(f"import: {e}")
    finally:
        kv.close()
    print(f"imported {count} users")


async def run_export(settings: Settings) -> None:
    kv = DbmKV(settings.db_path, readonly=True).open()
    users = await Store(kv).export_users()
    kv.close()
    json.dump(users, sys.stdout, indent=2, sort_keys=True)
    print()


def main(argv: List[str]) -> int:
    if argv[1:2] in (["--help"], ["-h"], ["help"]):
        print(__doc__.split("\n\n")[0] + "\n\n" + settings_help())
        return 0
    try:
        settings = load_settings(dict(os.environ))
        configure_logging(settings.log_level)
        if argv[1:] == []:
            asyncio.run(serve(settings))
        elif argv[1] == "import" and len(argv) == 3:
            asyncio.run(run_import(settings, argv[2]))
        elif argv[1:] == ["export"]:
            asyncio.run(run_export(settings))
        else:
            raise ConfigError("usage: python worker.py [import FILE | export | --help]")
    except ConfigError as e:
        print(f"worker.py: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno in (98, 13):  # address in use, permission denied
            print(f"worker.py: HOST/PORT: cannot listen: {e.strerror}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
