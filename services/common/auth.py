"""API keys: the keys file, hashing, lookups and reload on change, and `meshserve keys`.

The keys file (JSON) holds only SHA-256 hashes of the keys, never a key in clear:

    {"keys": [{"name": "team-a", "sha256": "<64 hex>", "models": ["digits"],
               "scopes": ["infer"], "priority": 1, "rate_per_s": 50, "burst": 100}]}

- models: the models the key may use ("*" = all); priority: the request priority used when
  a request sets none (0 = the model's default); rate_per_s / burst: the key's token bucket
  (absent: no per-key limit).
- scopes: what the key may do with those models. "infer": inference, metadata/config/ready,
  and async tasks (submit; get/watch/cancel of the tasks it submitted). "admin": model
  control (load/unload), routing policies, statistics and the server-wide settings calls.
  A key without "scopes" (files written before scopes existed) has both, as it had before;
  `meshserve keys add` writes the scopes explicitly (default: infer only).
No grpc here: the gateway's protection module reads the presented key from gRPC metadata.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import secrets
import sys
import tempfile
import time
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from meshserve.common.errors import ConfigError
from meshserve.common.ratelimit import RateLimit

log = logging.getLogger(__name__)

ALL_MODELS = "*"
KEY_PREFIX = "msk_"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_ENTRY_FIELDS = {"name", "sha256", "models", "scopes", "priority", "rate_per_s", "burst"}
INFER = "infer"
ADMIN = "admin"
SCOPES = (INFER, ADMIN)
# A key written before scopes existed could do everything on its models: it still can.
LEGACY_SCOPES = frozenset(SCOPES)


def hash_key(key: str) -> str:
    """The hex SHA-256 of a key (what the keys file stores)."""
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    """A new random key: 256 bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    sha256: str
    models: frozenset[str]  # ALL_MODELS inside: every model
    priority: int = 0  # 0: the model's default
    limit: RateLimit | None = None
    scopes: frozenset[str] = LEGACY_SCOPES

    def has(self, scope: str) -> bool:
        return scope in self.scopes

    def allows(self, model: str) -> bool:
        """model "" stands for every model (e.g. statistics of all): needs "*"."""
        return ALL_MODELS in self.models or (model != "" and model in self.models)


# The key of the call being served (set by the gateway's protection after it checked the
# key; None when auth is off). Async tasks are bound to it: owner() below.
CALLER: ContextVar[ApiKey | None] = ContextVar("meshserve_caller", default=None)


def owner() -> str:
    """Who owns what the current call creates: the caller key's hash ("" when auth is off)."""
    key = CALLER.get()
    return key.sha256 if key is not None else ""


@dataclass(frozen=True, slots=True)
class KeySet:
    by_hash: dict[str, ApiKey]

    def lookup(self, key: str) -> ApiKey | None:
        return self.by_hash.get(hash_key(key))


