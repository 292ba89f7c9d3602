"""Definition files: pure parsing, exact results and exact one-line errors.

The expectations follow Apptainer's parser (pkg/build/types/parser/deffile.go): script
bodies verbatim, one newline per line; `#` lines are comments only outside scripts.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rankwire.errors import UserError
from rankwire.runtime.deffile import DefFile, FileCopy, Stage, parse, render

EVERY_SECTION = """\
# A recipe with every section rankwire builds.
Bootstrap: docker
From: debian:12   # pinned below by the lock file
Stage: only
Fingerprints: 12045C8C0B1004D058DE4BEDA20C27EE7FF7BA84, 22045C8C0B1004D058DE4BEDA20C27EE7FF7BA84

%setup
    touch "${APPTAINER_ROOTFS}/setup-was-here"

%files
    hello.c /opt/hello.c
    "my data" "/opt/my data"
    README.md
    # not a file
%post -c /bin/bash
    # a comment inside a script is part of it
    apt-get update && apt-get install -y libmpich-dev

    mpicc -o /opt/hello /opt/hello.c
    echo "export HELLO=1" >> "$APPTAINER_ENVIRONMENT"
%environment
    export LC_ALL=C
%runscript
    exec /opt/hello "$@"
%startscript
    exec /opt/hello --serve
%labels
    Author someone@example.org
    Version 1.0
    Empty
%help
    Runs the MPICH hello.
%test
    /opt/hello --version
"""


def test_every_section() -> None:
    deffile = parse(EVERY_SECTION, "hello.def")
    assert deffile == DefFile(
        stages=(
            Stage(
                name="only",
                bootstrap="docker",
                from_="debian:12",
                headers=(
                    ("Bootstrap", "docker"),
                    ("From", "debian:12"),
                    ("Stage", "only"),
                    (
                        "Fingerprints",
                        "12045C8C0B1004D058DE4BEDA20C27EE7FF7BA84, "
                        "22045C8C0B1004D058DE4BEDA20C27EE7FF7BA84",
                    ),
                ),
                fingerprints=(
                    "12045C8C0B1004D058DE4BEDA20C27EE7FF7BA84",
                    "22045C8C0B1004D058DE4BEDA20C27EE7FF7BA84",
                ),
                files=(
                    FileCopy("hello.c", "/opt/hello.c", None),
                    FileCopy("my data", "/opt/my data", None),
                    FileCopy("README.md", "", None),
                ),
                post=(
                    "    # a comment inside a script is part of it\n"
                    "    apt-get update && apt-get install -y libmpich-dev\n"
                    "\n"
                    "    mpicc -o /opt/hello /opt/hello.c\n"
                    '    echo "export HELLO=1" >> "$APPTAINER_ENVIRONMENT"\n'
                ),
                post_shell="/bin/bash",
                environment="    export LC_ALL=C\n",
                runscript='    exec /opt/hello "$@"\n',
                startscript="    exec /opt/hello --serve\n",
                labels=(("Author", "someone@example.org"), ("Version", "1.0"), ("Empty", "")),
                help="    Runs the MPICH hello.\n",
                test="    /opt/hello --version\n",
                setup='    touch "${APPTAINER_ROOTFS}/setup-was-here"\n\n',
                section_args=(("post", "-c /bin/bash"),),
            ),
        ),
        warnings=(),
    )
    assert deffile.image is deffile.stages[0]


# The shape `spack containerize` writes for `format: singularity`, Debian standing in for Spack.
SPACK = """\
Bootstrap: docker
From: spack/ubuntu-jammy:0.21
Stage: build

%files
  spack.yaml /opt/spack-environment/spack.yaml

%post
  # Install the software, remove unnecessary deps
  cd /opt/spack-environment && spack env activate . && spack install --fail-fast && spack gc -y
  mkdir -p /opt/view /opt/software
  spack env activate --sh -d . > /opt/spack-environment/environment_modifications.sh

Bootstrap: docker
From: ubuntu:22.04
Stage: final

%files from build
  /opt/spack-environment /opt
  /opt/software /opt
  /opt/._view /opt
  /opt/view /opt
  ENV_SH ENV_SH

