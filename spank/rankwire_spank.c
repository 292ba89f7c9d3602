/* The SPANK callbacks, the request, the holder lease (see shim.h for the whole shim). */
#include "shim.h"
#include "options.h"

#include <dlfcn.h>
#include <pwd.h>

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
	int active, enforced, bridge, ns[2], lease, pidfd, tasks, exited; /* ns: user, mount */
	pid_t holder; /* the lease's peer */
	char error[1024], *workdir, *helper, *warning, *save; /* save: the start phase's */
	char *bridge_server; /* the node's bridge server, started by the start phase: its socket */
	struct buf env; /* the reply's setenv/unsetenv/copyenv records, for the tasks */
	struct buf entry; /* the reply's entrypoint words, "LEN:WORD" each (`through_entrypoint`) */
	struct rw_helper h; /* for the save phase, after the last task */
	struct rw_job job; /* its gids our copy */
	struct rw_run check; /* the check phase's helper, started in init_post_opt */
	long bucket; /* fresh_bucket's, once bucketed */
	int bucketed;
} st = {.ns = {-1, -1}, .lease = -1, .pidfd = -1};

void rw_fail(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	if (!*st.error)
		vsnprintf(st.error, sizeof st.error, fmt, ap);
	va_end(ap);
}

/* The request: who, which step, the options, the environments (setup adds the args). */
static int put_facts(struct buf *b, spank_t sp, struct rw_job *job)
{
	static const char *const key[] = {"uid", "gid", "job_id", "step_id", "local_tasks",
		"total_tasks", "node_id", "nnodes", "groups", "env"};
	static const spank_item_t item[] = {S_JOB_UID, S_JOB_GID, S_JOB_ID, S_JOB_STEPID,
		S_JOB_LOCAL_TASK_COUNT, S_JOB_TOTAL_TASK_COUNT, S_JOB_NODEID, S_JOB_NNODES,
		S_JOB_SUPPLEMENTARY_GIDS, S_JOB_ENV};
	char **env = NULL, cwd[4096], *pmix = getenv("PMIX_SERVER_TMPDIR");
	char *conf = getenv("SLURM_CONF"); /* slurmd's: the reaper asks that Slurm */
	char *node = getenv("SLURMD_NODENAME"); /* slurmstepd's own: slurmd's -N or host name */
	uint32_t v[8];
	void *a[] = {v, v + 1, v + 2, v + 3, v + 4, v + 5, v + 6, v + 7, &job->gids, &env};

	for (size_t i = 0; i < sizeof a / sizeof *a; i++) {
		/* The last argument is the groups' count, unread for the other items. */
		spank_err_t rc = spank_get_item(sp, item[i], a[i], &job->ngids);
		if (rc != ESPANK_SUCCESS)
			return rw_fail("rankwire: cannot get the job's %s: %s", key[i],
				       spank_strerror(rc)), -1;
		if (i < 8)
			frame_add(b, key[i], "%u", v[i]);
	}
	job->uid = v[0], job->gid = v[1], st.tasks = (int)v[4];
	{ /* the home the helper binds (the passwd database's): the tickets' keys hold it */
		struct passwd pw, *found = NULL;
		char pwbuf[16384];
		if (!getpwuid_r(job->uid, &pw, pwbuf, sizeof pwbuf, &found) && found)
			frame_add(b, "passwd_home", "%s", pw.pw_dir);
	}
	for (int i = 0; i < job->ngids; i++)
		frame_add(b, "gids", "%u", (unsigned)job->gids[i]);
	frame_add(b, "stepd_pid", "%d", (int)getpid());
	frame_add(b, "cwd", "%s", getcwd(cwd, sizeof cwd) ? cwd : ""); /* none: helper picks */
	for (int i = 0; i < RW_N_OPTS; i++)
		if (opt_val[i])
			frame_add(b, "opt", "%s=%s", options[i].name, opt_val[i]);
	for (char **e = env; e && *e; e++)
		frame_add(b, "env", "%s", *e);
	int argc = 0; /* the tasks' command: its MPI decides a PMI bridge in a two-MPI image */
	char **argv = NULL;
	if (spank_get_item(sp, S_JOB_ARGV, &argc, &argv) == ESPANK_SUCCESS)
		for (int i = 0; i < argc && argv; i++)
			frame_add(b, "argv", "%s", argv[i]);
	/* Slurm's PMIx plugin puts its dir in slurmstepd's own environment; tasks get it later. */
	if (pmix)
		frame_add(b, "stepd_env", "PMIX_SERVER_TMPDIR=%s", pmix);
	if (conf)
		frame_add(b, "stepd_env", "SLURM_CONF=%s", conf);
	if (node)
		frame_add(b, "stepd_env", "SLURMD_NODENAME=%s", node);
	for (const char *const *p = rw_step_values; *p; p++) /* what the tickets' keys skip */
		frame_add(b, "step_value", "%s", *p);
	frame_add(b, "phases", "check+start"); /* the check phase may run start itself */
	return 0;
}

/* What a peer replied; keep (not NULL): the records a join replays, for the ticket. root:
 * root's check replied (and its start phase child, not dumpable from its start). */
struct reply {
	struct buf *req, *keep;
	int root;
	int skip, last, enforced, checked, started, bridge, fast, argv_used, fresh, fresh_plan;
	char *socket; /* the check phase's join_socket */
	char *bridge_server; /* the start phase's: the node's bridge server runs, at this socket */
};

/* The records a step that joins the named container, or starts its own, without the
 * helper replays or uses: root's alone say which files and image and binds its check read
 * (not a separate start phase, which runs as the user, dumpable at first). */
static int replayed(const char *key, int root)
{
	static const char *const keys[] = {"warning", "workdir", "setenv", "unsetenv", "copyenv",
		"entrypoint", "bridge", "fresh_plan", NULL}, *const roots[] = {"depends",
		"fresh_image", "fresh_bind", NULL}; /* the ticket's key's files, a fresh start's */
	for (const char *const *k = keys; *k; k++)
		if (!strcmp(key, *k))
			return 1;
	for (const char *const *k = roots; root && *k; k++)
		if (!strcmp(key, *k))
			return 1;
	return 0;
}

/* One word as rankwire-entrypoint (entrypoint.c) reads them: "LEN:WORD". */
static void entry_word(struct buf *b, const char *word)
{
	char len[24];
	int n = snprintf(len, sizeof len, "%zu:", strlen(word));

	buf_put(b, len, (size_t)n), buf_put(b, word, strlen(word));
}

