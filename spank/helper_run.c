/* Running the helper: no shell, no user string in argv, every id change checked. */
#include "shim.h"

#define MUST(ok) do { if (!(ok)) _exit(126); } while (0) /* in the child */

static void __attribute__((noreturn))
helper_child(const char *helper, const char *phase, int sock, int errfd, int pass_fd,
	     const struct rw_job *job)
{
	char *const argv[] = {(char *)helper, "spank-helper", (char *)phase, NULL};
	char *const envp[] = {"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C.UTF-8", NULL};
	int in = fcntl(sock, F_DUPFD, 10), err = fcntl(errfd, F_DUPFD, 10);
	int pass = pass_fd >= 0 ? fcntl(pass_fd, F_DUPFD, 10) : -1, first = pass_fd >= 0 ? 4 : 3;
	uid_t uid = job ? job->uid : 0, ru, eu, su;
	gid_t gid = job ? job->gid : 0, rg, eg, sg;
	sigset_t none;

	MUST(in >= 0 && err >= 0 && (pass_fd < 0 || pass >= 0));
	MUST(sigemptyset(&none) == 0 && sigprocmask(SIG_SETMASK, &none, NULL) == 0);
	for (int sig = 1; sig < NSIG; sig++) /* SIGKILL, SIGSTOP, libc's: refuse, are SIG_DFL */
		(void)signal(sig, SIG_DFL);
	/* slurmstepd runs user_init with euid = the user and saved uid 0: take root back,
	 * then become exactly root (check) or exactly the job user (start). */
	MUST(seteuid(0) == 0);
	MUST(setgroups(job ? (size_t)job->ngids : 0, job ? job->gids : NULL) == 0);
	MUST(setresgid(gid, gid, gid) == 0);
	MUST(setresuid(uid, uid, uid) == 0);
	MUST(getresuid(&ru, &eu, &su) == 0 && ru == uid && eu == uid && su == uid);
	MUST(getresgid(&rg, &eg, &sg) == 0 && rg == gid && eg == gid && sg == gid);
	MUST(uid == 0 || setuid(0) != 0); /* and no way back */
	MUST(dup2(in, 0) == 0 && dup2(in, 1) == 1 && dup2(err, 2) == 2);
	MUST((pass < 0 || dup2(pass, 3) == 3) && chdir("/") == 0);
	if (syscall(SYS_close_range, first, ~0U, 0)) {
		MUST(errno == ENOSYS); /* before Linux 5.9: one by one; EBADF: was not open */
		for (int fd = first; fd < 65536; fd++)
			MUST(close(fd) == 0 || errno == EBADF);
	}
	umask(022);
	execve(helper, argv, envp);
	(void)dprintf(2, "cannot run %s: %s\n", helper, strerror(errno)); /* else: exit code */
	_exit(127);
}

/* The reply until EOF (an fd that comes with it into *fd_out): NULL, or why none. */
static const char *read_reply(int fd, int *fd_out, struct buf *reply)
{
	char data[65536], ctl[CMSG_SPACE(sizeof(int))];
	struct cmsghdr *c;
	int got;

	for (;;) {
		struct iovec iov = {data, sizeof data};
		struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl,
				     .msg_controllen = sizeof ctl};
		ssize_t n = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC); /* SO_RCVTIMEO: 600 s */
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno != ECONNRESET) /* reset: it left some of the request unread */
			return errno == EAGAIN ? "no reply within 600 s" : strerror(errno);
		if (n <= 0)
			return reply->oom ? "out of memory" : NULL;
		if (reply->len + (size_t)n > FRAME_MAX)
			return "a reply over 4 MiB";
		if ((c = CMSG_FIRSTHDR(&msg)) && c->cmsg_type == SCM_RIGHTS) { /* room for one */
			memcpy(&got, CMSG_DATA(c), sizeof got);
			if (fd_out && *fd_out < 0)
				*fd_out = got;
			else
				rw_close(got);
		}
		buf_put(reply, data, (size_t)n);
	}
}

int rw_run_helper(const char *helper, const char *phase, const struct buf *req,
		  const struct rw_job *as_user, int pass_fd, int *fd_out, struct buf *reply)
{
	int fds[3] = {-1, -1, -1}, status = 0; /* the socketpair, the memfd */
	char data[65536], *line;
	const char *why;
	struct timeval tv = {HELPER_TIMEOUT_MS / 1000, 0};
	struct stat sb;
	pid_t pid;
	ssize_t n;

	if (stat(helper, &sb) || sb.st_uid != 0 || (sb.st_mode & 022)) {
		rw_fail("rankwire: the helper %s must exist, be owned by root and not be "
			"group/world-writable (plugstack.conf helper=)", helper);
		return -1;
	}
	if (req->oom || socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) ||
	    (fds[2] = memfd_create("rankwire-helper", MFD_CLOEXEC)) < 0 || (pid = fork()) < 0) {
		rw_fail("rankwire: cannot run the helper: %s", strerror(req->oom ? ENOMEM : errno));
		for (int i = 0; i < 3; i++)
			rw_close(fds[i]); /* -1: EBADF, harmless */
		return -1;
	}
	if (pid == 0)
		helper_child(helper, phase, fds[1], fds[2], pass_fd, as_user);
	rw_close(fds[1]);
	/* The request, then EOF. A helper that stops reading early (EPIPE) has replied or
	 * died: its reply says why; one that takes nothing for 600 s is killed. */
	int bad = setsockopt(fds[0], SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) ||
		  setsockopt(fds[0], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	for (size_t off = 0; !bad && off < req->len; off += n > 0 ? (size_t)n : 0)
		bad = (n = send(fds[0], req->p + off, req->len - off, MSG_NOSIGNAL)) < 0 &&
		      errno != EINTR;
	if ((bad || shutdown(fds[0], SHUT_WR)) && errno != EPIPE && errno != ECONNRESET)
		why = errno == EAGAIN ? "it took no request in 600 s" : strerror(errno);
	else
		why = read_reply(fds[0], fd_out, reply);
	if (why)
		(void)kill(pid, SIGKILL); /* ESRCH: it is gone already */
	rw_close(fds[0]);
	while (waitpid(pid, &status, 0) < 0 && errno == EINTR) /* ECHILD: the reply decides */
		;
	/* What the helper wrote to stderr (a traceback) goes to slurmd's log; with no reply,
	 * its last line also goes to the user. Unreadable: there is no more to say. */
	n = pread(fds[2], data, sizeof data - 1, 0);
	rw_close(fds[2]);
	data[n > 0 ? n : 0] = 0;
	for (n = (ssize_t)strlen(data); n > 0 && data[n - 1] == '\n';)
		data[--n] = 0;
	if (*data)
		slurm_error("rankwire: helper %s phase: %s", phase, data);
	if (why || !reply->len || !WIFEXITED(status) || WEXITSTATUS(status)) {
		line = strrchr(data, '\n') ? strrchr(data, '\n') + 1 : data;
		rw_fail("rankwire: the helper's %s phase failed: %s", phase,
			why ? why : *line ? line : "no reply");
		return -1;
	}
	return 0;
}
