/* Joining a job's named container without the helper (see shim.h): the ticket, root's
 * file BASE/SLURMD/JOB/.UID.join, holds what the helper's check and start phases replied
 * to the last step that ran them for this user's named container, keyed by that step's
 * request. A later step whose request is the same bar Slurm's per-step values
 * (`step_values`), while every file the check read is as it was then (the replies'
 * `depends` records: "root|user IDENTITY PATH", the identity as the helper saw it) and
 * the same holder answers, would get the same replies: the shim joins the holder itself.
 *
 * Layout: "rankwire-join 3 ARGV PID NS KEYLEN SOCKLEN\n", the key (KEYLEN bytes: a frame of
 * the request's records that the phases' answers depend on), the holder's socket path
 * (SOCKLEN bytes), then the replies' records (a frame, to the end: those to replay, and
 * `depends`). ARGV 1: the start phase read the tasks' command (a two-MPI image), so the
 * key holds it. PID and NS (its user and mount namespaces, "DEV:INO,DEV:INO"): the holder
 * that step joined.
 *
 * Reading the ticket's files is root's (a root-made dir); the rest (the `depends` files
 * as their reader saw them, the socket in the user's runtime dir) is a lookup in paths
 * a user may point at a FUSE mount they serve: it runs in a child that the deadline
 * kills, which hands back only a Unix socket and two namespace descriptors. */
#include "shim.h"

#include <dirent.h>
#include <sys/un.h>

#define TICKET_MAGIC "rankwire-join 3"
#define JOIN_WAIT_MS 5000 /* the whole fast join; else the helper runs */
#define SPECIAL_STEP 0xFFFFFFFAu /* and above: batch, extern, interactive (plan.SPECIAL_STEPS) */
#define END "end=1" /* the child's last record: what came is whole */

/* Environment values Slurm makes anew for each job or step (the job's and step's ids,
 * srun's ports, PMIx's per-step server): in the key by name only, as the request's job
 * and step ids and slurmstepd's pid are. An entry ending in '=' is a name, the others are
 * prefixes of names. The planners read none of these values for what a join replies (the
 * task environment leaves SLURM_*, PMI_* and PMIX_* to Slurm); the request lists them
 * (`step_value`), and a start phase that a fresh ticket would replay plans again with
 * them changed, and keeps no plugin plan if anything differs (spank/helper.py
 * `_plugin_plan`). */
const char *const rw_step_values[] = {"SLURM_JOB_ID=", "SLURM_JOBID=", "SLURM_STEP_ID=",
	"SLURM_STEPID=", "SLURM_JOB_START_TIME=", "SLURM_JOB_END_TIME=",
	"SLURM_SRUN_COMM_PORT=", "SLURM_STEP_LAUNCHER_PORT=", "SLURM_STEP_RESV_PORTS=",
	"SLURM_PMI2_SRUN_PORT=",
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

	if (!strcmp(k, "stepd_pid") || !strcmp(k, "job_id") || (!strcmp(k, "argv") && !kg->argv))
		return;
	if (!strcmp(k, "step_id")) { /* a real step's id is per step; a special one decides */
		frame_add(kg->key, "step_kind", "%s",
			  strtoul(v, NULL, 10) >= SPECIAL_STEP ? v : "real");
		return;
	}
	if (!strcmp(k, "env") || !strcmp(k, "stepd_env"))
		for (const char *const *p = rw_step_values; *p; p++)
			if (!strncmp(v, *p, strlen(*p))) {
				frame_add(kg->key, "step_value", "%s:%.*s", k, (int)strcspn(v, "="), v);
				return;
			}
	frame_add(kg->key, k, "%s", v);
}

/* `len` bytes of `from` parsed by fn on a copy; -1 when they are no frame. */
static int parse_copy(const char *from, size_t len, frame_fn *fn, void *ctx)
{
	char *copy = malloc(len ? len : 1);
	int rc = copy ? frame_parse(memcpy(copy, from, len), len, fn, ctx) : -1;

	return free(copy), rc;
}

/* The key: the request's first `len` bytes (the records put_facts and the plugstack
 * arguments made) bar what changes per step. */
