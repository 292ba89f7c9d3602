"""One declaration per option: a new table entry reaches exec's --help, the srun
delegation of the launcher and the SPANK plugin's option list, with no other edit."""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from rankwire.record import record
from rankwire.runtime import options, plan
from rankwire.runtime.options import OPTIONS, Option, delegation_argv, spank_header

DUMMY = Option(
    "dummy_knob",
    "value",
    "A knob that exists only in this test.",
    "container",
    flags=("--dummy-knob",),
    metavar="LEVEL",
    spank="container-dummy-knob",
    spank_metavar="LEVEL",
    spank_help="Set the dummy knob",
)


@pytest.fixture
def with_dummy(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The table with DUMMY added, and ExecOptions with its field (its planner logic);
    the CLI modules rebuilt from them, and rebuilt again from the real table after."""
    namespace = {"__annotations__": {"dummy_knob": "object"}, "dummy_knob": None}
    exec_options = record(type("ExecOptions", (plan.ExecOptions,), namespace))
    monkeypatch.setattr(options, "OPTIONS", (*OPTIONS, DUMMY))
    monkeypatch.setattr(plan, "ExecOptions", exec_options)
    names = (
        "rankwire.runtime.execcmd",
        "rankwire.runtime.cli_run",
        "rankwire.launcher.launchcmd",
        "rankwire.launcher.cli",
    )
    modules = [importlib.import_module(m) for m in names]  # in this order: each its users
    for m in modules:
        importlib.reload(m)
    yield
    monkeypatch.undo()
    for m in modules:
        importlib.reload(m)


@pytest.mark.usefixtures("with_dummy")
def test_a_new_option_reaches_exec_help() -> None:
    from rankwire.runtime.cli_run import exec_

    result = CliRunner().invoke(exec_, ["--help"])
    assert result.exit_code == 0
    assert "--dummy-knob LEVEL" in result.output
    assert "A knob that exists only in this test." in result.output


@pytest.mark.usefixtures("with_dummy")
def test_a_new_option_reaches_the_srun_delegation(base_image: Path) -> None:
    from rankwire.launcher.cli import _apptainer_mpirun

    args = ["-n", "2", "--dummy-knob", "7", "--fabric", "none", "--dry-run", "--json"]
    result = CliRunner().invoke(
        _apptainer_mpirun,
        [*args, str(base_image), "/bin/true"],
        env={"SLURM_JOB_ID": "4242"},  # inside an allocation: the job goes to srun
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    delegate = json.loads(result.output)["delegate"]
    at = delegate.index("exec")
    assert delegate[:4] == ["srun", "--mpi=pmi2", "-n", "2"]
    assert delegate[at + 1 :] == [
        "--fabric",
        "none",
        "--dummy-knob",
        "7",
        str(base_image),
        "/bin/true",
    ]


@pytest.mark.usefixtures("with_dummy")
def test_a_new_option_reaches_the_spank_plugin() -> None:
    header = options.spank_header()
    assert (
        '"container-dummy-knob", "LEVEL", '
        '"Set the dummy knob (also RANKWIRE_CONTAINER_DUMMY_KNOB)", 1, '
        '"RANKWIRE_CONTAINER_DUMMY_KNOB")'
    ) in header
    assert f"#define RW_N_OPTS {len(options.spank_options())}" in header


def test_the_header_lists_every_plugin_option_in_table_order() -> None:
    header = spank_header()
    names = [o.spank for o in OPTIONS if o.spank]
    found = [line.split('"')[1] for line in header.splitlines() if line.startswith("\tX(")]
    assert found == names
    assert "#define RW_OPT_IMAGE 0" in header
    flag = next(line for line in header.splitlines() if '"container-writable"' in line)
    assert ", NULL, " in flag and flag.endswith(', 0, "RANKWIRE_CONTAINER_WRITABLE") \\')


def test_delegation_leaves_defaults_out() -> None:
    assert delegation_argv({"fabric": "auto", "binds": (), "contain": False}) == []
    assert delegation_argv({"unsquash": True, "share": "k", "env": ("A=1", "B=2")}) == [
        "--share",
        "k",
        "--unsquash",
        "--env",
        "A=1",
        "--env",
        "B=2",
    ]


def test_every_exec_option_is_a_field_and_joining_allows_only_process_options() -> None:
    fields = {f.name for f in dataclasses.fields(plan.ExecOptions)}
    for opt in options.in_scope("container", "process"):
        assert opt.dest in fields, opt.dest
        assert opt.join_ok == (opt.scope == "process")
    governed = {o.spank for o in OPTIONS if o.policy}
    assert governed == {
        "container-image",
        "container-mounts",
        "container-remap-root",
        "container-writable",
        "container-fabric",
        "container-host-mpi",  # only the site's under enforce (spank/policy.check_options)
    }


def test_exec_without_options_gets_what_click_would_give() -> None:
    """`rankwire/entry.py` runs an option-less exec with `execcmd.defaults()`: exactly the
    keyword arguments click reads from `exec IMAGE CMD`."""
    from rankwire.runtime.cli_run import exec_
    from rankwire.runtime.execcmd import defaults

    with exec_.make_context("exec", ["img.sif", "cmd", "--arg"]) as ctx:
        params = dict(ctx.params)
    assert (params.pop("image"), params.pop("command")) == ("img.sif", ("cmd", "--arg"))
    assert defaults() == params


# Launcher argvs whose leading options are plainly spelled: `rankwire/entry.py` reads them
# without click (`options.parse_plain`), and must read what click reads.
PLAIN = [
    ["-n", "4", "img.sif", "cmd"],
    ["-np", "2", "--pmi", "pmix", "img.sif", "cmd", "-v", "--pmi", "x"],  # after: the command's
    ["--ntasks=3", "--pmi=pmi2", "--tag-output", "-v", "img.sif", "a", "b"],
    ["--timeout", "2.5", "--fence-timeout=1e1", "--no-slurm", "--pmi-transport", "port", "i", "c"],
    ["-n", "4", "--np", "2", "--verbose", "img.sif", "c"],  # the last -n counts
    ["-n", "-3", "img.sif", "c"],  # taken as click takes it; the planner refuses it
    ["-n", " 7", "--timeout", "inf", "img.sif", "c"],
    ["img.sif", "cmd"],
    ["-", "cmd"],
]
# ... and those it leaves to click: other options, glued values, `--`, values click refuses
# (its error says so), help, a missing value or word.
NOT_PLAIN = [
    ["-n4", "img.sif", "c"],
    ["--fabric", "none", "img.sif", "c"],
    ["-n", "2", "--dry-run", "img.sif", "c"],
    ["--", "img.sif", "c"],
    ["-n", "x", "img.sif", "c"],
    ["--pmi", "PMIX", "img.sif", "c"],
    ["--timeout", "soon", "img.sif", "c"],
    ["--tag-output=1", "img.sif", "c"],
    ["-h"],
    ["-n"],
    ["-n", "2", "img.sif"],  # apptainer-mpirun needs a command
]


@pytest.mark.parametrize("argv", PLAIN, ids=" ".join)
def test_plain_launcher_options_are_read_as_click_reads_them(argv: list[str]) -> None:
    from rankwire.launcher.cli import _apptainer_mpirun, run
    from rankwire.runtime.execcmd import defaults
    from rankwire.runtime.options import parse_plain

    parsed = parse_plain(argv, ("launcher",))
    assert parsed is not None
    values, words = parsed
    with _apptainer_mpirun.make_context("apptainer-mpirun", list(argv)) as ctx:
        params = dict(ctx.params)
    typed = {k: (type(v), v) for k, v in {**defaults(), **values}.items()}  # 3 is not 3.0
    assert [params.pop("image"), *params.pop("command")] == words
    assert typed == {k: (type(v), v) for k, v in params.items()}
    with run.make_context("run", list(argv)) as ctx:
        params = dict(ctx.params)
    assert [params.pop("target"), *params.pop("args")] == words
    assert params.pop("image") is None
    assert typed == {k: (type(v), v) for k, v in params.items()}


@pytest.mark.parametrize("argv", NOT_PLAIN, ids=" ".join)
def test_other_launcher_argvs_go_to_click(argv: list[str]) -> None:
    from rankwire.launcher.launchcmd import plain

    assert plain("apptainer-mpirun", argv) is None
    if argv != ["-n", "2", "img.sif"]:  # `run IMAGE` runs its runscript
        assert plain("run", argv) is None
    assert plain("run", ["-n", "2", "--image", "img.sif", "cmd"]) is None  # --image: click
