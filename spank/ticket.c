/* Joining a job's named container without the helper (see shim.h): the ticket, root's
 * file BASE/SLURMD/JOB/.UID.join, holds what the helper's check and start phases replied
 * to the last step that ran them for this user's named container, keyed by that step's
 * request and by the files the check phase's decision read (its `depends` records: the
 * policy file, its keyring, the image) as they are: a later step whose request is the
 * same bar Slurm's per-step values (`step_values`), while those files are unchanged,
 * would get the same replies, so the shim joins the holder itself.
 *
 * Layout: "rankwire-join 1 ARGV KEYLEN SOCKLEN\n", the key (KEYLEN bytes: a frame of the
 * request's records that the phases' answers depend on and of each `depends` file's
 * identity), the holder's socket path (SOCKLEN bytes), then the replies' records (a
 * frame, to the end: those to replay, and `depends`). ARGV 1: the start phase read the
 * tasks' command (a two-MPI image), so the key holds it. */
#include "shim.h"

#include <sys/un.h>

#define TICKET_MAGIC "rankwire-join 1"
#define JOIN_WAIT_MS 5000 /* the holder's answer to `join`; else the helper runs */

/* Environment values Slurm makes anew for each step of a job (srun's ports, the step's
 * id, PMIx's per-step server): in the key by name only. An entry ending in '=' is a name,
 * the others are prefixes of names. The planners read none of these values for what a
 * join replies (the task environment leaves SLURM_*, PMI_* and PMIX_* to Slurm). */
static const char *const step_values[] = {"SLURM_STEP_ID=", "SLURM_STEPID=",
	"SLURM_SRUN_COMM_PORT=", "SLURM_STEP_LAUNCHER_PORT=", "SLURM_STEP_RESV_PORTS=",
	"SLURM_TASK_PID=", "SLURM_PMIXP_ABORT_AGENT_PORT=", "PMI_JOBID=", "PMIX_NAMESPACE=",
	"PMIX_SERVER_TMPDIR=", "PMIX_SERVER_URI", "PMIX_DSTORE_", NULL};

/* euid 0 for this thread only (libc's seteuid changes every thread of slurmstepd), and
 * back; user_init runs with the job user's euid and saved uid 0. */
static uid_t root_begin(void)
{
	uid_t eu = geteuid();
	return syscall(SYS_setresuid, -1, 0, -1) ? (uid_t)-1 : eu;
}

static void root_end(uid_t eu)
{
	if (eu != (uid_t)-1 && (syscall(SYS_setresuid, -1, eu, -1) || geteuid() != eu))
		abort(); /* from euid 0: cannot fail */
}

struct keying { struct buf *key; int argv; };

static void on_key(const char *k, char *v, void *ctx)
{
	struct keying *kg = ctx;

	if (!strcmp(k, "step_id") || !strcmp(k, "stepd_pid") || (!strcmp(k, "argv") && !kg->argv))
		return;
	if (!strcmp(k, "env") || !strcmp(k, "stepd_env"))
		for (const char *const *p = step_values; *p; p++)
			if (!strncmp(v, *p, strlen(*p))) {
				frame_add(kg->key, "step_value", "%s:%.*s", k, (int)strcspn(v, "="), v);
				return;
			}
	frame_add(kg->key, k, "%s", v);
}

/* A `depends` record of the replies: the file's identity now, as the job user sees it
 * (user_init's euid: as the check phase opened the image). */
static void on_depends(const char *k, char *v, void *ctx)
{
	struct stat s;

	if (strcmp(k, "depends"))
		return;
	if (stat(v, &s))
		frame_add(ctx, "file", "%s: %d", v, errno);
	else
		frame_add(ctx, "file", "%s: %ju %ju %jd %jd.%09ld %jd.%09ld", v,
			  (uintmax_t)s.st_dev, (uintmax_t)s.st_ino, (intmax_t)s.st_size,
			  (intmax_t)s.st_mtim.tv_sec, s.st_mtim.tv_nsec, (intmax_t)s.st_ctim.tv_sec,
			  s.st_ctim.tv_nsec);
}