static void key_of(const struct buf *req, size_t len, int argv, struct buf *key)
{
	struct keying kg = {key, argv};

	if (req->oom || parse_copy(req->p, len, on_key, &kg))
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

/* The namespaces of fds (user, mount) as "DEV:INO,DEV:INO", or "" */
static void ns_ids(const int fds[2], char out[96])
{
	struct stat u, m;

	*out = 0;
	if (!fstat(fds[0], &u) && !fstat(fds[1], &m))
		snprintf(out, 96, "%ju:%ju,%ju:%ju", (uintmax_t)u.st_dev, (uintmax_t)u.st_ino,
			 (uintmax_t)m.st_dev, (uintmax_t)m.st_ino);
}

void rw_ticket_write(const char *dir, uid_t uid, const struct buf *req, size_t len, int argv,
		     pid_t holder, const int ns[2], const char *sock, const struct buf *records)
{
	char name[32], tmp[64], head[256], ids[96];
	struct buf key = {0}, t = {0};
	int dfd = -1, fd = -1, ok = 0;
	uid_t eu;

	key_of(req, len, argv, &key);
	ns_ids(ns, ids);
	eu = root_begin();
	ticket_name(name, uid);
	snprintf(tmp, sizeof tmp, "%s.%d", name, (int)getpid());
	if (eu != (uid_t)-1 && *ids && (dfd = open_dir(dir)) >= 0) {
		snprintf(head, sizeof head, TICKET_MAGIC " %d %d %s %zu %zu\n", argv, (int)holder,
			 ids, key.len, strlen(sock));
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

/* The ticket `name` in dir, root's file read whole, NUL-terminated (t->len counts it); its
 * inode in *ino (not NULL). */
static int read_ticket(const char *dir, const char *name, struct buf *t, ino_t *ino)
{
	char chunk[65536];
	struct stat s;
	int dfd, fd = -1, ok = 0;
	ssize_t n = -1;
	uid_t eu = root_begin();

	if (eu != (uid_t)-1 && (dfd = open_dir(dir)) >= 0) {
		fd = openat(dfd, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
		rw_close(dfd);
	}
	if (fd >= 0 && !fstat(fd, &s) && S_ISREG(s.st_mode) && s.st_uid == 0 &&
	    !(s.st_mode & 077) && s.st_size > 0 && s.st_size <= 2 * FRAME_MAX) {
		while ((n = read(fd, chunk, sizeof chunk)) > 0)
			buf_put(t, chunk, (size_t)n);
		ok = n == 0 && !t->oom && t->len == (size_t)s.st_size;
		if (ino)
			*ino = s.st_ino;
	}
	rw_close(fd);
	root_end(eu);
	buf_put(t, "", 1);
	return ok && !t->oom ? 0 : -1;
}

/* A `depends` record ("root|user IDENTITY PATH"): still the file the helper read? The
 * identity as runtime/.. spank/helper.py `_identity` makes it. */
static void on_depends(const char *k, char *v, void *ctx)
{
	int *same = ctx, root;
	char now[128], *ident, *path;
	size_t ilen;
	struct stat s;
	uid_t eu = (uid_t)-1;

	if (strcmp(k, "depends") || !*same)
		return;
	root = !strncmp(v, "root ", 5);
	if (!root && strncmp(v, "user ", 5))
		return (void)(*same = 0);
	ident = v + 5, ilen = strcspn(ident, " "), path = ident + ilen + (ident[ilen] == ' ');
	if (root)
		eu = root_begin();
	*same = (!root || eu != (uid_t)-1) && !stat(path, &s) &&
		snprintf(now, sizeof now, "%ju:%ju:%jd:%jd:%jd", (uintmax_t)s.st_dev,
			 (uintmax_t)s.st_ino, (intmax_t)s.st_size,
			 (intmax_t)s.st_mtim.tv_sec * 1000000000 + s.st_mtim.tv_nsec,
			 (intmax_t)s.st_ctim.tv_sec * 1000000000 + s.st_ctim.tv_nsec) < (int)sizeof now &&
		strlen(now) == ilen && !memcmp(now, ident, ilen);
	if (root)
		root_end(eu);
}

/* `join` at sock, answered by the process `pid` of uid: 0 and [lease, user ns, mount ns]
 * in got, each checked for its kind. Nothing is sent to any other process. */
static int join_holder(const char *sock, uid_t uid, pid_t pid, const char *ns,
		       struct rw_fds *got)
{
	char ids[96];
	union { struct cmsghdr align; char b[CMSG_SPACE(4 * sizeof(int))]; } ctl;
	struct sockaddr_un a = {.sun_family = AF_UNIX};
	struct ucred cr = {0};
	socklen_t len = sizeof cr;
	int64_t deadline = rw_now_ms() + JOIN_WAIT_MS;
	int fd, line = 0;

	got->n = 0;
	if (strlen(sock) >= sizeof a.sun_path)
		return -1;
	strcpy(a.sun_path, sock);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) ||
	    getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &len) || cr.uid != uid || cr.pid != pid ||
	    send(fd, "join\n", 5, MSG_NOSIGNAL) != 5)
		return rw_close(fd), -1;
	got->fd[got->n++] = fd;
	while (!line) { /* one line (the holder's report, unread) and its fds: user, mount ns */
		char data[4096];
		struct iovec iov = {data, sizeof data};
		struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.b,
				     .msg_controllen = sizeof ctl.b};
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
	/* Three, and namespaces of the right kinds (a PID namespace too: not the plugin's) */
	if (line && got->n == 3 && ioctl(got->fd[1], NS_GET_NSTYPE) == CLONE_NEWUSER &&
	    ioctl(got->fd[2], NS_GET_NSTYPE) == CLONE_NEWNS &&
	    (ns_ids(got->fd + 1, ids), !strcmp(ids, ns))) /* that very holder's, not a pid's */
		return 0;
	return rw_close_fds(got), got->n = 0, -1;
}

/* The child's part: the ticket, its key, its files, its holder; then the records to replay
 * and [lease, user ns, mount ns] to `out`. Exits; sends nothing when anything differs. */
static void __attribute__((noreturn))
fast_child(const char *dir, uid_t uid, const struct buf *req, size_t len, int out)
{
	struct buf t = {0}, key = {0};
	struct rw_fds got = {.n = 0};
	int argv, holder, off = 0, same = 1;
	size_t klen, slen, rlen;
	char sock[108], ns[96], *rec, name[32];

	ticket_name(name, uid);
	if (read_ticket(dir, name, &t, NULL) ||
	    sscanf(t.p, TICKET_MAGIC " %d %d %95s %zu %zu\n%n", &argv, &holder, ns, &klen, &slen,
		   &off) != 5 ||
	    off <= 0 || t.p[off - 1] != '\n' || (argv != 0 && argv != 1) || klen > t.len ||
	    slen >= sizeof sock || (size_t)off + klen + slen >= t.len)
		_exit(0);
	key_of(req, len, argv, &key);
	if (key.oom || key.len != klen || memcmp(key.p, t.p + off, klen))
		_exit(0);
	memcpy(sock, t.p + off + klen, slen), sock[slen] = 0;
	rec = t.p + off + klen + slen, rlen = t.len - 1 - (size_t)off - klen - slen;
	if (strlen(sock) != slen || parse_copy(rec, rlen, on_depends, &same) || !same ||
	    join_holder(sock, uid, (pid_t)holder, ns, &got))
		_exit(0);
	{ /* the records, then END (the parent takes nothing that does not end so) */
		union { struct cmsghdr align; char b[CMSG_SPACE(3 * sizeof(int))]; } ctl = {0};
		struct buf all = {0};
		buf_put(&all, rec, rlen), buf_put(&all, END, sizeof END);
		struct iovec iov = {all.p, all.len};
		struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.b,
				     .msg_controllen = sizeof ctl.b};
		struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
		ssize_t n = 0;

		c->cmsg_level = SOL_SOCKET, c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(3 * sizeof(int));
		memcpy(CMSG_DATA(c), got.fd, 3 * sizeof(int));
		for (size_t done = 0; !all.oom && done < all.len && n >= 0; done += (size_t)n)
			n = done ? send(out, all.p + done, all.len - done, MSG_NOSIGNAL) :
				   sendmsg(out, &msg, MSG_NOSIGNAL);
	}
	_exit(0);
}

