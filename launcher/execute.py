"""Run a LaunchPlan: our PMI server, N ranks (in one shared container or on the host).

Single-threaded asyncio (ranks are forked and `setns` in the child, which must not race
other threads). Exit code: 0 if every rank exits 0; otherwise the first failure: a rank's
exit code (128+N for signal N), the code a rank passed to abort, 124 for --timeout, 1 for a
fence that cannot complete or a rank that closed its PMI connection before finalize and
runs on, and 1 when N > 1 ranks of a program that links an MPI all
exited 0 without one of them speaking to our PMI server (N singletons, not one job of N:
`plan.expect_pmi`; a program that links no MPI, like /bin/hostname, is never judged so).
On the first failure, or a signal to the launcher, every other
rank gets SIGTERM, then SIGKILL after the grace period. When `execute` returns, no rank,
holder, mount or socket of the job is left, nor any process a rank started (the
container's PID namespace ends with it, see `_Job.end_container`).

asyncio and the PMI server are imported while the holder sets the container up
(`open_container`'s `meanwhile`), not before: together about 25 ms of the launch. A kept
plan's ranks are started by the C front end (`adopt`), and this module is then imported
while they load: Python's start is no longer before them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import resource
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Callable, Optional, Union, cast

from rankwire.launcher.plan import LaunchPlan
from rankwire.pmi.job import FenceFailed, Job, format_ranks
from rankwire.runtime.instance import (
    FORWARDED_SIGNALS,
    Lease,
    end_with_slurmstepd,
    exit_code,
    open_container,
    start_in,
)

if TYPE_CHECKING:
    import asyncio

    from rankwire.pmi.pmix.server import PmixServer
    from rankwire.pmi.server import PmiServer

ABORT_GRACE_S = 0.2
DRAIN_S = 2.0  # output still on its way once the container has ended


def say(message: str) -> None:
    sys.stderr.write(f"rankwire: {message}\n")
    sys.stderr.flush()


class _Job:
    def __init__(
        self,
        plan: LaunchPlan,
        lease: Optional[Lease],
        server: Union[PmiServer, PmixServer],
        errors: Optional[tuple[int, int]] = None,
    ) -> None:
        import asyncio

        self.plan = plan
        self.lease = lease
        self.loop = asyncio.get_running_loop()
        self.pids: dict[int, int] = {}  # rank -> pid, while running
        self.failure: Optional[int] = None
        self.tearing_down = False
        self.relays: dict[int, Callable[[], None]] = {}  # output pipe -> its last flush
        self.ending = False
        # Failures held for ABORT_GRACE_S before one is judged the job's (see `settle`):
        # the first rank that exited non-zero, the first rank that closed its PMI
        # connection before finalize (and that message), the first fence failure.
        self.exit_pending: Optional[tuple[int, int]] = None
        self.lost_pending: Optional[tuple[int, str]] = None
        self.fence_pending: Optional[FenceFailed] = None
        self.settle_timer: Optional[asyncio.TimerHandle] = None
        # Why ranks could not start (`start_in` errors=): one pipe for all, read as lines
        # `<rank>\t<why>`, said once per cause with its ranks when the job ends (`errors`:
        # the pipe the C front end gave the ranks it started).
        self.errors_r, self.errors_w = os.pipe() if errors is None else errors
        os.set_blocking(self.errors_r, False)
        self.errors_buf = bytearray()
        self.not_started: dict[str, list[int]] = {}  # why -> ranks
        self.done = self.loop.create_future()
        self.server = server
        if plan.warm_record:
            server.on_finalize = self.record_warm

    # -- failures and teardown --------------------------------------------------------
    def fail(self, code: int, why: Optional[str] = None) -> None:
        if self.failure is None:
            self.failure = code
            if why:
                say(why)
        self.teardown(signal.SIGTERM)

    def teardown(self, sig: int) -> None:
        self.signal_all(sig)
        if not self.tearing_down:
            self.tearing_down = True
            self.loop.call_later(self.plan.grace, self.signal_all, signal.SIGKILL)

    def signal_all(self, sig: int) -> None:
        for pid in self.pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def on_signal(self, sig: int) -> None:
        self.signal_all(sig)  # the ranks decide; their exit codes say what happened
        if not self.tearing_down:
            self.tearing_down = True
            self.loop.call_later(self.plan.grace, self.signal_all, signal.SIGKILL)

    def on_timeout(self) -> None:
        self.fail(124, f"the job ran longer than --timeout {self.plan.timeout:g}s: killed it")

    # -- ranks ------------------------------------------------------------------------
    def spawn(self, rank: int, devnull: int) -> Callable[[], None]:
        """Start rank `rank`; returns the call that takes its pid in (`instance.start_in`):
        `run` starts every rank first."""
        env, fds = self.server.rank_env(rank)
        proc = dataclasses.replace(self.plan.process, env={**self.plan.process.env, **env})
        stdin = 0 if rank == self.plan.stdin_rank else devnull
        errors = (self.errors_w, str(rank))
        if self.plan.tag_output:
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            pid_of = start_in(
                self.lease, proc, inherit=fds, stdio=(stdin, out_w, err_w), errors=errors
            )
            os.close(out_w)
            os.close(err_w)
            self.relay(out_r, 1, rank)
            self.relay(err_r, 2, rank)
        else:
            pid_of = start_in(self.lease, proc, inherit=fds, stdio=(stdin, 1, 2), errors=errors)
        self.server.spawned(rank)
        return lambda: self.took(rank, pid_of())

    def took(self, rank: int, pid: int) -> None:
        """Rank `rank` is process `pid`, our child: ours to wait for and to signal."""
        self.pids[rank] = pid
        pidfd = os.pidfd_open(pid)
        self.loop.add_reader(pidfd, self.reaped, rank, pid, pidfd)

    def reaped(self, rank: int, pid: int, pidfd: int) -> None:
        self.loop.remove_reader(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        code = exit_code(status)
        del self.pids[rank]
        self.read_not_started()  # written before that exit, if the rank could not start
        # The PMI core words it as Popen does: a negative code is a signal.
        self.server.rank_exited(rank, -os.WTERMSIG(status) if os.WIFSIGNALED(status) else code)
        if code != 0 and self.failure is None and not self.tearing_down:
            # A rank that calls abort exits right after; its abort reaches us through the
            # PMI server (for PMIx, via the helper process), maybe a moment after the exit.
            # Wait that moment for an abort only: any other failure now is this exit's.
            if self.exit_pending is None:
                self.exit_pending = (rank, code)
                self.hold()
        elif code != 0 and self.failure is None:
            self.fail(code)
        self.check_done()

    def hold(self) -> None:
        """Judge the held failures in ABORT_GRACE_S: a rank's abort, its exit and the end
        of its PMI connection reach us in any order."""
        if self.settle_timer is None:
            self.settle_timer = self.loop.call_later(ABORT_GRACE_S, self.settle)

    def settle(self) -> None:
        """The job's failure, unless an abort came first: a rank that dropped its PMI
        connection and still runs (the others' failures follow from it), else the first
        failed exit, else the fence failure (a rank that exited 0 without finalize)."""
        if self.settle_timer is not None:
            self.settle_timer.cancel()
            self.settle_timer = None
        if self.failure is None:
            if self.lost_pending is not None and self.lost_pending[0] in self.pids:
                self.fail(1, self.lost_pending[1])
            elif self.exit_pending is not None:
                rank, code = self.exit_pending
                started = all(rank not in ranks for ranks in self.not_started.values())
                self.fail(code, f"rank {rank} exited with {code}" if started else None)
            elif self.fence_pending is not None:
                self.fail(1, f"PMI fence failed: {self.fence_pending.reason}")
        self.exit_pending = self.lost_pending = self.fence_pending = None
        self.check_done()

    def read_not_started(self) -> None:
        with contextlib.suppress(BlockingIOError):  # we hold the write end: never EOF
            while chunk := os.read(self.errors_r, 65536):
                self.errors_buf.extend(chunk)
        *lines, rest = self.errors_buf.split(b"\n")
        self.errors_buf[:] = rest
        for line in lines:
            rank, _, why = line.decode(errors="replace").partition("\t")
            self.not_started.setdefault(why, []).append(int(rank))

    def relay(self, fd: int, to: int, rank: int) -> None:
        """Copy a rank's output to ours, each line prefixed with `[rank] `."""
        prefix = f"[{rank}] ".encode()
        pending = bytearray()

        def finish() -> None:
            if pending:
                os.write(to, prefix + bytes(pending) + b"\n")
            self.loop.remove_reader(fd)
            os.close(fd)
            del self.relays[fd]

        def readable() -> None:
            chunk = os.read(fd, 65536)
            if chunk:
                pending.extend(chunk)
                *lines, rest = pending.split(b"\n")
                if lines:
                    os.write(to, b"".join(prefix + line + b"\n" for line in lines))
                    pending[:] = rest
                return
            finish()
            self.check_done()

        self.relays[fd] = finish
        self.loop.add_reader(fd, readable)

    def check_done(self) -> None:
        if self.pids or self.settle_timer is not None or self.done.done():
            return
        if self.relays:
            self.end_container()
        else:
            self.done.set_result(None)

    def end_container(self) -> None:
        """Every rank has exited, but processes they left hold the output pipes: end the
        container (the kernel ends every process of its PID namespace), then drain what
        is left for DRAIN_S at most (a shared container may outlive our lease)."""
        if self.ending:
            return
        self.ending = True
        if self.lease is not None:
            self.lease.close()
        self.loop.call_later(DRAIN_S, self.stop_relays)

    def stop_relays(self) -> None:
        for finish in list(self.relays.values()):
            finish()
        self.check_done()

    def record_warm(self, rank: int) -> None:
        """Keep which parts of the image's files the ranks read (`runtime/warm.py`), from
        the first finalizing rank that can still be read, for the next launch."""
        pid = self.pids.get(rank)
        report = self.lease.report if self.lease is not None else {}
        if pid is not None and self.failure is None and report.get("fuse_image"):
            from rankwire.runtime.warm import record

            try:
                kept = record(pid, int(report.get("init_pid") or pid), self.plan.warm_record)
            except Exception:  # a hint for the next launch must not fail this one
                kept = True  # and is not tried again
            if kept:
                self.server.on_finalize = None

    # -- PMI events -------------------------------------------------------------------
    def told_fence_failed(self, rank: int) -> bool:
        """The rank got a held fence failure as the answer to its fence."""
        return self.fence_pending is not None and rank in self.fence_pending.waiting

    async def watch_events(self) -> None:
        from rankwire.pmi.server import Aborted, ProtocolViolation, RankLost

        while True:
            event = await self.server.wait_event()
            if isinstance(event, Aborted) and self.told_fence_failed(event.rank):
                self.hold()  # MPI aborts on our fence error: the cause is held already
            elif isinstance(event, Aborted):
                msg = f": {event.message}" if event.message else ""
                self.fail(
                    event.code or 1, f"rank {event.rank} aborted the job (code {event.code}){msg}"
                )
            elif isinstance(event, FenceFailed) and self.failure is None:
                if event.timed_out:
                    self.fail(1, f"PMI fence failed: {event.reason}")
                elif self.exit_pending is not None and self.lost_pending is None:
                    self.settle()  # the fence failed because that rank exited
                else:  # a rank that lost its connection may be exiting right now
                    self.fence_pending = self.fence_pending or event
                    self.hold()
            elif isinstance(event, RankLost) and self.failure is None:
                when = "during a fence" if event.during_fence else "before finalize"
                self.lost_pending = self.lost_pending or (
                    event.rank,
                    f"rank {event.rank} closed its PMI connection {when} and runs on: the "
                    "other ranks cannot complete the job without it (a rank must keep its "
                    "PMI_FD/PMI_PORT connection open until MPI_Finalize)",
                )
                self.hold()
            elif isinstance(event, ProtocolViolation):
                who = "a rank" if event.rank is None else f"rank {event.rank}"
                say(f"{who} sent a malformed PMI request: {event.message}")

    # -- the whole job ----------------------------------------------------------------
    async def run(self, adopted: Sequence[tuple[int, int]] = ()) -> int:
        """The job, to its end; its exit code. `adopted`: (pid, our PMI_FD end) of each
        rank the C front end started (`adopt`); none: start them here."""
        await self.server.start()
        # asyncio puts back SIG_DFL, not what a caller had (a caller embedding us, say)
        previous = {sig: signal.getsignal(sig) for sig in FORWARDED_SIGNALS}
        for sig in FORWARDED_SIGNALS:
            self.loop.add_signal_handler(sig, self.on_signal, sig)
        if adopted:  # the front end held them since it started the ranks: now they're theirs
            signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
        events = self.loop.create_task(self.watch_events())
        timer = (
            self.loop.call_later(self.plan.timeout, self.on_timeout)
            if (self.plan.timeout)
            else None
        )
        devnull = os.open(os.devnull, os.O_RDONLY)
        self.loop.add_reader(self.errors_r, self.read_not_started)
        try:
            starting: list[Callable[[], None]] = []
            try:
                for rank, (pid, fd) in enumerate(adopted):
                    cast("PmiServer", self.server).adopt(rank, fd)
                    starting.append(functools.partial(self.took, rank, pid))
                for rank in range(len(adopted), self.plan.ntasks):
                    starting.append(self.spawn(rank, devnull))
            finally:  # each rank started is ours to wait for and to signal
                for started in starting:
                    started()
            self.check_done()
            await self.done
        finally:
            os.close(devnull)
            self.loop.remove_reader(self.errors_r)
            self.read_not_started()
            os.close(self.errors_r)
            os.close(self.errors_w)
            if timer:
                timer.cancel()
            events.cancel()
            # blocked meanwhile: between asyncio's SIG_DFL and the caller's handler, a
            # signal would end the caller without its own cleanup
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
            try:
                for sig, handler in previous.items():
                    self.loop.remove_signal_handler(sig)
                    if handler is not None:
                        signal.signal(sig, handler)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            self.signal_all(signal.SIGKILL)  # only if we are unwinding from an error
            await self.server.close()
        for why, ranks in self.not_started.items():  # one line for N ranks, not N lines
            say(f"{format_ranks(ranks)}: {why}")
        if self.failure is None and self.plan.expect_pmi and not self.server.connected_ranks:
            # Each rank took MPI's singleton init: N jobs of size 1, not one of N.
            server = "PMIx" if self.plan.pmi == "pmix" else "PMI-1/PMI-2"
            say(
                f"none of the {self.plan.ntasks} ranks connected to the {server} server: each "
                "ran alone as an MPI job of size 1: use the PMI their MPI speaks (--pmi auto) "
                "and keep the PMI_*/PMIX_* variables in their environment"
            )
            return 1
        return self.failure or 0


def pmi_server(plan: LaunchPlan, jobid: Optional[str] = None) -> Union[PmiServer, PmixServer]:
    """The job's PMI server, not started yet (its owner, `_Job.run`, starts and closes it).
    MPICH launches import no PMIx server (≈ 20 ms). `jobid`: the one the C front end gave
    the ranks it started (`adopt`)."""
    job = Job(size=plan.ntasks, fence_timeout=plan.fence_timeout, jobid=jobid)
    # asyncio imports ssl when it can (OpenSSL: about 5 ms of CPU and 5 MiB), which a kept
    # launch's ranks wait for at their first PMI request. The launcher's loop speaks no TLS,
    # as the PMI-2 bridge's does not (`pmi2bridge.spawn`). ssl is kept out of that import
    # only: anything after it may still import ssl.
    kept_out = sys.modules.setdefault("ssl", None) is None  # type: ignore[arg-type]
    try:
        if plan.pmi == "pmix":
            from rankwire.pmi.pmix.server import PmixServer

            return PmixServer(job)
        from rankwire.pmi.server import PmiServer

        return PmiServer(job, mode=plan.pmi_transport)
    finally:
        if kept_out and sys.modules.get("ssl", 0) is None:
            del sys.modules["ssl"]


def adopt(args: Sequence[str]) -> int:
    """`rankwire-py __launch …`: the C front end (`runtime/front.c` `launch_plan`) started
    the container and the ranks of a kept launch plan (`launcher/plancache.py`), then
    exec'd us with them: serve their PMI and see the job to its end, as `execute` does
    for the ranks it starts. The words: the plan's descriptor, the ranks' start-error
    pipe (read, write end), the holder's pid, the lease's connection and its user, mount
    and PID namespaces' descriptors, the job id the ranks were given, the holder's
    report (JSON), then PID:FD (a rank's pid and our end of its PMI_FD socketpair) per
    rank, in rank order."""
    import json
    import socket

    from rankwire.launcher.plancache import front_end_plan
    from rankwire.runtime.instance import HolderHandle

    lease: Optional[Lease] = None
    holder: Optional[HolderHandle] = None
    kept: Optional[tuple[str, os.stat_result]] = None  # the plan's file, as the front end read it
    try:
        try:
            plan_fd, err_r, err_w, holder_pid, conn, userns, mntns, pidns = map(int, args[:8])
            kept = (os.readlink(f"/proc/self/fd/{plan_fd}"), os.fstat(plan_fd))
            report = json.loads(args[9])
            holder = HolderHandle(report["socket"], holder_pid, report, True, report["session"])
            lease = Lease(socket.socket(fileno=conn), userns, mntns, report, pidns)
            plan = front_end_plan(plan_fd)
            ranks = [(int(pid), int(fd)) for pid, _, fd in (w.partition(":") for w in args[10:])]
            if len(ranks) != plan.ntasks:
                raise ValueError(f"{len(ranks)} ranks started, {plan.ntasks} planned")
            server = pmi_server(plan, args[8])
        except Exception as err:  # its ranks end with the container, below
            with contextlib.suppress(OSError):  # not started again: the next launch plans
                if kept is not None and os.path.samestat(os.stat(kept[0]), kept[1]):
                    os.unlink(kept[0])
            say(f"cannot serve the launch its kept plan started ({err}): launch it again")
            return 125
        import asyncio

        async def main() -> int:
            job = _Job(plan, lease, server, errors=(err_r, err_w))
            return await job.run(ranks)

        return asyncio.run(main())
    finally:
        # the front end held them for `_Job.run`: not through the teardown's waits
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
        if lease is not None:
            lease.close()
        if holder is not None:
            holder.wait()


def execute(
    plan: LaunchPlan, keep: Optional[Callable[[Optional[list[tuple[str, str]]]], None]] = None
) -> int:
    """Run the job; returns the launcher's exit code. A task of a step (`srun …
    apptainer-mpirun`) ends with its slurmstepd. `keep`: called with what our holder did
    (its recipe; None: it cannot be done again) once it serves: the plan is kept then."""
    end_with_slurmstepd()
    if plan.open_files is not None:  # the planner found the job needs more (up to hard)
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (plan.open_files, hard))

    made: list[Union[PmiServer, PmixServer]] = []

    def make_server() -> None:  # while the holder sets the container up
        made.append(pmi_server(plan))
        if plan.pmi == "pmix":
            cast("PmixServer", made[0]).launch()  # its helpers start meanwhile too

    with contextlib.ExitStack() as stack:
        # The container opens outside asyncio's loop: there ^C stops a long setup at once.
        try:
            lease = None
            if plan.container is not None:
                started = None if keep is None else (lambda holder: keep(holder.recipe))
                lease = stack.enter_context(
                    open_container(plan.container, started=started, meanwhile=make_server)
                )
            else:
                make_server()
        except BaseException:
            if made:
                import asyncio

                asyncio.run(made[0].close())
            raise
        import asyncio

        server = made[0]

        async def main() -> int:
            try:
                job = _Job(plan, lease, server)
            except BaseException:
                await server.close()
                raise
            return await job.run()  # which closes the server

        return asyncio.run(main())
