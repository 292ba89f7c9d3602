"""What the hot paths import: each module a command does not use costs every start
(issue 17). Checked in a fresh interpreter, as the user runs the command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.users import User, rw

pytestmark = pytest.mark.usefixtures("nothing_left_behind")

# `rankwire ARGS` (its console entry point), then the names of the modules it imported,
# one line on stdout.
LOADED = (
    "import atexit, sys\n"
    "atexit.register(lambda: print(' '.join(sorted(sys.modules))))\n"
    "from rankwire.entry import main\n"
    "main(sys.argv[1:])\n"
)
# Joining an instance reads no image, host or fabric facts and plans no container.
NOT_FOR_A_JOIN = {
    "csv",
    "hashlib",
    "rankwire.fabric",
    "rankwire.runtime.assemble",
    "rankwire.runtime.facts",
    "rankwire.runtime.holder",
    "rankwire.runtime.hostfacts",
    "rankwire.runtime.imagefacts",
    "rankwire.runtime.imagemeta",
    "rankwire.runtime.pull",
}


def loaded_by(runner: User, *args: str) -> set[str]:
    python = os.path.join(runner.bindir, "python") if runner.bindir else sys.executable
    proc = runner.run([python, "-c", LOADED, *args], cwd="/tmp")
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


def test_joining_an_instance_imports_only_what_a_join_needs(runner: User, base_image: Path) -> None:
    name = f"imports-{runner.name}"
    start = rw(runner, "instance", "start", str(base_image), name)
    assert start.returncode == 0, start.stderr
    try:
        loaded = loaded_by(runner, "exec", f"instance://{name}", "true")
    finally:
        stop = rw(runner, "instance", "stop", name)
    assert stop.returncode == 0, stop.stderr
    assert "rankwire.runtime.instance" in loaded  # the join ran
    assert sorted(loaded & (NOT_FOR_A_JOIN | {"click", "rankwire.cli"})) == []


def test_the_spank_helper_starts_without_the_cli() -> None:
    """`rankwire spank-helper PHASE` (twice per plugin step) goes straight to the helper:
    no click, no `rankwire.cli`; its reply still comes (here: the epilog of no job)."""
    import socket
    import subprocess

    from rankwire.runtime import frame

    script = (  # the modules on stderr: stdout is the reply's socket
        "import atexit, sys\n"
        "atexit.register(lambda: print(' '.join(sorted(sys.modules)), file=sys.stderr))\n"
        "from rankwire.entry import main\n"
        "main(sys.argv[1:])\n"
    )
    ours, theirs = socket.socketpair()
    with ours, theirs:
        proc = subprocess.run(
            [sys.executable, "-c", script, "spank-helper", "epilog"],
            stdin=subprocess.DEVNULL,
            stdout=theirs.fileno(),
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
        theirs.close()
        reply = frame.decode(ours.recv(65536))
    assert proc.returncode == 0, proc.stderr
    loaded = set(proc.stderr.split())
    assert "rankwire.spank.helper" in loaded
    assert sorted(loaded & {"click", "rankwire.cli"}) == []
    assert reply == [("done", "1")]  # no job id: nothing to end


def test_the_plugins_pmi2_bridge_starts_without_the_cli(tmp_path: Path) -> None:
    """`rankwire spank-helper pmi2-bridge DIR` (the first task of a node the plugin bridges)
    goes straight to `pmi2bridge.for_task`: no click, no `rankwire.cli`. Outside a PMI-2
    step its report on fd 3 is the one line the shim shows."""
    import socket
    import subprocess

    from rankwire.runtime import frame

    script = (
        "import atexit, os, sys\n"
        "atexit.register(lambda: print(' '.join(sorted(sys.modules)), file=sys.stderr))\n"
        "os.dup2(int(sys.argv[1]), 3)\n"
        "os.dup2(int(sys.argv[2]), 4)\n"
        "from rankwire.entry import main\n"
        "main(sys.argv[3:])\n"
    )
    ours, theirs = socket.socketpair()
    control_r, control_w = os.pipe()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "SLURM_"))}
    with ours, theirs:
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                script,
                str(theirs.fileno()),
                str(control_r),
                "spank-helper",
                "pmi2-bridge",
                str(tmp_path),
            ],
            pass_fds=(theirs.fileno(), control_r),
            env=env,
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
        os.close(control_r)
        os.close(control_w)
        theirs.close()
        reply = frame.decode(ours.recv(65536))
    assert proc.returncode == 1, proc.stderr
    assert sorted(set(proc.stderr.split()) & {"click", "rankwire.cli"}) == []
    assert reply == [
        (
            "error",
            "rankwire: no Slurm PMI-2 connection to bridge (PMI_FD, PMI_JOBID, PMI_RANK, "
            "PMI_SIZE, SLURM_LOCALID, SLURM_NODEID unset): run the PMI-2 bridge as a task of "
            "`srun --mpi=pmi2`",
        )
    ]


def modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter has loaded once it ran `code`."""
    script = f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