static void on_reply(const char *key, char *val, void *ctx)
{
	struct reply *r = ctx;

	if (r->keep && replayed(key, r->root))
		frame_add(r->keep, key, "%s", val);
	if (!strcmp(key, "error"))
		rw_fail("%s", val);
	else if (!strcmp(key, "skip"))
		r->skip = 1;
	else if (!strcmp(key, "last")) /* the holder's, to `leave` */
		r->last = !strcmp(val, "1");
	else if (!strcmp(key, "enforced"))
		r->enforced = !strcmp(val, "1");
	else if (!strcmp(key, "bridge")) /* the start phase's: 1 PMI-1/2 over PMIx, 2 the other */
		r->bridge = !strcmp(val, "1") ? 1 : !strcmp(val, "2") ? 2 : 0;
	else if (!strcmp(key, "warning") && !st.warning && !(st.warning = strdup(val)))
		rw_fail("rankwire: out of memory");
	else if (!strcmp(key, "save") && (free(st.save), !(st.save = strdup(val))))
		rw_fail("rankwire: out of memory");
	else if (!strcmp(key, "started")) /* the check phase ran start as the job user */
		r->started = !strcmp(val, "1");
	else if (!strcmp(key, "checked") && r->req && (r->checked = 1))
		frame_add(r->req, key, "%s", val); /* for the start phase */
	else if (!strcmp(key, "workdir") && (free(st.workdir), !(st.workdir = strdup(val))))
		rw_fail("rankwire: out of memory");
	else if (!strcmp(key, "setenv") || !strcmp(key, "unsetenv") || !strcmp(key, "copyenv"))
		frame_add(&st.env, key, "%s", val);
	else if (!strcmp(key, "entrypoint"))
		entry_word(&st.entry, val);
	else if (!strcmp(key, "fast_join")) /* the check phase's: a ticket for later steps */
		r->fast = !strcmp(val, "1");
	else if (!strcmp(key, "join_socket") && (free(r->socket), !(r->socket = strdup(val))))
		rw_fail("rankwire: out of memory");
	else if (!strcmp(key, "argv_used")) /* the start phase's: the key holds the command */
		r->argv_used = !strcmp(val, "1");
	else if (!strcmp(key, "fresh")) /* the check phase's: a fresh ticket may be kept */
		r->fresh = !strcmp(val, "1");
	else if (!strcmp(key, "fresh_plan")) /* the start phase's: and its plugin plan */
		r->fresh_plan = 1;
	else if (!strcmp(key, "bridge_server") && /* not replayed: a ticket's step starts one */
		 (free(r->bridge_server), !(r->bridge_server = strdup(val))))
		rw_fail("rankwire: out of memory");
}

/* What a phase handed over: exactly [lease, user ns (not if enforced), mount ns]. The lease
 * is a Unix stream socket to the holder (run by uid), the namespaces are the holder's. */
static void take_container(struct rw_fds *got, const char *phase, uid_t uid)
{
	static const char *const ns[] = {"user", "mnt"};
	int want = st.enforced ? 2 : 3, v[2] = {0}, lease = got->fd[0];
	socklen_t len[3] = {sizeof v[0], sizeof v[1], sizeof(struct ucred)};
	struct ucred cr = {0};
	struct stat a, b;
	char path[64];
	uid_t eu = geteuid();

	if (got->n != want)
		rw_fail("rankwire: the helper's %s phase handed over %d descriptors, not %d", phase,
			got->n, want);
	else if (getsockopt(lease, SOL_SOCKET, SO_DOMAIN, &v[0], &len[0]) || v[0] != AF_UNIX ||
		 getsockopt(lease, SOL_SOCKET, SO_TYPE, &v[1], &len[1]) || v[1] != SOCK_STREAM ||
		 getsockopt(lease, SOL_SOCKET, SO_PEERCRED, &cr, &len[2]) || cr.uid != uid)
		rw_fail("rankwire: the lease handed over is no Unix stream socket to a holder run "
			"by uid %u", (unsigned)uid);
	/* Its /proc/PID/ns, dumpable or not: euid 0 for this thread only (libc's: all threads) */
	for (int k = st.enforced, *fd = got->fd + 1 - k; k < 2 && !*st.error &&
	     !syscall(SYS_setresuid, -1, 0, -1); k++) { /* k 0: user, 1: mount */
		snprintf(path, sizeof path, "/proc/%d/ns/%s", (int)cr.pid, ns[k]);
		if (ioctl(fd[k], NS_GET_NSTYPE) != (k ? CLONE_NEWNS : CLONE_NEWUSER) ||
		    fstat(fd[k], &a) || stat(path, &b) || a.st_ino != b.st_ino ||
		    a.st_dev != b.st_dev)
			rw_fail("rankwire: the %s namespace fd is not the holder's", ns[k]);
	}
	if (syscall(SYS_setresuid, -1, eu, -1) || geteuid() != eu) /* from euid 0: cannot fail */
		abort();
	/* Its pidfd now: release waits for this very process (if Linux >= 5.3 can tell). */
	if (!*st.error && (st.pidfd = (int)syscall(SYS_pidfd_open, cr.pid, 0)) < 0 &&
	    errno != ENOSYS)
		rw_fail("rankwire: cannot watch the container's holder: %s", strerror(errno));
	if (!*st.error) /* ours now */
		st.lease = lease, st.holder = cr.pid, st.ns[1] = got->fd[want - 1],
		st.ns[0] = want == 3 ? got->fd[1] : -1, got->n = 0;
}

/* The plugstack.conf arguments: into req (for the helper), h and named (the last
 * named_dir=, as spank/plan.named_base). */
static void plugstack_args(int ac, char **av, struct buf *req, struct rw_helper *h,
			   const char **named)
{
	char *end;

	for (int i = 0; i < ac; i++)
		if (frame_add(req, "arg", "%s", av[i]), !strncmp(av[i], "helper=", 7))
			h->path = av[i] + 7;
		else if (!strncmp(av[i], "named_dir=", 10))
			*named = av[i] + 10;
		else if (!strncmp(av[i], "timeout=", 8) && ((h->timeout_s = (int)strtol(av[i] + 8,
			 &end, 10)) < 1 || h->timeout_s > 86400 || *end || end == av[i] + 8))
			rw_fail("rankwire: plugstack.conf %s: give 1 to 86400 seconds", av[i]);
}

static int asked_for(spank_t sp, int i);
static int opt_index(const char *name);
static void slurmd_key(char key[256], const char *conf, const char *node);

/* A step asking for a named container: its job's dir on this node (BASE/SLURMD/JOB, as
 * spank/plan.named_dir's parent's parent), where the ticket is; else "". */
static void ticket_dir(spank_t sp, const char *base, char *dir, size_t n)
{
	uint32_t job = 0;
	char key[256];

	*dir = 0;
	if (!asked_for(sp, opt_index("container-name")) ||
	    spank_get_item(sp, S_JOB_ID, &job) != ESPANK_SUCCESS)
		return;
	slurmd_key(key, getenv("SLURM_CONF"), getenv("SLURMD_NODENAME"));
	if (snprintf(dir, n, "%s/%s/%u", base, key, job) >= (int)n)
		*dir = 0;
}

static void no_record(const char *k UNUSED, char *v UNUSED, void *ctx UNUSED) {}

/* What a way without the helper got (ok: `got` and the replies to `replay`), taken as
 * `phase`'s container and its replies replayed into r. 0 (nothing kept, nothing said to
 * the user) when it failed, or whoever handed over is not the holder take_container
 * wants: the helper then decides, as for any step. */
static int taken(int ok, struct rw_fds *got, const char *phase, uid_t uid, struct buf *replay,
		 struct reply *r)
{
	if (ok)
		take_container(got, phase, uid);
	if (*st.error)
		*st.error = 0, ok = 0;
	if (ok)
		(void)frame_parse(replay->p, replay->len, on_reply, r);
	else
		rw_close_fds(got);
	free(replay->p);
	return ok;
}

/* The ticket's holder, joined as the helper's start phase would (`taken`). */
static int join_fast(const char *dir, uid_t uid, const struct buf *req, size_t len,
		     struct reply *r)
{
	struct rw_fds got = {.n = 0};
	struct buf replay = {0};
	char *copy = NULL; /* a frame? checked on a copy (parsing is in place) */
	int ok = !rw_fast_join(dir, uid, req, len, &got, &replay) &&
		 (copy = malloc(replay.len)) &&
		 !frame_parse(memcpy(copy, replay.p, replay.len), replay.len, no_record, NULL);

	free(copy);
	return taken(ok, &got, "join", uid, &replay, r);
}

