/*
 * rankwire SPANK shim: `srun --container-image=app.sif ./mpi_app` (or srun --container=).
 *
 * Mechanism only; every decision is the Python helper's (`rankwire spank-helper`):
 *   user_init (slurmstepd, once per node): run the helper twice -- "check" as root (site
 *     policy; it opens the image and hands us the descriptor) and "start" as the job user
 *     (plans and starts the node's shared container from that very descriptor) -- then
 *     join the container's holder: its namespace fds, and the connection as the step's
 *     lease. Failures are kept for task_init: Slurm 22.05 does not report user_init's.
 *   task_init (each task, forked, as the user): setns user + mount, chdir, env.
 *   task_exit (slurmstepd): after the last task, leave; the holder tears down.
 * The helper runs by fork + setresuid + execve with a fixed environment; JSON goes over a
 * socketpair (the image fd travels with SCM_RIGHTS). No shell, no user string in argv.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <slurm/spank.h>

SPANK_PLUGIN(rankwire, 1);

#ifndef RANKWIRE_HELPER
#define RANKWIRE_HELPER "/usr/local/bin/rankwire"
#endif
#define REPLY_MAX (4 << 20)
#define HELPER_TIMEOUT_MS (600 * 1000)
#define HOLDER_WAIT_MS 10000

enum { O_IMAGE, O_MOUNTS, O_WORKDIR, O_ENV, O_WRITABLE, O_FABRIC, O_REMAP_ROOT, N_OPTS };
static char *opt_val[N_OPTS];

static struct spank_option options[];

/* A flag arrives remotely as "" (not NULL): store "1" for every flag. */
static int opt_cb(int val, const char *arg, int remote)
{
	if (val < 0 || val >= N_OPTS)
		return -1;
	free(opt_val[val]);
	opt_val[val] = strdup(options[val].has_arg && arg ? arg : "1");
	return opt_val[val] ? 0 : -1;
}

static struct spank_option options[] = {
	{"container-image", "IMG", "Run the tasks in SIF image IMG (also RANKWIRE_CONTAINER_IMAGE;"
	 " srun --container=IMG works too)", 1, O_IMAGE, opt_cb},
	{"container-mounts", "SRC[:DST[:ro]][,...]", "Bind host paths into the container", 1,
	 O_MOUNTS, opt_cb},
	{"container-workdir", "DIR", "Working directory inside the container", 1, O_WORKDIR, opt_cb},
	{"container-env", "NAME[,...]", "Keep the host value of these variables over the image's",
	 1, O_ENV, opt_cb},
	{"container-writable", NULL, "Let tasks write to the image (changes end with the step)", 0,
	 O_WRITABLE, opt_cb},
	{"container-fabric", "auto|none|PROV", "Host libfabric provider to bind (default auto)", 1,
	 O_FABRIC, opt_cb},
	{"container-remap-root", NULL, "Be root (uid 0) inside the container", 0, O_REMAP_ROOT,
	 opt_cb},
	SPANK_OPTIONS_TABLE_END
};

struct buf { char *p; size_t len, cap; };

/* Per-step state in slurmstepd; each forked task has its copy. */
static struct {
	int active, userns, mntns, lease, tasks, exited;
	pid_t holder;
	char *error, *workdir, *env; /* env: the start reply, parsed again by each task */
} st = {.userns = -1, .mntns = -1, .lease = -1};

static void put(struct buf *b, const char *s, size_t n)
{
	if (b->len + n + 1 > b->cap) {
		b->cap = (b->cap ? b->cap * 2 : 4096) + n;
		if (!(b->p = realloc(b->p, b->cap)))
			abort();
	}
	memcpy(b->p + b->len, s, n);
	b->len += n;
	b->p[b->len] = 0;
}

static void puts_(struct buf *b, const char *s) { put(b, s, strlen(s)); }

