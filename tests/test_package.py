"""The distribution installs under one import name and its console scripts behave."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

REPO = Path(__file__).resolve().parent.parent
SUBPACKAGES = ("launcher", "runtime", "fabric", "pmi", "pmi.pmix", "spank")


@pytest.mark.slow
def test_non_editable_install_imports(tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    # Only the installed copy is importable: -S drops site (and the editable finder),
    # and the cwd is not the source tree.
    code = (
        "import rankwire, importlib;"
        f"mods=[importlib.import_module('rankwire.'+m) for m in {SUBPACKAGES!r}];"
        "print(rankwire.__file__); [print(m.__file__) for m in mods]"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": os.environ["PATH"]},
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert len(out) == 1 + len(SUBPACKAGES)
    for path in out:
        assert path.startswith(str(target / "rankwire")), path
    # The holder's serving half, next to runtime/holder.py, static: the holder execs it
    # from inside the container, where the host's dynamic loader is out of view.
    holder = target / "rankwire" / "runtime" / "rankwire-holder"
    assert os.access(holder, os.X_OK)
    with open(holder, "rb") as f:
        assert [
            seg["p_type"] for seg in ELFFile(f).iter_segments() if seg["p_type"] == "PT_INTERP"
        ] == []
    # No top-level name other than ours (e.g. no `fabric` shadowing the PyPI package).
    tops = {p.name for p in target.iterdir() if not p.name.endswith((".dist-info", "bin"))}
    assert tops == {"rankwire"}


def test_version_and_help() -> None:
    from rankwire import __version__

    out = subprocess.run(["rankwire", "--version"], capture_output=True, text=True, check=True)
    assert __version__ in out.stdout
    helptext = subprocess.run(["rankwire", "--help"], capture_output=True, text=True, check=True)
    assert "MPI inside unprivileged containers" in helptext.stdout
    for command in ("build", "inspect", "exec", "run", "shell", "instance", "pmi", "doctor"):
        assert f"  {command} " in helptext.stdout, command


def test_apptainer_mpirun_help_and_one_line_errors() -> None:
    helptext = subprocess.run(["apptainer-mpirun", "--help"], capture_output=True, text=True)
    assert helptext.returncode == 0 and "Usage: apptainer-mpirun" in helptext.stdout
    proc = subprocess.run(
        ["apptainer-mpirun", "-n", "2", "x.sif", "true"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr == "apptainer-mpirun: image x.sif not found: check the path\n"


def _sysctl(name: str) -> int | None:
    path = Path("/proc/sys") / name
    return int(path.read_text()) if path.exists() else None


def test_doctor_reports_host_facts() -> None:
    import json

    from rankwire.runtime.hostfacts import TOOLS

    proc = subprocess.run(
        ["rankwire", "doctor", "--json"], capture_output=True, text=True, check=True
    )
    max_userns = _sysctl("user/max_user_namespaces")
    clone = _sysctl("kernel/unprivileged_userns_clone")
    host = json.loads(proc.stdout)["facts"]["host"]  # beside the checks (tests/test_doctor.py)
    assert host == {
        "uid": os.getuid(),
        "gid": os.getgid(),
        "kernel": os.uname().release,
        "machine": os.uname().machine,
        "max_user_namespaces": max_userns,
        "unprivileged_userns_clone": clone,
        "userns_allowed": max_userns != 0 and (clone != 0 or os.getuid() == 0),
        "dev_fuse_usable": os.access("/dev/fuse", os.R_OK | os.W_OK),
        "tools": {name: shutil.which(name) for name in TOOLS},
    }
    assert host["tools"]["mksquashfs"] == "/usr/bin/mksquashfs"  # `make test`