int rw_fast_join(const char *dir, uid_t uid, const struct buf *req, size_t len,
		 struct rw_fds *got, struct buf *records)
{
	int sv[2], pidfd, e, status;
	int64_t deadline = rw_now_ms() + JOIN_WAIT_MS;
	pid_t pid;

	got->n = 0;
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv))
		return -1;
	if ((pid = fork()) == 0) {
		rw_close(sv[0]);
		fast_child(dir, uid, req, len, sv[1]);
	}
	rw_close(sv[1]);
	if (pid < 0)
		return rw_close(sv[0]), -1;
	pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
	e = rw_read_frame(sv[0], pidfd, deadline, got, records);
	if (e) { /* stuck in a lookup the deadline ends (a FUSE request may outlive SIGKILL) */
		(void)kill(pid, SIGKILL), (void)poll(&(struct pollfd){pidfd, POLLIN, 0}, 1, 1000);
		(void)waitpid(pid, &status, WNOHANG); /* else a zombie until slurmstepd ends */
	} else { /* it exited (its end of the socket closed with it): reaped at once */
		while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
			;
	}
	rw_close(sv[0]), rw_close(pidfd);
	if (!e && got->n == 3 && !records->oom && records->len > sizeof END &&
	    !memcmp(records->p + records->len - sizeof END, END, sizeof END)) {
		records->len -= sizeof END;
		return 0;
	}
	rw_close_fds(got), got->n = 0, records->len = 0;
	return -1;
}

