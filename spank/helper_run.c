/* Running the helper: no shell, no user string in argv, every id change checked, and one
 * deadline for the whole phase (request to exit): a helper that stalls or trickles is killed. */
#include "shim.h"

#define MUST(ok) do { if (!(ok)) _exit(126); } while (0) /* in the child */
#define FD_HIGH (3 + RW_MAX_FDS) /* above every fd the child dup2s to */

static void __attribute__((noreturn))
helper_child(const char *helper, const char *phase, const int *io, const struct rw_fds *pass,
	     const struct rw_job *job)
{
	char *const argv[] = {(char *)helper, "spank-helper", (char *)phase, NULL};
	char *const envp[] = {"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C.UTF-8", NULL};
	int n = 3 + pass->n, src[3 + RW_MAX_FDS] = {io[0], io[1], io[2]}, fd[3 + RW_MAX_FDS];
	uid_t uid = job ? job->uid : 0, ru, eu, su;
	gid_t gid = job ? job->gid : 0, rg, eg, sg;
	sigset_t none;

	/* stdin: the request's socket, stdout: the reply's, stderr: a memfd, then pass as 3, 4, ... */
	MUST(pass->n <= RW_MAX_FDS && memcpy(src + 3, pass->fd, pass->n * sizeof *src));
	for (int i = 0; i < n; i++)
		MUST((fd[i] = fcntl(src[i], F_DUPFD, FD_HIGH)) >= 0);
	MUST(sigemptyset(&none) == 0 && sigprocmask(SIG_SETMASK, &none, NULL) == 0);
	for (int sig = 1; sig < NSIG; sig++) /* SIGKILL, SIGSTOP, libc's: refuse, are SIG_DFL */
		(void)signal(sig, SIG_DFL);
	/* slurmstepd runs user_init with euid = the user and saved uid 0: take root back,
	 * then become exactly root (check) or exactly the job user (start). */
	MUST(seteuid(0) == 0 && setpgid(0, 0) == 0); /* its own group: killed as one */
	MUST(setgroups(job ? (size_t)job->ngids : 0, job ? job->gids : NULL) == 0);
	MUST(setresgid(gid, gid, gid) == 0 && setresuid(uid, uid, uid) == 0);
	MUST(getresuid(&ru, &eu, &su) == 0 && ru == uid && eu == uid && su == uid);
	MUST(getresgid(&rg, &eg, &sg) == 0 && rg == gid && eg == gid && sg == gid);
	MUST((uid == 0 || setuid(0) != 0) && chdir("/") == 0); /* and no way back */
	for (int i = 0; i < n; i++)
		MUST(dup2(fd[i], i) == i);
	if (syscall(SYS_close_range, n, ~0U, 0)) {
		MUST(errno == ENOSYS); /* before Linux 5.9: one by one; EBADF: was not open */
		for (int i = n; i < 65536; i++)
			MUST(close(i) == 0 || errno == EBADF);
	}
	umask(022), execve(helper, argv, envp);
	(void)dprintf(2, "cannot run %s: %s\n", helper, strerror(errno)); /* else: exit code */
	_exit(127);
}