# Modules the plugin's check and start phases, and every exec or launch that plans, used
# to load only to read an image or the host: `platform` (through `uuid` too: a SIF's UUID
# is kept as its 16 bytes), tempfile and subprocess (about 6 ms).
NOT_FOR_FACTS = {"platform", "uuid", "tempfile", "subprocess", "random"}


def test_reading_an_image_s_facts_loads_no_platform(base_image: Path) -> None:
    """The plugin's check: the helper's modules, then the image's facts, read (hashlib:
    the image's identity is a sha256)."""
    loaded = modules_after(
        "from rankwire.spank import helper\n"
        "from rankwire.runtime.imagefacts import image_facts\n"
        f"assert image_facts({str(base_image)!r}).partition_offset > 0\n"
    )
    assert "rankwire.runtime.sif_read" in loaded
    assert sorted(loaded & NOT_FOR_FACTS) == []


def test_the_start_phase_s_planners_load_no_platform_or_openssl() -> None:
    """What the plugin's start phase imports while root checks: the facts, the planners,
    the executor; the image's facts come from the check, so no hashlib either (about 3 ms
    more)."""
    loaded = modules_after(
        "import rankwire.runtime.assemble, rankwire.runtime.facts, rankwire.runtime.instance"
    )
    assert "rankwire.fabric.hostfacts" in loaded
    assert sorted(loaded & (NOT_FOR_FACTS | {"hashlib", "_hashlib"})) == []


def test_a_pmi2_bridge_follower_imports_no_server_code() -> None:
    """The node's other tasks only connect and hand over their PMI-2 socket: the bridge
    process's asyncio loop and PMI codec (`pmi2serve`) are the first task's alone."""
    loaded = modules_after("import rankwire.pmi.pmix.pmi2bridge")
    heavy = {"asyncio", "rankwire.pmi.codec", "rankwire.pmi.pmix.pmi2serve", "logging"}
    assert sorted(loaded & heavy) == []


def test_the_pmi2_bridge_process_loads_no_tls_and_no_launcher_server() -> None:
    """The node's PMI-2 bridge process (`pmi2bridge.spawn` forks it and keeps `ssl` out:
    about 10 ms) runs its asyncio loop without ssl, and takes libpmix's settings from
    `serverenv`, not from the launcher's PMIx server (about 12 ms more)."""
    loaded = modules_after(
        "sys.modules['ssl'] = None\n"
        "from rankwire.pmi.pmix import helper, pmi2serve\n"
        "import asyncio\n"
        "assert asyncio.run(asyncio.to_thread(int, '7')) == 7\n"
    )
    heavy = {"_ssl", "rankwire.pmi.pmix.server", "rankwire.pmi.server", "secrets"}
    assert "rankwire.pmi.pmix.serverenv" in loaded
    assert sorted(loaded & heavy) == []


def test_the_launcher_loads_the_pmix_server_only_for_a_pmix_job() -> None:
    """`apptainer-mpirun`/`rankwire run` of an MPICH (PMI-1/PMI-2) job does not import the
    PMIx server (about 20 ms of its start); `launcher.execute` does where the plan says
    pmix. Neither asyncio nor a PMI server is loaded before the container's holder is
    forked: they load while it sets the container up (`open_container`'s `meanwhile`)."""
    before = modules_after("import rankwire.launcher.cli, rankwire.launcher.execute")
    assert sorted(before & {"asyncio", "rankwire.pmi.server", "_ssl"}) == []
    loaded = modules_after(
        "from rankwire.launcher import execute, plan\n"
        "p = plan.plan_launch(plan.LaunchOptions(ntasks=2), plan.host_process(['/bin/true'], "
        "{}, '/tmp'), None, {}, [], 'pmi1/2', 'pmi1/2')\n"
        "execute.pmi_server(p)"
    )
    assert "rankwire.pmi.server" in loaded
    assert "rankwire.pmi.pmix.server" not in loaded
    # asyncio came without ssl (the ranks of a kept launch wait for this import), and the
    # PMI server without `secrets` (its port mode's); ssl may still be imported after it
    assert sorted(loaded & {"_ssl", "secrets"}) == []
    after = modules_after(
        "from rankwire.launcher import execute, plan\n"
        "p = plan.plan_launch(plan.LaunchOptions(ntasks=2), plan.host_process(['/bin/true'], "
        "{}, '/tmp'), None, {}, [], 'pmi1/2', 'pmi1/2')\n"
        "execute.pmi_server(p)\n"
        "import asyncio.sslproto, ssl\n"
        "assert asyncio.sslproto.ssl is None and ssl.OPENSSL_VERSION\n"
    )
    assert "_ssl" in after