/* ---- A fresh container without the helper ------------------------------------------
 * A fresh ticket, root's file /run/rankwire/.UID.B.K.start (B: a hash of what
 * init_post_opt knows of the request, rankwire_spank.c `fresh_bucket`; K: a hash of the
 * key; the FRESH_KEPT written or used last of a user's stay), holds what the helper's
 * phases replied to a step that ran them and started a container of its own
 * (spank/plan.py `starts_fresh`, spank/helper.py `_plugin_plan`), keyed by its request
 * as a named ticket is, in any job of the user. A later step with the same key, while the
 * files root's check read are as they were (`depends` "root ..."), has the C front end
 * start its container (`rankwire spank-helper start-kept`, runtime/front.c
 * `plugin_start`), run as exactly the job user as the start phase is: it opens the image
 * and the binds' sources as the check did and checks them against the ticket, checks
 * the plugin plan's key (the host, the code), makes the container from its recipe and
 * hands over the lease. Then the step replays the ticket's replies. Requests that differ
 * only where init_post_opt cannot see (srun --chdir, the command, plugstack.conf: srun's
 * environment is the same) have tickets of their own under one B.
 *
 * Layout: "rankwire-start 1 ARGV KEYLEN\n", the key, then the replies' records. */
#define FRESH_MAGIC "rankwire-start 1"
#define FRESH_KEPT 16
#define FRESH_SEEN 64 /* names one look at the dir takes (FRESH_KEPT, and some written since) */
#define FRESH_MAX (256 << 10) /* a ticket's bytes: /run is memory, kept until reboot */

typedef char fresh_name_t[sizeof ((struct rw_fresh *)0)->name];

uint64_t rw_fnv1a(uint64_t h, const void *data, size_t n)
{
	for (size_t i = 0; i < n; i++)
		h = (h ^ ((const unsigned char *)data)[i]) * 0x100000001b3ULL;
	return h;
}

/* The names of uid's fresh tickets in dir `dfd` (of requests of `*bucket` only, unless
 * NULL), at most FRESH_SEEN, in `names`: their count. */
static int fresh_names(int dfd, uid_t uid, const unsigned long *bucket, fresh_name_t *names)
{
	char prefix[48];
	int n = 0, fd = openat(dfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC); /* own offset */
	size_t plen = (size_t)(bucket ? snprintf(prefix, sizeof prefix, ".%u.%016lx.",
						 (unsigned)uid, *bucket) :
					snprintf(prefix, sizeof prefix, ".%u.", (unsigned)uid));
	DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
	struct dirent *e;

	if (!d)
		return rw_close(fd), 0;
	while (n < FRESH_SEEN && (e = readdir(d))) {
		size_t len = strlen(e->d_name);
		if (!strncmp(e->d_name, prefix, plen) && len < sizeof *names && len > plen + 6 &&
		    !strcmp(e->d_name + len - 6, ".start"))
			strcpy(names[n++], e->d_name);
	}
	closedir(d);
	return n;
}

/* Only the FRESH_KEPT tickets of uid written or used last stay (a kind of step run once
 * leaves none for ever). */
static void prune_fresh(int dfd, uid_t uid)
{
	fresh_name_t names[FRESH_SEEN];
	struct timespec at[FRESH_SEEN];
	struct stat s;
	int n = fresh_names(dfd, uid, NULL, names);

	for (int i = 0; i < n; i++)
		at[i] = fstatat(dfd, names[i], &s, AT_SYMLINK_NOFOLLOW) ? (struct timespec){0, 0} :
			s.st_mtim;
	for (; n > FRESH_KEPT; n--) { /* the oldest goes, the last takes its place */
		int old = 0;
		for (int i = 1; i < n; i++)
			if (at[i].tv_sec < at[old].tv_sec ||
			    (at[i].tv_sec == at[old].tv_sec && at[i].tv_nsec < at[old].tv_nsec))
				old = i;
		(void)unlinkat(dfd, names[old], 0);
		if (old != n - 1)
			strcpy(names[old], names[n - 1]), at[old] = at[n - 1];
	}
}

