"""Every input `make fuzz` (tools/fuzz.py) found crashing or hanging, replayed through its
target: tests/data/fuzz-corpus/<target>/<case>. Also: each target takes its own seeds."""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import fuzz

CASES = sorted(p for p in fuzz.CORPUS.glob("*/*") if p.is_file())


@pytest.fixture(scope="module", autouse=True)
def _release() -> Iterator[None]:
    yield
    fuzz.cleanup()


@pytest.mark.parametrize("path", CASES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_saved_input_neither_crashes_nor_hangs(path: Path) -> None:
    assert fuzz.replay(path) is None


def test_corpus_folders_are_targets() -> None:
    assert {p.parent.name for p in CASES} <= set(fuzz.TARGETS)


@pytest.mark.parametrize("name", sorted(fuzz.TARGETS))
def test_seeds_pass(name: str) -> None:
    target = fuzz.TARGETS[name]
    for seed in target.seeds():
        assert fuzz.check(target, seed) is None, seed[:80]


def test_the_mutator_is_reproducible() -> None:
    target = fuzz.TARGETS["pmi1"]

    def inputs(seed: str) -> list[bytes]:
        mutate = fuzz.Mutator(random.Random(seed), target.seeds(), target.tokens, 4096)
        return [mutate() for _ in range(200)]

    assert inputs("s") == inputs("s") != inputs("t")


def test_a_policy_path_holding_a_nul_is_a_policy_error(tmp_path: Path) -> None:
    from rankwire.spank import policy

    path = tmp_path / "policy.toml"
    path.write_bytes((fuzz.CORPUS / "policy" / "nul-in-a-path").read_bytes())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(policy, "_trusted", lambda path: None)
        with pytest.raises(policy.PolicyError) as err:
            policy.load_policy(str(path))
    assert str(err.value) == "policy: 'image_dirs': '/sr\\x00v' holds a NUL character"
