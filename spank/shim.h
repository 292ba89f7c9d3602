/*
 * rankwire SPANK shim: `srun --container-image=app.sif ./mpi_app` (or srun --container=).
 * Mechanism only; every decision is the Python helper's (`rankwire spank-helper`):
 *   user_init (slurmstepd, once per node): run the helper's "check" phase as root (site
 *     policy; it opens the image, hands us the fd) and its "start" phase as the job user
 *     (starts the node's shared container from that fd), then join the container's
 *     holder: its namespace fds, and the connection as the step's lease. Failures are
 *     kept for task_init: Slurm 22.05 does not report user_init's.
 *   task_init (each task, forked, as the user): setns user + mount, chdir, env.
 *   task_exit (slurmstepd): after the last task, leave; the holder tears down.
 * rankwire_spank.c: the callbacks, the holder; helper_run.c: running the helper (fork,
 * exact ids, fixed env, execve; request and reply over a socketpair, the image fd by
 * SCM_RIGHTS, stderr in a memfd); frame.c: the only wire format, framed records (no JSON).
 * options.h is generated from runtime/options.py.
 */
#ifndef RANKWIRE_SHIM_H
#define RANKWIRE_SHIM_H
#include "frame.h"

#include <errno.h>
#include <stdint.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/wait.h>

#include <slurm/spank.h>

#ifndef RANKWIRE_HELPER
#define RANKWIRE_HELPER "/usr/local/bin/rankwire" /* plugstack.conf helper= overrides */
#endif
#define HELPER_TIMEOUT_MS (600 * 1000) /* for each read and write */
#define HOLDER_WAIT_MS 10000 /* for each step of joining and leaving, and for its exit */

/* close() of a descriptor we own: Linux frees it even when close reports an error, so
 * there is nothing to retry or report. */
#define rw_close(fd) ((void)close(fd))

struct rw_job { uid_t uid; gid_t gid; gid_t *gids; int ngids; };

/* Keep the first one-line error; task_init reports it to srun. */
void rw_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Run `helper spank-helper PHASE`: req in, the reply frame out (with at most one fd, into
 * *fd_out); as_user NULL: as root. 0, or -1 with the reason given to rw_fail. */
int rw_run_helper(const char *helper, const char *phase, const struct buf *req,
		  const struct rw_job *as_user, int pass_fd, int *fd_out, struct buf *reply);
#endif