/* Which of the user's fresh tickets a step's request would use (its name): a hash of
 * what init_post_opt knows of the request already, its options as given, task counts
 * and environment (Slurm's per-step values by name only, as the ticket's key); computed
 * once per step (st.bucket), as the environment may change after init_post_opt. -1 if
 * Slurm does not tell. */
static long fresh_bucket(spank_t sp)
{
	uint32_t local = 0, total = 0;
	uint64_t h = RW_FNV_START;
	char n[32], **env = NULL;

	if (st.bucketed)
		return st.bucket;
	st.bucketed = 1, st.bucket = -1;
	if (spank_get_item(sp, S_JOB_LOCAL_TASK_COUNT, &local) != ESPANK_SUCCESS ||
	    spank_get_item(sp, S_JOB_TOTAL_TASK_COUNT, &total) != ESPANK_SUCCESS ||
	    spank_get_item(sp, S_JOB_ENV, &env) != ESPANK_SUCCESS)
		return -1;
	h = rw_fnv1a(h, n, (size_t)snprintf(n, sizeof n, "%u %u", local, total) + 1);
	for (int i = 0; i < RW_N_OPTS; i++) /* each with its NUL: "" apart from none */
		h = opt_val[i] ? rw_fnv1a(h, opt_val[i], strlen(opt_val[i]) + 1) : rw_fnv1a(h, "-", 1);
	for (char **e = env; e && *e; e++) {
		size_t len = strlen(*e);
		for (const char *const *p = rw_step_values; *p; p++)
			if (!strncmp(*e, *p, strlen(*p)))
				len = strcspn(*e, "=");
		h = rw_fnv1a(rw_fnv1a(h, *e, len), "", 1);
	}
	return st.bucket = (long)(h >> 1);
}

/* The step's container started from the user's fresh ticket, as the helper's start
 * phase would (`rw_fresh_start`, `taken`). */
static int start_fresh(const struct rw_helper *h, const struct rw_job *job, long bucket,
		       const struct buf *req, size_t len, struct reply *r)
{
	struct rw_fds got = {.n = 0};
	struct buf replay = {0};
	struct rw_fresh used = {"", 0};
	int ok = bucket >= 0 &&
		 !rw_fresh_start(h, job, (unsigned long)bucket, req, len, &got, &replay, &used);

	ok = taken(ok, &got, "start", job->uid, &replay, r);
	if (*used.name) /* the request's ticket: touched, or dropped (the helper keeps another) */
		rw_fresh_used(&used, ok);
	return ok;
}

/* The contents of /proc/self/NAME and of /proc/PID/NAME are the same. */
static int same_proc_file(pid_t pid, const char *name)
{
	char path[64], a[8192], b[8192];
	ssize_t n[2] = {-1, -1};
	int fd;

	for (int i = 0; i < 2; i++) {
		if (i)
			snprintf(path, sizeof path, "/proc/%d/%s", (int)pid, name);
		else
			snprintf(path, sizeof path, "/proc/self/%s", name);
		if ((fd = open(path, O_RDONLY | O_CLOEXEC)) >= 0)
			n[i] = read(fd, i ? b : a, sizeof a), rw_close(fd);
	}
	return n[0] >= 0 && n[0] < (ssize_t)sizeof a && n[0] == n[1] && !memcmp(a, b, n[0]);
}

/* The check helper started in init_post_opt is where a helper started now would be:
 * slurmstepd's cgroups (Slurm's task/cgroup moves slurmstepd into the step's cpuset,
 * memory and devices cgroups after init_post_opt on cgroup v1), resource limits and
 * audit login uid (which a PAM session, UsePAM, may set after it too). The holder and
 * the FUSE daemons it starts inherit all of them. */
static int same_context(pid_t pid)
{
	return same_proc_file(pid, "cgroup") && same_proc_file(pid, "limits") &&
	       same_proc_file(pid, "loginuid");
}

static void setup(spank_t sp, int ac, char **av)
{
	struct rw_helper h = {RANKWIRE_HELPER, HELPER_TIMEOUT_S};
	struct buf req = {0}, keep = {0};
	struct reply chk = {.req = &req, .keep = &keep, .root = 1}, run = {.keep = &keep};
	struct rw_job job = {0};
	struct rw_fds fds = {.n = 0}, held = {.n = 0};
	const char *base = RW_JOBS_DIR;
	char dir[4352];
	size_t asked = 0;
	long bucket = fresh_bucket(sp);

	plugstack_args(ac, av, &req, &h, &base);
	if (*st.error || put_facts(&req, sp, &job))
		goto out;
	asked = req.len, ticket_dir(sp, base, dir, sizeof dir);
	if (*dir) {
		struct reply fast = {0};
		if (join_fast(dir, job.uid, &req, asked, &fast)) {
			run.bridge = fast.bridge;
			goto joined;
		}
	} else if (!st.check.pid && bucket >= 0) { /* rw_fresh_start reads the bucket's tickets */
		struct reply fresh = {0}; /* no bridge, no save: the ticket's step had none */
		if (start_fresh(&h, &job, bucket, &req, asked, &fresh))
			goto joined;
	}
	if (*dir) /* a ticket is the last helper's: this one's replies may differ */
		rw_ticket_drop(dir, job.uid);
	if (st.check.pid && !same_context(st.check.pid))
		rw_abandon_helper(&st.check); /* run below as before: in the step's cgroups */
	if ((st.check.pid ? rw_finish_helper(&st.check, &req, &fds, on_reply, &chk) :
	     rw_run_helper(&h, "check", &req, NULL, &held, &fds, on_reply, &chk)) || *st.error)
		goto out;
	if (chk.skip)
		st.active = 0; /* e.g. a batch step, or srun --container with an oci.conf */
	else if ((st.enforced = chk.enforced)) /* root built and joined it: no start phase */
		take_container(&fds, "check", 0);
	else if (chk.started) /* its child, the job user exactly, started or joined it */
		take_container(&fds, "check+start", job.uid);
	else if (!chk.checked || fds.n < 1 || fds.n > RW_MAX_FDS)
		rw_fail("rankwire: the helper's check phase allowed nothing (`checked` and 1 to %d "
			"descriptors, not %d)", RW_MAX_FDS, fds.n);
	if (st.active && !st.enforced && !chk.started && !*st.error &&
	    !rw_run_helper(&h, "start", &req, &job, &fds, &held, on_reply, &run) && !*st.error) {
		if (run.skip) /* --container-name=NAME:no_exec: the tasks stay on the host */
			st.active = 0, rw_close_fds(&held), held.n = 0;
		else
			take_container(&held, "start", job.uid);
	}
	if (*dir && chk.fast && chk.socket && !run.skip && st.lease >= 0 && !*st.error)
		rw_ticket_write(dir, job.uid, &req, asked, run.argv_used || chk.argv_used,
				st.holder, st.ns, chk.socket, &keep);
	if (!*dir && bucket >= 0 && chk.fresh && (chk.fresh_plan || run.fresh_plan) && !run.skip &&
	    st.lease >= 0 && !st.enforced && !chk.bridge && !run.bridge && !st.save && !*st.error)
		rw_fresh_write(job.uid, (unsigned long)bucket, &req, asked,
			       run.argv_used || chk.argv_used, &keep);
	if (chk.started)
		run.bridge = chk.bridge, run.bridge_server = chk.bridge_server, chk.bridge_server = NULL;
	if (run.bridge)
		st.bridge_server = run.bridge_server, run.bridge_server = NULL;
joined:
	st.bridge = run.bridge;
	if ((st.bridge || st.save) && !(st.helper = strdup(h.path)))
		rw_fail("rankwire: out of memory");
	st.h = (struct rw_helper){st.helper, h.timeout_s}, st.job = job, st.job.gids = NULL;
	if (st.save && job.ngids > 0 && (st.job.gids = calloc(job.ngids, sizeof *job.gids)))
		memcpy(st.job.gids, job.gids, job.ngids * sizeof *job.gids);
	else if (st.save && job.ngids > 0)
		rw_fail("rankwire: out of memory");
out:
	rw_abandon_helper(&st.check); /* unused if setup failed before it */
	if (st.active && !st.workdir)
		rw_fail("rankwire: the helper named no working directory in the container");
	rw_close_fds(&fds), rw_close_fds(&held), free(req.p), free(keep.p);
	free(chk.socket), free(run.socket), free(chk.bridge_server), free(run.bridge_server);
}