int64_t rw_now_ms(void)
{
	struct timespec t = {0, 0};
	return clock_gettime(CLOCK_MONOTONIC, &t), (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

void rw_close_fds(const struct rw_fds *f)
{
	for (int i = 0; i < f->n && i < RW_MAX_FDS; i++)
		rw_close(f->fd[i]);
}

int rw_read_frame(int fd, int until, int64_t deadline, struct rw_fds *got, struct buf *out)
{
	char data[65536], ctl[CMSG_SPACE(RW_MAX_FDS * sizeof(int))];
	struct rw_fds none = {.n = 0}; /* got NULL: every fd is closed */
	struct pollfd p[2] = {{fd, POLLIN, 0}, {until, POLLIN, 0}}; /* until -1: ignored */
	int64_t left, n;
	int f;

	for (got = got ? got : &none;;) {
		struct iovec iov = {data, sizeof data};
		struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl,
				     .msg_controllen = sizeof ctl};
		if ((left = deadline - rw_now_ms()) <= 0)
			return ETIMEDOUT;
		if ((n = poll(p, 2, left < INT_MAX ? (int)left : INT_MAX)) > 0 && !p[0].revents)
			n = 0; /* `until` exited, and all it sent is read: the end, EOF or not */
		else if (n > 0)
			n = recvmsg(fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
		else if (n == 0 || errno == EINTR)
			continue; /* the deadline decides */
		if (n < 0 && (errno == EINTR || errno == EAGAIN))
			continue;
		if (n <= 0) /* EOF brings no fds */
			return n < 0 ? errno : out->oom ? ENOMEM : 0;
		for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
			for (size_t i = 0; c->cmsg_type == SCM_RIGHTS &&
			     i < (c->cmsg_len - CMSG_LEN(0)) / sizeof f; i++, got->n++) {
				memcpy(&f, CMSG_DATA(c) + i * sizeof f, sizeof f);
				if (got != &none && got->n < RW_MAX_FDS)
					got->fd[got->n] = f;
				else
					rw_close(f); /* counted: the caller refuses the lot */
			}
		got->n += msg.msg_flags & MSG_CTRUNC ? RW_MAX_FDS + 1 : 0;
		if (out->len + (size_t)n > FRAME_MAX)
			return EMSGSIZE;
		buf_put(out, data, (size_t)n);
	}
}

int rw_spawn_helper(const struct rw_helper *h, const char *phase, const struct rw_job *as_user,
		    const struct rw_fds *pass, struct rw_run *run)
{
	int in[2] = {-1, -1}, out[2] = {-1, -1}, err = -1;
	struct stat sb;
	pid_t pid = -1;

	*run = (struct rw_run){0, -1, -1, -1, -1, h->timeout_s, phase};
	if (stat(h->path, &sb) || sb.st_uid != 0 || (sb.st_mode & 022))
		return rw_fail("rankwire: the helper %s must exist, be owned by root and not be "
			       "group/world-writable (plugstack.conf helper=)", h->path), -1;
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, in) ||
	    socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, out) ||
	    (err = memfd_create("rankwire-helper", MFD_CLOEXEC)) < 0 || (pid = fork()) < 0) {
		rw_fail("rankwire: cannot run the helper: %s", strerror(errno));
		return rw_close(in[0]), rw_close(in[1]), rw_close(out[0]), rw_close(out[1]),
		       rw_close(err), -1;
	}
	if (pid == 0)
		helper_child(h->path, phase, (int[]){in[1], out[1], err}, pass, as_user);
	rw_close(in[1]), rw_close(out[1]);
	run->pid = pid, run->in = in[0], run->reply = out[0], run->err = err;
	run->pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
	return 0;
}

/* The request to the helper's stdin, then its end (EOF), by the deadline: 0 or an errno. */
static int send_request(int fd, const struct buf *req, int64_t deadline)
{
	for (size_t sent = 0; sent < req->len;) {
		struct pollfd p = {fd, POLLOUT, 0};
		int64_t left = deadline - rw_now_ms();
		ssize_t n;
		if (left <= 0)
			return ETIMEDOUT;
		if (poll(&p, 1, left < INT_MAX ? (int)left : INT_MAX) < 0 ||
		    (n = send(fd, req->p + sent, req->len - sent, MSG_NOSIGNAL | MSG_DONTWAIT)) < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			return errno;
		}
		sent += (size_t)n;
	}
	return shutdown(fd, SHUT_WR) ? errno : 0;
}

