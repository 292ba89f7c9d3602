/* The SPANK callbacks, the request, the holder lease (see shim.h for the whole shim). */
#include "shim.h"
#include "options.h"

SPANK_PLUGIN(rankwire, 1);
#define OPTION(i, name, meta, help, has_arg, env) {name, meta, help, has_arg, i, opt_cb},
#define ENV(i, name, meta, help, has_arg, env) env,
_Static_assert(RW_OPT_IMAGE >= 0, "runtime/options.py has no container-image option");

static int opt_cb(int val, const char *arg, int remote);
static struct spank_option options[] = {RW_OPTIONS(OPTION) SPANK_OPTIONS_TABLE_END};
static const char *const opt_env[RW_N_OPTS] = {RW_OPTIONS(ENV)};
static char *opt_val[RW_N_OPTS];

/* A flag arrives remotely as "" (not NULL): store "1" for every flag. */
static int opt_cb(int val, const char *arg, int remote UNUSED)
{
	if (val < 0 || val >= RW_N_OPTS)
		return -1;
	free(opt_val[val]);
	opt_val[val] = strdup(options[val].has_arg && arg ? arg : "1");
	return opt_val[val] ? 0 : -1;
}

/* Per-step state in slurmstepd; each forked task has its copy. */
static struct {
	int active, ns[2], lease, tasks, exited; /* ns: user, mount */
	pid_t holder;
	char error[1024], *workdir;
	struct buf env; /* the start reply's setenv/unsetenv/copyenv records, for the tasks */
} st = {.ns = {-1, -1}, .lease = -1};

void rw_fail(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	if (!*st.error)
		vsnprintf(st.error, sizeof st.error, fmt, ap);
	va_end(ap);
}

/* The request: who, which step, the plugstack args, the options, the environments. */
static int put_facts(struct buf *b, spank_t sp, int ac, char **av, struct rw_job *job)
{
	static const char *const key[] = {"uid", "gid", "job_id", "step_id", "local_tasks",
		"total_tasks", "node_id", "nnodes", "groups", "env"};
	static const spank_item_t item[] = {S_JOB_UID, S_JOB_GID, S_JOB_ID, S_JOB_STEPID,
		S_JOB_LOCAL_TASK_COUNT, S_JOB_TOTAL_TASK_COUNT, S_JOB_NODEID, S_JOB_NNODES,
		S_JOB_SUPPLEMENTARY_GIDS, S_JOB_ENV};
	char **env = NULL, cwd[4096], *pmix = getenv("PMIX_SERVER_TMPDIR");
	uint32_t v[8];
	void *a[] = {v, v + 1, v + 2, v + 3, v + 4, v + 5, v + 6, v + 7, &job->gids, &env};

	for (size_t i = 0; i < sizeof a / sizeof *a; i++) {
		/* The last argument is the groups' count, unread for the other items. */
		spank_err_t rc = spank_get_item(sp, item[i], a[i], &job->ngids);
		if (rc != ESPANK_SUCCESS) {
			rw_fail("rankwire: cannot get the job's %s: %s", key[i], spank_strerror(rc));
			return -1;
		}
		if (i < 8)
			frame_add(b, key[i], "%u", v[i]);
	}
	job->uid = v[0], job->gid = v[1], st.tasks = (int)v[4];
	for (int i = 0; i < job->ngids; i++)
		frame_add(b, "gids", "%u", (unsigned)job->gids[i]);
	frame_add(b, "stepd_pid", "%d", (int)getpid());
	frame_add(b, "cwd", "%s", getcwd(cwd, sizeof cwd) ? cwd : ""); /* none: helper picks */
	for (int i = 0; i < ac; i++)
		frame_add(b, "arg", "%s", av[i]);
	for (int i = 0; i < RW_N_OPTS; i++)
		if (opt_val[i])
			frame_add(b, "opt", "%s=%s", options[i].name, opt_val[i]);
	for (char **e = env; e && *e; e++)
		frame_add(b, "env", "%s", *e);
	/* Slurm's PMIx plugin puts its dir in slurmstepd's own environment; tasks get it later. */
	if (pmix)
		frame_add(b, "stepd_env", "PMIX_SERVER_TMPDIR=%s", pmix);
	return 0;
}

struct reply { char *checked, *socket; int skip, last; }; /* what a frame from a peer said */