def test_loading_libpmix_runs_no_ldconfig() -> None:
    """Every PMI bridge and PMIx server process loads libpmix: by its soname, without
    `ctypes.util` (whose import brings subprocess, tempfile and shutil, about 5 ms)."""
    loaded = modules_after("from rankwire.pmi.pmix import abi\nabi.lib()")
    assert sorted({"ctypes.util", "subprocess"} & loaded) == []


# `rankwire ARGS` through the console entry point; the modules it imported on stderr.
ENTRY = (
    "import atexit, sys\n"
    "atexit.register(lambda: print(' '.join(sorted(sys.modules)), file=sys.stderr))\n"
    "from rankwire.entry import main\n"
    "main(sys.argv[1:])\n"
)


def test_exec_without_options_starts_without_the_cli(runner: User, base_image: Path) -> None:
    """`rankwire exec IMAGE CMD…` without an option (what `srun rankwire exec` tasks run)
    goes straight to `runtime/execcmd.py`: no click, no `rankwire.cli`; with an option it
    goes through click; both run the command alike, and a user error is the same line."""
    python = os.path.join(runner.bindir, "python") if runner.bindir else sys.executable
    script = ["sh", "-c", "echo in; exit 7"]

    def run(*args: str) -> tuple[int, str, set[str]]:
        proc = runner.run([python, "-c", ENTRY, *args], cwd="/tmp")
        *said, modules = proc.stderr.rstrip("\n").split("\n")
        return (
            proc.returncode,
            proc.stdout + "".join(f"{ln}\n" for ln in said),
            set(modules.split()),
        )

    code, out, fast = run("exec", str(base_image), *script)
    assert (code, out) == (7, "in\n")
    assert sorted(fast & {"click", "rankwire.cli"}) == []
    assert "rankwire.runtime.execcmd" in fast
    code, out, slow = run("exec", "--fabric", "auto", str(base_image), *script)
    assert (code, out) == (7, "in\n")
    assert {"click", "rankwire.cli"} <= slow
    missing = "rankwire: image /nonexistent.sif not found: check the path\n"
    assert run("exec", "/nonexistent.sif", "true")[:2] == (2, missing)
    assert run("exec", "--fabric", "auto", "/nonexistent.sif", "true")[:2] == (2, missing)


def test_a_launch_with_plain_options_starts_without_the_cli(runner: User, base_image: Path) -> None:
    """`apptainer-mpirun -n N IMAGE CMD…` and `rankwire run -n N …` led by plainly spelled
    launcher options only go straight to `launcher/launchcmd.py`: no click, no
    `rankwire.cli`; another option goes through click; both run the job alike, and a user
    error is the same line."""
    python = os.path.join(runner.bindir, "python") if runner.bindir else sys.executable
    amr = ENTRY.replace("import main\nmain(", "import apptainer_mpirun\napptainer_mpirun(")

    def launch(entry: str, *args: str) -> tuple[int, str, set[str]]:
        proc = runner.run([python, "-c", entry, *args], cwd="/tmp")
        *said, modules = proc.stderr.rstrip("\n").split("\n")
        return (
            proc.returncode,
            proc.stdout + "".join(f"{ln}\n" for ln in said),
            set(modules.split()),
        )

    image = str(base_image)
    for entry, lead, want in (
        (amr, [], (0, "in\nin\n")),  # the command
        (ENTRY, ["run"], (0, "runscript: x\nrunscript: x\n")),  # the image's runscript
    ):
        args = ["sh", "-c", "echo in"] if lead == [] else ["x"]
        code, out, fast = launch(entry, *lead, "-n", "2", "--pmi", "pmi1", image, *args)
        assert (code, out) == want
        assert sorted(fast & {"click", "rankwire.cli"}) == []
        assert "rankwire.launcher.launchcmd" in fast
        code, out, slow = launch(entry, *lead, "-n", "2", "--fabric", "auto", image, *args)
        assert (code, out) == want
        assert {"click", "rankwire.cli"} <= slow
        prog = "rankwire" if lead else "apptainer-mpirun"
        few = f"{prog}: -n 0: the number of ranks must be at least 1\n"
        assert launch(entry, *lead, "-n", "0", image, *args)[:2] == (2, few)
        assert launch(entry, *lead, "-n", "0", "--fabric", "auto", image, *args)[:2] == (2, few)
    missing = "apptainer-mpirun: image /nonexistent.sif not found: check the path\n"
    assert launch(amr, "-n", "2", "/nonexistent.sif", "true")[:2] == (2, missing)