/* `len` bytes of `from` parsed by fn on a copy; -1 when they are no frame. */
static int parse_copy(const char *from, size_t len, frame_fn *fn, void *ctx)
{
	char *copy = malloc(len ? len : 1);
	int rc = copy ? frame_parse(memcpy(copy, from, len), len, fn, ctx) : -1;

	return free(copy), rc;
}

/* The key: the request's first `len` bytes (the records put_facts and the plugstack
 * arguments made) bar what changes per step, then the replies' `depends` files as now. */
static void key_of(const struct buf *req, size_t len, int argv, const char *records,
		   size_t rlen, struct buf *key)
{
	struct keying kg = {key, argv};

	if (req->oom || parse_copy(req->p, len, on_key, &kg) ||
	    parse_copy(records, rlen, on_depends, key))
		key->oom = 1;
}

/* The job's dir, root's and writable by no one else (the check phase made it), or -1. */
static int open_dir(const char *dir)
{
	struct stat s;
	int fd = open(dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);

	if (fd >= 0 && (fstat(fd, &s) || s.st_uid != 0 || s.st_mode & 022))
		return rw_close(fd), -1;
	return fd;
}

static void ticket_name(char name[32], uid_t uid)
{
	snprintf(name, 32, ".%u.join", (unsigned)uid);
}