int slurm_spank_init(spank_t sp, int ac UNUSED, char **av UNUSED)
{
	/* sbatch and salloc too: Slurm hands their options on to the job's steps. */
	int ours = spank_context() == S_CTX_LOCAL || spank_context() == S_CTX_REMOTE ||
		   spank_context() == S_CTX_ALLOCATOR;

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

/* The index of option `name` in the table. */
static int opt_index(const char *name)
{
	for (int i = 0; i < RW_N_OPTS; i++)
		if (!strcmp(options[i].name, name))
			return i;
	return -1;
}

static int asked_for(spank_t sp, int i)
{
	return i >= 0 && (opt_val[i] || has_env(sp, opt_env[i]));
}

/* Not slurmstepd, or no container asked for: no helper runs, the step is untouched. */
static int wants_container(spank_t sp)
{
	return spank_remote(sp) == 1 && (asked_for(sp, RW_OPT_IMAGE) ||
	       asked_for(sp, opt_index("container-name")) || has_env(sp, "SLURM_CONTAINER"));
}

/* Still root, before slurmstepd starts the MPI plugin's server (mpi/pmix: tens of ms) and
 * forks the tasks: start the check phase's helper, whose interpreter and imports then
 * overlap that; user_init sends it the request (its facts: the cwd, the PMIx dir, are
 * only known then), if slurmstepd's cgroups and limits are still the helper's
 * (`same_context`; else it runs a new one, as for any step before). Not for a named
 * container's step, which may join through its ticket without the helper. If the step
 * fails after spank_init, slurm_spank_exit kills it; if it fails in spank_init (Slurm
 * then skips slurm_spank_exit) or slurmstepd dies, the helper reads EOF and exits. */
int slurm_spank_init_post_opt(spank_t sp, int ac, char **av)
{
	struct rw_helper h = {RANKWIRE_HELPER, HELPER_TIMEOUT_S};
	struct rw_fds none = {.n = 0};
	struct buf args = {0};
	const char *base = RW_JOBS_DIR;
	uint32_t uid = 0;
	long bucket;

	if (!wants_container(sp) || asked_for(sp, opt_index("container-name")))
		return 0;
	/* A fresh ticket may hold: the helper would take a core from the tasks for nothing */
	if ((bucket = fresh_bucket(sp)) >= 0 &&
	    spank_get_item(sp, S_JOB_UID, &uid) == ESPANK_SUCCESS &&
	    rw_fresh_ticket_exists(uid, (unsigned long)bucket))
		return 0;
	plugstack_args(ac, av, &args, &h, &base);
	free(args.p);
	if (!*st.error && rw_spawn_helper(&h, "check", NULL, &none, &st.check))
		*st.error = 0; /* user_init runs it the usual way, and says why it cannot */
	return 0;
}

int slurm_spank_user_init(spank_t sp, int ac, char **av)
{
	if (!wants_container(sp)) /* another plugin changed the step's environment */
		return rw_abandon_helper(&st.check), 0;
	st.active = 1;
	setup(sp, ac, av);
	return 0; /* failures are reported by task_init: Slurm 22.05 drops user_init's */
}

/* One of the reply's environment changes, applied to this task's environment. */
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

/* --container-entrypoint: slurmstepd execs the tasks' argv, which a plugin cannot make
 * longer; argv[0] becomes rankwire-entrypoint instead (installed beside this plugin,
 * opened on the host by `open_entrypoint`, run as /proc/self/fd/N in the container),
 * which execs the image's ENTRYPOINT words, the command's argv[0] and the rest of argv
 * (entrypoint.c). The words go in its environment; the descriptor closes at exec. */
static int entry_fd = -1;

/* In task_init_privileged, before an enforced container's setns: on the host either way. */
static void open_entrypoint(void)
{
	char path[PATH_MAX], *slash;
	Dl_info self;

	if (!dladdr((void *)open_entrypoint, &self) || !self.dli_fname ||
	    snprintf(path, sizeof path, "%s", self.dli_fname) >= (int)sizeof path - 24 ||
	    !(slash = strrchr(path, '/')))
		return rw_fail("rankwire: cannot tell where the plugin is installed");
	strcpy(slash + 1, "rankwire-entrypoint");
	if ((entry_fd = open(path, O_RDONLY | O_CLOEXEC)) < 0)
		rw_fail("rankwire: cannot open %s (%s): reinstall the plugin with "
			"make -C spank install", path, strerror(errno));
}

static void through_entrypoint(spank_t sp)
{
	char exe[64], **argv = NULL;
	int argc = 0;
	struct buf v = {0};

	if (st.entry.oom)
		return rw_fail("rankwire: out of memory");
	if (spank_get_item(sp, S_JOB_ARGV, &argc, &argv) != ESPANK_SUCCESS || argc < 1 || !argv ||
	    !argv[0])
		return rw_fail("rankwire: --container-entrypoint: the task has no command");
	/* srun --multi-prog: slurmstepd builds each task's argv from the configuration it got
	 * as the step's argv[1]; the step's argv[0], which is all a plugin reaches, is unused. */
	if (argc == 2 && argv[1] && strchr(argv[1], '\n'))
		return rw_fail("rankwire: --container-entrypoint does not work with srun "
			       "--multi-prog; put the entrypoint in the configuration's commands");
	buf_put(&v, st.entry.p, st.entry.len), entry_word(&v, argv[0]), buf_put(&v, "", 1);
	snprintf(exe, sizeof exe, "/proc/self/fd/%d", entry_fd);
	if (v.oom || spank_setenv(sp, "RANKWIRE_ENTRYPOINT_ARGV", v.p, 1) != ESPANK_SUCCESS ||
	    !(argv[0] = strdup(exe)))
		rw_fail("rankwire: cannot hand the image's entrypoint to the task");
	free(v.p);
}

/* Enforced: still root in the forked task, before Slurm drops privileges; the mount
 * namespace only (no user namespace: root's, which the user cannot change). Any mode:
 * rankwire-entrypoint is opened here, on the host. */
int slurm_spank_task_init_privileged(spank_t sp UNUSED, int ac UNUSED, char **av UNUSED)
{
	if (st.active && st.entry.len && !*st.error)
		open_entrypoint();
	if (st.active && st.enforced && !*st.error && setns(st.ns[1], CLONE_NEWNS))
		rw_fail("rankwire: cannot enter the container: %s", strerror(errno));
	return 0; /* task_init reports it */
}

#define BRIDGE_WAIT_MS 120000 /* a PMI-2 bridge's start: its first fence waits for all tasks */

/* In a forked child about to exec: `fds[i]` becomes descriptor 3 + i, inheritable, whatever
 * numbers they had (moved above 9 first, so that none overwrites another). */
static int child_fds(const int *fds, int n)
{
	int high[4];

	for (int i = 0; i < n; i++)
		if ((high[i] = fcntl(fds[i], F_DUPFD_CLOEXEC, 10)) < 0)
			return -1;
	for (int i = 0; i < n; i++)
		if (dup2(high[i], 3 + i) != 3 + i) /* dup2 to another number clears close-on-exec */
			return -1;
	return 0;
}

/* The child's side of starting a bridge: detach (a grandchild: never the task's child to
 * reap), unblock signals, exec the helper with `argv` and the task's environment less
 * PYTHON* (a job's PYTHONHOME or PYTHONPATH, from conda or a module, must not choose the
 * helper's interpreter or packages; the array is the forked child's copy). The
 * intermediate child exits 0 once the grandchild exists. */
static void exec_detached(char **argv, char **env, const int *fds, int n)
{
	sigset_t all;
	pid_t pid;

	if ((pid = fork()) == 0 && !child_fds(fds, n)) {
		char **to = env;
		for (char **e = env; *e; e++)
			if (strncmp(*e, "PYTHON", 6))
				*to++ = *e;
		*to = NULL;
		sigfillset(&all), sigprocmask(SIG_UNBLOCK, &all, NULL);
		execve(argv[0], argv, env);
	}
	_exit(pid > 0 ? 0 : 127); /* the bridge's own stderr says why it failed */
}

/* A bridge's environment changes (its report frame) for this task; `error` fails it. */
static void on_bridge_env(const char *key, char *val, void *ctx)
{
	if (!strcmp(key, "error"))
		rw_fail("%s", val);
	else
		on_task_env(key, val, ctx);
}

/* The task's variables that start with `prefix` go (the live array: setenv may move it,
 * unsetenv shifts it). */
static void unset_prefixed(spank_t sp, const char *prefix)
{
	char **env = NULL, name[256];

	for (int gone = 1; gone;) {
		gone = 0;
		if (spank_get_item(sp, S_JOB_ENV, &env) != ESPANK_SUCCESS || !env)
			break;
		for (char **e = env; *e && !gone; e++) {
			size_t len = strcspn(*e, "=");
			/* Slurm's unsetenv removes only NAME=...: an entry without '=' stays */
			if (strncmp(*e, prefix, strlen(prefix)) || len >= sizeof name || !(*e)[len])
				continue;
			memcpy(name, *e, len), name[len] = 0;
			gone = spank_unsetenv(sp, name) == ESPANK_SUCCESS;
		}
	}
}

#define PMI2_JOIN_MS 60000 /* pmi/pmix/pmi2bridge.START_TIMEOUT */

/* The node's bridge server that the start phase started (st.bridge_server): its socket,
 * which must be in the user's runtime dir `dir`. */
static int started_socket(const char *dir, struct sockaddr_un *sa)
{
	size_t len = strlen(dir);
	int n;

	if (strncmp(st.bridge_server, dir, len) || st.bridge_server[len] != '/')
		return -1;
	memset(sa, 0, sizeof *sa), sa->sun_family = AF_UNIX;
	n = snprintf(sa->sun_path, sizeof sa->sun_path, "%s", st.bridge_server);
	return n > 0 && (size_t)n < sizeof sa->sun_path ? 0 : -1;
}

/* The node's PMI-2 bridge socket, as pmi/pmix/pmi2bridge.socket_path names it: in the job
 * user's runtime dir (root made it, 0700), after PMI_JOBID ("job.step"), the node and the
 * slurmstepd that made the task's PMI_FD (maker_suffix). */
static int pmi2_socket(spank_t sp, char *dir, size_t dirlen, struct sockaddr_un *sa)
{
	char jobid[64], node[16], slurm_fd[16], stepd[24] = "";
	int n;

	if (spank_getenv(sp, "PMI_JOBID", jobid, sizeof jobid) != ESPANK_SUCCESS ||
	    spank_getenv(sp, "SLURM_NODEID", node, sizeof node) != ESPANK_SUCCESS ||
	    spank_getenv(sp, "PMI_FD", slurm_fd, sizeof slurm_fd) != ESPANK_SUCCESS ||
	    strchr(jobid, '/') || strchr(node, '/'))
		return -1;
	if ((n = snprintf(dir, dirlen, RW_RUN_DIR "/%u", (unsigned)getuid())) < 0 ||
	    (size_t)n >= dirlen)
		return -1;
	if (st.bridge_server)
		return started_socket(dir, sa);
	maker_suffix((int)strtol(slurm_fd, NULL, 10), stepd, sizeof stepd);
	memset(sa, 0, sizeof *sa), sa->sun_family = AF_UNIX;
	n = snprintf(sa->sun_path, sizeof sa->sun_path, "%s/pmi2bridge.%s.%s%s", dir, jobid, node,
		     stepd);
	return n > 0 && (size_t)n < sizeof sa->sun_path ? 0 : -1;
}

struct follower { spank_t sp; int cleared; };

/* The leader's answer ends with the record end=1 (no value holds a NUL), as
 * pmi2bridge.reply_ended says. */
static int reply_ended(const struct buf *b)
{
	return b->len >= 6 && !memcmp(b->p + b->len - 6, "end=1", 6) &&
	       (b->len == 6 || !b->p[b->len - 7]);
}

/* The leader's records: its error (first, if any), or the rank's PMIX_* to set, once the
 * task lost Slurm's PMI_* (Open MPI must not see a PMI-2 step) and any stale PMIX_*. */
static void on_follower(const char *key, char *val, void *ctx)
{
	struct follower *f = ctx;

	if (!strcmp(key, "error"))
		rw_fail("rankwire: %s", val);
	else if (!strcmp(key, "setenv") && !*st.error) {
		if (!f->cleared++)
			unset_prefixed(f->sp, "PMI_"), unset_prefixed(f->sp, "PMIX_");
		on_task_env(key, val, f->sp);
	}
}

/* A node bridge's server (`what`) at `sa`, for a task that joins it: connect (it may not
 * listen yet: retried until `deadline`, unless it `listened` before the tasks started;
 * non-blocking, so a full backlog is EAGAIN and retried, not a wait) and check that the
 * job user serves it. The descriptor, or -1 after rw_fail. */
static int connect_node_server(const struct sockaddr_un *sa, int64_t deadline,
			       const char *what, int listened)
{
	struct ucred cred = {0, (uid_t)-1, (gid_t)-1};
	socklen_t len = sizeof cred;
	int fd;

	if ((fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0)) < 0)
		return rw_fail("rankwire: cannot join the %s: %s", what, strerror(errno)), -1;
	while (connect(fd, (const struct sockaddr *)sa, sizeof *sa)) {
		if (errno != ENOENT && errno != ECONNREFUSED && errno != EINTR && errno != EAGAIN)
			return rw_close(fd), rw_fail("rankwire: cannot join the %s at %s: %s", what,
						     sa->sun_path, strerror(errno)), -1;
		if (listened && errno != EINTR && errno != EAGAIN)
			return rw_close(fd), rw_fail("rankwire: the node's %s, started with the "
				"step, ended before this task joined it (%s); see the step's first "
				"message (srun -l)", what, strerror(errno)), -1;
		if (rw_now_ms() >= deadline && listened)
			return rw_close(fd), rw_fail("rankwire: the node's %s, started with the "
				"step, took no connection within %d s", what,
				(int)(PMI2_JOIN_MS / 1000)), -1;
		if (rw_now_ms() >= deadline)
			return rw_close(fd), rw_fail("rankwire: the node's %s (its task with "
				"SLURM_LOCALID=0) did not listen within %d s (it did not start, or "
				"ended); see that task's message (srun -l)", what,
				(int)(PMI2_JOIN_MS / 1000)), -1;
		(void)poll(NULL, 0, 5);
	}
	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len))
		return rw_close(fd), rw_fail("rankwire: cannot check who serves the %s at %s: %s",
					     what, sa->sun_path, strerror(errno)), -1;
	if (cred.uid != getuid())
		return rw_close(fd), rw_fail("rankwire: the %s's socket %s is held by uid %u, not "
			"by you; ask the node's admin to find that process", what, sa->sun_path,
			(unsigned)cred.uid), -1;
	return fd;
}

