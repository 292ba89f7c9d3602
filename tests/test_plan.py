"""The pure planners, fed facts and asserted on plans (no I/O, no fixtures)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import pytest

from rankwire.errors import UserError
from rankwire.fabric.hostfacts import FabricHostFacts
from rankwire.fabric.plan import EMPTY_IMAGE
from rankwire.launcher.plan import LaunchOptions, describe, plan_launch, resolve_pmi
from rankwire.runtime.assemble import Facts, plan_image
from rankwire.runtime.hostfacts import HostFacts
from rankwire.runtime.options import delegation_argv
from rankwire.runtime.plan import (
    ExecOptions,
    ImageFacts,
    Mount,
    UserFacts,
    extracts_first,
    parse_bind,
    paths_to_probe,
    plan_container,
    plan_env,
    share_key,
    within,
)
from rankwire.runtime.slurmfacts import SlurmStep

HOST = HostFacts(
    kernel="6.1",
    machine="x86_64",
    uid=1000,
    gid=1000,
    max_user_namespaces=15000,
    unprivileged_userns_clone=1,
    dev_fuse_usable=True,
    tools={"squashfuse_ll": "/usr/bin/squashfuse_ll", "unsquashfs": "/usr/bin/unsquashfs"},
)
IMAGE = ImageFacts("app.sif", 4096, 8192, "d" * 32, {"IMG": "image", "K": "image"}, True)


def user(environ: Optional[dict[str, str]] = None, cwd: str = "/work/job", **kw: Any) -> UserFacts:
    return UserFacts(
        uid=1000,
        gid=1000,
        home="/home/u",
        cwd=cwd,
        environ=environ if environ is not None else {"HOME": "/home/u"},
        cache_dir="/home/u/.cache/rankwire",
        **kw,
    )


ALL = frozenset({"/etc/hosts", "/etc/localtime", "/home/u", "/data", "/work/job/in"})


def targets(plan: Any) -> list[str]:
    return [m.target for m in plan.mounts]


def test_mount_order_defaults_then_binds_then_pmix_then_fabric() -> None:
    step = SlurmStep("7", "0", 1, "/var/spool/slurmd/pmix.7.0", "/tmp/spmix_appdir_1000_7.0")
    u = user({"RANKWIRE_BIND": "/data:/d:ro"}, slurm=step)
    opts = ExecOptions(binds=(parse_bind("in"),))
    fabric = (Mount("bind", "/.rankwire/fabric/lib/libfabric.so.1", "/usr/lib/libfabric.so.1"),)
    existing = ALL | {"/var/spool/slurmd/pmix.7.0", "/tmp/spmix_appdir_1000_7.0"}
    plan = plan_container(IMAGE, HOST, u, opts, existing, fabric_mounts=fabric)
    assert targets(plan) == [
        "/proc",
        "/sys",
        "/dev",
        "/etc/hosts",
        "/etc/localtime",
        "/tmp",
        "/var/tmp",
        "/home/u",
        "/work/job",  # the cwd, not under any bind above
        "/d",  # RANKWIRE_BIND first
        "/work/job/in",  # then -B; its relative source is the cwd's
        "/var/spool/slurmd/pmix.7.0",  # the app dir is under /tmp, already bound
        "/.rankwire/fabric/lib/libfabric.so.1",
    ]
    assert plan.mounts[9] == Mount("bind", "/d", "/data", readonly=True, recursive=True)
    assert plan.image == "/work/job/app.sif"  # relative to the user's cwd, not ours
    assert plan.image_drivers == ("squashfuse_ll", "extract")
    assert plan.share is None  # one task: no node-wide container


def test_contain_and_missing_paths() -> None:
    plan = plan_container(IMAGE, HOST, user(), ExecOptions(contain=True), frozenset())
    assert plan.namespaces == ("user", "mount", "pid")  # the container owns its processes
    assert [(m.kind, m.target) for m in plan.mounts] == [
        ("proc", "/proc"),  # its PID namespace's own
        ("bind", "/sys"),
        ("devtmpfs", "/dev"),
        ("tmpfs", "/tmp"),
        ("tmpfs", "/var/tmp"),
        ("tmpfs", "/home/u"),
    ]
    bare = plan_container(IMAGE, HOST, user(cwd="/home/u/x"), ExecOptions(), frozenset())
    assert targets(bare) == ["/proc", "/sys", "/dev", "/tmp", "/var/tmp", "/home/u/x"]


def test_missing_bind_source_is_named() -> None:
    with pytest.raises(UserError) as err:
        plan_container(
            IMAGE, HOST, user(), ExecOptions(binds=(parse_bind("/nope:/x"),)), frozenset()
        )
    assert str(err.value) == "bind source '/nope' does not exist: create it or fix -B"


def test_paths_to_probe_are_what_the_planner_asks_about() -> None:
    step = SlurmStep("7", "0", 1, "/spool/pmix.7.0", None)
    u = user({"APPTAINER_BINDPATH": "/data"}, slurm=step)
    assert paths_to_probe(u, ExecOptions(binds=(parse_bind("rel:/r"),))) == (
        "/etc/hosts",
        "/etc/localtime",
        "/home/u",
        "/data",
        "/work/job/rel",
        "/spool/pmix.7.0",
    )


def test_env_precedence_one_key_in_every_layer() -> None:
    """host < image < fabric < APPTAINERENV_ < RANKWIRE_ENV_ < --env, one key in each."""
    host = {
        "K": "host",
        "APPTAINERENV_K": "apptainerenv",
        "RANKWIRE_ENV_K": "rankwireenv",
        "ONLY_HOST": "h",
        "PATH": "/host/bin",
        "LD_LIBRARY_PATH": "/host/lib",
    }
    opts = ExecOptions(env=("K=cli",))
    layers = [
        (host, {}, ExecOptions(env=("K=cli",)), "cli"),
        (host, {}, ExecOptions(), "rankwireenv"),
        (
            {k: v for k, v in host.items() if k != "RANKWIRE_ENV_K"},
            {},
            ExecOptions(),
            "apptainerenv",
        ),
        ({"K": "host"}, {"K": "fabric"}, ExecOptions(), "fabric"),
        ({"K": "host"}, {}, ExecOptions(), "image"),
    ]
    for environ, fabric, o, want in layers:
        assert plan_env(IMAGE, user(environ), o, fabric)["K"] == want, want
    env = plan_env(IMAGE, user(host), opts, {"K": "fabric"})
    assert env["ONLY_HOST"] == "h" and env["IMG"] == "image"
    assert env["PATH"] == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert "LD_LIBRARY_PATH" not in env and "APPTAINERENV_K" not in env
    assert env["HOME"] == "/home/u" and env["RANKWIRE_CONTAINER"] == "app.sif"
    no_image = dataclasses.replace(IMAGE, env={})
    assert plan_env(no_image, user({"K": "host"}), ExecOptions(), {})["K"] == "host"


def test_cleanenv_keeps_wireup_and_pmix_translation() -> None:
    host = {"PMI_FD": "3", "SLURM_JOB_ID": "7", "PMIX_GDS_MODULE": "hash", "SECRET": "x"}
    env = plan_env(IMAGE, user(host), ExecOptions(cleanenv=True), {})
    assert env["PMI_FD"] == "3" and env["SLURM_JOB_ID"] == "7" and "SECRET" not in env
    assert env["PMIX_MCA_gds"] == "hash"
    already = plan_env(IMAGE, user({**host, "PMIX_MCA_gds": "ds21"}), ExecOptions(), {})
    assert already["PMIX_MCA_gds"] == "ds21"


def test_share_under_srun_and_share_names() -> None:
    step = SlurmStep("7", "3", 4, None, None)
    u = user({"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "3"}, slurm=step)
    plan = plan_container(IMAGE, HOST, u, ExecOptions(), ALL)
    assert plan.share is not None and plan.share.startswith("slurm-7.3-")
    other = plan_container(IMAGE, HOST, u, ExecOptions(binds=(parse_bind("/data"),)), ALL)
    assert other.share != plan.share  # other binds: never the same container
    assert plan_container(IMAGE, HOST, u, ExecOptions(share="none"), ALL).share is None
    assert share_key("job-%j.%s", u.environ) == "job-7.3"
    with pytest.raises(UserError) as err:
        share_key("a/b", {})
    assert str(err.value) == "--share a/b: use letters, digits, '.', '_', '-' (at most 64)"


@pytest.mark.parametrize(
    ("spec", "mount"),
    [
        ("/a", Mount("bind", "", "/a", recursive=True)),
        ("/a:/b", Mount("bind", "/b", "/a", recursive=True)),
        ("/a:/b:ro", Mount("bind", "/b", "/a", readonly=True, recursive=True)),
        ("/a::ro+rw", Mount("bind", "", "/a", readonly=True, recursive=True)),
        ("rel:/b/../c:rw", Mount("bind", "/c", "rel", recursive=True)),
    ],
)
def test_one_bind_grammar(spec: str, mount: Mount) -> None:
    assert parse_bind(spec) == mount


def test_within_is_component_wise() -> None:
    assert within("/a/b", "/a") and within("/a", "/a") and within("/a/b", "/")
    assert not within("/ab", "/a") and not within("/a", "/a/b")


def facts(environ: dict[str, str]) -> Facts:
    return Facts(
        image=IMAGE,
        host=HOST,
        user=user(environ),
        existing=ALL,
        fabric_host=FabricHostFacts((), (), None),
        fabric_image=EMPTY_IMAGE,
    )


def test_plan_image_assembles_fabric_container_and_process() -> None:
    plan = plan_image(facts({"K": "host"}), ExecOptions(fabric="none"), ("/bin/true",))
    assert plan.fabric.provider == "" and plan.fabric.reason
    assert plan.process is not None and plan.process.argv == ("/bin/true",)
    assert plan.process.env == plan.env and plan.process.workdir == "/work/job"
    assert plan_image(facts({}), ExecOptions(fabric="none"), None).process is None


def test_srun_delegation_argv() -> None:
    opts = ExecOptions(
        binds=(parse_bind("/data:/d:ro"),),
        contain=True,
        fabric="tcp",
        env=("A=1",),
        workdir="/w",
        cleanenv=True,
    )
    values = {
        **{f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)},
        "binds": tuple(m.spec() for m in opts.binds),
    }
    prefix = ["/venv/bin/rankwire", "exec", *delegation_argv(values), "app.sif"]
    plan = plan_image(facts({}), dataclasses.replace(opts, fabric="none"), ("/opt/hello",))
    assert plan.process is not None
    launch = plan_launch(
        LaunchOptions(ntasks=4, tag_output=True, timeout=90),
        plan.process,
        plan.container,
        {"SLURM_JOB_ID": "42"},
        prefix,
        mpi_kind="pmix",
    )
    assert launch.delegate == (
        "srun",
        "--mpi=pmix",
        "-n",
        "4",
        "--label",
        "--time=2",
        "/venv/bin/rankwire",
        "exec",
        "--bind",
        "/data:/d:ro",
        "--contain",
        "--fabric",
        "tcp",
        "--env",
        "A=1",
        "--cleanenv",
        "--pwd",
        "/w",
        "app.sif",
        "/opt/hello",
    )
    assert describe(launch) == "inside Slurm job 42: delegating to " + " ".join(launch.delegate)


def test_local_launch_strips_the_callers_wireup() -> None:
    plan = plan_image(facts({"PMI_FD": "9", "PMIX_RANK": "0"}), ExecOptions(fabric="none"), ("x",))
    assert plan.process is not None
    launch = plan_launch(LaunchOptions(ntasks=2), plan.process, plan.container, {}, [], None)
    assert launch.delegate is None and launch.slurm_job is None
    assert "PMI_FD" not in launch.process.env and "PMIX_RANK" not in launch.process.env
    assert describe(launch).startswith("launching 2 rank(s) on one shared container of ")


@pytest.mark.parametrize(
    ("choice", "kind", "pmi"),
    [
        ("auto", "pmix", "pmix"),
        ("auto", "pmi1/2", "pmi2"),
        ("auto", "both", "pmi2"),
        ("auto", None, "pmi2"),
        ("pmi1", "pmix", "pmi1"),
        ("pmix", None, "pmix"),
    ],
)
def test_pmi_choice(choice: str, kind: Optional[str], pmi: str) -> None:
    assert resolve_pmi(choice, kind) == pmi


def test_the_extract_cache_is_keyed_on_the_partitions_content() -> None:
    content = dataclasses.replace(IMAGE, content_digest="sha256:" + "ab" * 32)
    plan = plan_container(content, HOST, user(), ExecOptions(), ALL)
    assert plan.extract_dir == "/home/u/.cache/rankwire/sandbox/" + "ab" * 16
    other = dataclasses.replace(content, content_digest="sha256:" + "cd" * 32)
    assert plan_container(other, HOST, user(), ExecOptions(), ALL).extract_dir != plan.extract_dir
    # Same metadata identity, no content read (FUSE first): the holder reads it if it
    # falls back to extracting, and knows where the cache is.
    unread = plan_container(IMAGE, HOST, user(), ExecOptions(), ALL)
    assert (unread.extract_dir, unread.cache_dir) == ("", "/home/u/.cache/rankwire")


def test_only_a_plan_that_extracts_first_pays_for_the_content_digest() -> None:
    assert not extracts_first(HOST, ExecOptions())
    assert extracts_first(HOST, ExecOptions(unsquash=True))
    assert extracts_first(dataclasses.replace(HOST, dev_fuse_usable=False), ExecOptions())


@pytest.mark.parametrize("item", ["1BAD", "=v", "A B"])
def test_an_export_must_name_a_variable(item: str) -> None:
    with pytest.raises(UserError) as err:
        plan_env(IMAGE, user(), ExecOptions(export=(item,)))
    assert str(err.value) == f"bad -x '{item}': give a variable name, -x VAR or -x VAR=VALUE"


# -- whole plans (mutation-testing kills, `make mutants`) -----------------------------------
def test_default_container_plan_whole() -> None:
    """Every mount with its flags (recursive binds of whole trees, single files not), the
    id maps, the drivers: one plan asserted whole."""
    plan = plan_container(IMAGE, HOST, user(environ={}), ExecOptions(), ALL)
    assert plan.mounts == (
        Mount("proc", "/proc"),
        Mount("bind", "/sys", "/sys", recursive=True),
        Mount("bind", "/dev", "/dev", recursive=True),
        Mount("bind", "/etc/hosts", "/etc/hosts"),
        Mount("bind", "/etc/localtime", "/etc/localtime"),
        Mount("bind", "/tmp", "/tmp", recursive=True),
        Mount("bind", "/var/tmp", "/var/tmp", recursive=True),
        Mount("bind", "/home/u", "/home/u", recursive=True),
        Mount("bind", "/work/job", "/work/job", recursive=True),
    )
    assert (plan.uid_map, plan.gid_map) == ((1000, 1000, 1), (1000, 1000, 1))
    assert plan.tmpfs_size_mib == 64
    assert (plan.image_drivers, plan.overlay_drivers) == (("squashfuse_ll", "extract"), ("kernel",))
    other = dataclasses.replace(user(environ={}), uid=1001, gid=2002)
    fake = plan_container(IMAGE, HOST, other, ExecOptions(fakeroot=True), ALL)
    assert (fake.uid_map, fake.gid_map) == ((0, 1001, 1), (0, 2002, 1))
    plain = plan_container(IMAGE, HOST, other, ExecOptions(), ALL)
    assert (plain.uid_map, plain.gid_map) == ((1001, 1001, 1), (2002, 2002, 1))
    tools = {**HOST.tools, "squashfuse": "/usr/bin/squashfuse", "fuse-overlayfs": "/usr/bin/f"}
    host = dataclasses.replace(HOST, tools=tools)
    both = plan_container(IMAGE, host, user(), ExecOptions(), ALL)
    assert both.image_drivers == ("squashfuse_ll", "squashfuse", "extract")
    assert both.overlay_drivers == ("kernel", "fuse-overlayfs")
    nofuse = plan_container(IMAGE, dataclasses.replace(host, dev_fuse_usable=False), user(),
                            ExecOptions(), ALL)  # fmt: skip
    assert (nofuse.image_drivers, nofuse.overlay_drivers) == (("extract",), ("kernel",))
    unsquash = plan_container(IMAGE, host, user(), ExecOptions(unsquash=True), ALL)
    assert (unsquash.image_drivers, unsquash.overlay_drivers) == (
        ("extract",), ("kernel", "fuse-overlayfs"),
    )  # fmt: skip
    inside = plan_container(IMAGE, HOST, user(cwd="/tmp/x"), ExecOptions(), ALL)
    assert targets(inside)[-1] == "/home/u"  # the cwd is under /tmp, bound already
    dev = plan_container(IMAGE, HOST, user(cwd="/dev/shm"), ExecOptions(), ALL)
    assert targets(dev)[-1] == "/dev/shm"  # /dev is a kernel dir: the cwd is bound itself
    nocwd = plan_container(IMAGE, HOST, user(), ExecOptions(bind_cwd=False), ALL)
    assert targets(nocwd)[-1] == "/home/u"


def test_small_decisions_exactly() -> None:
    from rankwire.runtime.plan import (
        ContainerPlan,
        cache_dir,
        hidden_by,
        plan_process,
        runscript_argv,
        sandbox_dir,
    )

    assert cache_dir({}, "/h") == "/h/.cache/rankwire"
    assert cache_dir({"XDG_CACHE_HOME": "/x"}, "/h") == "/x/rankwire"
    assert cache_dir({"XDG_CACHE_HOME": ""}, "/h") == "/h/.cache/rankwire"
    assert cache_dir({"RANKWIRE_CACHEDIR": "/c", "XDG_CACHE_HOME": "/x"}, "/h") == "/c"
    assert sandbox_dir("/c", None) == ""
    assert sandbox_dir("/c", "sha256:" + "ab" * 32) == "/c/sandbox/" + "ab" * 16
    assert sandbox_dir("/c", "cd" * 32) == "/c/sandbox/" + "cd" * 16
    for spec in ("", "a:b:ro:x", ":b"):
        with pytest.raises(UserError) as err:
            parse_bind(spec)
        assert str(err.value) == f"bad -B '{spec}': use SRC[:DST[:ro|rw]]"
    assert parse_bind("a:/b:ro") == Mount("bind", "/b", "a", readonly=True, recursive=True)
    assert hidden_by("/dev", "/dev") is None  # at its own place
    assert hidden_by("/x", "/dev/shm") is None
    assert hidden_by("/x", "/dev") == "the container's /dev"
    assert hidden_by("/x", "/proc/sys") == "the container's /proc"
    assert hidden_by("/x", "/") == "the whole image"
    assert hidden_by("/x", "/data") is None
    assert runscript_argv(IMAGE, ["a"]) == ["/.singularity.d/runscript", "a"]
    with pytest.raises(UserError) as err:
        runscript_argv(dataclasses.replace(IMAGE, has_runscript=False), [])
    assert str(err.value) == "app.sif has no runscript: use `rankwire exec IMAGE COMMAND`"
    assert plan_process(IMAGE, user(), ExecOptions(), ["x"]).workdir == "/work/job"
    assert plan_process(IMAGE, user(), ExecOptions(contain=True), ["x"]).workdir == "/home/u"
    assert plan_process(IMAGE, user(), ExecOptions(containall=True), ["x"]).workdir == "/home/u"
    assert plan_process(IMAGE, user(), ExecOptions(workdir="/w"), ["x"]).workdir == "/w"
    plan = plan_container(IMAGE, HOST, user(), ExecOptions(), ALL)
    assert ContainerPlan.from_dict(plan.to_dict()) == plan


def test_env_edge_cases_exactly() -> None:
    host = {"APPTAINERENV_": "bare prefix", "RANKWIRE_ENV_A": "a", "H": "host", "E": "host"}
    opts = ExecOptions(env_file_vars=("F=file=x", "G"), export=("H", "NOPE", "I=i"))
    env = plan_env(IMAGE, user(host), opts)
    assert env["A"] == "a" and "" not in env and env["F"] == "file=x" and env["G"] == ""
    assert (env["H"], env["I"], "NOPE" in env) == ("host", "i", False)
    for item in ("=v", "K"):
        with pytest.raises(UserError) as err:
            plan_env(IMAGE, user(), ExecOptions(env=(item,)))
        assert str(err.value) == f"bad --env '{item}': use --env KEY=VALUE"
    assert plan_env(IMAGE, user(), ExecOptions(env=("K=",)))["K"] == ""


def test_plans_are_frozen_and_binds_under_a_private_tmp_are_kept() -> None:
    from rankwire.runtime.plan import ContainerPlan, ProcessPlan, _share

    plan = plan_container(IMAGE, HOST, user(), ExecOptions(), ALL)
    for value in (plan, plan.mounts[0], ProcessPlan(("x",), {}, "/"), IMAGE, ExecOptions(),
                  user()):  # fmt: skip
        field = dataclasses.fields(value)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(value, field, None)
    assert isinstance(plan, ContainerPlan)
    assert Mount("bind", "/a", "/b") == Mount("bind", "/a", "/b", False, False, "")
    # --contain: /tmp is a private tmpfs, which would hide a PMIx dir below it.
    step = SlurmStep("7", "0", 1, None, "/tmp/spmix_appdir_1000_7.0")
    u = user(cwd="/tmp/x", slurm=step)
    opts = ExecOptions(contain=True)
    contained = plan_container(IMAGE, HOST, u, opts, ALL | {"/tmp/spmix_appdir_1000_7.0"})
    assert targets(contained)[-1] == "/tmp/spmix_appdir_1000_7.0"
    # One node-wide container per step of two tasks or more.
    for ntasks, shared in ((1, False), (2, True)):
        s = SlurmStep("7", "0", ntasks, None, None)
        assert (_share(None, plan, user(slurm=s)) is not None) is shared


def test_process_plans_forbid_new_privileges_by_default() -> None:
    from rankwire.runtime.plan import ProcessPlan

    assert ProcessPlan(("x",), {}, "/").no_new_privs is True