%post
  apt-get -yqq update && apt-get -yqq upgrade
  rm -rf /var/lib/apt/lists/*
  cat ENV_SH >> $APPTAINER_ENVIRONMENT

%labels
  app mpich-hello
  mpi mpich

%runscript
  exec /opt/view/bin/hello "$@"
""".replace("ENV_SH", "/opt/spack-environment/environment_modifications.sh")


def test_spack_containerize_shape() -> None:
    build, final = parse(SPACK, "spack.def").stages
    assert (build.name, build.bootstrap, build.from_) == (
        "build",
        "docker",
        "spack/ubuntu-jammy:0.21",
    )
    assert build.files == (FileCopy("spack.yaml", "/opt/spack-environment/spack.yaml", None),)
    assert build.post == (
        "  # Install the software, remove unnecessary deps\n"
        "  cd /opt/spack-environment && spack env activate . && spack install --fail-fast"
        " && spack gc -y\n"
        "  mkdir -p /opt/view /opt/software\n"
        "  spack env activate --sh -d . > /opt/spack-environment/environment_modifications.sh\n"
        "\n"
    )
    assert (final.name, final.bootstrap, final.from_) == ("final", "docker", "ubuntu:22.04")
    env = "/opt/spack-environment/environment_modifications.sh"
    assert final.files == (
        FileCopy("/opt/spack-environment", "/opt", "build"),
        FileCopy("/opt/software", "/opt", "build"),
        FileCopy("/opt/._view", "/opt", "build"),
        FileCopy("/opt/view", "/opt", "build"),
        FileCopy(env, env, "build"),
    )
    assert final.post.endswith(f"  cat {env} >> $APPTAINER_ENVIRONMENT\n\n")
    assert final.post_shell is None
    assert final.labels == (("app", "mpich-hello"), ("mpi", "mpich"))
    assert final.runscript == '  exec /opt/view/bin/hello "$@"\n'
    assert final.section_args == ()


def test_to_dict_is_json_and_render_round_trips() -> None:
    for text in (EVERY_SECTION, SPACK, MULTISTAGE_EXAMPLE):
        deffile = parse(text)
        data = json.loads(json.dumps(deffile.to_dict()))
        assert data["stages"][-1]["from"] == deffile.image.from_
        assert parse("".join(render(stage) for stage in deffile.stages)) == deffile
    stage = parse(EVERY_SECTION).image.to_dict()
    assert stage["labels"] == {"Author": "someone@example.org", "Version": "1.0", "Empty": ""}
    assert stage["files"][1] == {"src": "my data", "dst": "/opt/my data", "from_stage": None}
    assert stage["section_args"] == {"post": "-c /bin/bash"}


# Paraphrased from apptainer/apptainer examples/multistage/Apptainer: comments between
# the stages fall inside the first stage's %post (Apptainer reads them so too).
MULTISTAGE_EXAMPLE = """\
#
# First Stage
#
Bootstrap: docker
From: golang:1.12.3-alpine3.9
Stage: one


%post
        cd /root
        cat << EOF > hello.go
package main
EOF
        go build -o hello hello.go



#
# Second Stage
#
Bootstrap: oras
From: ghcr.io/apptainer/alpine:3.15.0
Stage: two


# install go binary from stage one
%files from one
        /root/hello /bin/hello


# run application
%runscript
        hello
"""


def test_apptainer_multistage_example() -> None:
    one, two = parse(MULTISTAGE_EXAMPLE).stages
    assert one.headers == (
        ("Bootstrap", "docker"),
        ("From", "golang:1.12.3-alpine3.9"),
        ("Stage", "one"),
    )
    assert one.post == (
        "        cd /root\n"
        "        cat << EOF > hello.go\n"
        "package main\n"
        "EOF\n"
        "        go build -o hello hello.go\n"
        "\n\n\n"
        "#\n# Second Stage\n#\n"
    )
    assert (two.name, two.bootstrap, two.from_) == (
        "two",
        "oras",
        "ghcr.io/apptainer/alpine:3.15.0",
    )
    assert two.files == (FileCopy("/root/hello", "/bin/hello", "one"),)
    assert two.runscript == "        hello\n"


def test_apptainer_docker_and_scratch_examples() -> None:
    # examples/docker/Apptainer: key case and a comment after a header value.
    docker = parse(
        "BootStrap: docker\n"
        "From: busybox:latest   # This is a comment\n"
        "\n"
        "%runscript\n"
        '    echo "This is what happens when you run the container..."\n'
        "\n"
        "%post\n"
        '    echo "Hello from inside the container"\n'
    ).image
    assert (docker.bootstrap, docker.from_, docker.name) == ("docker", "busybox:latest", None)
    assert docker.headers == (("BootStrap", "docker"), ("From", "busybox:latest"))
    assert docker.post == '    echo "Hello from inside the container"\n'
    # examples/scratch/Apptainer.busybox: no From:, the work done in %setup.
    scratch = parse(
        "Bootstrap: scratch\n"
        "\n"
        "%setup\n"
        "    # Create bin directory.\n"
        '    mkdir "${APPTAINER_ROOTFS}/bin"\n'
    ).image
    assert (scratch.bootstrap, scratch.from_) == ("scratch", "")
    assert scratch.setup == '    # Create bin directory.\n    mkdir "${APPTAINER_ROOTFS}/bin"\n'


def test_apptainer_parsing_details() -> None:
    text = (
        "Bootstrap: localimage\r\n"
        "From: base.sif\r\n"
        "IncludeCmd: yes\r\n"
        "%files\r\n"
        "  a b c\r\n"  # words after DST are ignored, as Apptainer does
        "  'x y' z\r\n"  # Apptainer's splitter: `'x y`, then `' z`
        "%post -e\r\n"
        "  true\r\n"
        "%post\r\n"
        "  false\r\n"
        "%labels\r\n"
        "  k first\r\n"
        "  k\tsecond\r\n"  # Apptainer splits labels at a space only
        "  k last\r\n"
    )
    deffile = parse(text, "d.def")
    stage = deffile.image
    assert stage.files == (FileCopy("a", "b", None), FileCopy("'x y", "' z", None))
    assert stage.post == "  true\n  false\n"
    assert stage.section_args == (("post", "-e"),)
    assert stage.labels == (("k", "last"), ("k\tsecond", ""))
    assert deffile.warnings == (
        "d.def line 3: header IncludeCmd is not used by rankwire (kept as written)",
    )


def test_header_continuation() -> None:
    stage = parse("Bootstrap: docker\nFrom: registry.example.org/\\\n  mpi/hello:1\n").image
    assert stage.from_ == "registry.example.org/mpi/hello:1"
    assert stage.headers == (("Bootstrap", "docker"), ("From", "registry.example.org/mpi/hello:1"))


def test_not_utf8() -> None:
    with pytest.raises(UserError) as err:
        parse(b"Bootstrap: docker\nFrom: x\n%post\n  echo \xff\n", "bad.def")
    assert str(err.value) == "bad.def line 4: not UTF-8 text (byte 0xff); save the file as UTF-8"


FIX_STAGE = "copy only from a stage above this one, named with Stage: NAME"
SECTIONS = "%setup, %files, %post, %environment, %runscript, %startscript, %labels, %help, %test"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            # apptainer/apptainer examples/debian/Apptainer
            "BootStrap: debootstrap\nOSVersion: stable\nMirrorURL: http://ftp.us.debian.org/debian/\n",
            "r.def line 1: bootstrap agent debootstrap is not supported; "
            "use Bootstrap: docker, oras, localimage or scratch",
        ),
        (
            "Bootstrap: Docker\nFrom: x\n",
            "r.def line 1: bootstrap agent Docker is not supported; "
            "use Bootstrap: docker, oras, localimage or scratch",
        ),
        (
            "Bootstrap:\nFrom: x\n",
            "r.def line 1: bootstrap agent (none) is not supported; "
            "use Bootstrap: docker, oras, localimage or scratch",
        ),
        (
            "\nBootstrap: oras\nStage: x\n",
            "r.def line 2: Bootstrap: oras needs a From: header; add From: IMAGE below it",
        ),
        (
            "Bootstrap: docker\nFrom: a\nStage: one\n%files from two\n  /x\n"
            "Bootstrap: docker\nFrom: b\nStage: two\n",
            f"r.def line 4: %files from two: that stage is defined later (line 8); {FIX_STAGE}",
        ),
        (
            "Bootstrap: docker\nFrom: a\nStage: one\nBootstrap: docker\nFrom: b\n"
            "%files from bild\n  /x\n",
            f"r.def line 6: %files from bild: no stage has that name; {FIX_STAGE}",
        ),
        (
            "Bootstrap: docker\nFrom: a\nStage: one\n%files from one # itself\n  /x\n",
            f"r.def line 4: %files from one: that is this stage; {FIX_STAGE}",
        ),
        (
            "# comment\n\n%post\n  echo\nBootstrap: docker\nFrom: a\n",
            "r.def line 3: section %post before any Bootstrap: header; "
            "start the file with Bootstrap: docker and From: IMAGE",
        ),
        (
            "From: debian:12\nBootstrap: docker\nFrom: a\n",
            "r.def line 1: From: debian:12 stands before the first Bootstrap: line, so its stage "
            "has no Bootstrap; start each stage with Bootstrap: AGENT",
        ),
        (
            "# only a comment\n",
            "r.def line 1: no Bootstrap: line, so no stage to build; "
            "start the file with Bootstrap: docker and From: IMAGE",
        ),
        (
            "Bootstrap: docker\nFrom: a\nStage: build\n\n"
            "Bootstrap: docker\nFrom: b\nStage: build\n",
            "r.def line 7: stage name build is used twice (first at line 3); "
            "give each stage its own Stage: name",
        ),
        (
            "Bootstrap: docker\nFrom: a\n%post\n  echo\n%install\n  make install\n",
            f"r.def line 5: unknown section %install; sections are {SECTIONS}",
        ),
        (
            # apptainer/apptainer examples/instances/Apptainer (SCIF apps)
            "BootStrap: oras\nFrom: ghcr.io/apptainer/busybox:1.31.1\n%appstart foo\n  echo\n",
            "r.def line 3: section %appstart is not supported by rankwire; "
            "SCIF apps are not built; move the app's work into %post",
        ),
        (
            "Bootstrap: docker\nFrom: a\n%arguments\n  v=1\n",
            "r.def line 3: section %arguments is not supported by rankwire; "
            "write the values into the recipe",
        ),
        (
            "Bootstrap: docker\nFrom: a\n%Install now\n",
            f"r.def line 3: unknown section %Install; sections are {SECTIONS}",
        ),
        (
            "Bootstrap: docker\nFrom: a\nMaintainer: me\n",
            "r.def line 3: unknown header Maintainer; check its spelling "
            "(rankwire uses Bootstrap, From, Stage, Fingerprints)",
        ),
        (
            "Bootstrap: docker\nFrom a\n",
            "r.def line 2: header line From a has no ':'; "
            "write KEY: VALUE, or start a section with %post, %files, …",
        ),
        (
            "Bootstrap: docker\nFrom: a\n%files /opt\n  x\n",
            "r.def line 3: %files takes no argument or 'from STAGE', not /opt; "
            "write %files or %files from STAGE",
        ),
        (
            'Bootstrap: docker\nFrom: a\n%files\n  "\n',
            'r.def line 4: %files line " names no source; '
            'write SRC [DST], quoting a path with spaces in "..."',
        ),
        (
            'Bootstrap: docker\nFrom: a\n%files\n  "" /dst\n',
            'r.def line 4: %files line "" /dst names no source; '
            'write SRC [DST], quoting a path with spaces in "..."',
        ),
        (
            "Bootstrap: docker\nFrom: a\n%post -c # no shell\n  true\n",
            "r.def line 3: %post -c names no shell; write %post -c /bin/bash",
        ),
    ],
)
def test_errors(text: str, message: str) -> None:
    with pytest.raises(UserError) as err:
        parse(text, "r.def")
    assert str(err.value) == message


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.sampled_from(
                [
                    "Bootstrap: docker",
                    "bootstrap: scratch",
                    "From: x",
                    "Stage: a",
                    "Stage: b",
                    "%files from a",
                    "%files",
                    "%post -c",
                    "%labels",
                    '  "a b" c',
                    "  '",
                    '  "',
                    "%post",
                    "  Bootstrap: indented",
                    "# c",
                    "",
                    "Key: \\",
                ]
            ),
            st.text(max_size=20),
        ),
        max_size=12,
    ),
    st.sampled_from(["", "Bootstrap: docker\nFrom: x\n", "Bootstrap: docker\nFrom: x\n%files\n"]),
)
def test_arbitrary_text_raises_only_user_error(lines: list[str], head: str) -> None:
    """Recipe-like lines (after a valid stage head, mostly) and any text: a UserError of
    one line or a parse, never another exception."""
    try:
        parse(head + "\n".join(lines))
    except UserError as err:
        assert str(err).startswith("RECIPE.def line ")
        assert "\n" not in str(err)


def test_apptainer_headers_are_kept_with_a_warning() -> None:
    deffile = parse(
        "Bootstrap: docker\nRegistry: example.org\nFrom: a\nOtherURL2: http://x\n", "w.def"
    )
    assert deffile.image.headers == (
        ("Bootstrap", "docker"),
        ("Registry", "example.org"),
        ("From", "a"),
        ("OtherURL2", "http://x"),
    )
    assert deffile.warnings == (
        "w.def line 2: header Registry is not used by rankwire (kept as written)",
        "w.def line 4: header OtherURL2 is not used by rankwire (kept as written)",
    )
