"""`rankwire spank-helper check|start`: the SPANK shim's Python half (not for humans).

The shim runs it with a request (a frame of job facts, `runtime/frame.py`) on stdin and
a socket as stdout:
- `check`, as root: site policy decides; the image is opened with the job user's
  credentials and its descriptor handed back (SCM_RIGHTS), so the bytes the container
  mounts are the bytes checked here -- no path is looked up again.
- `start`, as the job user, with that descriptor as fd 3: plans the container and starts
  the node's holder, which every task of the step then joins in task_init.
The reply is one frame; a failure is the record `error=rankwire: <one line>`.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import json
import os
import pwd
import socket
import stat
import sys
import traceback
from collections.abc import Iterator
from typing import Any, Optional

from rankwire.errors import UserError
from rankwire.runtime import frame
from rankwire.runtime.plan import Mount
from rankwire.spank import plan
from rankwire.spank.plan import Asked, JobFacts, asked
from rankwire.spank.policy import Policy, load_policy

IMAGE_FD = 3  # where the shim puts the checked image for `start`
Reply = list[tuple[str, str]]


def _reply(records: Reply, fd: Optional[int] = None) -> None:
    payload = frame.encode(records)
    out = socket.socket(fileno=os.dup(1))
    try:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))] if fd else []
        sent = out.sendmsg([payload], anc)
        out.sendall(payload[sent:])
    finally:
        out.close()


@contextlib.contextmanager
def as_user(facts: JobFacts) -> Iterator[None]:
    """Root acting with the job user's credentials (file access checks are the user's)."""
    if facts.uid == 0:
        yield
        return
    os.setgroups(list(facts.gids))
    os.setegid(facts.gid)
    os.seteuid(facts.uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups([])


def _oci_conf(env: dict[str, str]) -> bool:
    conf = env.get("SLURM_CONF") or "/etc/slurm/slurm.conf"
    return os.path.exists(os.path.join(os.path.dirname(conf), "oci.conf"))


def _open_image(path: str, named_by: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise UserError(f"image {path} (from {named_by}) not found: check the path") from None
    except OSError as err:
        raise UserError(f"cannot open image {path} (from {named_by}): {err.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise UserError(f"image {path} (from {named_by}) is {kind}: give a SIF file")
    return fd


def _checked_mount(m: Mount, policy: Policy) -> Mount:
    """As the job user: the source exists, and its real path is one policy allows."""
    if not os.path.exists(m.source):
        raise UserError(f"--container-mounts source {m.source} does not exist: create it")
    real = os.path.realpath(m.source)
    policy.check_mount(real)
    return dataclasses.replace(m, source=real)


def check(facts: JobFacts) -> tuple[Reply, Optional[int]]:
    """Root: does site policy allow what the step asked for? Returns (reply, image fd)."""
    from rankwire.runtime.imagefacts import image_facts

    want = asked(facts, _oci_conf(facts.env))
    if want is None:
        return [("skip", "no container asked for")], None
    policy = load_policy(facts.arg("policy"))
    policy.check_options(fabric=want.fabric, remap_root=want.remap_root, writable=want.writable)
    with as_user(facts):
        mounts = tuple(_checked_mount(m, policy) for m in want.mounts)
        # Every read of the image is the user's (on a root-squashed NFS, root reads less).
        fd = _open_image(want.image, want.image_from)
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
            policy.check_image(real)
            facts_of_image = image_facts(real, fd=fd)
        except BaseException:
            os.close(fd)
            raise
    checked = {
        "image_facts": dataclasses.asdict(facts_of_image),
        "asked": dataclasses.asdict(dataclasses.replace(want, mounts=mounts)),
    }
    return [("checked", json.dumps(checked))], fd


def _asked(d: dict[str, Any]) -> Asked:
    return Asked(
        **{
            **d,
            "mounts": tuple(Mount(**m) for m in d["mounts"]),
            "keep_env": tuple(d["keep_env"]),
        }
    )


def start(facts: JobFacts, checked: dict[str, Any]) -> Reply:
    """The job user: plan the container from the checked image (fd 3) and start it."""
    from rankwire.runtime.assemble import plan_image
    from rankwire.runtime.facts import gather
    from rankwire.runtime.instance import start_holder
    from rankwire.runtime.plan import ImageFacts
    from rankwire.runtime.slurmfacts import slurm_step

    image = ImageFacts(**checked["image_facts"])
    want = _asked(checked["asked"])
    home = facts.env.get("HOME") or pwd.getpwuid(facts.uid).pw_dir
    user = plan.user_facts(facts, home, slurm_step(plan.step_env(facts), facts.uid))
    opts = plan.exec_options(want, want.mounts)
    # Readers in other processes (unsquashfs for the fabric ABI check) see the checked
    # file through our descriptor, never through its path.
    found = gather(image, opts, user=user, fabric_image_path=f"/proc/{os.getpid()}/fd/{IMAGE_FD}")
    planned = plan_image(found, opts, None)
    holder = start_holder(
        planned.container, mode="shared", owner=facts.stepd_pid, register=False, image_fd=IMAGE_FD
    )
    changes = plan.task_env(facts.env, planned.env, want.keep_env)
    return [
        ("socket", holder.socket),
        ("holder_pid", str(holder.pid)),
        ("workdir", opts.workdir or user.cwd),
        *(("setenv", v) for v in changes.set),
        *(("unsetenv", v) for v in changes.unset),
        *(("copyenv", v) for v in changes.copy),
    ]


def main(phase: str) -> int:
    """Serve one request; the exit code is 0 whenever a reply was sent."""
    fd = None
    try:
        req = frame.decode(sys.stdin.buffer.read())
        facts = JobFacts.from_request(req)
        if phase == "check":
            reply, fd = check(facts)
        elif phase == "start":
            reply = start(facts, json.loads(frame.one(req, "checked") or "{}"))
        else:
            raise UserError(f"unknown spank-helper phase '{phase}'")
    except UserError as err:
        reply = [("error", f"rankwire: {err}")]
    except frame.FrameError as err:
        reply = [("error", f"rankwire: bad request from the plugin: {err}")]
    except Exception as err:  # the shim shows one line; the traceback goes to slurmd's log
        traceback.print_exc()
        reply = [("error", f"rankwire: internal error in the {phase} phase: {err!r}"[:900])]
    _reply(reply, fd)
    return 0


__all__ = ["Asked", "check", "main", "start"]