/* A task joins its node's PMI-2 bridge (pmi2bridge's followers), the one the start phase
 * started (every task, st.bridge_server) or else its node's first task: here, without a
 * process of its own: connect (it may not listen yet), check that the job user serves it,
 * hand over the task's rank, Slurm socket and stderr (the started one's messages go there),
 * read its records (pmi2bridge.follower_reply: the rank's PMIX_* or the bridge's error,
 * then end=1). The connection is the task's across exec: its EOF is the task's end. */
static void join_pmi2_bridge(spank_t sp, int slurm_fd)
{
	char dir[64], rank[18], jobid[64], said[96], data[4096];
	int fds[2] = {slurm_fd, 2};
	union { struct cmsghdr h; char b[CMSG_SPACE(sizeof fds)]; } cbuf = {0};
	struct iovec iov = {said, 0};
	struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf.b,
			     .msg_controllen = sizeof cbuf.b};
	struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
	struct sockaddr_un sa;
	struct follower f = {sp, 0};
	int64_t deadline = rw_now_ms() + PMI2_JOIN_MS, left;
	struct buf b = {0};
	ssize_t n = 0;
	int fd;

	if (spank_getenv(sp, "PMI_RANK", rank, sizeof rank) != ESPANK_SUCCESS ||
	    spank_getenv(sp, "PMI_JOBID", jobid, sizeof jobid) != ESPANK_SUCCESS ||
	    strpbrk(jobid, " \n") || pmi2_socket(sp, dir, sizeof dir, &sa))
		return rw_fail("rankwire: the PMI-2 bridge needs the task's PMI_RANK, PMI_JOBID "
			       "and SLURM_NODEID (short, without '/'): run with srun --mpi=pmi2");
	if ((fd = connect_node_server(&sa, deadline, "PMI-2 bridge", !!st.bridge_server)) < 0)
		return;
	iov.iov_len = (size_t)snprintf(said, sizeof said, "%s %s\n", rank, jobid); /* fits */
	c->cmsg_level = SOL_SOCKET, c->cmsg_type = SCM_RIGHTS, c->cmsg_len = CMSG_LEN(sizeof fds);
	memcpy(CMSG_DATA(c), fds, sizeof fds);
	if (sendmsg(fd, &msg, MSG_NOSIGNAL) != (ssize_t)iov.iov_len)
		return rw_close(fd), rw_fail("rankwire: cannot join the PMI-2 bridge: %s",
					    strerror(errno));
	while (!b.oom && b.len <= FRAME_MAX && !reply_ended(&b)) {
		struct pollfd p = {fd, POLLIN, 0};
		int r = (left = deadline - rw_now_ms()) > 0 ? poll(&p, 1, (int)left) : 0;
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) { /* the deadline, or poll failed: no recv without a deadline */
			n = -2;
			break;
		}
		if ((n = recv(fd, data, sizeof data, 0)) <= 0 && !(n < 0 && errno == EINTR))
			break;
		buf_put(&b, data, n > 0 ? (size_t)n : 0);
	}
	if (b.oom || b.len > FRAME_MAX)
		rw_fail("rankwire: the node's PMI-2 bridge's answer is over %d bytes", FRAME_MAX);
	else if (!reply_ended(&b))
		rw_fail("rankwire: the node's PMI-2 bridge %s", n == -2 ? "did not answer in time" :
			"ended during start-up; see its message");
	else if (frame_parse(b.p, b.len, on_follower, &f))
		rw_fail("rankwire: bad answer from the node's PMI-2 bridge");
	else if (!f.cleared && !*st.error) /* no variable at all: still not a PMI-2 step's */
		unset_prefixed(sp, "PMI_"), unset_prefixed(sp, "PMIX_");
	free(b.p);
	if (*st.error)
		return rw_close(fd);
	rw_close(slurm_fd); /* the bridge's now */
	if (fcntl(fd, F_SETFD, 0)) /* the task keeps it: its end is the bridge's EOF */
		rw_close(fd), rw_fail("rankwire: cannot hand the PMI-2 bridge's connection to "
				      "the task");
}

