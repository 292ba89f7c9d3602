"""fabric/factcache.py: dear host facts kept in the user's cache dir, believed only from
our own files, missed on any change or damage, never kept when read from a moving file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rankwire.fabric import factcache
from rankwire.fabric.factcache import FactCache
from rankwire.record import record


@record
class Facts:
    name: str
    paths: tuple[str, ...]


def decode(d: dict) -> Facts:
    return Facts(d["name"], tuple(d["paths"]))


def paths_of(f: Facts) -> tuple[str, ...]:
    return f.paths


@pytest.fixture
def settled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files made by the test itself are new: keep facts read from them anyway."""
    monkeypatch.setattr(factcache, "SETTLE_NS", 0)


def cache(tmp_path: Path, key: object = "k") -> FactCache:
    return FactCache(str(tmp_path / "cache"), "kind", key, [str(tmp_path / "watched")])


def test_kept_until_a_file_changes(tmp_path: Path, settled: None) -> None:
    (tmp_path / "watched").write_text("1")
    lib = tmp_path / "lib.so"
    lib.write_text("a")
    facts = Facts("x", (str(lib),))
    cache(tmp_path).store(facts, facts.paths)
    assert cache(tmp_path).load(decode, paths_of) == facts
    assert cache(tmp_path, "other key").load(decode, paths_of) is None
    lib.write_text("ab")  # one of the facts' own files
    assert cache(tmp_path).load(decode, paths_of) is None
    cache(tmp_path).store(facts, facts.paths)
    (tmp_path / "watched").unlink()  # a watched file going counts too
    assert cache(tmp_path).load(decode, paths_of) is None


def test_only_our_own_entries_are_believed(tmp_path: Path, settled: None) -> None:
    (tmp_path / "watched").write_text("1")
    facts = Facts("x", ())
    c = cache(tmp_path)
    c.store(facts, ())
    entry = Path(c.dir) / c.name
    assert c.load(decode, paths_of) == facts
    os.chmod(entry, 0o664)  # writable by the group
    assert cache(tmp_path).load(decode, paths_of) is None
    os.chmod(entry, 0o600)
    os.chmod(c.dir, 0o777)  # a dir others can write into
    assert cache(tmp_path).load(decode, paths_of) is None
    entry.unlink()
    cache(tmp_path).store(facts, ())  # nor written there
    assert not entry.exists()
    os.chmod(c.dir, 0o700)
    if os.geteuid() == 0:  # another user's file
        cache(tmp_path).store(facts, ())
        os.chown(entry, 1, 1)
        assert cache(tmp_path).load(decode, paths_of) is None
        entry.unlink()
    entry.symlink_to(tmp_path / "elsewhere.json")  # not followed
    (tmp_path / "elsewhere.json").write_text(json.dumps({"facts": {}, "identity": {}}))
    assert cache(tmp_path).load(decode, paths_of) is None


@pytest.mark.parametrize(
    "text",
    ["", "not json", "[]", '{"facts": {"name": "x", "paths": []}}', '{"identity": {}}',
     '{"facts": {"name": "x", "paths": [[1]]}, "identity": {}}', "[" * 100_000],
)  # fmt: skip
def test_a_damaged_entry_is_a_miss(tmp_path: Path, settled: None, text: str) -> None:
    (tmp_path / "watched").write_text("1")
    c = cache(tmp_path)
    c.store(Facts("x", ()), ())
    (Path(c.dir) / c.name).write_text(text)
    assert cache(tmp_path).load(decode, paths_of) is None


def test_facts_read_from_a_file_that_just_changed_are_not_kept(tmp_path: Path) -> None:
    """A file changed while (or just before) the facts were read (an upgrade of the
    library meanwhile): what was read may be half old, half new."""
    (tmp_path / "watched").write_text("1")
    c = cache(tmp_path)
    lib = tmp_path / "lib.so"
    lib.write_text("a")  # "while they were read"
    c.store(Facts("x", (str(lib),)), (str(lib),))
    assert not (Path(c.dir) / c.name).exists()