/* A JSON string; bytes >= 0x80 go as they are (the helper decodes with surrogateescape). */
static void put_str(struct buf *b, const char *s)
{
	char esc[8];
	put(b, "\"", 1);
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;
		int n = c == '"' || c == '\\' ? snprintf(esc, sizeof esc, "\\%c", c)
			: c < 0x20 ? snprintf(esc, sizeof esc, "\\u%04x", c) : 0;
		put(b, n ? esc : s, n ? (size_t)n : 1);
	}
	put(b, "\"", 1);
}

/* `open`, then the strings v[0..n) (n < 0: up to NULL) as a JSON array. */
static void put_strs(struct buf *b, const char *open, char *const *v, int n)
{
	puts_(b, open);
	for (int i = 0; n < 0 ? v && v[i] : i < n; i++) {
		puts_(b, i ? "," : "");
		put_str(b, v[i]);
	}
	puts_(b, "]");
}

/* Keep the first one-line error; task_init reports it to srun. */
static void __attribute__((format(printf, 1, 2))) fail(const char *fmt, ...)
{
	char msg[1024];
	va_list ap;
	if (st.error)
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	st.error = strdup(msg);
}

/*
 * Replies are flat JSON objects of strings and arrays of strings, written by Python with
 * ensure_ascii=False: the only \u escapes are control characters and surrogateescape'd
 * raw bytes (\udc80-\udcff). Unescaped in place; fn(key, value, ctx) is called per string
 * or array item. Anything else: -1.
 */
static char *scan_str(char **sp)
{
	static const char from[] = "\"\\/bfnrt", to[] = "\"\\/\b\f\n\r\t";
	char *s = *sp + 1, *o = s, *start = s, hex[5] = {0};
	const char *e;
	for (; *s != '"'; s++) {
		if (!*s)
			return NULL;
		if (*s != '\\') {
			*o++ = *s;
		} else if (*++s == 'u' && strlen(s) >= 5) {
			unsigned cp = (unsigned)strtoul(memcpy(hex, s + 1, 4), NULL, 16);
			if (cp >= 0x80 && (cp < 0xdc80 || cp > 0xdcff))
				return NULL;
			*o++ = (char)(cp & 0xff);
			s += 4;
		} else if (*s && (e = strchr(from, *s))) {
			*o++ = to[e - from];
		} else {
			return NULL;
		}
	}
	*o = 0;
	*sp = s + 1;
	return start;
}

static void ws(char **s) { *s += strspn(*s, " \t\r\n"); }

static int parse_reply(char *s, void (*fn)(const char *, char *, void *), void *ctx)
{
	char *key, *val;
	ws(&s);
	if (*s++ != '{')
		return -1;
	for (ws(&s); *s != '}'; ws(&s)) {
		if (*s != '"' || !(key = scan_str(&s)))
			return -1;
		ws(&s);
		if (*s++ != ':')
			return -1;
		ws(&s);
		int array = *s == '[';
		for (s += array, ws(&s); !array || *s != ']'; ws(&s)) {
			if (*s != '"' || !(val = scan_str(&s)))
				return -1;
			fn(key, val, ctx);
			ws(&s);
			if (!array)
				break;
			s += *s == ',';
		}
		s += array;
		ws(&s);
		if (*s == ',')
			s++;
		else if (*s != '}')
			return -1;
	}
	return 0;
}

/* ---- the helper ------------------------------------------------------------------ */

struct job { uid_t uid; gid_t gid; gid_t *gids; int ngids; };

