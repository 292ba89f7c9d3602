"""The SPANK helper's pure parts: what a step asked for, the task env, the site policy."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import pytest

from rankwire.errors import UserError
from rankwire.runtime import frame
from rankwire.runtime.plan import Mount
from rankwire.spank.plan import JobFacts, asked, parse_mounts, task_env
from rankwire.spank.policy import PolicyError, load_policy


def facts(
    options: Mapping[str, str] = MappingProxyType({}),
    env: Mapping[str, str] = MappingProxyType({}),
    step: int = 0,
) -> JobFacts:
    request = [
        ("uid", "1000"),
        ("gid", "1000"),
        ("gids", "1000"),
        ("gids", "27"),
        ("job_id", "7"),
        ("step_id", str(step)),
        ("local_tasks", "2"),
        ("total_tasks", "4"),
        ("node_id", "0"),
        ("nnodes", "2"),
        ("stepd_pid", "1234"),
        ("cwd", "/home/u/run"),
        ("arg", "helper=/usr/bin/rankwire"),
        ("arg", "policy=/etc/rankwire/policy.toml"),
        *(("opt", f"{k}={v}") for k, v in options.items()),
        *(("env", f"{k}={v}") for k, v in env.items()),
        ("stepd_env", "PMIX_SERVER_TMPDIR=/var/spool/slurmd/pmix.7.0/"),
    ]
    # Through the wire format, as the shim sends it.
    return JobFacts.from_request(frame.decode(frame.encode(request)))


def test_request_is_decoded() -> None:
    f = facts({"container-image": "a=b.sif"}, {"X": "1=2", "RAW": "\udcff\n"})
    assert f.options == {"container-image": "a=b.sif"}
    assert f.env == {"X": "1=2", "RAW": "\udcff\n"}
    assert (f.uid, f.gid, f.job_id, f.step_id, f.stepd_pid, f.cwd) == (
        1000,
        1000,
        7,
        0,
        1234,
        "/home/u/run",
    )

    assert f.gids == (1000, 27) and f.stepd_env["PMIX_SERVER_TMPDIR"].endswith("pmix.7.0/")
    assert f.arg("policy") == "/etc/rankwire/policy.toml" and f.arg("nope") is None


def test_request_without_a_fact_is_refused() -> None:
    with pytest.raises(frame.FrameError, match=r"^the request has no uid$"):
        JobFacts.from_request(frame.decode(b"gid=0\0"))


def test_image_option_wins_over_env_and_native_container() -> None:
    env = {"RANKWIRE_CONTAINER_IMAGE": "/env.sif", "SLURM_CONTAINER": "/native.sif"}
    a = asked(facts({"container-image": "img.sif"}, env), oci_conf=False)
    assert a is not None and a.image == "/home/u/run/img.sif"
    assert a.image_from == "--container-image"
    a = asked(facts({}, env), oci_conf=False)
    assert a is not None and (a.image, a.image_from) == ("/env.sif", "RANKWIRE_CONTAINER_IMAGE")
    a = asked(facts({}, {"SLURM_CONTAINER": "native.sif"}), oci_conf=False)
    assert a is not None and (a.image, a.image_from) == ("/home/u/run/native.sif", "--container")


def test_native_container_is_slurms_when_the_node_has_oci_conf() -> None:
    assert asked(facts({}, {"SLURM_CONTAINER": "/native.sif"}), oci_conf=True) is None
    # Our own option still applies.
    assert asked(facts({"container-image": "/x.sif"}), oci_conf=True) is not None


@pytest.mark.parametrize("step", [0xFFFFFFFB, 0xFFFFFFFC, 0xFFFFFFFA])
def test_batch_extern_and_interactive_steps_are_left_alone(step: int) -> None:
    assert asked(facts({"container-image": "/x.sif"}, step=step), oci_conf=False) is None


def test_no_image_no_container() -> None:
    assert asked(facts({}, {"RANKWIRE_CONTAINER_MOUNTS": "/a"}), oci_conf=False) is None


def test_options_and_their_variables() -> None:
    a = asked(
        facts(
            {"container-image": "/x.sif", "container-writable": "1"},
            {
                "RANKWIRE_CONTAINER_MOUNTS": "/data:/in:ro,scratch",
                "RANKWIRE_CONTAINER_ENV": "PATH, LANG",
                "RANKWIRE_CONTAINER_FABRIC": "tcp",
                "RANKWIRE_CONTAINER_REMAP_ROOT": "yes",
                "RANKWIRE_CONTAINER_WORKDIR": "/in",
            },
        ),
        oci_conf=False,
    )
    assert a is not None
    assert a.mounts == (
        Mount("bind", "/in", "/data", readonly=True, recursive=True),
        Mount("bind", "/home/u/run/scratch", "/home/u/run/scratch", recursive=True),
    )
    assert a.keep_env == ("PATH", "LANG") and a.fabric == "tcp" and a.workdir == "/in"
    assert a.writable and a.remap_root


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("/a:/b:rx", "unknown flag 'rx'"),
        ("/a:rel", "DST must be absolute"),
        ("/a:/b:ro:x", "use SRC[:DST[:ro|rw]]"),
        (":/b", "use SRC[:DST[:ro|rw]]"),
    ],
)
def test_bad_mounts_are_named(spec: str, why: str) -> None:
    with pytest.raises(UserError, match=re.escape(why)):
        parse_mounts(spec, "/cwd")


def test_bad_flag_and_workdir() -> None:
    with pytest.raises(UserError, match="not a yes/no value"):
        asked(facts({"container-image": "/x", "container-writable": "maybe"}), oci_conf=False)
    with pytest.raises(UserError, match="absolute path"):
        asked(facts({"container-image": "/x", "container-workdir": "rel"}), oci_conf=False)


def test_task_env_sets_unsets_keeps_and_copies() -> None:
    job = {"PATH": "/host/bin", "LD_LIBRARY_PATH": "/host/lib", "SAME": "1", "KEEP": "host"}
    ctr = {"PATH": "/usr/bin", "SAME": "1", "KEEP": "image", "NEW": "x"}
    changes = task_env(job, ctr, ["KEEP"])
    assert set(changes.set) == {"PATH=/usr/bin", "NEW=x"}
    assert changes.unset == ("LD_LIBRARY_PATH",)
    assert "PMIX_MCA_gds=PMIX_GDS_MODULE" in changes.copy


# -- policy -----------------------------------------------------------------------------


def write_policy(tmp_path: Path, text: str, mode: int = 0o644) -> Path:
    tmp_path.chmod(0o755)
    p = tmp_path / "policy.toml"
    p.write_text(text)
    p.chmod(mode)
    return p


needs_root = pytest.mark.skipif(os.getuid() != 0, reason="policy files must be root-owned")


def test_no_policy_allows_everything() -> None:
    p = load_policy(None)
    p.check_image("/anywhere/x.sif")
    p.check_mount("/etc")
    p.check_options(fabric="verbs", remap_root=True, writable=True)


@needs_root
def test_policy_refusals_name_the_reason(tmp_path: Path) -> None:
    path = write_policy(
        tmp_path,
        'image_dirs = ["/apps/images"]\nmount_sources = ["/scratch"]\n'
        "allow_fabric_choice = false\nallow_remap_root = false\nallow_writable = false\n",
    )
    p = load_policy(str(path))
    p.check_image("/apps/images/sub/x.sif")
    with pytest.raises(PolicyError, match=r"^policy: image /apps/imagesX/x.sif is outside"):
        p.check_image("/apps/imagesX/x.sif")
    p.check_mount("/scratch")
    with pytest.raises(PolicyError, match="mount source /etc is outside"):
        p.check_mount("/etc")
    p.check_options(fabric="auto", remap_root=False, writable=False)
    for kw, what in (
        ({"fabric": "tcp"}, "--container-fabric=tcp"),
        ({"remap_root": True}, "--container-remap-root"),
        ({"writable": True}, "--container-writable"),
    ):
        args = {"fabric": "auto", "remap_root": False, "writable": False, **kw}
        with pytest.raises(PolicyError, match=what):
            p.check_options(**args)


@needs_root
@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("image_dir = []\n", "unknown key 'image_dir'"),
        ("image_dirs = [\n", "not valid TOML"),
        ('image_dirs = ["rel"]\n', "not an absolute path"),
        ("image_dirs = '/a'\n", "must be a list"),
        ("allow_writable = 1\n", "must be true or false"),
        ("enforce = 'yes'\n", "'enforce' must be true or false"),
    ],
)
def test_broken_policy_fails_closed(tmp_path: Path, text: str, why: str) -> None:
    with pytest.raises(PolicyError, match=why):
        load_policy(str(write_policy(tmp_path, text)))


@needs_root
def test_policy_that_is_not_text_fails_closed(tmp_path: Path) -> None:
    path = write_policy(tmp_path, "")
    path.write_bytes(b'image_dirs = ["/caf\xe9"]\n')
    with pytest.raises(PolicyError) as err:
        load_policy(str(path))
    assert str(err.value).startswith(f"policy: {path} is not valid TOML: ")


@needs_root
def test_enforce_refuses_remap_root(tmp_path: Path) -> None:
    p = load_policy(str(write_policy(tmp_path, "enforce = true\n")))
    assert p.enforce
    with pytest.raises(PolicyError) as err:
        p.check_options(fabric="auto", remap_root=True, writable=False)
    assert str(err.value) == (
        "policy: --container-remap-root needs a user namespace, which this site's enforced "
        "policy does not give containers; drop it"
    )


@needs_root
def test_policy_anyone_could_edit_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="must be owned by root"):
        load_policy(str(write_policy(tmp_path, "", mode=0o666)))
    path = write_policy(tmp_path, "")
    os.chown(path, 65534, 65534)
    with pytest.raises(PolicyError, match="must be owned by root"):
        load_policy(str(path))
    with pytest.raises(PolicyError, match="no such file"):
        load_policy(str(tmp_path / "missing.toml"))