static void on_reply(const char *key, char *val, void *ctx)
{
	struct reply *r = ctx;

	if (!strcmp(key, "error"))
		rw_fail("%s", val);
	else if (!strcmp(key, "skip"))
		r->skip = 1;
	else if (!strcmp(key, "last")) /* the holder's, to `leave` */
		r->last = !strcmp(val, "1");
	else if (!strcmp(key, "checked"))
		r->checked = val;
	else if (!strcmp(key, "socket"))
		r->socket = val;
	else if (!strcmp(key, "workdir") && !(st.workdir = strdup(val)))
		rw_fail("rankwire: out of memory");
	else if (!strcmp(key, "holder_pid"))
		st.holder = atoi(val); /* not a number: 0, then release waits for nothing */
	else if (!strcmp(key, "setenv") || !strcmp(key, "unsetenv") || !strcmp(key, "copyenv"))
		frame_add(&st.env, key, "%s", val);
}

/* Connect to the holder, take its namespace fds; the connection is the step's lease. Each
 * step has a deadline: SO_SNDTIMEO for connect and send, SO_RCVTIMEO for every read. */
static void join_holder(const char *path)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	struct timeval tv = {HOLDER_WAIT_MS / 1000, 0};
	char data[4096], ctl[CMSG_SPACE(sizeof st.ns)];
	struct iovec iov = {data, sizeof data};
	struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl,
			     .msg_controllen = sizeof ctl};
	struct cmsghdr *c;
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	ssize_t n = -1;

	if (fd < 0 || (errno = ENAMETOOLONG, strlen(path) >= sizeof sa.sun_path) ||
	    !strcpy(sa.sun_path, path) || setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) ||
	    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) ||
	    connect(fd, (struct sockaddr *)&sa, sizeof sa) ||
	    send(fd, "join\n", 5, MSG_NOSIGNAL) != 5 ||
	    (n = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC)) <= 0 || (errno = EPROTO, 0) ||
	    !(c = CMSG_FIRSTHDR(&msg)) || c->cmsg_type != SCM_RIGHTS ||
	    c->cmsg_len != CMSG_LEN(sizeof st.ns))
		goto bad;
	memcpy(st.ns, CMSG_DATA(c), sizeof st.ns);
	/* What came with them is for Python peers: skip it, up to its newline. */
	while (!memchr(data, '\n', (size_t)n))
		if ((n = read(fd, data, sizeof data)) <= 0)
			goto bad;
	st.lease = fd;
	return;
bad: /* the fds are closed with slurmstepd; the step fails */
	rw_fail("rankwire: cannot join the container at %s: %s", path,
		n == 0 ? "the holder hung up" : strerror(errno));
	if (fd >= 0)
		rw_close(fd);
}

static void setup(spank_t sp, int ac, char **av)
{
	const char *helper = RANKWIRE_HELPER;
	struct buf req = {0}, checked = {0}, started = {0}, *bufs[] = {&req, &checked, &started};
	struct reply chk = {0}, run = {0};
	struct rw_job job = {0};
	int image_fd = -1;

	for (int i = 0; i < ac; i++)
		if (!strncmp(av[i], "helper=", 7))
			helper = av[i] + 7;
	if (put_facts(&req, sp, ac, av, &job) ||
	    rw_run_helper(helper, "check", &req, NULL, -1, &image_fd, &checked))
		goto out;
	if (frame_parse(checked.p, checked.len, on_reply, &chk))
		rw_fail("rankwire: bad reply from the helper's check phase");
	if (chk.skip)
		st.active = 0; /* e.g. a batch step, or srun --container with an oci.conf */
	else if (!chk.checked || image_fd < 0)
		rw_fail("rankwire: the helper's check phase allowed nothing");
	if (!st.active || *st.error)
		goto out;
	frame_add(&req, "checked", "%s", chk.checked);
	if (rw_run_helper(helper, "start", &req, &job, image_fd, NULL, &started))
		goto out;
	if (frame_parse(started.p, started.len, on_reply, &run))
		rw_fail("rankwire: bad reply from the helper's start phase");
	else if (!run.socket || !st.workdir)
		rw_fail("rankwire: the helper's start phase named no container");
	if (!*st.error)
		join_holder(run.socket);
out:
	if (image_fd >= 0)
		rw_close(image_fd);
	for (int i = 0; i < 3; i++)
		free(bufs[i]->p);
}

