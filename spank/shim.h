/*
 * rankwire SPANK shim: `srun --container-image=app.sif ./mpi_app` (or srun --container=).
 * Mechanism only; every decision is the Python helper's (`rankwire spank-helper`):
 *   init_post_opt (slurmstepd, root, before the MPI plugin's setup): start the helper's
 *     "check" phase, which loads its code while slurmstepd sets up the step (not for a
 *     named container's step, which may join through its ticket without the helper, nor
 *     where a fresh ticket may hold).
 *   user_init (slurmstepd, once per node): run the helper's "check" phase as root (the
 *     started one, if its cgroups and limits are still slurmstepd's, else a new one; site
 *     policy; it opens the image and binds), asking it to run the "start" phase too: a
 *     child of it that becomes exactly the job user starts the container from those
 *     descriptors (`started=1`). A helper that did not (nor enforced the container
 *     itself) hands us the fds, and its "start" phase runs as the job user with them as
 *     3, 4, ... Each hands over [lease, (user ns,) mount ns], checked against the lease's
 *     peer (the holder). Failures are kept for task_init: Slurm 22.05 does not report
 *     user_init's.
 *   task_init_privileged (each task, forked, root; enforced only): setns mount.
 *   task_init (each task, as the user): setns user + mount (advisory only), no_new_privs,
 *     chdir, env.
 *   task_exit (slurmstepd): after the last task, --container-save (the helper's "save"
 *     phase as the job user), then leave; the holder tears down (a named one stays).
 *   job_epilog (slurmd's epilog, root): the job's named containers on the node go.
 *   A step that joins a job's named container as an earlier step did, with the same
 *     request, joins its holder without the helper (ticket.c: the phases' replies kept).
 *   A step that repeats an earlier step's request for a container of its own (in any job)
 *     has the C front end start it from the user's plugin plan, as the job user, without
 *     the helper (ticket.c: root's fresh ticket, the phases' replies kept).
 * Every wait has a deadline. rankwire_spank.c: the callbacks, the lease; helper_run.c:
 * running the helper (fork, exact ids, fixed env, execve; the request on a socketpair,
 * the reply over another with fds by SCM_RIGHTS, stderr in a memfd); frame.c: the only
 * wire format, framed records (no JSON). options.h is generated from runtime/options.py.
 */
#ifndef RANKWIRE_SHIM_H
#define RANKWIRE_SHIM_H
#include "frame.h"

#include <errno.h>
#include <stdint.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <linux/nsfs.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>

#include <slurm/spank.h>

#ifndef RANKWIRE_HELPER
#define RANKWIRE_HELPER "/usr/local/bin/rankwire" /* plugstack.conf helper= overrides */
#endif
#define HELPER_TIMEOUT_S 600 /* each helper phase as a whole (plugstack.conf timeout=) */
#define HOLDER_WAIT_MS 10000 /* for each step of leaving, and for the holder's exit */
#define RW_MAX_FDS 64 /* descriptors a reply may hand over */
#define RW_JOBS_DIR "/run/rankwire/jobs" /* named containers' dirs (spank/plan.JOBS_DIR) */
#define RW_RUN_DIR "/run/rankwire" /* the users' runtime dirs below it (spank/helper.RUN_DIR) */
#define EPILOG_TIMEOUT_S 60 /* the job epilog's helper phase, at most */

/* close() of a descriptor we own: Linux frees it even when close reports an error, so
 * there is nothing to retry or report (nor for -1: EBADF). */
#define rw_close(fd) ((void)close(fd))

struct rw_job { uid_t uid; gid_t gid; gid_t *gids; int ngids; };
struct rw_helper { const char *path; int timeout_s; };
/* Descriptors that came with a reply: n counts all, fd[] keeps the first RW_MAX_FDS. */
struct rw_fds { int fd[RW_MAX_FDS], n; };

/* A helper phase under way (pid 0: none): our ends of its stdin and of its reply socket,
 * its stderr (a memfd), its pidfd; the phase's time limit, counted from the request. */
struct rw_run { pid_t pid; int in, reply, err, pidfd, timeout_s; const char *phase; };

