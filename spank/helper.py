"""`rankwire spank-helper check|start`: the SPANK shim's Python half (not for humans).

The shim runs it with a request (JSON, job facts) on stdin and a socket as stdout:
- `check`, as root: site policy decides; the image is opened with the job user's
  credentials and its descriptor handed back (SCM_RIGHTS), so the bytes the container
  mounts are the bytes checked here -- no path is looked up again.
- `start`, as the job user, with that descriptor as fd 3: plans the container and starts
  the node's holder, which every task of the step then joins in task_init.
The reply is one JSON object; a failure is `{"error": "rankwire: <one line>"}`.
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
from rankwire.spank.plan import PLAN_ENV_DROP, Asked, JobFacts, asked, task_env
from rankwire.spank.policy import load_policy

IMAGE_FD = 3  # where the shim puts the checked image for `start`


def _reply(data: dict[str, Any], fd: Optional[int] = None) -> None:
    payload = json.dumps(data, ensure_ascii=False).encode("utf-8", "surrogateescape")
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


def check(facts: JobFacts) -> tuple[dict[str, Any], Optional[int]]:
    """Root: does site policy allow what the step asked for? Returns (reply, image fd)."""
    from rankwire.runtime.imagefacts import image_facts

    want = asked(facts, _oci_conf(facts.env))
    if want is None:
        return {"skip": "no container asked for"}, None
    policy = load_policy(facts.arg("policy"))
    policy.check_options(fabric=want.fabric, remap_root=want.remap_root, writable=want.writable)
    mounts = []
    with as_user(facts):
        for src, dst, ro in want.mounts:
            if not os.path.exists(src):
                raise UserError(f"--container-mounts source {src} does not exist: create it")
            real = os.path.realpath(src)
            policy.check_mount(real)
            if ":" in real or ":" in dst or "," in real + dst:
                raise UserError(f"--container-mounts {src}: paths with ':' or ',' cannot be bound")
            mounts.append(f"{real}:{dst}:{'ro' if ro else 'rw'}")
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
        "binds": mounts,
        "workdir": want.workdir,
        "keep_env": list(want.keep_env),
        "writable": want.writable,
        "fabric": want.fabric,
        "remap_root": want.remap_root,
    }
    return {"checked": json.dumps(checked)}, fd


def start(facts: JobFacts, checked: dict[str, Any]) -> dict[str, Any]:
    """The job user: plan the container from the checked image (fd 3) and start it."""
    from rankwire.fabric.plan import fabric_for
    from rankwire.runtime.hostfacts import collect_host_facts
    from rankwire.runtime.instance import start_holder
    from rankwire.runtime.plan import (
        ExecOptions,
        ImageFacts,
        UserFacts,
        plan_container,
        plan_env,
    )
    from rankwire.runtime.slurmfacts import slurm_step

    image = ImageFacts(**checked["image_facts"])
    # Readers in other processes (unsquashfs for the fabric ABI check) see the checked
    # file through our descriptor, never through its path.
    via_fd = dataclasses.replace(image, path=f"/proc/{os.getpid()}/fd/{IMAGE_FD}")
    env = dict(facts.env)
    home = env.get("HOME") or pwd.getpwuid(facts.uid).pw_dir
    step_env = {
        **env,
        **facts.stepd_env,
        "SLURM_JOB_ID": str(facts.job_id),
        "SLURM_STEP_ID": str(facts.step_id),
        "SLURM_STEP_NUM_TASKS": str(facts.total_tasks),
    }
    user = UserFacts(
        uid=facts.uid,
        gid=facts.gid,
        home=home,
        cwd=facts.cwd,
        environ={k: v for k, v in env.items() if k not in PLAN_ENV_DROP},
        cache_dir=os.path.join(env.get("XDG_CACHE_HOME") or f"{home}/.cache", "rankwire"),
        slurm=slurm_step(step_env, facts.uid),
    )
    opts = ExecOptions(
        binds=tuple(checked["binds"]),
        writable_tmpfs=checked["writable"],
        fakeroot=checked["remap_root"],
        fabric=checked["fabric"],
        share="none",
        workdir=checked["workdir"],
    )
    fabric = fabric_for(via_fd, opts.fabric)
    container = plan_container(image, collect_host_facts(), user, opts, fabric_mounts=fabric.mounts)
    container_env = plan_env(image, user, opts, fabric.env)
    holder = start_holder(
        container, mode="shared", owner=facts.stepd_pid, register=False, image_fd=IMAGE_FD
    )
    changes = task_env(env, container_env, checked["keep_env"])
    return {
        "socket": holder.socket,
        "holder_pid": str(holder.pid),
        "workdir": opts.workdir or user.cwd,
        "setenv": list(changes.set),
        "unsetenv": list(changes.unset),
        "copyenv": list(changes.copy),
    }


def main(phase: str) -> int:
    """Serve one request; the exit code is 0 whenever a reply was sent."""
    fd = None
    try:
        req = json.loads(sys.stdin.buffer.read().decode("utf-8", "surrogateescape"))
        facts = JobFacts.from_request(req)
        if phase == "check":
            reply, fd = check(facts)
        elif phase == "start":
            reply = start(facts, json.loads(req["checked"]))
        else:
            raise UserError(f"unknown spank-helper phase '{phase}'")
    except UserError as err:
        reply = {"error": f"rankwire: {err}"}
    except Exception as err:  # the shim shows one line; the traceback goes to slurmd's log
        traceback.print_exc()
        reply = {"error": f"rankwire: internal error in the {phase} phase: {err!r}"[:900]}
    _reply(reply, fd)
    return 0


__all__ = ["Asked", "check", "main", "start"]