def parse_keys(data: object, source: str) -> KeySet:
    """Validates a decoded keys file; ConfigError names the file and the field."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ConfigError(f"{source}: keys: expected an object with a list 'keys'")
    unknown = set(data) - {"keys"}
    if unknown:
        raise ConfigError(f"{source}: unknown top-level field(s) {sorted(unknown)}")
    by_hash: dict[str, ApiKey] = {}
    names: set[str] = set()
    for i, entry in enumerate(data["keys"]):
        where = f"{source}: keys[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected an object")
        if "key" in entry:
            raise ConfigError(f"{where}.key: never store a key in clear; store its sha256")
        unknown = set(entry) - _ENTRY_FIELDS
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{where}.name: a non-empty string is required")
        if name in names:
            raise ConfigError(f"{where}.name: duplicate name {name!r}")
        digest = entry.get("sha256")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise ConfigError(f"{where}.sha256: expected 64 lowercase hex digits")
        if digest in by_hash:
            raise ConfigError(f"{where}.sha256: the same key as {by_hash[digest].name!r}")
        models = entry.get("models")
        if (not isinstance(models, list) or not models
                or not all(isinstance(m, str) and m for m in models)):
            raise ConfigError(f"{where}.models: a non-empty list of model names (or \"*\")")
        scopes = entry.get("scopes", sorted(LEGACY_SCOPES))
        if (not isinstance(scopes, list) or not scopes
                or not all(isinstance(x, str) and x in SCOPES for x in scopes)):
            raise ConfigError(f"{where}.scopes: a non-empty list of {list(SCOPES)}")
        priority = entry.get("priority", 0)
        if isinstance(priority, bool) or not isinstance(priority, int) or priority < 0:
            raise ConfigError(f"{where}.priority: an integer >= 0 (0: the model's default)")
        limit = None
        if "rate_per_s" in entry or "burst" in entry:
            rate, burst = entry.get("rate_per_s"), entry.get("burst")
            for field, value in (("rate_per_s", rate), ("burst", burst)):
                if value is not None and (isinstance(value, bool)
                                          or not isinstance(value, int | float)):
                    raise ConfigError(f"{where}.{field}: a number is required")
            if rate is None:
                raise ConfigError(f"{where}.rate_per_s: required with burst")
            try:
                limit = RateLimit(float(rate), float(burst if burst is not None
                                                     else max(1.0, rate)))
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
        names.add(name)
        by_hash[digest] = ApiKey(name, digest, frozenset(models), priority, limit,
                                 frozenset(scopes))
    return KeySet(by_hash)


def load_keys(path: str | Path) -> KeySet:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the keys file: {e.strerror or e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    return parse_keys(data, str(path))


def _signature(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size, st.st_ino


class KeyStore:
    """The keys file, reloaded when it changes: `current()` stats the file at most once
    per `check_interval_s` (on the caller's path: no polling task). A file that fails to
    load on reload keeps the previous keys (logged); at construction it raises ConfigError."""

    def __init__(self, path: str, check_interval_s: float = 1.0, clock=time.monotonic):
        self.path = path
        self.check_interval_s = check_interval_s
        self.clock = clock
        self._signature = _signature(path) if os.path.exists(path) else None
        self._keys = load_keys(path)
        self._checked_at = clock()
        self._bad_signature: tuple | None = None
        log.info("API keys: %d key(s) from %s", len(self._keys.by_hash), path)

    def current(self) -> KeySet:
        now = self.clock()
        if now - self._checked_at >= self.check_interval_s:
            self._checked_at = now
            self._maybe_reload()
        return self._keys

    def _maybe_reload(self) -> None:
        try:
            signature = _signature(self.path)
        except OSError as e:
            if self._bad_signature != ("missing",):
                log.error("API keys: cannot stat %s (%s); keeping the previous keys",
                          self.path, e)
                self._bad_signature = ("missing",)
            return
        if signature == self._signature or signature == self._bad_signature:
            return
        try:
            keys = load_keys(self.path)
        except ConfigError as e:
            log.error("API keys: reload failed, keeping the previous %d key(s): %s",
                      len(self._keys.by_hash), e)
            self._bad_signature = signature
            return
        self._keys, self._signature, self._bad_signature = keys, signature, None
        log.info("API keys: reloaded %d key(s) from %s", len(keys.by_hash), self.path)


# ------------------------------------------------------------------ meshserve keys


def _read_file(path: Path) -> dict:
    if not path.exists():
        return {"keys": []}
    data = json.loads(path.read_text())
    parse_keys(data, str(path))  # refuse to edit a broken file
    return data


def _write_file(path: Path, data: dict) -> None:
    """Atomically (a reader never sees half a file), readable by the owner only."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent or ".", delete=False,
                                     prefix=".keys-", suffix=".json") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.chmod(f.name, 0o600)
    Path(f.name).replace(path)


def keys_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="meshserve keys",
                                description="API keys of a gateway's keys file (--api-keys-file).")
    sub = p.add_subparsers(dest="action", required=True)
    add = sub.add_parser("add", help="create a key: printed once, only its hash is stored")
    add.add_argument("name")
    add.add_argument("--models", required=True, help='comma list of models, or "*" for all')
    add.add_argument("--scopes", default=INFER,
                     help=f"comma list of {', '.join(SCOPES)} (default: {INFER}): infer = "
                          "inference, metadata and its own async tasks; admin = load, unload, "
                          "routing, statistics")
    add.add_argument("--priority", type=int, default=0, help="default request priority (0: model's)")
    add.add_argument("--rate-per-s", type=float, default=None, help="the key's rate limit")
    add.add_argument("--burst", type=float, default=None, help="the key's burst (default: rate)")
    rm = sub.add_parser("remove", help="revoke a key by name")
    rm.add_argument("name")
    ls = sub.add_parser("list", help="names, models and limits (never keys)")
    for parser in (add, rm, ls):
        parser.add_argument("--file", required=True, help="the keys file (JSON)")
    args = p.parse_args(argv)
    path = Path(args.file)
    try:
        data = _read_file(path)
        if args.action == "list":
            for e in data["keys"]:
                limit = f" rate_per_s={e['rate_per_s']} burst={e.get('burst')}" \
                    if "rate_per_s" in e else ""
                scopes = ",".join(e.get("scopes", sorted(LEGACY_SCOPES)))
                print(f"{e['name']}: models={','.join(e['models'])} scopes={scopes} "
                      f"priority={e.get('priority', 0)}{limit}")
            return 0
        if args.action == "remove":
            kept = [e for e in data["keys"] if e["name"] != args.name]
            if len(kept) == len(data["keys"]):
                print(f"no key named {args.name!r} in {path}", file=sys.stderr)
                return 1
            _write_file(path, {**data, "keys": kept})
            print(f"removed key {args.name!r} from {path}")
            return 0
        key = generate_key()
        entry: dict = {"name": args.name, "sha256": hash_key(key),
                       "models": [m.strip() for m in args.models.split(",") if m.strip()],
                       "scopes": [x.strip() for x in args.scopes.split(",") if x.strip()],
                       "priority": args.priority}
        if args.rate_per_s is not None:
            entry["rate_per_s"] = args.rate_per_s
            entry["burst"] = args.burst if args.burst is not None else max(1.0, args.rate_per_s)
        new = {**data, "keys": [*data["keys"], entry]}
        parse_keys(new, str(path))  # the same checks the gateway makes
        _write_file(path, new)
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(key)
    print(f"key {args.name!r} added to {path}; it is shown only now: store it safely",
          file=sys.stderr)
    return 0