/* The PMI-2 to PMIx bridge (pmi/pmix/pmi2bridge.py) of this task, still on the host. The
 * start phase started the node's (st.bridge_server): every task joins it. Else the
 * node's first task runs `rankwire spank-helper pmi2-bridge DIR` as the job user with the task's
 * environment, which takes over the task's Slurm PMI_FD and becomes the node's PMIx
 * server; its report (the task's PMIX_* in, PMI_* out) is applied here, bounded; EOF on
 * the control pipe, whose write end the task keeps across exec, is the task's end. The
 * node's other tasks join it (join_pmi2_bridge). */
static void start_pmi2_bridge(spank_t sp)
{
	char **env = NULL, slurm_fd[16], local[16], dir[64], *argv[] = {st.helper,
		"spank-helper", "pmi2-bridge", dir, NULL}; /* rankwire/entry.py: report 3, control 4 */
	int rep[2] = {-1, -1}, ctl[2] = {-1, -1}, status = 0;
	struct sockaddr_un sa;
	struct buf b = {0};
	pid_t pid;

	if (spank_get_item(sp, S_JOB_ENV, &env) != ESPANK_SUCCESS || !env ||
	    spank_getenv(sp, "PMI_FD", slurm_fd, sizeof slurm_fd) != ESPANK_SUCCESS ||
	    spank_getenv(sp, "SLURM_LOCALID", local, sizeof local) != ESPANK_SUCCESS ||
	    pmi2_socket(sp, dir, sizeof dir, &sa))
		return rw_fail("rankwire: the PMI-2 bridge needs the task's PMI_FD, PMI_JOBID, "
			       "SLURM_LOCALID and SLURM_NODEID: run with srun --mpi=pmi2");
	if (strcmp(local, "0") || st.bridge_server)
		return join_pmi2_bridge(sp, (int)strtol(slurm_fd, NULL, 10));
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, rep) || pipe2(ctl, O_CLOEXEC))
		return rw_close(rep[0]), rw_close(rep[1]),
		       rw_fail("rankwire: cannot start the PMI-2 bridge: %s", strerror(errno));
	if ((pid = fork()) == 0)
		exec_detached(argv, env, (int[]){rep[1], ctl[0]}, 2);
	rw_close(rep[1]), rw_close(ctl[0]);
	if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status) ||
	    WEXITSTATUS(status))
		rw_fail("rankwire: cannot start the PMI-2 bridge (fork)");
	else if ((status = rw_read_frame(rep[0], -1, rw_now_ms() + BRIDGE_WAIT_MS, NULL, &b)))
		rw_fail("rankwire: the PMI-2 bridge did not report its start (within %d s): %s",
			BRIDGE_WAIT_MS / 1000, strerror(status));
	else if (frame_parse(b.p, b.len, on_bridge_env, sp) || b.len == 0)
		rw_fail("rankwire: the PMI-2 bridge said nothing (see its message above)");
	else if (fcntl(ctl[1], F_SETFD, 0)) /* the task keeps it: its end is the bridge's EOF */
		rw_fail("rankwire: cannot hand the PMI-2 bridge's pipe to the task");
	else
		rw_close((int)strtol(slurm_fd, NULL, 10)); /* Slurm's socket: the bridge's now */
	rw_close(rep[0]), free(b.p);
	if (*st.error)
		rw_close(ctl[1]);
}