static void __attribute__((noreturn))
helper_child(const char *helper, const char *phase, int sock, int errfd, int pass_fd,
	     const struct job *job)
{
	char *const argv[] = {(char *)helper, "spank-helper", (char *)phase, NULL};
	char *const envp[] = {"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C.UTF-8", NULL};
	int fds[3] = {fcntl(sock, F_DUPFD, 10), fcntl(errfd, F_DUPFD, 10),
		      pass_fd >= 0 ? fcntl(pass_fd, F_DUPFD, 10) : -1};
	sigset_t none;

	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	for (int sig = 1; sig < NSIG; sig++)
		signal(sig, SIG_DFL);
	/* slurmstepd runs user_init with euid = the user and saved uid 0: take root back,
	 * then become exactly root or exactly the job user. */
	if (seteuid(0) || (job ? setgroups((size_t)job->ngids, job->gids) ||
				 setresgid(job->gid, job->gid, job->gid) ||
				 setresuid(job->uid, job->uid, job->uid)
			       : setgroups(0, NULL) || setresgid(0, 0, 0) || setresuid(0, 0, 0)))
		_exit(126);
	if (dup2(fds[0], 0) < 0 || dup2(fds[0], 1) < 0 || dup2(fds[1], 2) < 0 ||
	    (fds[2] >= 0 && dup2(fds[2], 3) < 0) || chdir("/"))
		_exit(126);
	if (syscall(SYS_close_range, fds[2] >= 0 ? 4 : 3, ~0U, 0))
		for (int fd = fds[2] >= 0 ? 4 : 3; fd < 65536; fd++)
			close(fd);
	umask(022);
	execve(helper, argv, envp);
	dprintf(2, "cannot run %s: %s\n", helper, strerror(errno));
	_exit(127);
}

/* Run one helper phase: request in, reply (a JSON object) out, maybe with one fd. */
static char *run_helper(const char *helper, const char *phase, const struct buf *req,
			const struct job *as_user, int pass_fd, int *fd_out)
{
	int sv[2], errfd, status = 0;
	struct stat sb;
	struct buf reply = {0};
	char data[65536], ctl[CMSG_SPACE(sizeof(int))], *line;

	if (stat(helper, &sb) || sb.st_uid != 0 || (sb.st_mode & 022)) {
		fail("rankwire: the helper %s must exist, be owned by root and not be "
		     "group/world-writable (plugstack.conf helper=)", helper);
		return NULL;
	}
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) ||
	    (errfd = memfd_create("rankwire-helper", MFD_CLOEXEC)) < 0) {
		fail("rankwire: cannot run the helper: %s", strerror(errno));
		return NULL;
	}
	pid_t pid = fork();
	if (pid == 0)
		helper_child(helper, phase, sv[1], errfd, pass_fd, as_user);
	close(sv[1]);
	for (size_t off = 0; pid > 0 && off < req->len;) {
		ssize_t n = write(sv[0], req->p + off, req->len - off);
		if (n <= 0)
			break;
		off += (size_t)n;
	}
	shutdown(sv[0], SHUT_WR);
	for (;;) {
		struct iovec iov = {data, sizeof data};
		struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl,
				     .msg_controllen = sizeof ctl};
		struct pollfd pfd = {sv[0], POLLIN, 0};
		if (pid < 0 || poll(&pfd, 1, HELPER_TIMEOUT_MS) <= 0) {
			if (pid > 0)
				kill(pid, SIGKILL);
			break;
		}
		ssize_t n = recvmsg(sv[0], &msg, MSG_CMSG_CLOEXEC);
		if (n <= 0 || reply.len + (size_t)n > REPLY_MAX)
			break;
		for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
			if (c->cmsg_type == SCM_RIGHTS && fd_out && *fd_out < 0)
				memcpy(fd_out, CMSG_DATA(c), sizeof(int));
		put(&reply, data, (size_t)n);
	}
	close(sv[0]);
	while (pid > 0 && waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	/* Whatever the helper wrote to stderr (a traceback) goes to slurmd's log; with no
	 * reply, its last line also goes to the user. */
	ssize_t n = pread(errfd, data, sizeof data - 1, 0);
	data[n > 0 ? n : 0] = 0;
	for (n = (ssize_t)strlen(data); n > 0 && data[n - 1] == '\n';)
		data[--n] = 0;
	if (*data)
		slurm_error("rankwire: helper %s phase: %s", phase, data);
	if (!reply.len || !WIFEXITED(status) || WEXITSTATUS(status)) {
		line = strrchr(data, '\n') ? strrchr(data, '\n') + 1 : data;
		fail("rankwire: the helper's %s phase failed: %s", phase, *line ? line : "no reply");
		free(reply.p);
		reply.p = NULL;
	}
	close(errfd);
	return reply.p;
}

