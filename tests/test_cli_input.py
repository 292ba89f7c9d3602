"""Bad and unusual command-line input: one line `rankwire: <cause>: <fix>`, the exit code
a shell would give, nothing started or left behind; and the spellings users type
(Apptainer's -e/-c/-C/--env-file/--no-home, mpirun's -h/-np/-x)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from harness.users import User

pytestmark = pytest.mark.usefixtures("nothing_left_behind")

ME = User("self", os.getuid(), os.getgid(), "")
NOT_UTF8 = "caf\udce9\udcff"  # the bytes caf\xe9\xff, as Python holds them in argv


def run(runner: User, *args: str, **kw: Any) -> subprocess.CompletedProcess:
    kw.setdefault("cwd", "/tmp")
    return runner.run(list(args), **kw)


def assert_error(proc: subprocess.CompletedProcess, code: int, line: str) -> None:
    """Exactly one line on stderr, nothing on stdout, and the exit code."""
    assert (proc.returncode, proc.stderr, proc.stdout) == (code, line + "\n", "")


def dry_json(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = run(ME, *args, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    plan: dict[str, Any] = json.loads(proc.stdout)
    return plan


# -- numbers: --timeout, --fence-timeout, -n -------------------------------------------
@pytest.mark.parametrize(
    ("option", "value", "shown"),
    [
        ("--fence-timeout", "0", "0"),
        ("--fence-timeout", "-1", "-1"),
        ("--fence-timeout", "nan", "nan"),
        ("--fence-timeout", "inf", "inf"),
        ("--timeout", "nan", "nan"),
        ("--timeout", "inf", "inf"),
        ("--timeout", "0", "0"),
    ],
)
def test_timeouts_must_be_positive_and_finite(
    runner: User, base_image: Path, option: str, value: str, shown: str
) -> None:
    # --fence-timeout 0 used to raise a traceback once the container had started.
    proc = run(runner, "apptainer-mpirun", "-n", "2", option, value, str(base_image), "/bin/true")
    assert_error(
        proc,
        2,
        f"apptainer-mpirun: {option} {shown}: give a positive, finite number of seconds "
        f"(or leave {option} out: no limit)",
    )


@pytest.mark.parametrize(
    ("n", "slurm", "line"),
    [
        ("0", False, "-n 0: the number of ranks must be at least 1"),
        ("-3", False, "-n -3: the number of ranks must be at least 1"),
        (
            "99999999999999",
            True,
            "-n 99999999999999: at most 2147483647 ranks (an MPI rank is a C int); "
            "give a smaller -n",
        ),
        (
            "4194305",
            False,
            "-n 4194305: one host runs at most 4194304 processes (the kernel's "
            "PID_MAX_LIMIT): run it across nodes in a Slurm allocation",
        ),
    ],
)
def test_rank_count_is_bounded(base_image: Path, n: str, slurm: bool, line: str) -> None:
    env = {**os.environ, "SLURM_JOB_ID": "4242"} if slurm else None
    proc = run(ME, "apptainer-mpirun", "-n", n, "--dry-run", str(base_image), "/bin/true", env=env)
    assert_error(proc, 2, f"apptainer-mpirun: {line}")


def test_a_big_job_still_goes_to_srun(base_image: Path) -> None:
    args = ["-n", "4194305", "--dry-run", "--json", str(base_image), "/bin/true"]
    plan = dry_json("apptainer-mpirun", *args, env={"SLURM_JOB_ID": "4242"})
    assert plan["delegate"][:4] == ["srun", "--mpi=pmi2", "-n", "4194305"]


def test_a_bad_number_is_one_line(base_image: Path) -> None:
    proc = run(ME, "apptainer-mpirun", "-n", "abc", str(base_image), "/bin/true")
    assert_error(
        proc,
        2,
        "apptainer-mpirun: invalid value for '-n' / '--ntasks' / '-np' / '--np': 'abc' is not "
        "a valid integer: see apptainer-mpirun --help",
    )


# -- rankwire build: text that is not UTF-8 ----------------------------------------------
@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["--label", f"k={NOT_UTF8}"],
            "--label k=caf\\xe9\\xff is not UTF-8: labels must be UTF-8 text",
        ),
        (
            ["--label", f"{NOT_UTF8}=v"],
            "--label caf\\xe9\\xff=v is not UTF-8: labels must be UTF-8 text",
        ),
        (
            ["--env", f"K={NOT_UTF8}"],
            "--env K=caf\\xe9\\xff is not UTF-8: variables must be UTF-8 text",
        ),
        (
            ["--runscript", f"echo {NOT_UTF8}"],
            "--runscript echo caf\\xe9\\xff is not UTF-8: the runscript must be UTF-8 text",
        ),
    ],
)
def test_build_refuses_text_that_is_not_utf8(tmp_path: Path, args: list[str], line: str) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    out = tmp_path / "o.sif"
    proc = run(ME, "rankwire", "build", str(out), str(rootfs), *args)
    assert_error(proc, 2, f"rankwire: {line}; convert it (e.g. with iconv -f latin1 -t utf-8)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rootfs"]


# -- options before the image: unknown ones, and the spellings users type ----------------
@pytest.mark.parametrize(
    "args",
    [
        ["rankwire", "exec", "--nv"],
        ["rankwire", "exec", "-e", "-c", "--nv"],
        ["rankwire", "shell", "--nv"],
        ["rankwire", "run", "-n", "1", "--image", "IMG", "--nv"],
        ["apptainer-mpirun", "--nv"],
        ["apptainer-mpirun", "-n", "2", "--nv"],
    ],
)
def test_an_unknown_option_is_not_an_image(base_image: Path, args: list[str]) -> None:
    args = [str(base_image) if a == "IMG" else a for a in args]
    proc = run(ME, *args, str(base_image), "/bin/true")
    command = " ".join(args[:2]) if args[0] == "rankwire" else args[0]
    prog = args[0]
    assert_error(proc, 2, f"{prog}: unknown option --nv: see {command} --help")


def test_a_typo_gets_a_suggestion(base_image: Path) -> None:
    proc = run(ME, "rankwire", "exec", "--cleanen", str(base_image), "/bin/true")
    assert_error(
        proc,
        2,
        "rankwire: unknown option --cleanen (did you mean --cleanenv?): see rankwire exec --help",
    )


@pytest.mark.parametrize("prog", [["apptainer-mpirun"], ["rankwire", "exec"], ["rankwire", "run"]])
def test_dash_h_is_help(base_image: Path, prog: list[str]) -> None:
    proc = run(ME, *prog, "-h", str(base_image), "/bin/true")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"Usage: {' '.join(prog)} [OPTIONS]")


@pytest.mark.parametrize("spelling", ["-n", "-np", "--np", "--ntasks"])
def test_rank_count_spellings(base_image: Path, spelling: str) -> None:
    plan = dry_json(
        "apptainer-mpirun", spelling, "3", "--dry-run", "--json", str(base_image), "true"
    )
    assert plan["ntasks"] == 3


def test_apptainer_and_mpirun_spellings_reach_the_plan(base_image: Path, tmp_path: Path) -> None:
    env_file = tmp_path / "env"
    env_file.write_text('# set by the file\nexport FA=1\nFB="two words"\nA=from-file\n')
    host = {"HOSTV": "host value", "NOT_EXPORTED": "x"}
    args = ["-e", "-x", "HOSTV", "-x", "SETV=set", "-x", "UNSET_HERE", "--env", "A=1,B=2"]
    args += ["--env", "C=x,y", "--env", '"D=a=1,b"', "--env-file", str(env_file)]
    plan = dry_json(
        "rankwire", "exec", *args, "--dry-run", "--json", str(base_image), "true", env=host
    )
    env = plan["process"]["env"]
    assert {k: env[k] for k in ("A", "B", "C", "D", "FA", "FB", "HOSTV", "SETV")} == {
        "A": "1",  # --env wins over the file
        "B": "2",
        "C": "x,y",  # one "=": commas stay in the value, as in Apptainer
        "D": "a=1,b",
        "FA": "1",
        "FB": "two words",
        "HOSTV": "host value",
        "SETV": "set",
    }
    assert "NOT_EXPORTED" not in env and "UNSET_HERE" not in env  # -e: clean environment


def test_containall_and_no_home(base_image: Path) -> None:
    home = os.path.expanduser("~")
    img = str(base_image)
    plain = dry_json("rankwire", "exec", "--dry-run", "--json", img, "true")
    assert any(m["target"] == home for m in plain["container"]["mounts"])
    no_home = dry_json("rankwire", "exec", "--no-home", "--dry-run", "--json", img, "true")
    assert not any(m["target"] == home for m in no_home["container"]["mounts"])
    c = dry_json("rankwire", "exec", "-c", "--dry-run", "--json", img, "true")
    cap_c = dry_json("rankwire", "exec", "-C", "--dry-run", "--json", img, "true", env={"X1": "1"})
    assert cap_c["container"]["mounts"] == c["container"]["mounts"]  # -C contains as -c
    assert cap_c["process"]["workdir"] == home
    assert "X1" not in cap_c["process"]["env"]  # and cleans the environment as -e


def test_the_new_spellings_reach_srun(base_image: Path, tmp_path: Path) -> None:
    env_file = tmp_path / "env"
    env_file.write_text("FA=1\n")
    args = ["-n", "2", "-C", "--no-home", "-x", "HOSTV", "--env", "A=1,B=2"]
    args += ["--env", '"D=a=1,b"', "--env-file", str(env_file), "--dry-run", "--json"]
    plan = dry_json("apptainer-mpirun", *args, str(base_image), "true", env={"SLURM_JOB_ID": "7"})
    delegate = plan["delegate"]
    assert delegate[delegate.index("exec") + 1 :] == [
        "--containall",
        "--no-home",
        "--env",
        "A=1",
        "--env",
        "B=2",
        "--env",
        '"D=a=1,b"',
        "--env-file",
        str(env_file),
        "-x",
        "HOSTV",
        str(base_image),
        "true",
    ]


def test_the_environment_options_for_real(runner: User, base_image: Path, shared_dir: Path) -> None:
    env_file = shared_dir / f"env-{runner.name}"
    env_file.write_text("FA='from file'\n")
    env_file.chmod(0o644)
    proc = run(
        runner,
        "env",
        "HOSTV=host value",
        "rankwire",
        "exec",
        "-e",
        "-x",
        "HOSTV",
        "--env",
        "A=1,B=2",
        "--env-file",
        str(env_file),
        str(base_image),
        "sh",
        "-c",
        'echo "$A $B $FA|$HOSTV"',
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "1 2 from file|host value\n", "")


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["--env", "LDFLAGS=-Wl,-rpath=/x"],
            "bad --env 'LDFLAGS=-Wl,-rpath=/x': '-rpath' is not a variable name; quote a value "
            "holding commas: --env '\"LDFLAGS=-Wl,-rpath=/x\"'",
        ),
        (
            ["--env-file", "/nonexistent/env"],
            "--env-file /nonexistent/env: No such file or directory; check the path",
        ),
    ],
)
def test_bad_environment_options(base_image: Path, args: list[str], line: str) -> None:
    proc = run(ME, "rankwire", "exec", *args, str(base_image), "/bin/true")
    assert_error(proc, 2, f"rankwire: {line}")


# -- what a command that cannot start says ---------------------------------------------
@pytest.mark.parametrize(
    ("args", "code", "line"),
    [
        (
            ["/etc/os-release"],
            126,
            "/etc/os-release: permission denied in the container: it is not an executable "
            "file (chmod +x it, or run it through its interpreter)",
        ),
        (
            ["/etc"],
            126,
            "/etc: is a directory in the container, not a program: give the program's path",
        ),
        (
            ["/etc/passwd"],  # the host's, not the image's
            127,
            "/etc/passwd: no such file in the container: check the path, or bind it in with -B",
        ),
        (["a\nb"], 127, "a\\nb: command not found in the container"),
        (
            ["--pwd", "/bin/true", "/bin/true"],
            125,
            "working directory /bin/true is not a directory in the container: pass --pwd DIR "
            "or bind it with -B",
        ),
        (
            ["--pwd", f"/{NOT_UTF8}", "/bin/true"],
            125,
            "working directory /caf\\xe9\\xff does not exist in the container: pass --pwd DIR "
            "or bind it with -B",
        ),
    ],
)
def test_a_command_that_cannot_start(
    runner: User, base_image: Path, args: list[str], code: int, line: str
) -> None:
    *options, command = args
    proc = run(runner, "rankwire", "exec", *options, str(base_image), command)
    assert_error(proc, code, f"rankwire: {line}")


@pytest.mark.parametrize("command", [["inspect"], ["sif", "list"], ["sif", "dump"]])
def test_a_directory_is_not_an_image(tmp_path: Path, command: list[str]) -> None:
    extra = ["1"] if command == ["sif", "dump"] else []
    proc = run(ME, "rankwire", *command, str(tmp_path), *extra)
    assert_error(
        proc,
        2,
        f"rankwire: {tmp_path} is a directory, not a SIF image: rankwire runs SIF files "
        "(see rankwire build)",
    )


def test_an_env_file_line_that_is_not_k_v(base_image: Path, tmp_path: Path) -> None:
    env_file = tmp_path / "env"
    env_file.write_text("OK=1\nFA=from file\n")
    proc = run(ME, "rankwire", "exec", "--env-file", str(env_file), str(base_image), "true")
    assert_error(
        proc,
        2,
        f"rankwire: --env-file {env_file} line 2: 'FA=from file' is not a simple `export K=V`: "
        "only those are read (quote a value holding spaces), or pass --env K=V",
    )
