"""rankwire: MPI inside unprivileged containers, wired right."""

# The one place the version lives (pyproject.toml reads it); a plain string keeps
# `import rankwire` free of importlib.metadata, which every rank would pay for.
__version__ = "0.1.0"