int rw_fresh_ticket_exists(uid_t uid, unsigned long bucket)
{
	fresh_name_t names[FRESH_SEEN];
	int dfd, there = 0;
	uid_t eu = root_begin();

	if (eu != (uid_t)-1 && (dfd = open_dir(RW_RUN_DIR)) >= 0)
		there = fresh_names(dfd, uid, &bucket, names) > 0, rw_close(dfd);
	root_end(eu);
	return there;
}

void rw_fresh_write(uid_t uid, unsigned long bucket, const struct buf *req, size_t len, int argv,
		    const struct buf *records)
{
	char tmp[96], head[128];
	fresh_name_t name;
	struct buf key = {0}, t = {0};
	int dfd = -1, fd = -1, ok = 0;
	uint64_t h;
	uid_t eu;

	key_of(req, len, argv, &key);
	h = rw_fnv1a(RW_FNV_START, key.p, key.len);
	eu = root_begin();
	snprintf(name, sizeof name, ".%u.%016lx.%016llx.start", (unsigned)uid, bucket,
		 (unsigned long long)h);
	snprintf(tmp, sizeof tmp, "%s.%d", name, (int)getpid());
	if (eu != (uid_t)-1 && (dfd = open_dir(RW_RUN_DIR)) >= 0) {
		snprintf(head, sizeof head, FRESH_MAGIC " %d %zu\n", argv, key.len);
		buf_put(&t, head, strlen(head)), buf_put(&t, key.p, key.len);
		buf_put(&t, records->p, records->len);
		(void)unlinkat(dfd, tmp, 0);
		fd = t.len <= FRESH_MAX ? openat(dfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW |
						 O_CLOEXEC, 0600) : -1;
		ok = fd >= 0 && !key.oom && !t.oom && !records->oom && !fchown(fd, 0, 0) &&
		     write(fd, t.p, t.len) == (ssize_t)t.len;
		rw_close(fd);
		if (fd >= 0 && !(ok && !renameat(dfd, tmp, dfd, name)))
			(void)unlinkat(dfd, tmp, 0);
		prune_fresh(dfd, uid);
		rw_close(dfd);
	}
	root_end(eu);
	free(key.p), free(t.p);
}

/* A ticket's records for the front end's request: what it opens, the plan it starts. */
static void on_fresh(const char *k, char *v, void *ctx)
{
	if (!strcmp(k, "fresh_image") || !strcmp(k, "fresh_bind"))
		frame_add(ctx, k, "%s", v);
	else if (!strcmp(k, "fresh_plan"))
		frame_add(ctx, "plan", "%s", v);
}

/* root's `depends` only (the user's, the image, the front end checks by opening it):
 * ctx[0] stays 1 while each holds, ctx[1] counts them. */
static void on_root_depends(const char *k, char *v, void *ctx)
{
	if (!strcmp(k, "depends") && !strncmp(v, "root ", 5))
		on_depends(k, v, ctx), ((int *)ctx)[1]++;
}

/* Every root `depends` of the records (one at least) is the file root's check read:
 * looked up in a child that the deadline kills (a path may be on a file system that
 * hangs), which says so on a pipe ("1", then EOF at its exit): its exit status is not
 * read (another may reap it), nor a pidfd needed. */
