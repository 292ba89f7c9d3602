"""The SPANK helper's pure parts: what a step asked for, the task env, the site policy."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import pytest

from rankwire.errors import UserError
from rankwire.runtime import frame
from rankwire.runtime.plan import ContainerPlan, Mount
from rankwire.spank.plan import (
    SPECIAL_STEPS,
    JobFacts,
    asked,
    parse_mounts,
    per_step,
    starts_fresh,
    task_env,
)
from rankwire.spank.policy import Policy, PolicyError, load_policy


def facts(
    options: Mapping[str, str] = MappingProxyType({}),
    env: Mapping[str, str] = MappingProxyType({}),
    step: int = 0,
    step_values: tuple[str, ...] = (),
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
        *(("step_value", v) for v in step_values),
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


# -- policy decisions, exact (mutation-testing kills, `make mutants`) ------------------------
@needs_root
def test_policy_in_a_directory_anyone_could_edit_is_refused(tmp_path: Path) -> None:
    """A root-owned policy file in a world-writable directory can be swapped: refused."""
    path = write_policy(tmp_path, "")
    tmp_path.chmod(0o777)
    with pytest.raises(PolicyError) as err:
        load_policy(str(path))
    assert str(err.value) == (
        f"policy: {tmp_path} must be owned by root and not writable by group or others (and "
        "not a symlink); fix its mode, or no container runs"
    )
    tmp_path.chmod(0o755)
    os.chown(tmp_path, 65534, 65534)
    with pytest.raises(PolicyError) as err:
        load_policy(str(path))
    assert str(err.value).startswith(f"policy: {tmp_path} must be owned by root ")
    os.chown(tmp_path, 0, 0)
    assert load_policy(str(path)).image_dirs is None


@needs_root
def test_image_dirs_do_not_allow_mounts(tmp_path: Path) -> None:
    path = write_policy(tmp_path, 'image_dirs = ["/apps/images"]\nmount_sources = ["/scratch"]\n')
    p = load_policy(str(path))
    p.check_image("/apps/images")
    p.check_mount("/scratch/sub")
    with pytest.raises(PolicyError) as err:
        p.check_mount("/apps/images")
    assert str(err.value) == (
        "policy: mount source /apps/images is outside the allowed mount sources (/scratch)"
    )
    with pytest.raises(PolicyError) as err:
        p.check_image("/scratch/x.sif")
    assert str(err.value) == (
        "policy: image /scratch/x.sif is outside the allowed image directories (/apps/images); "
        "copy it there or ask your admin"
    )


def test_remote_images_under_each_policy() -> None:
    Policy().check_remote("ghcr.io", "docker://ghcr.io/a/b")  # no policy file: allowed
    allowed = Policy(source="/etc/p.toml", allowed_registries=("ghcr.io", "reg:5000"))
    allowed.check_remote("GHCR.io", "docker://GHCR.io/a/b")
    allowed.check_remote("reg:5000", "oras://reg:5000/x")
    cases = [
        (Policy(source="/etc/p.toml", enforce=True, allowed_registries=("ghcr.io",)), "ghcr.io",
         "policy: remote image docker://ghcr.io/a cannot run under this site's enforced policy "
         "(a pulled image is its user's file, which users could change): ask your admin to "
         "place it in an image directory"),
        (Policy(source="/etc/p.toml"), "ghcr.io",
         "policy: registry ghcr.io of docker://ghcr.io/a is not allowed: /etc/p.toml has no "
         "allowed_registries, so no remote image runs here; use a local SIF or ask your admin"),
        (allowed, "quay.io",
         "policy: registry quay.io of docker://quay.io/a is not in allowed_registries "
         "(ghcr.io, reg:5000) of /etc/p.toml; use an image from one of them or ask your admin"),
        (Policy(source="/etc/p.toml", allowed_registries=()), "quay.io",
         "policy: registry quay.io of docker://quay.io/a is not in allowed_registries "
         "(none) of /etc/p.toml; use an image from one of them or ask your admin"),
    ]  # fmt: skip
    for policy, registry, message in cases:
        with pytest.raises(PolicyError) as err:
            policy.check_remote(registry, f"docker://{registry}/a")
        assert str(err.value) == message
    with pytest.raises(dataclasses.FrozenInstanceError):
        allowed.enforce = True  # type: ignore[misc]


@needs_root
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('image_dirs = ["/a", 3]\n', "'image_dirs' must be a list of absolute paths"),
        ('mount_sources = ["/a", ""]\n', "'mount_sources' must be a list of absolute paths"),
        ('mount_sources = ["/a\\u0000b"]\n', "'mount_sources': '/a\\x00b' holds a NUL character"),
        ("allowed_registries = 'ghcr.io'\n",
         "'allowed_registries' must be a list of host[:port] names"),
        ("allowed_registries = ['ghcr.io', 3]\n",
         "'allowed_registries' must be a list of host[:port] names"),
        ("allowed_registries = ['https://ghcr.io']\n",
         "'allowed_registries': 'https://ghcr.io' is not a host[:port] (no scheme, no path)"),
        ("allowed_registries = ['ghcr.io/x']\n",
         "'allowed_registries': 'ghcr.io/x' is not a host[:port] (no scheme, no path)"),
        ("allowed_registries = ['']\n",
         "'allowed_registries': '' is not a host[:port] (no scheme, no path)"),
    ],
)  # fmt: skip
def test_policy_values_are_checked_exactly(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(PolicyError) as err:
        load_policy(str(write_policy(tmp_path, text)))
    assert str(err.value) == f"policy: {message}"


@needs_root
def test_a_full_policy_loads_every_key(tmp_path: Path) -> None:
    text = (
        'image_dirs = ["/apps/images"]\nmount_sources = ["/scratch", "/data"]\n'
        "allowed_registries = ['GHCR.io', 'reg:5000']\nallow_fabric_choice = false\n"
        "allow_remap_root = false\nallow_writable = false\nenforce = true\n"
    )
    path = write_policy(tmp_path, text)
    assert load_policy(str(path)) == Policy(
        str(path), ("/apps/images",), ("/scratch", "/data"), False, False, False, True,
        ("ghcr.io", "reg:5000"),
    )  # fmt: skip


def _container(mounts: tuple[Mount, ...]) -> ContainerPlan:
    return ContainerPlan(
        "/i.sif", 4096, 100, ("squashfuse", "loop"), ("fuse-overlayfs", "kernel"), False,
        (1000, 1000, 1), (1000, 1000, 1), ("user", "mount", "pid"), mounts, 64, "", "",
    )  # fmt: skip


def test_container_transforms_for_the_tasks() -> None:
    from rankwire.spank.plan import enforced, for_tasks, with_descriptors, without_home

    home = Mount("bind", "/home/u", "/home/u")
    data = Mount("bind", "/data", "/data")
    tmp = Mount("tmpfs", "/home/u")
    c = _container((home, data, tmp))
    assert with_descriptors(c, {"/data": 7, "/nope": 8}).mounts == (
        home, Mount("bind", "/data", "/proc/self/fd/7"), tmp,
    )  # fmt: skip
    assert with_descriptors(_container((tmp,)), {"/home/u": 3}).mounts == (tmp,)
    assert for_tasks(c).namespaces == ("user", "mount")
    assert without_home(c, "/home/u").mounts == (
        Mount("tmpfs", "/home/u", options="mode=0700"), data, tmp,
    )  # fmt: skip
    private = Mount("tmpfs", "/data", options="mode=0700")
    assert without_home(c, "/data").mounts == (home, private, tmp)
    root = dataclasses.replace(c, uid_map=(0, 1000, 1), gid_map=(0, 2000, 1))
    e = enforced(root)
    assert (e.namespaces, e.image_drivers, e.overlay_drivers, e.uid_map, e.gid_map) == (
        ("mount",), ("loop",), ("kernel",), (1000, 1000, 1), (2000, 2000, 1),
    )  # fmt: skip


def test_pull_plan_cache_and_insecure_registries() -> None:
    from rankwire.runtime.reference import parse_reference
    from rankwire.spank.plan import plan_pull

    ref = parse_reference("docker://Reg.Example:5000/a/b:1")
    env = {"RANKWIRE_CACHEDIR": "cache", "RANKWIRE_PULL_TIMEOUT": "9", "SECRET": "x"}
    pull = plan_pull(facts(env=env), "docker://reg.example:5000/a/b:1", ref, "/home/u", "u")
    assert (pull.root, pull.site_cache, pull.insecure) == ("/home/u/run/cache/images", False, False)
    assert pull.env == {
        "RANKWIRE_PULL_TIMEOUT": "9", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "LC_ALL": "C.UTF-8", "HOME": "/home/u", "USER": "u", "LOGNAME": "u",
    }  # fmt: skip
    site = ("image_cache=/var/cache/rw/", "registry_insecure=other, REG.example:5000")
    job = dataclasses.replace(facts(), args=facts().args + site)
    pull = plan_pull(job, "docker://x", ref, "/home/u", "u")
    assert (pull.root, pull.site_cache, pull.insecure) == ("/var/cache/rw/1000", True, True)
    pull = plan_pull(facts(), "docker://x", ref, "/home/u", "u")
    assert (pull.root, pull.site_cache, pull.insecure) == (
        "/home/u/.cache/rankwire/images", False, False,
    )  # fmt: skip
    with pytest.raises(UserError) as err:
        job = dataclasses.replace(facts(), args=("image_cache=rel",))
        plan_pull(job, "docker://x", ref, "/home/u", "u")
    assert str(err.value) == "plugstack.conf image_cache=rel: give an absolute directory"


def test_step_and_user_facts_exactly() -> None:
    from rankwire.spank.plan import SPECIAL_STEPS, exec_options, step_env, user_facts

    assert sorted(SPECIAL_STEPS) == [4294967290, 4294967291, 4294967292, 4294967293]
    assert asked(facts({"container-image": "/i.sif"}, step=4294967293), False) is None
    assert asked(facts({"container-image": "/i.sif"}, step=4294967294), False) is not None
    f = facts(env={"PWD": "/p", "RANKWIRE_BIND": "/etc", "PMIX_SERVER_TMPDIR": "/x", "A": "1"})
    assert f.cwd == "/home/u/run"
    assert dataclasses.replace(f, cwd="").cwd == ""
    u = user_facts(f, "/home/u", None)
    assert (u.uid, u.gid, u.home, u.cwd, u.slurm) == (1000, 1000, "/home/u", "/home/u/run", None)
    assert u.environ == {"PWD": "/p", "PMIX_SERVER_TMPDIR": "/x", "A": "1"}  # no binds
    assert u.cache_dir == "/home/u/.cache/rankwire"
    assert step_env(f) == {
        "PWD": "/p", "RANKWIRE_BIND": "/etc", "A": "1",
        "PMIX_SERVER_TMPDIR": "/var/spool/slurmd/pmix.7.0/",
        "SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4",
    }  # fmt: skip
    want = asked(facts({"container-image": "/i.sif"}), False)
    assert want is not None
    opts = exec_options(want, ())
    assert (opts.workdir, opts.bind_cwd, opts.share, opts.fakeroot) == (None, True, "none", False)
    w = asked(facts({"container-image": "/i.sif", "container-workdir": "/w"}), False)
    assert w is not None and exec_options(w, ()).bind_cwd is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.uid = 0  # type: ignore[misc]


def test_task_env_refuses_what_cannot_reach_a_task() -> None:
    for value in ("a\0b", "\ud800"):
        with pytest.raises(UserError) as err:
            task_env({}, {"BAD": value}, [])
        message = "the container's variable BAD holds a NUL or invalid text: fix the image's"
        assert str(err.value) == f"{message} environment"
    assert task_env({}, {"OK": "\udcff"}, []).set == ("OK=\udcff",)  # surrogateescape: bytes
    assert task_env({}, {"PMI_X": "a\0b"}, []).set == ()  # Slurm's own: not checked


def test_cwd_falls_back_to_pwd_then_root_and_results_are_frozen() -> None:
    from rankwire.spank.plan import Pull

    base = [(k, v) for k, v in frame.decode(frame.encode([
        ("uid", "1"), ("gid", "1"), ("job_id", "7"), ("step_id", "0"), ("local_tasks", "1"),
        ("total_tasks", "1"), ("node_id", "0"), ("nnodes", "1"), ("stepd_pid", "9"),
    ]))]  # fmt: skip
    assert JobFacts.from_request([*base, ("env", "PWD=/p")]).cwd == "/p"
    assert JobFacts.from_request(base).cwd == "/"
    want = asked(facts({"container-image": "/i.sif"}), False)
    for value in (want, Pull("s", "/r", False, False, {}), task_env({}, {}, [])):
        field = dataclasses.fields(value)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(value, field, None)


# -- where a node's named containers live: the slurmd key (conf + node) -----------------
@pytest.mark.parametrize(
    ("conf", "node", "key"),
    [
        (None, None, "default"),
        ("", "", "default"),
        ("/etc/slurm/slurm.conf", None, "_etc_slurm_slurm.conf"),
        (None, "node1", "default@node1"),
        ("/etc/slurm/slurm.conf", "node1", "_etc_slurm_slurm.conf@node1"),
        ("/x/\xe9.conf", "n\xf6de+1", "_x___.conf@n__de_1"),  # bytes, as the shim counts
        ("/s/a@b", "c", "_s_a_b@c"),  # "@" only ever the separator
    ],
)
def test_slurmd_key_names_conf_and_node(conf: str, node: str, key: str) -> None:
    from rankwire.spank.plan import slurmd_key

    assert slurmd_key(conf, node) == key


def test_slurmd_key_stays_one_file_name() -> None:
    from rankwire.spank.plan import slurmd_key

    key = slurmd_key("/" + "a" * 300, "n" * 300)
    assert key == "_" + "a" * 199 + "@" + "n" * 50 and len(key) == 251


def _stepd(f: JobFacts, **env: str) -> JobFacts:
    return dataclasses.replace(f, stepd_env={**f.stepd_env, **env})


def test_named_dirs_are_per_node_and_the_epilogs_dir_matches() -> None:
    """Two nodes of one job under one slurm.conf (and a named_dir= every node sees) keep
    their changes apart; the node is slurmstepd's SLURMD_NODENAME, never the job's (a
    step started from a batch script carries the batch node's); the job epilog (conf and
    node from its environment) finds the same BASE/SLURMD."""
    from rankwire.spank.plan import jobs_dir, named_dir

    job = facts({"container-image": "/i.sif", "container-name": "c"}, {"SLURMD_NODENAME": "b"})
    job = dataclasses.replace(job, args=(*job.args, "named_dir=/shared/rw/"))
    want = asked(job, False)
    assert want is not None
    conf = "/etc/slurm/slurm.conf"
    dirs = [named_dir(_stepd(job, SLURM_CONF=conf, SLURMD_NODENAME=n), want) for n in "xy"]
    assert dirs == [
        "/shared/rw/_etc_slurm_slurm.conf@x/7/1000/c",
        "/shared/rw/_etc_slurm_slurm.conf@y/7/1000/c",
    ]
    assert named_dir(_stepd(job, SLURM_CONF=conf), want) == (
        "/shared/rw/_etc_slurm_slurm.conf/7/1000/c"  # a Slurm that names no node
    )
    assert jobs_dir(job.args, conf, "x") == "/shared/rw/_etc_slurm_slurm.conf@x"
    g = asked(dataclasses.replace(job, args=(*job.args, "container_scope=global")), False)
    assert g is not None
    assert named_dir(_stepd(job, SLURMD_NODENAME="x"), g) == "/shared/rw/default@x/global/1000/c"


def test_per_step_changes_only_what_the_tickets_key_by_name() -> None:
    """The shim's tickets key Slurm's per-step values by name only (the request lists them,
    spank/ticket.c `rw_step_values`): `per_step` changes exactly those, and the job's and a
    real step's ids, so that a plan made from both says whether it read any."""
    env = {"SLURM_JOB_ID": "7", "PMIX_SERVER_URI41": "x", "SLURM_NTASKS": "4", "HOME": "/h"}
    values = ("SLURM_JOB_ID=", "PMIX_SERVER_URI", "PMIX_SERVER_TMPDIR=")
    f = facts(env=env, step=3, step_values=values)
    other = per_step(f)
    assert other.env == {**env, "SLURM_JOB_ID": "71", "PMIX_SERVER_URI41": "x1"}
    assert other.stepd_env == {"PMIX_SERVER_TMPDIR": "/var/spool/slurmd/pmix.7.0/1"}
    assert (other.job_id, other.step_id, other.stepd_pid) == (8, 2, 1235)
    assert dataclasses.replace(other, env=f.env, stepd_env=f.stepd_env, job_id=7, step_id=3,
                               stepd_pid=1234) == f  # fmt: skip
    special = min(SPECIAL_STEPS)  # the batch or extern step: its id is its kind
    assert per_step(facts(step=special)).step_id == special


@pytest.mark.parametrize(
    ("options", "fresh"),
    [
        ({"container-image": "/a.sif"}, True),
        ({"container-image": "/a.sif", "container-mounts": "/d:/d"}, True),
        ({"container-image": "/a.sif", "container-name": "box"}, False),
        ({"container-image": "/a.sif", "container-save": "/b.sif"}, False),
        ({"container-image": "docker://debian:12"}, False),
        ({"container-image": "/a.sif", "container-host-mpi": "auto"}, False),
    ],
)
def test_only_a_container_of_its_own_may_start_fresh(options: dict[str, str], fresh: bool) -> None:
    want = asked(facts(options), False)
    assert want is not None
    assert starts_fresh(want) is fresh