int slurm_spank_init(spank_t sp, int ac UNUSED, char **av UNUSED)
{
	int ours = spank_context() == S_CTX_LOCAL || spank_context() == S_CTX_REMOTE;

	for (struct spank_option *o = options; ours && o->name; o++)
		if (spank_option_register(sp, o) != ESPANK_SUCCESS)
			return slurm_error("rankwire: cannot register --%s", o->name), -1;
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
	/* Not slurmstepd, or no container asked for: no helper runs, the step is untouched. */
	if (spank_remote(sp) != 1 || (!opt_val[RW_OPT_IMAGE] &&
	    !has_env(sp, opt_env[RW_OPT_IMAGE]) && !has_env(sp, "SLURM_CONTAINER")))
		return 0;
	st.active = 1;
	setup(sp, ac, av);
	return 0; /* failures are reported by task_init: Slurm 22.05 drops user_init's */
}

/* One of the start reply's environment changes, applied to this task's environment. */
static void on_task_env(const char *key, char *val, void *ctx)
{
	char *eq = strchr(val, '='), from[65536];
	spank_err_t rc = ESPANK_SUCCESS;

	if (eq)
		*eq++ = 0;
	if (!strcmp(key, "setenv") && eq)
		rc = spank_setenv(ctx, val, eq, 1);
	else if (!strcmp(key, "unsetenv"))
		rc = spank_unsetenv(ctx, val);
	else if (!strcmp(key, "copyenv") && eq && !has_env(ctx, val)) /* TARGET=SOURCE */
		if ((rc = spank_getenv(ctx, eq, from, sizeof from)) == ESPANK_SUCCESS)
			rc = spank_setenv(ctx, val, from, 0);
	if (rc != ESPANK_SUCCESS && rc != ESPANK_ENV_NOEXIST) /* no SOURCE: nothing to copy */
		rw_fail("rankwire: cannot set %s for the task: %s", val, spank_strerror(rc));
}

int slurm_spank_task_init(spank_t sp, int ac UNUSED, char **av UNUSED)
{
	if (!st.active)
		return 0;
	/* Forked and single-threaded, as setns(CLONE_NEWUSER) wants; no_new_privs as for all
	 * rankwire's containers. Namespace and lease fds are close-on-exec: the task's own. */
	if (!*st.error && (setns(st.ns[0], CLONE_NEWUSER) || setns(st.ns[1], CLONE_NEWNS) ||
			   prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)))
		rw_fail("rankwire: cannot enter the container: %s", strerror(errno));
	if (!*st.error && chdir(st.workdir))
		rw_fail("rankwire: working directory %s does not exist in the container: pass "
			"--container-workdir DIR or bind it with --container-mounts", st.workdir);
	if (!*st.error && (st.env.oom || frame_parse(st.env.p, st.env.len, on_task_env, sp)))
		rw_fail("rankwire: out of memory");
	return *st.error ? (slurm_error("%s", st.error), -1) : 0;
}

/* The step's lease ends; if it was the last, wait for the holder's teardown. */
static void release(void)
{
	char data[256];
	size_t len = 0;
	ssize_t n = -1;
	struct reply r = {0};
	struct pollfd pfd = {-1, POLLIN, 0};

	if (st.lease < 0)
		return;
	rw_close(st.ns[0]);
	rw_close(st.ns[1]);
	/* The holder replies last=0|1 and hangs up; each read waits HOLDER_WAIT_MS at most. */
	if (send(st.lease, "leave\n", 6, MSG_NOSIGNAL) == 6)
		while (len < sizeof data && (n = read(st.lease, data + len, sizeof data - len)) > 0)
			len += (size_t)n;
	if (n != 0 || frame_parse(data, len, on_reply, &r))
		slurm_error("rankwire: no answer to `leave` from the container's holder");
	/* No pidfd (ESRCH): the holder is gone already. Not gone in time: we waited enough. */
	if (r.last && st.holder > 0 && (pfd.fd = (int)syscall(SYS_pidfd_open, st.holder, 0)) >= 0) {
		(void)poll(&pfd, 1, HOLDER_WAIT_MS);
		rw_close(pfd.fd);
	}
	rw_close(st.lease);
	st.lease = -1;
}

int slurm_spank_task_exit(spank_t sp UNUSED, int ac UNUSED, char **av UNUSED)
{
	if (st.lease >= 0 && ++st.exited >= st.tasks)
		release();
	return 0;
}

int slurm_spank_exit(spank_t sp, int ac UNUSED, char **av UNUSED)
{
	if (spank_remote(sp) == 1)
		release();
	for (int i = 0; i < RW_N_OPTS; i++)
		free(opt_val[i]), opt_val[i] = NULL;
	return 0;
}