static int root_depends_hold(const struct buf *records)
{
	int p[2], status, same[2] = {1, 0}, got = 0, ended = 0;
	int64_t deadline = rw_now_ms() + JOIN_WAIT_MS, left;
	char said = 0;
	pid_t pid;

	if (pipe2(p, O_CLOEXEC))
		return 0;
	if ((pid = fork()) == 0) {
		rw_close(p[0]);
		if (!parse_copy(records->p, records->len, on_root_depends, same) && same[0] &&
		    same[1])
			(void)!write(p[1], "1", 1);
		_exit(0);
	}
	rw_close(p[1]);
	while (pid > 0 && !ended && (left = deadline - rw_now_ms()) > 0) {
		int r = poll(&(struct pollfd){p[0], POLLIN, 0}, 1, (int)left);
		ssize_t n;
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) /* the deadline */
			break;
		if ((n = read(p[0], &said, 1)) == 1)
			got = said == '1';
		else if (n == 0) /* EOF: it is exiting */
			ended = 1;
		else if (errno != EINTR && errno != EAGAIN)
			break;
	}
	rw_close(p[0]);
	if (pid > 0 && ended) /* closed at its exit: a zombie at once */
		while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
			;
	else if (pid > 0) { /* ours until reaped: no pid reuse. Stuck in a lookup, it may
			       * outlive SIGKILL for a while (a FUSE request): not waited for */
		got = 0, (void)kill(pid, SIGKILL);
		for (int i = 0; i < 100 && waitpid(pid, &status, WNOHANG) == 0; i++)
			(void)poll(NULL, 0, 10);
	}
	return got;
}

void rw_fresh_used(const struct rw_fresh *f, int hit)
{
	struct stat s;
	int dfd;
	uid_t eu = root_begin();

	/* still the file read (a helper of the same request may have renamed its own there) */
	if (eu != (uid_t)-1 && *f->name && (dfd = open_dir(RW_RUN_DIR)) >= 0) {
		if (!fstatat(dfd, f->name, &s, AT_SYMLINK_NOFOLLOW) && s.st_ino == f->ino)
			(void)(hit ? utimensat(dfd, f->name, NULL, AT_SYMLINK_NOFOLLOW) :
				     unlinkat(dfd, f->name, 0));
		rw_close(dfd);
	}
	root_end(eu);
}

static void on_started(const char *k, char *v, void *ctx)
{
	if (!strcmp(k, "started") && !strcmp(v, "1"))
		*(int *)ctx = 1;
}

/* The fresh ticket `name`, if its key is the request's: 0, and its records (after the
 * key) in `records`. */
static int fresh_match(const char *name, const struct buf *req, size_t len, struct buf *records,
		       ino_t *ino)
{
	struct buf t = {0}, key = {0};
	int argv, off = 0, rc = -1;
	size_t klen;

	if (!read_ticket(RW_RUN_DIR, name, &t, ino) &&
	    sscanf(t.p, FRESH_MAGIC " %d %zu\n%n", &argv, &klen, &off) == 2 && off > 0 &&
	    t.p[off - 1] == '\n' && (argv == 0 || argv == 1) && klen < t.len - (size_t)off &&
	    (key_of(req, len, argv, &key), !key.oom) && key.len == klen &&
	    !memcmp(key.p, t.p + off, klen)) {
		buf_put(records, t.p + off + klen, t.len - 1 - (size_t)off - klen);
		rc = records->oom ? -1 : 0;
	}
	free(t.p), free(key.p);
	return rc;
}

int rw_fresh_start(const struct rw_helper *h, const struct rw_job *job, unsigned long bucket,
		   const struct buf *req, size_t len, struct rw_fds *got, struct buf *records,
		   struct rw_fresh *used)
{
	fresh_name_t names[FRESH_SEEN];
	struct buf front = {0};
	struct rw_fds none = {.n = 0};
	int n = 0, at = -1, started = 0, rc = -1, dfd;
	uid_t eu = root_begin();

	got->n = 0, *used->name = 0;
	if (eu != (uid_t)-1 && (dfd = open_dir(RW_RUN_DIR)) >= 0)
		n = fresh_names(dfd, job->uid, &bucket, names), rw_close(dfd);
	root_end(eu);
	for (int i = 0; i < n && at < 0; i++) /* a few at most: one per directory, command */
		if (!fresh_match(names[i], req, len, records, &used->ino))
			at = i;
	if (at < 0)
		goto out;
	_Static_assert(sizeof used->name == sizeof names[0], "a ticket's name");
	strcpy(used->name, names[at]);
	frame_add(&front, "runtime_dir", RW_RUN_DIR "/%u", (unsigned)job->uid);
	frame_add(&front, "owner", "%d", (int)getpid());
	if (parse_copy(records->p, records->len, on_fresh, &front) || !root_depends_hold(records))
		goto out;
	if (!rw_run_helper(h, "start-kept", &front, job, &none, got, on_started, &started) &&
	    started && got->n == 3)
		rc = 0;
out:
	if (rc)
		rw_close_fds(got), got->n = 0, records->len = 0;
	free(front.p);
	return rc;
}
