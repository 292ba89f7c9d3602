"""Apptainer definition files: text in, frozen `DefFile` out (pure, no I/O).

The subset real recipes use, read the way Apptainer's parser reads it
(`pkg/build/types/parser/deffile.go`, `internal/pkg/build/stage.go`, `util.go`):

- The file is cut into stages before every line that starts with `bootstrap:` (any case,
  in column 0); each stage is a header block (`Key: value` lines; keys case-insensitive;
  `#` starts a comment; a trailing `\\` continues the value on the next line) followed by
  sections. A section starts at a line whose first word begins with `%`, and runs to the
  next such line: a script's lines (comments and blank lines included) are kept verbatim,
  each ending in a newline. A section given twice is one section, bodies concatenated.
- Header keys Apptainer does not know are refused as Apptainer refuses them; keys it
  knows but rankwire does not use (`MirrorURL`, `Registry`, …) are kept, with a warning.
- `%files [from STAGE]`: lines `SRC [DST]`, split at blanks outside `"…"`, `"` trimmed
  off both ends; `#` lines skipped; words after DST ignored (so a trailing comment is).
- `%labels`: lines `KEY VALUE` split at the first space; the last of a repeated key wins.
- `%post -c SHELL [ARGS]` runs the script with SHELL: `post_shell` is `SHELL [ARGS]`.

Where Apptainer accepts something and then ignores it or fails at build time (a `%files`
argument other than `from STAGE`, `%files from` a stage that is not above, `-c` with
no shell, a stage without `Bootstrap:`), this parser refuses it with the line number.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional, Union

from rankwire.errors import UserError, shown
from rankwire.record import record

BOOTSTRAPS = ("docker", "oras", "localimage", "scratch")
USED_HEADERS = ("bootstrap", "from", "stage", "fingerprints")
# Every header key Apptainer accepts (`validHeaders`); `otherurlN` for any digits N.
APPTAINER_HEADERS = frozenset(
    [
        "bootstrap",
        "from",
        "includecmd",
        "mirrorurl",
        "updateurl",
        "osversion",
        "include",
        "library",
        "registry",
        "namespace",
        "stage",
        "product",
        "user",
        "regcode",
        "productpgp",
        "registerurl",
        "modules",
        "otherurl&n",
        "fingerprints",
        "confurl",
        "setopt",
        "target",
        "frontend",
        "filename",
        "buildargs",
    ]
)
SECTIONS = (
    "setup",
    "files",
    "post",
    "environment",
    "runscript",
    "startscript",
    "labels",
    "help",
    "test",
)
# Sections Apptainer has that rankwire does not build: refused by name, with what to do.
_APPS = "SCIF apps are not built; move the app's work into %post"
UNSUPPORTED_SECTIONS = {
    "pre": "move its work into %setup",
    "arguments": "write the values into the recipe",
    **{
        f"app{part}": _APPS
        for part in ("install", "labels", "files", "env", "test", "help", "run", "start")
    },
}
_SCRIPT_SECTIONS = ("setup", "post", "environment", "runscript", "startscript", "help", "test")

_STAGE_START = re.compile(r"bootstrap:", re.IGNORECASE)
# Apptainer's `fileSplitter` with Go's ASCII `\s` and `\w` spelled out: a word (which may
# hold `{{ arg }}`), a "double-quoted" string, or a single quote and what follows it.
_S = r"\t\n\f\r "
_FILE_WORD = re.compile(
    rf"""([^{_S}"']*{{{{[{_S}]*[0-9A-Za-z_]+[{_S}]*}}}}*[^{_S}{{}}"']*)+"""
    rf"""|([^{_S}"']+|"([^"]*)"|'([^']*))"""
)


@record
class FileCopy:
    src: str
    dst: str  # "" copies to the same path as src
    from_stage: Optional[str]  # None: from the host


@record
class Stage:
    name: Optional[str]  # its `Stage:` header, None when it has none
    bootstrap: str
    from_: str  # "" for scratch
    headers: tuple[tuple[str, str], ...]  # every header, key as written, in order
    fingerprints: tuple[str, ...]
    files: tuple[FileCopy, ...]
    post: str
    post_shell: Optional[str]  # `%post -c SHELL`: "SHELL [ARGS]"
    environment: str
    runscript: str
    startscript: str
    labels: tuple[tuple[str, str], ...]
    help: str
    test: str
    setup: str
    section_args: tuple[tuple[str, str], ...]  # (section, its arguments), in SECTIONS order

    def to_dict(self) -> dict[str, object]:
        out = dataclasses.asdict(self)
        out["from"] = out.pop("from_")
        out["headers"] = [list(h) for h in self.headers]
        out["labels"] = dict(self.labels)
        out["section_args"] = dict(self.section_args)
        out["fingerprints"] = list(self.fingerprints)
        out["files"] = [dataclasses.asdict(f) for f in self.files]
        return out


@record
class DefFile:
    stages: tuple[Stage, ...]  # in build order; the last one is the image
    warnings: tuple[str, ...]  # one line each, for headers rankwire keeps but does not use

    @property
    def image(self) -> Stage:
        return self.stages[-1]

    def to_dict(self) -> dict[str, object]:
        return {"stages": [s.to_dict() for s in self.stages], "warnings": list(self.warnings)}


@dataclasses.dataclass
class _Section:
    name: str
    args: str
    line: int  # of the `%name` line
    body: list[tuple[int, str]]  # (line number, text)


def parse(text: Union[str, bytes], recipe: str = "RECIPE.def") -> DefFile:
    """The stages of definition file `text`; `recipe` names it in messages."""
    if isinstance(text, bytes):
        text = _decode(text, recipe)
    lines = _lines(text)
    starts = [i for i, line in enumerate(lines) if _STAGE_START.match(line)]
    _check_preamble(lines[: starts[0] if starts else len(lines)], recipe)
    if not starts:
        raise UserError(
            f"{recipe} line 1: no Bootstrap: line, so no stage to build; "
            "start the file with Bootstrap: docker and From: IMAGE"
        )
    ends = [*starts[1:], len(lines)]
    declared = {
        name: line
        for line, name in (_stage_name(lines, a, b) for a, b in zip(starts, ends))
        if name
    }
    ctx = _Context(recipe, named={}, declared=declared, warnings=[])
    stages = tuple(_stage(lines, start, end, ctx) for start, end in zip(starts, ends))
    return DefFile(stages=stages, warnings=tuple(ctx.warnings))


def render(stage: Stage) -> str:
    """A definition file for `stage` alone: its headers, then its sections. `parse` of it
    gives `stage` back (of several stages: their renders one after another), save for what
    Apptainer's grammar cannot say (a script line ending in \\r, a path holding both a
    blank and a `"`). Comments outside scripts and spacing are lost: store the original."""
    out = [f"{key}: {value}\n" for key, value in stage.headers] + ["\n"]
    args = {name: f" {value}" for name, value in stage.section_args}
    groups: dict[Optional[str], list[FileCopy]] = {}
    for copy in stage.files:
        groups.setdefault(copy.from_stage, []).append(copy)
    for source, copies in groups.items():
        out.append("%files" + (f" from {source}" if source is not None else "") + "\n")
        out.extend(f"    {_quoted(c.src)} {_quoted(c.dst)}".rstrip() + "\n" for c in copies)
        out.append("\n")
    if stage.labels or "labels" in args:
        out.append(f"%labels{args.get('labels', '')}\n")
        out.extend(f"    {key} {value}".rstrip() + "\n" for key, value in stage.labels)
        out.append("\n")
    for name in _SCRIPT_SECTIONS:
        body = getattr(stage, name)
        if body or name in args:
            # No blank line after a script: it would become part of the script.
            out.append(f"%{name}{args.get(name, '')}\n{body}")
    return "".join(out)


def _quoted(path: str) -> str:
    """`path` as a %files word: in double quotes when it holds a blank (a path holding
    both a blank and a `"` cannot be written in Apptainer's %files)."""
    return f'"{path}"' if re.search(r"\s", path) else path


def _decode(data: bytes, recipe: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise UserError(
            f"{recipe} line {line}: not UTF-8 text (byte 0x{data[err.start]:02x}); "
            "save the file as UTF-8"
        ) from None


def _lines(text: str) -> list[str]:
    """Lines as Go's `bufio.ScanLines` gives them: split at \\n, one trailing \\r dropped."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _is_section_line(line: str) -> bool:
    return line.lstrip().startswith("%")


def _is_blank_or_comment(line: str) -> bool:
    stripped = line.strip()
    return stripped == "" or stripped.startswith("#")


def _check_preamble(lines: list[str], recipe: str) -> None:
    """Before the first `Bootstrap:` line only comments and blank lines may stand."""
    for number, line in enumerate(lines, 1):
        if _is_blank_or_comment(line):
            continue
        if _is_section_line(line):
            raise UserError(
                f"{recipe} line {number}: section {shown(line.strip())} before any "
                "Bootstrap: header; start the file with Bootstrap: docker and From: IMAGE"
            )
        raise UserError(
            f"{recipe} line {number}: {shown(line.strip())} stands before the first Bootstrap: "
            "line, so its stage has no Bootstrap; start each stage with Bootstrap: AGENT"
        )


@record
class _Context:
    recipe: str
    named: dict[str, int]  # stages parsed so far: name -> line of its Stage: header
    declared: dict[str, int]  # every stage of the file, likewise (to say "defined later")
    warnings: list[str]


def _stage(lines: list[str], start: int, end: int, ctx: _Context) -> Stage:
    recipe = ctx.recipe
    header_end = next((i for i in range(start, end) if _is_section_line(lines[i])), end)
    headers, header_lines = _headers(lines, start, header_end, ctx)
    values = {key.lower(): value for key, value in headers}
    bootstrap = values.get("bootstrap", "")
    where = f"{recipe} line {header_lines.get('bootstrap', start + 1)}"
    if bootstrap not in BOOTSTRAPS:
        raise UserError(
            f"{where}: bootstrap agent {shown(bootstrap or '(none)')} is not supported; "
            f"use Bootstrap: {', '.join(BOOTSTRAPS[:-1])} or {BOOTSTRAPS[-1]}"
        )
    from_ = values.get("from", "")
    if not from_ and bootstrap != "scratch":
        raise UserError(
            f"{where}: Bootstrap: {bootstrap} needs a From: header; add From: IMAGE below it"
        )
    name = values.get("stage") or None
    if name is not None and name in ctx.named:
        raise UserError(
            f"{recipe} line {header_lines['stage']}: stage name {shown(name)} is used twice "
            f"(first at line {ctx.named[name]}); give each stage its own Stage: name"
        )
    sections = _sections(lines, header_end, end, recipe)
    scripts = {
        n: "".join(text + "\n" for s in sections if s.name == n for _, text in s.body)
        for n in _SCRIPT_SECTIONS
    }
    # A repeated section's arguments: the last ones given (Apptainer keeps those).
    args = {s.name: s.args for s in sections if s.name != "files" and s.args}
    post_line = next((s.line for s in reversed(sections) if s.name == "post" and s.args), 0)
    files = tuple(c for s in sections if s.name == "files" for c in _files(s, ctx))
    labels: dict[str, str] = {}
    for section in sections:
        if section.name == "labels":
            labels.update(_labels(section))
    if name is not None:
        ctx.named[name] = header_lines["stage"]
    return Stage(
        name=name,
        bootstrap=bootstrap,
        from_=from_,
        headers=tuple(headers),
        fingerprints=_fingerprints(values.get("fingerprints", "")),
        files=files,
        post_shell=_post_shell(args.get("post", ""), post_line, recipe),
        labels=tuple(labels.items()),
        section_args=tuple((n, args[n]) for n in SECTIONS if n in args),
        **scripts,
    )


def _fingerprints(value: str) -> tuple[str, ...]:
    text = value.split("#")[0].strip()
    return tuple(f.strip() for f in text.split(",")) if text else ()


def _stage_name(lines: list[str], start: int, end: int) -> tuple[int, str]:
    """(line, name) of the `Stage:` header of the stage in lines[start:end], (0, "") if none."""
    found = (0, "")
    for index in range(start, end):
        if _is_section_line(lines[index]):
            break
        key, _, value = lines[index].split("#")[0].partition(":")
        if key.strip().lower() == "stage":
            found = (index + 1, value.strip())
    return found


def _headers(
    lines: list[str], start: int, end: int, ctx: _Context
) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """(key as written, value) in order, and the line of each (lowercased) key's last use."""
    headers: list[tuple[str, str]] = []
    where: dict[str, int] = {}
    pending: Optional[tuple[str, str, int]] = None  # a value continued with a trailing `\`
    for index in range(start, end):
        line = lines[index].strip()
        if line == "" or line.startswith("#"):
            if pending:
                headers.append(pending[:2])
                where[pending[0].lower()] = pending[2]
                pending = None
            continue
        text = line.split("#")[0]
        if pending:
            key, value, number = pending[0], pending[1] + text.strip(), pending[2]
            pending = None
        else:
            number = index + 1
            if ":" not in text:
                raise UserError(
                    f"{ctx.recipe} line {number}: header line {shown(line)} has no ':'; "
                    "write KEY: VALUE, or start a section with %post, %files, …"
                )
            key, value = (part.strip() for part in text.split(":", 1))
            _check_header_key(key, number, ctx)
        if value.endswith("\\"):
            value = value[:-1]
            value = value[:-2] + "\n" if value.endswith("\\n") else value
            pending = (key, value, number)
            continue
        headers.append((key, value))
        where[key.lower()] = number
    if pending:
        headers.append(pending[:2])
        where[pending[0].lower()] = pending[2]
    return headers, where


def _check_header_key(key: str, number: int, ctx: _Context) -> None:
    recipe, lower = ctx.recipe, key.lower()
    if lower in USED_HEADERS:
        return
    if lower not in APPTAINER_HEADERS and re.sub(r"[0-9]+\Z", "&n", lower) not in APPTAINER_HEADERS:
        raise UserError(
            f"{recipe} line {number}: unknown header {shown(key)}; check its spelling "
            f"(rankwire uses {', '.join(h.capitalize() for h in USED_HEADERS)})"
        )
    ctx.warnings.append(
        f"{recipe} line {number}: header {shown(key)} is not used by rankwire (kept as written)"
    )


def _sections(lines: list[str], start: int, end: int, recipe: str) -> list[_Section]:
    sections: list[_Section] = []
    for index in range(start, end):
        line = lines[index]
        if not _is_section_line(line):
            sections[-1].body.append((index + 1, line))
            continue
        words = line.strip().lstrip("%").split(None, 1)
        name = words[0].lower() if words else ""
        where = f"{recipe} line {index + 1}"
        if name in UNSUPPORTED_SECTIONS:
            raise UserError(
                f"{where}: section %{shown(name)} is not supported by rankwire; "
                + UNSUPPORTED_SECTIONS[name]
            )
        if name not in SECTIONS:
            raise UserError(
                f"{where}: unknown section %{shown(words[0] if words else '')}; "
                f"sections are {', '.join('%' + s for s in SECTIONS)}"
            )
        sections.append(_Section(name, words[1].strip() if len(words) > 1 else "", index + 1, []))
    return sections


def _files(section: _Section, ctx: _Context) -> list[FileCopy]:
    args = section.args.split("#")[0].split()
    where = f"{ctx.recipe} line {section.line}"
    if args and (len(args) != 2 or args[0] != "from"):
        raise UserError(
            f"{where}: %files takes no argument or 'from STAGE', not {shown(section.args)}; "
            "write %files or %files from STAGE"
        )
    source = args[1] if args else None
    if source is not None and source not in ctx.named:
        named_at = ctx.declared.get(source, 0)
        why = (
            "no stage has that name"
            if not named_at
            else "that is this stage"
            if named_at < section.line
            else f"that stage is defined later (line {named_at})"
        )
        raise UserError(
            f"{where}: %files from {shown(source)}: {why}; "
            "copy only from a stage above this one, named with Stage: NAME"
        )
    copies: list[FileCopy] = []
    for number, raw in section.body:
        line = raw.strip()
        if line == "" or line.startswith("#"):
            continue
        words = [m.group(0).strip().strip('"') for m in _FILE_WORD.finditer(line)]
        if not words or not words[0]:
            raise UserError(
                f"{ctx.recipe} line {number}: %files line {shown(line)} names no source; "
                'write SRC [DST], quoting a path with spaces in "..."'
            )
        copies.append(FileCopy(words[0], words[1] if len(words) > 1 else "", source))
    return copies


def _labels(section: _Section) -> list[tuple[str, str]]:
    labels = []
    for _, raw in section.body:
        line = raw.strip()
        if line == "" or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        labels.append((key.strip(), value.strip()))
    return labels


def _post_shell(args: str, line: int, recipe: str) -> Optional[str]:
    """`-c SHELL [ARGS]` in %post's arguments, as Apptainer's `getSectionScriptArgs` reads it."""
    words = args.split("#")[0].split()
    if "-c" not in words:
        return None
    shell = words[words.index("-c") + 1 :]
    if not shell:
        raise UserError(f"{recipe} line {line}: %post -c names no shell; write %post -c /bin/bash")
    return " ".join(shell)
