"""Builds the two C programs and installs them: `rankwire`, the front end
(runtime/front.c), into the scripts dir next to `rankwire-py`, the Python CLI it runs for
everything it does not do itself, and as `apptainer-mpirun` too (it starts a launch whose
plan was kept; else the Python CLI runs it); and `rankwire-holder`, the holder's serving half
(runtime/holdserve.c), statically linked (the holder execs it from inside the container),
into the package next to runtime/holder.py. Everything else is in pyproject.toml. The
wheel is platform-specific (it holds native programs). Without a C compiler and a static
C library (Debian: gcc, libc6-dev) the install stops and says so."""

import os
import shlex
import shutil
import subprocess
import sys

from setuptools import Distribution, setup

FRONT = os.path.join("build", "front", "rankwire")
LAUNCHER = os.path.join("build", "front", "apptainer-mpirun")  # the same program
HOLDER = os.path.join("runtime", "rankwire-holder")
FRAME = os.path.join("spank", "frame.c")  # the shim's record parser and buffer, shared
BUILDS = [
    ([], FRONT, [os.path.join("runtime", "front.c"), FRAME]),
    (["-static"], HOLDER, [os.path.join("runtime", "holdserve.c"), FRAME]),
]


class NativeDistribution(Distribution):
    def has_ext_modules(self) -> bool:
        return True  # a platform wheel: it holds native programs


os.makedirs(os.path.dirname(FRONT), exist_ok=True)
cc = shlex.split(os.environ.get("CC", "cc"))
for flags, out, sources in BUILDS:
    try:
        subprocess.run([*cc, "-O2", "-Wall", *flags, "-Ispank", "-o", out, *sources], check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        sys.exit(
            f"rankwire: cannot build {out} ({err}): it needs a C compiler and a static C "
            "library (Debian: apt-get install gcc libc6-dev)"
        )

shutil.copy2(FRONT, LAUNCHER)

setup(distclass=NativeDistribution, data_files=[("bin", [FRONT, LAUNCHER])])
