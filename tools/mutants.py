#!/usr/bin/env python3
"""`make mutants`: mutation testing of the modules where a wrong decision is silent.

Each target module is mutated one small change at a time (a comparison, a boolean or
arithmetic operator, a constant, a string), and only that module's fast unit tests run
against the mutant (`pytest -x`): a mutant is killed when a test fails (or hangs past the
timeout), and survives when they all pass.

The sources are never touched: each worker copies the package, laid out as installed
(`rankwire/pmi` is `pmi/`, ...), into a temporary directory, mutates the copy, and runs
the tests with that copy first on sys.path (and PYTHONPATH, for the CLIs tests start).
A warm parent (pytest, hypothesis imported) forks one child per mutant. Survivors judged
equivalent are listed, one line of reason each, in tests/data/mutants-equivalent.txt;
the score leaves them out.

    tools/mutants.py [--jobs N] [--list] [--strings] [MODULE ...]   e.g. pmi/job.py
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import io
import multiprocessing
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import tokenize
from typing import Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("runtime", "pmi", "fabric", "launcher", "spank")
EQUIVALENT = os.path.join(ROOT, "tests", "data", "mutants-equivalent.txt")
REPORT_DIR = os.path.join(ROOT, "build", "mutants")


@dataclasses.dataclass(frozen=True)
class Target:
    module: str  # path under ROOT
    tests: tuple[str, ...]  # pytest arguments (paths under ROOT, -k ...)
    functions: tuple[str, ...] = ()  # only these functions/methods, if given


# Each module with the fast unit tests over facts that cover it (not the Slurm/MPI suites).
TARGETS = (
    Target("pmi/job.py", ("tests/test_pmi_job.py",)),
    Target("pmi/codec.py", ("tests/test_pmi_codec.py",)),
    Target("pmi/fields.py", ("tests/test_pmi_codec.py",)),
    Target("runtime/plan.py", ("tests/test_plan.py",)),
    Target("spank/policy.py", ("tests/test_spank_plan.py",)),
    Target("spank/plan.py", ("tests/test_spank_plan.py",)),
    Target("launcher/plan.py", ("tests/test_plan.py", "tests/test_launch_checks.py", "-k", "plan")),
    Target(
        "launcher/execute.py",
        ("tests/test_launch_checks.py", "-k", "never_connect or exit_decision"),
        ("fail", "reaped", "settle", "told_fence_failed", "watch_events"),
    ),
    Target("runtime/sif_read.py", ("tests/test_sif.py",)),
    Target("fabric/plan.py", ("tests/test_fabric_plan.py",)),
    Target("pmi/framing.py", ("tests/test_pmi_codec.py",)),
)

SWAP_OPS = {
    "==": "!=", "!=": "==", "<": "<=", "<=": "<", ">": ">=", ">=": ">",
    "+": "-", "-": "+", "*": "/", "/": "*", "//": "/", "%": "//", "**": "*",
    "+=": "-=", "-=": "+=", "|": "&", "&": "|", "<<": ">>", ">>": "<<",
}  # fmt: skip
SWAP_NAMES = {
    "and": "or", "or": "and", "True": "False", "False": "True",
    "break": "continue", "continue": "break",
}  # fmt: skip
STRING = re.compile(r"^([A-Za-z]*)('''|\"\"\"|'|\")(.*)\2$", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Mutant:
    module: str
    line: int
    col: int
    before: str
    after: str
    source: str

    @property
    def key(self) -> str:
        return f"{self.module}:{self.line}:{self.col}: {self.before!r} -> {self.after!r}"


def _skipped_spans(tree: ast.AST) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Annotations and docstrings: changing them changes no decision."""
    spans = []
    for node in ast.walk(tree):
        parts: list[Optional[ast.AST]] = []
        if isinstance(node, ast.arg):
            parts.append(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            parts.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            parts.append(node.annotation)
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            parts.append(node)  # docstrings, bare string statements
        for p in parts:
            if p is not None and p.end_lineno is not None and p.end_col_offset is not None:
                spans.append(((p.lineno, p.col_offset), (p.end_lineno, p.end_col_offset)))
    return spans


def _function_spans(tree: ast.AST, names: Sequence[str]) -> list[tuple[int, int]]:
    return [
        (node.lineno, node.end_lineno or node.lineno)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in names
    ]


def _replacements(
    toks: list[tokenize.TokenInfo], i: int, strings: bool
) -> list[tuple[str, str, int]]:
    """(before, after, how many tokens `before` spans) for token i."""
    tok = toks[i]
    prev = toks[i - 1].string if i else ""
    nxt = toks[i + 1].string if i + 1 < len(toks) else ""
    s = tok.string
    if tok.type == tokenize.OP and s in SWAP_OPS:
        return [(s, SWAP_OPS[s], 1)]
    if tok.type == tokenize.NAME:
        if s in SWAP_NAMES:
            return [(s, SWAP_NAMES[s], 1)]
        if s == "is":
            return [("is not", "is", 2)] if nxt == "not" else [("is", "is not", 1)]
        if s == "not" and nxt == "in":
            return [("not in", "in", 2)]
        if s == "not" and prev != "is":
            return [("not", "", 1)]
        if s == "in" and prev not in ("for", "not"):
            return [("in", "not in", 1)]
    if tok.type == tokenize.NUMBER:
        try:
            value = ast.literal_eval(s)
        except ValueError:
            return []
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return [(s, repr(value + 1), 1)]
    if strings and tok.type == tokenize.STRING:
        m = STRING.match(s)
        if m and "b" not in m.group(1).lower():
            prefix, quote, body = m.groups()
            return [(s, f"{prefix}{quote}XX{body}XX{quote}", 1)]
    return []


def mutants(target: Target, strings: bool = False) -> list[Mutant]:
    path = os.path.join(ROOT, target.module)
    with open(path, encoding="utf-8") as f:
        source = f.read()
    tree = ast.parse(source)
    reference = ast.dump(tree)
    skipped = _skipped_spans(tree)
    functions = _function_spans(tree, target.functions) if target.functions else None
    lines = source.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    toks = list(tokenize.generate_tokens(io.StringIO(source).readline))
    found = []
    for i, tok in enumerate(toks):
        (row, col), end = tok.start, tok.end
        if row > len(lines) or "pragma: no mutate" in lines[row - 1]:
            continue
        if any(a <= (row, col) < b for a, b in skipped):
            continue
        if functions is not None and not any(a <= row <= b for a, b in functions):
            continue
        for before, after, span in _replacements(toks, i, strings):
            end = toks[i + span - 1].end
            start_off = offsets[row - 1] + col
            end_off = offsets[end[0] - 1] + end[1]
            new = source[:start_off] + after + source[end_off:]
            try:
                if ast.dump(ast.parse(new)) == reference:
                    continue
            except SyntaxError:
                continue
            found.append(Mutant(target.module, row, col, before, after, new))
    return found


# -- running ----------------------------------------------------------------------------
def make_tree() -> str:
    """A copy of the package laid out as installed, readable by the unprivileged test user."""
    tree = tempfile.mkdtemp(prefix="rankwire-mutants-")
    os.chmod(tree, 0o755)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(os.path.join(ROOT, "rankwire"), os.path.join(tree, "rankwire"), ignore=ignore)
    for pkg in PACKAGES:
        shutil.copytree(os.path.join(ROOT, pkg), os.path.join(tree, "rankwire", pkg), ignore=ignore)
    for dirpath, _, _ in os.walk(tree):
        os.chmod(dirpath, 0o755)
    return tree


_tree: str = ""
_stamp = 0
_child = 0  # the forked test run, if any


def _terminated(signum: int, frame: object) -> None:
    """Pool.terminate (Ctrl-C, an error): take the running tests down with the worker."""
    if _child:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(_child, signal.SIGKILL)
    os._exit(1)


def _init_worker(trees: multiprocessing.queues.Queue[str]) -> None:
    global _tree
    _tree = trees.get()
    sys.path.insert(0, _tree)
    os.environ["PYTHONPATH"] = _tree
    os.environ["PYTHONPYCACHEPREFIX"] = os.path.join(_tree, ".pycache")
    os.chdir(_tree)
    # Temp dirs of the tests (a session's shared_dir) inside the tree, which goes at the
    # end: a test run killed on a hanging mutant cannot leave them in /tmp.
    scratch = os.path.join(_tree, "tmp")
    os.makedirs(scratch, exist_ok=True)
    os.chmod(scratch, 0o1777)
    os.environ["TMPDIR"] = tempfile.tempdir = scratch
    signal.signal(signal.SIGTERM, _terminated)
    import hypothesis  # noqa: F401  warm: each child forks with these imported
    import pytest  # noqa: F401


def _run_tests(args: Sequence[str], timeout: float) -> str:
    """'passed', 'failed' or 'timeout' for the tests in a forked child."""
    global _child
    pid = _child = os.fork()
    if pid == 0:  # child
        rc = 2
        try:
            os.setpgid(0, 0)
            fd = os.open(os.devnull, os.O_WRONLY)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            import pytest

            rc = pytest.main(
                ["-x", "-q", "-p", "no:cacheprovider", "--rootdir", ROOT,
                 "-c", os.path.join(ROOT, "pyproject.toml"), *args]
            )  # fmt: skip
        finally:
            os._exit(int(rc))
    with contextlib.suppress(OSError):  # before the child does, so killpg never misses it
        os.setpgid(pid, pid)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            _child = 0
            return "passed" if os.waitstatus_to_exitcode(status) == 0 else "failed"
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            _child = 0
            return "timeout"
        time.sleep(0.05)


def _tests_args(target: Target) -> list[str]:
    return [os.path.join(ROOT, a) if a.startswith("tests/") else a for a in target.tests]


def _test_mutant(job: tuple[Mutant, Target, float]) -> tuple[Mutant, str]:
    global _stamp
    mutant, target, timeout = job
    path = os.path.join(_tree, "rankwire", mutant.module)
    with open(path, "rb") as f:
        original = f.read()
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(mutant.source)
        _stamp += 1  # a distinct mtime each time: no stale .pyc of the previous mutant
        os.utime(path, (1_000_000 + _stamp, 1_000_000 + _stamp))
        outcome = _run_tests(_tests_args(target), timeout)
    finally:
        with open(path, "wb") as f:
            f.write(original)
        _stamp += 1
        os.utime(path, (1_000_000 + _stamp, 1_000_000 + _stamp))
    return mutant, outcome


def _baseline(target: Target) -> float:
    start = time.monotonic()
    outcome = _run_tests(_tests_args(target), 600)
    if outcome != "passed":
        sys.exit(f"mutants: the tests of {target.module} fail without a mutation: {target.tests}")
    return time.monotonic() - start


def load_equivalent() -> dict[str, str]:
    """key -> reason, from `module:line:col: 'before' -> 'after'  # reason` lines."""
    found = {}
    if os.path.exists(EQUIVALENT):
        with open(EQUIVALENT, encoding="utf-8") as f:
            for line in f:
                key, _, reason = line.strip().partition("  # ")
                if key and not key.startswith("#"):
                    found[key] = reason
    return found


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help="e.g. pmi/job.py (default: all)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    parser.add_argument("--strings", action="store_true", help="mutate string literals too")
    opts = parser.parse_args(argv)
    targets = [t for t in TARGETS if not opts.modules or t.module in opts.modules]
    if opts.list:
        for t in targets:
            for m in mutants(t, opts.strings):
                print(m.key)
        return 0
    equivalent = load_equivalent()
    os.makedirs(REPORT_DIR, exist_ok=True)
    start = time.monotonic()
    rows = []
    ctx = multiprocessing.get_context("fork")
    trees = [make_tree() for _ in range(opts.jobs)]
    queue = ctx.Queue()
    for tree in trees:
        queue.put(tree)
    try:
        with ctx.Pool(opts.jobs, initializer=_init_worker, initargs=(queue,)) as pool:
            for target in targets:
                base = pool.apply(_baseline, (target,))
                timeout = 3 * base + 10
                found = mutants(target, opts.strings)
                jobs = [(m, target, timeout) for m in found]
                survived = []
                killed = 0
                for mutant, outcome in pool.imap_unordered(_test_mutant, jobs):
                    if outcome == "passed":
                        survived.append(mutant)
                    else:
                        killed += 1
                survived.sort(key=lambda m: (m.line, m.col))
                equiv = [m for m in survived if m.key in equivalent]
                live = [m for m in survived if m.key not in equivalent]
                scored = len(found) - len(equiv)
                score = 100.0 * killed / scored if scored else 100.0
                rows.append((target.module, len(found), killed, len(survived), len(equiv), score))
                report = os.path.join(REPORT_DIR, target.module.replace("/", "_") + ".txt")
                with open(report, "w", encoding="utf-8") as f:
                    f.writelines(f"{m.key}\n" for m in live)
                print(
                    f"{target.module:24} {len(found):5} mutants {killed:5} killed "
                    f"{len(survived):4} survived ({len(equiv)} equivalent) {score:5.1f} %  "
                    f"[tests {base:.1f}s]",
                    flush=True,
                )
                for m in live:
                    print(f"    survived: {m.key}", flush=True)
    finally:
        for tree in trees:
            shutil.rmtree(tree, ignore_errors=True)
    print(f"mutants: {time.monotonic() - start:.0f}s; survivors in {REPORT_DIR}/")
    return 0 if all(r[5] >= 90.0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
