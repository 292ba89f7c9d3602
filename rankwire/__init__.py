"""rankwire: MPI inside unprivileged containers, wired right."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rankwire")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
