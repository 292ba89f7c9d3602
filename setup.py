"""Builds `rankwire`, the C front end (runtime/front.c), and installs it into the scripts
dir next to `rankwire-py`, the Python CLI it runs for everything it does not do itself.
Everything else is in pyproject.toml. The wheel is platform-specific (it holds a native
program). Without a working C compiler, `rankwire` is a two-line shell script that runs
`rankwire-py` (said on stderr): every command works, and every `exec instance://` join
plans in Python."""

import os
import shlex
import subprocess
import sys

from setuptools import Distribution, setup

# the front end, and the shim's record parser and buffer it shares
SOURCES = [os.path.join("runtime", "front.c"), os.path.join("spank", "frame.c")]
FRONT = os.path.join("build", "front", "rankwire")
SCRIPT = '#!/bin/sh\nexec "$(dirname "$(readlink -f "$0")")/rankwire-py" "$@"\n'


class NativeDistribution(Distribution):
    def has_ext_modules(self) -> bool:
        return True  # a platform wheel: `rankwire` is a native program


os.makedirs(os.path.dirname(FRONT), exist_ok=True)
try:
    cc = shlex.split(os.environ.get("CC", "cc"))
    subprocess.run([*cc, "-O2", "-Wall", "-Ispank", "-o", FRONT, *SOURCES], check=True)
except (OSError, subprocess.CalledProcessError) as err:
    print(f"rankwire: cannot build the C front end ({err}); installing a script", file=sys.stderr)
    with open(FRONT, "w") as f:
        f.write(SCRIPT)
    os.chmod(FRONT, 0o755)

setup(distclass=NativeDistribution, data_files=[("bin", [FRONT])])
