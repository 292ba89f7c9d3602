"""Image references and registry credentials: pure functions, exact results."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from rankwire.errors import UserError
from rankwire.runtime.reference import Access, Reference, parse_reference
from rankwire.runtime.registry import credentials

HEX = "0123456789abcdef" * 4
FIX = " or oras://REGISTRY/REPO[:TAG|@sha256:HEX]"


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("docker://alpine", Reference("docker", "docker.io", "library/alpine", "latest", None)),
        (
            "docker://ubuntu:22.04",
            Reference("docker", "docker.io", "library/ubuntu", "22.04", None),
        ),
        (
            "docker://nvcr.io/nvidia/pytorch:24.01-py3",
            Reference("docker", "nvcr.io", "nvidia/pytorch", "24.01-py3", None),
        ),
        (
            "docker://127.0.0.1:5000/a/b",
            Reference("docker", "127.0.0.1:5000", "a/b", "latest", None),
        ),
        (
            "docker://localhost/x@sha256:" + HEX,
            Reference("docker", "localhost", "x", None, "sha256:" + HEX),
        ),
        ("docker://r.io/x:t@sha256:" + HEX, Reference("docker", "r.io", "x", "t", "sha256:" + HEX)),
        (
            "oras://127.0.0.1:5000/sif/app:1",
            Reference("oras", "127.0.0.1:5000", "sif/app", "1", None),
        ),
    ],
)
def test_references_parse_as_docker_names_them(text: str, want: Reference) -> None:
    assert parse_reference(text) == want


def test_docker_hub_is_reached_at_its_api_host() -> None:
    assert parse_reference("docker://alpine").api_host == "registry-1.docker.io"
    assert parse_reference("docker://127.0.0.1:5000/a").api_host == "127.0.0.1:5000"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("docker://Alpine", "repository part Alpine is not lowercase a-z, 0-9, . _ -"),
        ("docker://alpine:b@d", "digest d is not sha256: and 64 lowercase hex digits"),
        ("docker://alpine:-x", "tag -x is not a valid tag"),
        ("oras://app:1", "an oras:// reference names its registry"),
        ("docker://r.io//x", "repository part  is not lowercase a-z, 0-9, . _ -"),
        ("docker://a\nb", "repository part a\\nb is not lowercase a-z, 0-9, . _ -"),
    ],
)
def test_bad_references_say_what_is_wrong(text: str, why: str) -> None:
    with pytest.raises(UserError) as err:
        parse_reference(text)
    shown = text.replace("\n", "\\n")
    assert str(err.value) == (
        f"image reference {shown}: {why}; write docker://[REGISTRY/]REPO[:TAG|@sha256:HEX]" + FIX
    )


def _config(tmp_path: Path, auths: dict[str, str]) -> Path:
    docker = tmp_path / ".docker"
    docker.mkdir()
    entries = {k: {"auth": base64.b64encode(v.encode()).decode()} for k, v in auths.items()}
    (docker / "config.json").write_text(json.dumps({"auths": entries}))
    return tmp_path


def test_credentials_come_from_the_flag_then_the_environment_then_docker_config(
    tmp_path: Path,
) -> None:
    home = str(_config(tmp_path, {"r.io": "cfg:pw1", "https://index.docker.io/v1/": "hub:pw2"}))
    ref = parse_reference("docker://r.io/x")
    env = {"RANKWIRE_DOCKER_USERNAME": "env", "RANKWIRE_DOCKER_PASSWORD": "pw3"}
    assert credentials(ref, Access(username="flag", password="pw"), env, home) == ("flag", "pw")
    assert credentials(ref, Access(), env, home) == ("env", "pw3")
    assert credentials(ref, Access(), {}, home) == ("cfg", "pw1")
    assert credentials(parse_reference("docker://alpine"), Access(), {}, home) == ("hub", "pw2")
    assert credentials(parse_reference("docker://q.io/x"), Access(), {}, home) is None
    assert credentials(ref, Access(), {"DOCKER_CONFIG": "/nonexistent"}, home) is None