/* ---- facts, replies ----------------------------------------------------------------- */

static void put_facts(struct buf *b, spank_t sp, int ac, char **av, struct job *job)
{
	static const char *names[N_OPTS] = {"container-image", "container-mounts",
		"container-workdir", "container-env", "container-writable", "container-fabric",
		"container-remap-root"};
	uint32_t job_id = 0, step_id = 0, local = 0, total = 0, node = 0, nnodes = 0;
	char **env = NULL, tmp[4096], *opts[N_OPTS], *stepd_env[1];
	int nopts = 0, nstepd = 0;

	spank_get_item(sp, S_JOB_UID, &job->uid);
	spank_get_item(sp, S_JOB_GID, &job->gid);
	spank_get_item(sp, S_JOB_SUPPLEMENTARY_GIDS, &job->gids, &job->ngids);
	spank_get_item(sp, S_JOB_ID, &job_id);
	spank_get_item(sp, S_JOB_STEPID, &step_id);
	spank_get_item(sp, S_JOB_LOCAL_TASK_COUNT, &local);
	spank_get_item(sp, S_JOB_TOTAL_TASK_COUNT, &total);
	spank_get_item(sp, S_JOB_NODEID, &node);
	spank_get_item(sp, S_JOB_NNODES, &nnodes);
	spank_get_item(sp, S_JOB_ENV, &env);
	st.tasks = (int)local;
	snprintf(tmp, sizeof tmp, "{\"uid\":%u,\"gid\":%u,\"job_id\":%u,\"step_id\":%u,"
		 "\"local_tasks\":%u,\"total_tasks\":%u,\"node_id\":%u,\"nnodes\":%u,"
		 "\"stepd_pid\":%d,\"gids\":[", job->uid, job->gid, job_id, step_id, local, total,
		 node, nnodes, (int)getpid());
	puts_(b, tmp);
	for (int i = 0; i < job->ngids; i++) {
		snprintf(tmp, sizeof tmp, "%s%u", i ? "," : "", job->gids[i]);
		puts_(b, tmp);
	}
	puts_(b, "],\"cwd\":");
	put_str(b, getcwd(tmp, sizeof tmp) ? tmp : "");
	put_strs(b, ",\"args\":[", av, ac);
	for (int i = 0; i < N_OPTS; i++)
		if (opt_val[i] && asprintf(&opts[nopts], "%s=%s", names[i], opt_val[i]) > 0)
			nopts++;
	put_strs(b, ",\"options\":[", opts, nopts);
	put_strs(b, ",\"env\":[", env, -1);
	/* Slurm's PMIx plugin tells its server dir to slurmstepd's own environment; the
	 * tasks only get it later, per task. */
	if (getenv("PMIX_SERVER_TMPDIR") &&
	    asprintf(&stepd_env[0], "PMIX_SERVER_TMPDIR=%s", getenv("PMIX_SERVER_TMPDIR")) > 0)
		nstepd = 1;
	put_strs(b, ",\"stepd_env\":[", stepd_env, nstepd);
	while (nopts)
		free(opts[--nopts]);
	while (nstepd)
		free(stepd_env[--nstepd]);
}

struct reply { char *checked, *socket; int skip; };