/* pmi/bridge.node_socket: the node's PMI bridge server, in the job user's runtime
 * dir, after SLURM_JOB_ID, SLURM_STEP_ID and SLURM_NODEID (digits only) and the step's
 * slurmstepd (stepd_suffix). */
static int pmi_node_socket(spank_t sp, char *dir, size_t dirlen, struct sockaddr_un *sa)
{
	char job[32], step[32], node[16], stepd[24] = "", **env = NULL;
	int n;

	if (spank_getenv(sp, "SLURM_JOB_ID", job, sizeof job) != ESPANK_SUCCESS ||
	    spank_getenv(sp, "SLURM_STEP_ID", step, sizeof step) != ESPANK_SUCCESS ||
	    spank_getenv(sp, "SLURM_NODEID", node, sizeof node) != ESPANK_SUCCESS ||
	    strspn(job, "0123456789") != strlen(job) || strspn(step, "0123456789") != strlen(step) ||
	    strspn(node, "0123456789") != strlen(node) || !*job || !*step || !*node)
		return -1;
	if ((n = snprintf(dir, dirlen, RW_RUN_DIR "/%u", (unsigned)getuid())) < 0 ||
	    (size_t)n >= dirlen)
		return -1;
	if (st.bridge_server)
		return started_socket(dir, sa);
	if (spank_get_item(sp, S_JOB_ENV, &env) == ESPANK_SUCCESS && env)
		stepd_suffix(env, stepd, sizeof stepd);
	memset(sa, 0, sizeof *sa), sa->sun_family = AF_UNIX;
	n = snprintf(sa->sun_path, sizeof sa->sun_path, "%s/pmibridge.%s.%s.%s%s", dir, job, step,
		     node, stepd);
	return n > 0 && (size_t)n < sizeof sa->sun_path ? 0 : -1;
}

/* A task hands its end of the PMI_FD socketpair, its stderr and its environment (framed
 * `env=K=V` records, then end=1) to the node's bridge server (pmi/bridgeserve: the one the
 * start phase started, st.bridge_server, which every task joins; or the one the first
 * task's shim started, which the others join), which forks its
 * bridge: connect (it may not listen yet), check that the job user serves it, send,
 * close. Nothing comes back, as from a bridge of the task's own: the task's PMI client
 * waits on PMI_FD. */
static void join_pmi_bridge(spank_t sp, int bridge_end)
{
	char dir[64], **env = NULL;
	union { struct cmsghdr h; char b[CMSG_SPACE(2 * sizeof(int))]; } cbuf = {0};
	int fds[2] = {bridge_end, 2}, fd, sent = 0;
	struct sockaddr_un sa;
	int64_t deadline = rw_now_ms() + PMI2_JOIN_MS, left;
	struct buf b = {0};

	if (pmi_node_socket(sp, dir, sizeof dir, &sa) ||
	    spank_get_item(sp, S_JOB_ENV, &env) != ESPANK_SUCCESS || !env)
		return rw_fail("rankwire: the PMI bridge needs the task's SLURM_JOB_ID, "
			       "SLURM_STEP_ID and SLURM_NODEID: run with srun --mpi=pmix");
	frame_hand_over(&b, env);
	if (b.oom)
		return free(b.p), rw_fail("rankwire: cannot join the PMI bridge: out of memory");
	if ((fd = connect_node_server(&sa, deadline, "PMI bridge server", !!st.bridge_server)) < 0)
		return free(b.p);
	while ((size_t)sent < b.len) { /* the fds go with the first bytes */
		struct iovec iov = {b.p + sent, b.len - (size_t)sent};
		struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
		struct pollfd p = {fd, POLLOUT, 0};
		ssize_t n;
		if (!sent) {
			struct cmsghdr *c;
			msg.msg_control = cbuf.b, msg.msg_controllen = sizeof cbuf.b;
			c = CMSG_FIRSTHDR(&msg);
			c->cmsg_level = SOL_SOCKET, c->cmsg_type = SCM_RIGHTS;
			c->cmsg_len = CMSG_LEN(sizeof fds);
			memcpy(CMSG_DATA(c), fds, sizeof fds);
		}
		if ((left = deadline - rw_now_ms()) <= 0 || poll(&p, 1, (int)left) < 0) {
			if (left > 0 && errno == EINTR)
				continue;
			break;
		}
		if ((n = sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT)) < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			break;
		}
		sent += (int)n;
	}
	if ((size_t)sent < b.len)
		rw_fail("rankwire: cannot hand the task to the node's PMI bridge server: %s",
			left <= 0 ? "no room within 60 s" : strerror(errno));
	free(b.p), rw_close(fd);
}

/* The PMI bridge of this task (pmi/bridge.py), still on the host: a socketpair whose one
 * end the task gets as PMI_FD (it loses PMIX_*), the other served by a bridge that is this
 * rank's PMIx client. The node's first task starts the node's bridge server, `rankwire
 * spank-helper pmi-bridge DIR` (rankwire/entry.py; as the job user, the task's
 * environment; detached: a grandchild, never the task's child to reap), which forks this
 * task's bridge on fd 3 and the other tasks' as they join (join_pmi_bridge); a bridge ends
 * when its task's end of the socket closes, or with the step (proctrack). When the start
 * phase started the node's server (st.bridge_server), every task joins it. */
static void start_bridge(spank_t sp)
{
	char **env = NULL, rank[16], fd[16], size[16], local[16], dir[64], *argv[] = {st.helper,
		"spank-helper", "pmi-bridge", dir, NULL};
	struct sockaddr_un sa;
	uint32_t n = 0;
	int sv[2], status = 0, first;
	pid_t pid;

	if (spank_get_item(sp, S_JOB_ENV, &env) != ESPANK_SUCCESS || !env ||
	    spank_get_item(sp, S_JOB_TOTAL_TASK_COUNT, &n) != ESPANK_SUCCESS ||
	    spank_getenv(sp, "PMIX_RANK", rank, sizeof rank) != ESPANK_SUCCESS ||
	    spank_getenv(sp, "SLURM_LOCALID", local, sizeof local) != ESPANK_SUCCESS)
		return rw_fail("rankwire: the PMI bridge needs the task's PMIX_RANK and "
			       "SLURM_LOCALID: run with srun --mpi=pmix");
	first = !strcmp(local, "0") && !st.bridge_server;
	if (first && pmi_node_socket(sp, dir, sizeof dir, &sa))
		snprintf(dir, sizeof dir, "%s", "/nonexistent"); /* no node socket: serves only us */
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv))
		return rw_fail("rankwire: cannot start the PMI bridge: %s", strerror(errno));
	if (!first) {
		join_pmi_bridge(sp, sv[1]);
		rw_close(sv[1]);
		if (*st.error)
			return rw_close(sv[0]);
	} else {
		if ((pid = fork()) == 0)
			exec_detached(argv, env, &sv[1], 1);
		rw_close(sv[1]);
		if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status) ||
		    WEXITSTATUS(status)) {
			rw_close(sv[0]);
			return rw_fail("rankwire: cannot start the PMI bridge (fork)");
		}
	}
	if (fcntl(sv[0], F_SETFD, 0))
		return rw_close(sv[0]), rw_fail("rankwire: cannot start the PMI bridge: %s",
						strerror(errno));
	snprintf(fd, sizeof fd, "%d", sv[0]), snprintf(size, sizeof size, "%u", n);
	if (spank_setenv(sp, "PMI_FD", fd, 1) || spank_setenv(sp, "PMI_RANK", rank, 1) ||
	    spank_setenv(sp, "PMI_SIZE", size, 1))
		return rw_close(sv[0]), rw_fail("rankwire: cannot set the task's PMI variables");
	unset_prefixed(sp, "PMIX_");
}