/* Keep the first one-line error; task_init reports it to srun. */
void rw_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Run `helper spank-helper PHASE` (as_user NULL: as root) with pass as fds 3, 4, ...: req
 * in; its reply's records to fn(ctx), its fds into got. 0, or -1 with the reason given to
 * rw_fail. It is rw_spawn_helper, then rw_finish_helper. */
int rw_run_helper(const struct rw_helper *h, const char *phase, const struct buf *req,
		  const struct rw_job *as_user, const struct rw_fds *pass, struct rw_fds *got,
		  frame_fn *fn, void *ctx);
/* Start the phase's helper, which starts its interpreter and imports while it waits for
 * the request on stdin: 0, or -1 after rw_fail. */
int rw_spawn_helper(const struct rw_helper *h, const char *phase, const struct rw_job *as_user,
		    const struct rw_fds *pass, struct rw_run *run);
/* Send the request, then read the reply and reap the helper, all within the phase's
 * timeout from now. */
int rw_finish_helper(struct rw_run *run, const struct buf *req, struct rw_fds *got,
		     frame_fn *fn, void *ctx);
/* A started helper not wanted after all: killed, reaped, its descriptors closed. */
void rw_abandon_helper(struct rw_run *run);
int64_t rw_now_ms(void); /* CLOCK_MONOTONIC: deadlines */
/* A frame until EOF (or the exit of pidfd until's process) by the deadline, its fds into
 * got (NULL: closed): 0 or an errno. */
int rw_read_frame(int fd, int until, int64_t deadline, struct rw_fds *got, struct buf *out);
void rw_close_fds(const struct rw_fds *f);

/* ticket.c: a named container joined without the helper. DIR is the job's dir on this
 * node (BASE/SLURMD/JOB), REQ's first LEN bytes the request as put_facts made it. */
/* 0 when the user's ticket still holds (bounded: a child does the lookups): the records
 * to replay in records, [lease, user ns, mount ns] in got; -1 when not (nothing kept). */
int rw_fast_join(const char *dir, uid_t uid, const struct buf *req, size_t len,
		 struct rw_fds *got, struct buf *records);
/* The ticket of a step that ran the helper and joined `holder` at `sock`. */
void rw_ticket_write(const char *dir, uid_t uid, const struct buf *req, size_t len, int argv,
		     pid_t holder, const int ns[2], const char *sock, const struct buf *records);
void rw_ticket_drop(const char *dir, uid_t uid);
/* Slurm's per-job and per-step values: the tickets' keys hold their names only. */
extern const char *const rw_step_values[];

/* ticket.c: a fresh container started without the helper, from root's fresh ticket of
 * uid for requests of `bucket` (rankwire_spank.c `fresh_bucket`). */
int rw_fresh_ticket_exists(uid_t uid, unsigned long bucket);
/* The fresh ticket a step used: its name and inode. */
struct rw_fresh { char name[64]; ino_t ino; };
/* 0 when the ticket holds and the C front end started and handed over the container
 * ([lease, user ns, mount ns] in got; the records to replay in records); else -1,
 * nothing kept (rw_fail may have been called: the caller clears it). The ticket whose
 * key held, if any, in used (else its name ""): the caller touches or drops it. */
int rw_fresh_start(const struct rw_helper *h, const struct rw_job *job, unsigned long bucket,
		   const struct buf *req, size_t len, struct rw_fds *got, struct buf *records,
		   struct rw_fresh *used);
/* The ticket `used` touched (hit: the step took its container) or dropped, if it is still
 * that file. */
void rw_fresh_used(const struct rw_fresh *used, int hit);
/* 64-bit FNV-1a of n bytes, on from h (RW_FNV_START: the start): the tickets' names. */
#define RW_FNV_START 0xcbf29ce484222325ULL
uint64_t rw_fnv1a(uint64_t h, const void *data, size_t n);
/* The fresh ticket of a step that ran the helper, whose replies were `records`. */
void rw_fresh_write(uid_t uid, unsigned long bucket, const struct buf *req, size_t len, int argv,
		    const struct buf *records);
#endif