static void on_reply(const char *key, char *val, void *ctx)
{
	struct reply *r = ctx;
	if (!strcmp(key, "error"))
		fail("%s", val);
	else if (!strcmp(key, "skip"))
		r->skip = 1;
	else if (!strcmp(key, "checked"))
		r->checked = val;
	else if (!strcmp(key, "socket"))
		r->socket = val;
	else if (!strcmp(key, "workdir"))
		st.workdir = strdup(val);
	else if (!strcmp(key, "holder_pid"))
		st.holder = (pid_t)atoi(val);
}

/* Connect to the holder, take the namespace fds; the connection is the step's lease. */
static int join_holder(const char *path)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	char data[4096], ctl[CMSG_SPACE(2 * sizeof(int))];
	struct iovec iov = {data, sizeof data};
	struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl,
			     .msg_controllen = sizeof ctl};
	struct cmsghdr *c;
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (fd < 0 || strlen(path) >= sizeof sa.sun_path)
		return -1;
	strcpy(sa.sun_path, path);
	if (connect(fd, (struct sockaddr *)&sa, sizeof sa) || write(fd, "join\n", 5) != 5 ||
	    recvmsg(fd, &msg, MSG_CMSG_CLOEXEC) <= 0 || !(c = CMSG_FIRSTHDR(&msg)) ||
	    c->cmsg_type != SCM_RIGHTS || c->cmsg_len != CMSG_LEN(2 * sizeof(int))) {
		close(fd);
		return -1;
	}
	memcpy(&st.userns, CMSG_DATA(c), sizeof(int));
	memcpy(&st.mntns, CMSG_DATA(c) + sizeof(int), sizeof(int));
	st.lease = fd;
	return 0;
}

static void setup(spank_t sp, int ac, char **av)
{
	const char *helper = RANKWIRE_HELPER;
	struct buf req = {0};
	struct job job = {0};
	struct reply chk = {0}, run = {0};
	char *reply, *started = NULL;
	int image_fd = -1;

	for (int i = 0; i < ac; i++)
		if (!strncmp(av[i], "helper=", 7))
			helper = av[i] + 7;
	put_facts(&req, sp, ac, av, &job);
	puts_(&req, "}");
	reply = run_helper(helper, "check", &req, NULL, -1, &image_fd);
	if (reply && parse_reply(reply, on_reply, &chk))
		fail("rankwire: bad reply from the helper's check phase");
	if (chk.skip) {
		st.active = 0; /* e.g. a batch step, or srun --container with an oci.conf */
	} else if (!st.error && chk.checked && image_fd >= 0) {
		req.p[--req.len] = 0; /* reopen the object: facts + what the check decided */
		puts_(&req, ",\"checked\":");
		put_str(&req, chk.checked);
		puts_(&req, "}");
		started = run_helper(helper, "start", &req, &job, image_fd, NULL);
		if (started && (st.env = strdup(started)) && parse_reply(started, on_reply, &run))
			fail("rankwire: bad reply from the helper's start phase");
		else if (!st.error && (!run.socket || !st.workdir))
			fail("rankwire: the helper's start phase named no container");
		else if (!st.error && join_holder(run.socket))
			fail("rankwire: cannot join the container at %s: %s", run.socket,
			     strerror(errno));
	} else {
		fail("rankwire: the helper's check phase allowed nothing");
	}
	if (image_fd >= 0)
		close(image_fd);
	free(reply);
	free(started);
	free(req.p);
}

/* ---- SPANK callbacks ------------------------------------------------------------------ */

int slurm_spank_init(spank_t sp, int ac, char **av)
{
	if (spank_context() != S_CTX_LOCAL && spank_context() != S_CTX_REMOTE)
		return 0;
	for (struct spank_option *o = options; o->name; o++)
		if (spank_option_register(sp, o) != ESPANK_SUCCESS) {
			slurm_error("rankwire: cannot register --%s", o->name);
			return -1;
		}
	return 0;
}

static int has_env(spank_t sp, const char *name)
{
	char b[2];
	spank_err_t rc = spank_getenv(sp, name, b, sizeof b);
	return rc == ESPANK_SUCCESS || rc == ESPANK_NOSPACE;
}

