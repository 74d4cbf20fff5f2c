"""The keys file: validation naming file and field, lookups by hash, reload, the CLI."""

from __future__ import annotations

import json
import os
import stat

import pytest

from meshserve.common import auth
from meshserve.common.errors import ConfigError
from meshserve.common.ratelimit import RateLimit


def entry(name="a", key="secret-a", **extra) -> dict:
    return {"name": name, "sha256": auth.hash_key(key), "models": ["digits"], **extra}


def write(path, *entries) -> None:
    path.write_text(json.dumps({"keys": list(entries)}))


def test_lookup_by_hash_and_permissions(tmp_path):
    keys = auth.parse_keys({"keys": [
        entry("a", "secret-a", priority=1, rate_per_s=5, burst=10),
        {**entry("b", "secret-b"), "models": ["*"]},
    ]}, "k.json")
    a = keys.lookup("secret-a")
    assert a.name == "a" and a.priority == 1 and a.limit == RateLimit(5.0, 10.0)
    assert a.allows("digits") and not a.allows("other") and not a.allows("")
    b = keys.lookup("secret-b")
    assert b.allows("anything") and b.allows("") and b.limit is None
    # written before scopes existed: both, as before
    assert a.scopes == b.scopes == {"infer", "admin"} and a.has("admin")
    assert keys.lookup("secret-c") is None
    assert "secret-a" not in json.dumps([e.sha256 for e in keys.by_hash.values()])


@pytest.mark.parametrize("data, field", [
    ({"keys": [{**entry(), "sha256": "abc"}]}, r"keys\[0\]\.sha256"),
    ({"keys": [{**entry(), "key": "secret-a"}]}, r"keys\[0\]\.key: never store a key in clear"),
    ({"keys": [{**entry(), "models": []}]}, r"keys\[0\]\.models"),
    ({"keys": [{**entry(), "models": "digits"}]}, r"keys\[0\]\.models"),
    ({"keys": [{**entry(), "priority": -1}]}, r"keys\[0\]\.priority"),
    ({"keys": [{**entry(), "rate_per_s": 0}]}, r"keys\[0\]: rate_per_s"),
    ({"keys": [{**entry(), "burst": 3}]}, r"keys\[0\]\.rate_per_s"),
    ({"keys": [entry("a", "x"), entry("a", "y")]}, r"keys\[1\]\.name: duplicate"),
    ({"keys": [entry("a", "x"), entry("b", "x")]}, r"keys\[1\]\.sha256: the same key"),
    ({"keys": [{**entry(), "colour": 1}]}, r"keys\[0\]: unknown field"),
    ({"keys": [{**entry(), "scopes": []}]}, r"keys\[0\]\.scopes"),
    ({"keys": [{**entry(), "scopes": ["root"]}]}, r"keys\[0\]\.scopes"),
    ({"keys": [{**entry(), "scopes": "infer"}]}, r"keys\[0\]\.scopes"),
    ({"users": []}, r"keys: expected"),
])
def test_invalid_files_name_the_file_and_field(data, field):
    with pytest.raises(ConfigError, match=r"^k\.json: " + field):
        auth.parse_keys(data, "k.json")


def test_unreadable_or_broken_file_fails_at_start(tmp_path):
    with pytest.raises(ConfigError, match="missing.json: cannot read"):
        auth.KeyStore(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        auth.KeyStore(str(bad))


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


def test_reload_on_change_at_most_once_per_interval_and_bad_files_keep_the_old_keys(tmp_path):
    path = tmp_path / "keys.json"
    write(path, entry("a", "secret-a"))
    clock = Clock()
    store = auth.KeyStore(str(path), check_interval_s=1.0, clock=clock)
    assert store.current().lookup("secret-a") is not None

    write(path, entry("a", "secret-a"), entry("b", "secret-b"))
    os.utime(path, ns=(1, 1))  # a different mtime, whatever the file system's resolution
    clock.now = 0.5
    assert store.current().lookup("secret-b") is None  # not checked yet: under a second
    clock.now = 1.0
    assert store.current().lookup("secret-b") is not None

    path.write_text('{"keys": [{"name": "broken"}]}')
    clock.now = 2.0
    keys = store.current()
    assert keys.lookup("secret-a") is not None and keys.lookup("secret-b") is not None

    path.unlink()
    clock.now = 3.0
    assert store.current().lookup("secret-b") is not None

    write(path, entry("c", "secret-c"))
    clock.now = 4.0
    keys = store.current()
    assert keys.lookup("secret-c") is not None and keys.lookup("secret-a") is None


def test_keys_cli_prints_the_key_once_and_stores_its_hash(tmp_path, capsys):
    path = tmp_path / "keys.json"
    assert auth.keys_main(["add", "team-a", "--models", "digits,other", "--priority", "2",
                           "--rate-per-s", "5", "--file", str(path)]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith(auth.KEY_PREFIX) and len(key) > 40
    text = path.read_text()
    assert key not in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    found = auth.load_keys(path).lookup(key)
    assert found.name == "team-a" and found.models == {"digits", "other"}
    assert found.priority == 2 and found.limit == RateLimit(5.0, 5.0)
    assert found.scopes == {"infer"}  # least privilege unless asked

    assert auth.keys_main(["add", "team-b", "--models", "*", "--scopes", "infer,admin",
                           "--file", str(path)]) == 0
    second = capsys.readouterr().out.strip()
    assert second != key and auth.load_keys(path).lookup(second).allows("x")
    assert auth.load_keys(path).lookup(second).scopes == {"infer", "admin"}
    assert auth.keys_main(["add", "team-c", "--models", "*", "--scopes", "root",
                           "--file", str(path)]) == 1
    assert "scopes" in capsys.readouterr().err
    assert auth.keys_main(["add", "team-a", "--models", "x", "--file", str(path)]) == 1
    assert "duplicate name" in capsys.readouterr().err

    assert auth.keys_main(["list", "--file", str(path)]) == 0
    listed = capsys.readouterr().out
    assert "team-a: models=digits,other scopes=infer priority=2" in listed and key not in listed
    assert auth.keys_main(["remove", "team-a", "--file", str(path)]) == 0
    assert auth.load_keys(path).lookup(key) is None