int rw_ticket_read(const char *dir, uid_t uid, const struct buf *req, size_t len, char *sock,
		   size_t sock_max, struct buf *records)
{
	char name[32], *rec = NULL;
	struct buf t = {0}, key = {0};
	struct stat s;
	size_t klen, slen, rlen;
	int dfd, fd = -1, argv, off = 0, ok = 0;
	ssize_t n;
	uid_t eu = root_begin();

	ticket_name(name, uid);
	if (eu != (uid_t)-1 && (dfd = open_dir(dir)) >= 0) {
		fd = openat(dfd, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
		rw_close(dfd);
	}
	if (fd >= 0 && !fstat(fd, &s) && S_ISREG(s.st_mode) && s.st_uid == 0 &&
	    !(s.st_mode & 077) && s.st_size > 0 && s.st_size <= 2 * FRAME_MAX) {
		char chunk[65536];
		while ((n = read(fd, chunk, sizeof chunk)) > 0)
			buf_put(&t, chunk, (size_t)n);
		ok = n == 0 && !t.oom && t.len == (size_t)s.st_size;
	}
	rw_close(fd);
	buf_put(&t, "", 1); /* sscanf stops at it */
	ok = ok && !t.oom &&
	     sscanf(t.p, TICKET_MAGIC " %d %zu %zu\n%n", &argv, &klen, &slen, &off) == 3 && off > 0 &&
	     t.p[off - 1] == '\n' &&
	     (argv == 0 || argv == 1) && klen <= t.len && slen < sock_max &&
	     (size_t)off + klen + slen < t.len;
	root_end(eu);
	if (ok) { /* the key as it is now (records that are no frame: no key) */
		rec = t.p + off + klen + slen, rlen = t.len - 1 - (size_t)off - klen - slen;
		key_of(req, len, argv, rec, rlen, &key);
	}
	ok = ok && !key.oom && key.len == klen && !memcmp(key.p, t.p + off, klen);
	if (ok) { /* the socket path */
		memcpy(sock, t.p + off + klen, slen), sock[slen] = 0;
		ok = strlen(sock) == slen;
	}
	if (ok)
		buf_put(records, rec, rlen), ok = !records->oom;
	free(t.p), free(key.p);
	return ok ? 0 : -1;
}

void rw_ticket_drop(const char *dir, uid_t uid)
{
	char name[32];
	int dfd;
	uid_t eu = root_begin();

	ticket_name(name, uid);
	if (eu != (uid_t)-1 && (dfd = open_dir(dir)) >= 0)
		(void)unlinkat(dfd, name, 0), rw_close(dfd);
	root_end(eu);
}

void rw_ticket_write(const char *dir, uid_t uid, const struct buf *req, size_t len, int argv,
		     const char *sock, const struct buf *records)
{
	char name[32], tmp[64], head[96];
	struct buf key = {0}, t = {0};
	int dfd = -1, fd = -1, ok = 0;
	uid_t eu;

	key_of(req, len, argv, records->p, records->len, &key); /* as the job user */
	eu = root_begin();
	ticket_name(name, uid);
	snprintf(tmp, sizeof tmp, "%s.%d", name, (int)getpid());
	if (eu != (uid_t)-1 && (dfd = open_dir(dir)) >= 0) {
		snprintf(head, sizeof head, TICKET_MAGIC " %d %zu %zu\n", argv, key.len,
			 strlen(sock));
		buf_put(&t, head, strlen(head)), buf_put(&t, key.p, key.len);
		buf_put(&t, sock, strlen(sock)), buf_put(&t, records->p, records->len);
		(void)unlinkat(dfd, tmp, 0);
		fd = openat(dfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
		ok = fd >= 0 && !key.oom && !t.oom && !records->oom &&
		     write(fd, t.p, t.len) == (ssize_t)t.len;
		rw_close(fd);
		if (fd >= 0 && !(ok && !renameat(dfd, tmp, dfd, name)))
			(void)unlinkat(dfd, tmp, 0); /* no ticket: the next step runs the helper */
		rw_close(dfd);
	}
	root_end(eu);
	free(key.p), free(t.p);
}

int rw_join_holder(const char *sock, uid_t uid, struct rw_fds *got)
{
	struct sockaddr_un a = {.sun_family = AF_UNIX};
	struct ucred cr = {0};
	socklen_t len = sizeof cr;
	int64_t deadline = rw_now_ms() + JOIN_WAIT_MS;
	int fd, line = 0;

	got->n = 0;
	if (strlen(sock) >= sizeof a.sun_path)
		return -1;
	strcpy(a.sun_path, sock);
	/* As the job user (user_init's euid), non-blocking (a full backlog: the helper runs);
	 * nothing is sent unless the job user's process answers. */
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) ||
	    getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &len) || cr.uid != uid ||
	    send(fd, "join\n", 5, MSG_NOSIGNAL) != 5)
		return rw_close(fd), -1;
	got->fd[got->n++] = fd;
	while (!line) { /* one line (the holder's report, unread) and its fds: user, mount ns */
		char data[4096], ctl[CMSG_SPACE(4 * sizeof(int))];
		struct iovec iov = {data, sizeof data};
		struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl,
				     .msg_controllen = sizeof ctl};
		int64_t left = deadline - rw_now_ms();
		ssize_t n;

		if (left <= 0 || poll(&(struct pollfd){fd, POLLIN, 0}, 1, (int)left) < 0)
			break;
		if ((n = recvmsg(fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC)) < 0 &&
		    (errno == EAGAIN || errno == EINTR))
			continue;
		for (struct cmsghdr *c = n > 0 ? CMSG_FIRSTHDR(&msg) : NULL; c;
		     c = CMSG_NXTHDR(&msg, c))
			if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
				for (size_t i = 0; i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int); i++) {
					int f;
					memcpy(&f, CMSG_DATA(c) + i * sizeof f, sizeof f);
					if (got->n < RW_MAX_FDS)
						got->fd[got->n++] = f;
					else
						rw_close(f);
				}
		if (n <= 0 || msg.msg_flags & MSG_CTRUNC)
			break;
		line = memchr(data, '\n', (size_t)n) != NULL;
	}
	if (line && got->n == 3) /* a PID namespace too: not a plugin's container */
		return 0;
	return rw_close_fds(got), got->n = 0, -1;
}