void rw_abandon_helper(struct rw_run *run)
{
	struct pollfd p = {run->pidfd, POLLIN, 0};
	int status;

	if (run->pid <= 0)
		return;
	/* It waits for its request: it has started nothing. Through its pidfd, so that a pid
	 * reused after someone else reaped it is safe; its exit awaited, bounded. */
	if (run->pidfd >= 0 && !syscall(SYS_pidfd_send_signal, run->pidfd, SIGKILL, NULL, 0))
		while (poll(&p, 1, HOLDER_WAIT_MS) < 0 && errno == EINTR)
			;
	else if (run->pidfd < 0)
		(void)kill(run->pid, SIGKILL);
	(void)waitpid(run->pid, &status, WNOHANG); /* else slurmstepd reaps it */
	rw_close(run->in), rw_close(run->reply), rw_close(run->err), rw_close(run->pidfd);
	run->pid = 0;
}

int rw_finish_helper(struct rw_run *run, const struct buf *req, struct rw_fds *got,
		     frame_fn *fn, void *ctx)
{
	struct buf reply = {0};
	int status = 0, e, bad;
	/* From the request on: a helper started early waited for it, on nobody's clock. */
	int64_t deadline = rw_now_ms() + (int64_t)run->timeout_s * 1000;
	char data[65536], why[64], *line;
	pid_t pid = run->pid, r = 0;
	ssize_t n;

	if (req->oom)
		return rw_abandon_helper(run), rw_fail("rankwire: cannot run the helper: %s",
						       strerror(ENOMEM)), -1;
	/* A helper that ended before it read it (EPIPE) says why in its stderr, read below. */
	if ((e = send_request(run->in, req, deadline)) == EPIPE || e == ECONNRESET)
		e = 0;
	rw_close(run->in);
	if (!e) /* until it exits (or EOF) */
		e = rw_read_frame(run->reply, run->pidfd, deadline, got, &reply);
	/* Its exit, by the same deadline (ECHILD: reaped elsewhere, the reply decides). */
	while (!e && (r = waitpid(pid, &status, WNOHANG)) == 0)
		e = rw_now_ms() < deadline ? (void)poll(NULL, 0, 10), 0 : ETIMEDOUT;
	if (e) /* ESRCH: gone already */
		(void)kill(-pid, SIGKILL), (void)kill(pid, SIGKILL);
	while (r == 0 && waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	run->pid = 0;
	/* Its stderr (a traceback) to slurmd's log; with no reply, its last line to the user. */
	data[(n = pread(run->err, data, sizeof data - 1, 0)) > 0 ? n : 0] = 0;
	for (n = (ssize_t)strlen(data); n > 0 && data[n - 1] == '\n';)
		data[--n] = 0;
	if (*data)
		slurm_error("rankwire: helper %s phase: %s", run->phase, data);
	if ((bad = e || !reply.len || !WIFEXITED(status) || WEXITSTATUS(status))) {
		line = strrchr(data, '\n') ? strrchr(data, '\n') + 1 : *data ? data : "no reply";
		snprintf(why, sizeof why, "no reply within %d s", run->timeout_s);
		rw_fail("rankwire: the helper's %s phase failed: %s", run->phase,
			e == ETIMEDOUT ? why : e == EMSGSIZE ? "a reply over 4 MiB" :
			e ? strerror(e) : line);
	} else if ((bad = frame_parse(reply.p, reply.len, fn, ctx))) {
		rw_fail("rankwire: bad reply from the helper's %s phase", run->phase);
	}
	rw_close(run->reply), rw_close(run->err), rw_close(run->pidfd), free(reply.p);
	return bad ? -1 : 0;
}

int rw_run_helper(const struct rw_helper *h, const char *phase, const struct buf *req,
		  const struct rw_job *as_user, const struct rw_fds *pass, struct rw_fds *got,
		  frame_fn *fn, void *ctx)
{
	struct rw_run run;

	return rw_spawn_helper(h, phase, as_user, pass, &run) ? -1 :
	       rw_finish_helper(&run, req, got, fn, ctx);
}