int slurm_spank_user_init(spank_t sp, int ac, char **av)
{
	if (!spank_remote(sp))
		return 0;
	/* No container asked for: no helper runs, the step is untouched. */
	if (!opt_val[O_IMAGE] && !has_env(sp, "RANKWIRE_CONTAINER_IMAGE") &&
	    !has_env(sp, "SLURM_CONTAINER"))
		return 0;
	st.active = 1;
	setup(sp, ac, av);
	return 0; /* failures are reported by task_init: Slurm 22.05 drops user_init's */
}

/* The start reply's setenv/unsetenv/copyenv lists, applied to one task's environment. */
static void on_task_env(const char *key, char *val, void *ctx)
{
	char *eq = strchr(val, '='), from[65536];
	spank_t sp = ctx;
	int rc = ESPANK_SUCCESS;

	if (eq)
		*eq++ = 0;
	if (!strcmp(key, "setenv") && eq)
		rc = spank_setenv(sp, val, eq, 1);
	else if (!strcmp(key, "unsetenv"))
		spank_unsetenv(sp, val);
	else if (!strcmp(key, "copyenv") && eq && !has_env(sp, val) && /* TARGET=SOURCE */
		 spank_getenv(sp, eq, from, sizeof from) == ESPANK_SUCCESS)
		rc = spank_setenv(sp, val, from, 0);
	if (rc != ESPANK_SUCCESS)
		fail("rankwire: cannot set %s in the task's environment", val);
}

int slurm_spank_task_init(spank_t sp, int ac, char **av)
{
	if (!st.active)
		return 0;
	if (st.error) {
		slurm_error("%s", st.error);
		return -1;
	}
	/* Forked and single-threaded, as setns(CLONE_NEWUSER) requires; no_new_privs as for
	 * every process rankwire starts in a container. */
	if (setns(st.userns, CLONE_NEWUSER) || setns(st.mntns, CLONE_NEWNS) ||
	    prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) {
		slurm_error("rankwire: cannot enter the container: %s", strerror(errno));
		return -1;
	}
	close(st.userns);
	close(st.mntns);
	close(st.lease);
	if (chdir(st.workdir)) {
		slurm_error("rankwire: working directory %s does not exist in the container: pass "
			    "--container-workdir DIR or bind it with --container-mounts", st.workdir);
		return -1;
	}
	parse_reply(st.env, on_task_env, sp);
	if (st.error)
		slurm_error("%s", st.error);
	return st.error ? -1 : 0;
}

/* The step's lease ends; if it was the last, wait for the holder's teardown. */
static void release(void)
{
	char data[256];
	ssize_t n;
	struct pollfd pfd = {st.lease, POLLIN, 0};

	if (st.lease < 0)
		return;
	close(st.userns);
	close(st.mntns);
	st.userns = st.mntns = -1;
	if (write(st.lease, "leave\n", 6) == 6 && poll(&pfd, 1, HOLDER_WAIT_MS) == 1 &&
	    (n = read(st.lease, data, sizeof data - 1)) > 0 &&
	    (data[n] = 0, strstr(data, "\"last\": true")) && st.holder > 0) {
		pfd.fd = (int)syscall(SYS_pidfd_open, st.holder, 0);
		if (pfd.fd >= 0) {
			poll(&pfd, 1, HOLDER_WAIT_MS);
			close(pfd.fd);
		}
	}
	close(st.lease);
	st.lease = -1;
}

int slurm_spank_task_exit(spank_t sp, int ac, char **av)
{
	if (st.lease >= 0 && ++st.exited >= st.tasks)
		release();
	return 0;
}

int slurm_spank_exit(spank_t sp, int ac, char **av)
{
	if (spank_remote(sp))
		release();
	for (int i = 0; i < N_OPTS; i++) {
		free(opt_val[i]);
		opt_val[i] = NULL;
	}
	return 0;
}