int slurm_spank_task_init(spank_t sp, int ac UNUSED, char **av UNUSED)
{
	uint32_t rank = 1;
	if (st.warning && spank_get_item(sp, S_TASK_GLOBAL_ID, &rank) == ESPANK_SUCCESS && !rank)
		dprintf(2, "rankwire: warning: %s\n", st.warning); /* once, on srun's stderr */
	if (!st.active)
		return *st.error ? (slurm_error("%s", st.error), -1) : 0;
	if (!*st.error && st.bridge == 1)
		start_bridge(sp);
	else if (!*st.error && st.bridge == 2)
		start_pmi2_bridge(sp);
	/* Forked and single-threaded, as setns(CLONE_NEWUSER) wants; no_new_privs as for all
	 * rankwire's containers. Namespace and lease fds are close-on-exec: the task's own. */
	if (!*st.error && ((!st.enforced && (setns(st.ns[0], CLONE_NEWUSER) ||
	    setns(st.ns[1], CLONE_NEWNS))) || prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)))
		rw_fail("rankwire: cannot enter the container: %s", strerror(errno));
	if (!*st.error && chdir(st.workdir))
		rw_fail("rankwire: working directory %s does not exist in the container: pass "
			"--container-workdir DIR or bind it with --container-mounts", st.workdir);
	if (!*st.error && (st.env.oom || frame_parse(st.env.p, st.env.len, on_task_env, sp)))
		rw_fail("rankwire: out of memory");
	if (!*st.error && st.entry.len) /* after the env records: they may unset any job name */
		through_entrypoint(sp);
	return *st.error ? (slurm_error("%s", st.error), -1) : 0;
}

/* The lease ends: `leave`, last=0|1 until EOF, (last) the holder's exit: HOLDER_WAIT_MS each. */
static void release(void)
{
	struct buf b = {0};
	struct reply r = {0};

	if (st.lease >= 0 && (send(st.lease, "leave\n", 6, MSG_NOSIGNAL | MSG_DONTWAIT) != 6 ||
	    rw_read_frame(st.lease, -1, rw_now_ms() + HOLDER_WAIT_MS, NULL, &b) ||
	    frame_parse(b.p, b.len, on_reply, &r)))
		slurm_error("rankwire: no answer to `leave` from the container's holder");
	if (r.last && st.pidfd >= 0) /* not gone in time: we waited enough */
		(void)poll(&(struct pollfd){st.pidfd, POLLIN, 0}, 1, HOLDER_WAIT_MS);
	rw_close(st.ns[0]), rw_close(st.ns[1]), rw_close(st.lease), rw_close(st.pidfd); /* -1: ok */
	st.lease = st.pidfd = st.ns[0] = st.ns[1] = -1, free(b.p);
}

static void on_saved(const char *key, char *val, void *ctx UNUSED)
{
	if (!strcmp(key, "error"))
		rw_fail("%s", val);
}

/* --container-save: `spank-helper save` as the job user, the container still there. */
static void save(void)
{
	struct buf req = {0};
	struct rw_fds none = {.n = 0}, got = {.n = 0};

	frame_add(&req, "uid", "%u", (unsigned)st.job.uid);
	frame_add(&req, "gid", "%u", (unsigned)st.job.gid);
	frame_add(&req, "save", "%s", st.save);
	if (!rw_run_helper(&st.h, "save", &req, &st.job, &none, &got, on_saved, NULL))
		rw_close_fds(&got);
	if (*st.error) /* slurmstepd's errors reach srun's stderr */
		slurm_error("%s", st.error);
	free(req.p);
}

int slurm_spank_task_exit(spank_t sp UNUSED, int ac UNUSED, char **av UNUSED)
{
	if ((st.lease >= 0 || st.save) && ++st.exited == st.tasks) {
		if (st.save && !*st.error)
			save();
		release();
	}
	return 0;
}

/* `s`'s first `max` bytes at `out`, each but [A-Za-z0-9._-] as '_'; returns the end. */
static char *key_part(char *out, const char *s, size_t max)
{
	for (size_t i = 0; i < max && s[i]; i++)
		*out++ = (s[i] >= 'a' && s[i] <= 'z') || (s[i] >= 'A' && s[i] <= 'Z') ||
			 (s[i] >= '0' && s[i] <= '9') || strchr("._-", s[i]) ? s[i] : '_';
	return *out = 0, out;
}

/* spank/plan.slurmd_key: our SLURM_CONF as a name ("default": none), then '@' and our node
 * (SLURMD_NODENAME) when slurmd gave one; 200 + 1 + 50 bytes at most. */
static void slurmd_key(char key[256], const char *conf, const char *node)
{
	char *end = key_part(key, conf && *conf ? conf : "default", 200);

	if (node && *node) {
		*end++ = '@';
		key_part(end, node, 50);
	}
}

/* The job's end on this node (slurmd's epilog, as root, no step state): if the job kept
 * named containers here, `spank-helper epilog` ends them and removes their dirs. Their
 * dir is BASE/SLURMD/JOB: BASE named_dir= or RW_JOBS_DIR, SLURMD our SLURM_CONF and node
 * (slurmd puts both in the epilog's environment) as a name (`slurmd_key`; the helper
 * checks BASE). */
int slurm_spank_job_epilog(spank_t sp, int ac, char **av)
{
	const char *conf = getenv("SLURM_CONF"), *node = getenv("SLURMD_NODENAME");
	const char *base = RW_JOBS_DIR;
	char key[256];
	struct rw_helper h = {RANKWIRE_HELPER, HELPER_TIMEOUT_S};
	struct rw_fds none = {.n = 0}, got = {.n = 0};
	struct buf req = {0};
	struct stat sb;
	uint32_t job = 0;
	char dir[4352];

	if (spank_get_item(sp, S_JOB_ID, &job) != ESPANK_SUCCESS)
		return 0;
	plugstack_args(ac, av, &req, &h, &base);
	slurmd_key(key, conf, node);
	snprintf(dir, sizeof dir, "%s/%s/%u", base, key, job);
	if (lstat(dir, &sb) || !S_ISDIR(sb.st_mode)) /* the usual case: nothing kept */
		return free(req.p), 0;
	slurm_debug("rankwire: job %u kept named containers in %s: ending them", job, dir);
	h.timeout_s = h.timeout_s < EPILOG_TIMEOUT_S ? h.timeout_s : EPILOG_TIMEOUT_S;
	frame_add(&req, "job_id", "%u", job);
	if (conf)
		frame_add(&req, "slurm_conf", "%s", conf);
	if (node)
		frame_add(&req, "slurmd_nodename", "%s", node);
	if (!*st.error && !rw_run_helper(&h, "epilog", &req, NULL, &none, &got, on_saved, NULL))
		rw_close_fds(&got);
	if (*st.error)
		slurm_error("%s", st.error);
	free(req.p);
	return 0; /* a failed epilog would drain the node; the reaper comes later */
}

int slurm_spank_exit(spank_t sp, int ac UNUSED, char **av UNUSED)
{
	if (spank_remote(sp) == 1)
		rw_abandon_helper(&st.check), release();
	for (int i = 0; i < RW_N_OPTS; i++)
		free(opt_val[i]), opt_val[i] = NULL;
	free(st.helper), free(st.warning), free(st.save), free(st.job.gids);
	st.helper = st.warning = st.save = NULL, st.job.gids = NULL;
	return 0;
}
