/*
 * `rankwire-holder`: the serving half of a container's holder. runtime/holder.py sets the
 * container up (namespaces, image, overlay, binds, pivot_root) and then execs this program
 * in its place (by descriptor: the holder is inside the container by then, hence a static
 * program), keeping its pid, its children (FUSE daemons, the PID namespace's init, the
 * watcher) and the descriptors it names in its arguments. A long-lived holder is then a
 * small C process instead of a Python interpreter forked from the CLI.
 *
 * Or it sets the container up itself (`setup`, below: the recipe of the C front end's exec
 * or launch plan, or the plugin's kept recipe), then serves the same way.
 *
 * It serves the holder's socket, one command per connection, as before:
 *   "join"  -> the report (JSON, one line) with the namespace descriptors; the connection
 *              is then a lease, which ends with "leave" (answered `last=1|0`, a frame) or EOF
 *   "info", "stop" -> the report with "leases": N ("stop" then ends us)
 *   "upper" -> the report with the overlay's upper dir (runtime/save.py)
 * and ends, tearing down, when: SIGTERM (with leases: once they have left, or TERM_GRACE_MS
 * after it, or at a second SIGTERM); "stop"; its owner, a FUSE daemon or init died; the
 * last lease of a non-persistent holder ended; nobody joined a non-persistent holder within
 * FIRST_JOIN_MS. Without serve=1 it only tears down (a setup that failed).
 *
 * Arguments, KEY=VALUE each (runtime/holder.py `Holder.server_args`): mode=ephemeral|shared|
 * persistent, status=FD (the starter's pipe: `said` goes there, before serving or after the
 * teardown), said=JSON, serve=1, listener=FD, dir=FD (the socket's directory) with
 * unlink=NAME (repeated: the socket, its plans), session=PATH with session_dir=FD (its
 * parent), ns=FD (repeated, in the join's order), upper=FD, owner=PID, daemon=PID (repeated),
 * init=PID with init_life=FD, watcher=PID with watcher_conn=FD. Descriptors not named (the
 * session's and overlay's locks) are just kept until we exit.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "frame.h" /* spank/frame.c: records and a growing buffer */

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif

#define FIRST_JOIN_MS 10000 /* a non-persistent holder nobody joins goes */
/* After SIGTERM, how long the leases' commands get to end by their own SIGTERM: scancel
 * signals a step's tasks and its container's holder in one sweep, and a teardown first
 * would SIGKILL the commands (exit 137, no chance to act on the SIGTERM). */
#define TERM_GRACE_MS 1000
#define DAEMON_EXIT_MS 5000 /* a FUSE daemon's unmount after SIGHUP */
#define INIT_EXIT_MS 1000 /* see reap_init */
#define WATCHER_EXIT_MS 5000
#define MAX_LIST 16 /* unlink=, ns=, daemon=, keep= (joinplan.KEEP_MAX) */
#define SPACE " \t\r\n\v\f" /* what Python's bytes.strip() strips */

struct list { int n, v[MAX_LIST]; };

static struct {
	int persistent, serve, status;
	const char *mode, *said, *session;
	int listener, dir, session_dir, upper, init_life, watcher_conn;
	pid_t owner, init, watcher;
	struct list ns, daemons;
	const char *unlink[MAX_LIST];
	int n_unlink;
} h = { .status = -1, .listener = -1, .dir = -1, .session_dir = -1, .upper = -1,
	.init_life = -1, .watcher_conn = -1 };

struct client { int fd, lease; };
static struct client *clients;
static int n_clients, cap_clients, leases, joined;
static long drain; /* SIGTERM came with leases: no more joins, and when we go all the same */

static int pidfd_open(pid_t pid) { return (int)syscall(SYS_pidfd_open, pid, 0); }

/* Slurm signals every process of a step (scancel, `scancel -s`, `--signal=USR1@60`): those
 * are for the commands, which need their container meanwhile; the holder and the watcher
 * ignore them (the holder's SIGTERM is its own: see main). */
static void ignore_commands_signals(void)
{
	const int theirs[] = { SIGHUP, SIGINT, SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM };
	for (size_t k = 0; k < sizeof theirs / sizeof theirs[0]; k++)
		signal(theirs[k], SIG_IGN);
}

static long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

/* Wait up to ms for `pid` (our child) to exit; 1 if it did (not yet reaped), 0 if not. */
static int exits_within(pid_t pid, int ms)
{
	int fd = pidfd_open(pid);
	if (fd < 0)
		return errno == ESRCH; /* reaped already: gone */
	struct pollfd p = { .fd = fd, .events = POLLIN };
	int r;
	while ((r = poll(&p, 1, ms)) < 0 && errno == EINTR)
		;
	close(fd);
	return r == 1;
}

static void put_all(int fd, const char *s, size_t n)
{
	while (n) {
		ssize_t w = send(fd, s, n, MSG_NOSIGNAL);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return;
		s += w;
		n -= (size_t)w;
	}
}

/* The report line, with descriptors attached (one message, as Python's send_fds); 0 if
 * it went. */
static int send_report(int fd, const int *fds, int nfds)
{
	size_t n = strlen(h.said);
	char line[n + 1];
	memcpy(line, h.said, n);
	line[n] = '\n';
	struct iovec iov = { .iov_base = line, .iov_len = n + 1 };
	union { char buf[CMSG_SPACE(sizeof(int) * MAX_LIST)]; struct cmsghdr align; } u;
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
	if (nfds > 0) {
		msg.msg_control = u.buf;
		msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
		struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
		memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
	}
	ssize_t sent;
	while ((sent = sendmsg(fd, &msg, MSG_NOSIGNAL)) < 0 && errno == EINTR)
		;
	return sent == (ssize_t)(n + 1) ? 0 : -1;
}

static void drop_client(int i)
{
	if (clients[i].lease)
		leases--;
	close(clients[i].fd);
	clients[i] = clients[--n_clients];
}

/* One readable connection; 1 if it said "stop". */
static int client(int i)
{
	char cmd[65];
	ssize_t n;
	while ((n = recv(clients[i].fd, cmd, 64, 0)) < 0 && errno == EINTR)
		;
	size_t len = n > 0 && !memchr(cmd, '\0', (size_t)n) ? (size_t)n : 0; /* a NUL: no command */
	while (len && strchr(SPACE, cmd[len - 1]))
		len--;
	cmd[len] = '\0';
	char *c = cmd + strspn(cmd, SPACE);
	int fd = clients[i].fd;
	if (clients[i].lease) { /* a lease ends: "leave", or EOF when its holder died */
		if (!strcmp(c, "leave")) {
			/* "last": we are about to tear down, so the leaver may wait for it; a
			 * persistent instance stays (no one should wait for its exit) unless a
			 * SIGTERM is draining it */
			const char *last = leases == 1 && (!h.persistent || drain) ? "last=1" : "last=0";
			put_all(fd, last, strlen(last) + 1);
		}
		drop_client(i);
		return 0;
	}
	if (!strcmp(c, "join")) {
		if (!drain && send_report(fd, h.ns.v, h.ns.n) == 0) {
			clients[i].lease = 1;
			leases++;
			joined = 1;
			return 0;
		}
	} else if (!strcmp(c, "info") || !strcmp(c, "stop")) {
		struct buf b = { 0 };
		buf_put(&b, h.said, strlen(h.said) - 1); /* the report without its closing brace */
		char tail[48];
		int t = snprintf(tail, sizeof tail, ", \"leases\": %d}\n", leases);
		buf_put(&b, tail, (size_t)t);
		if (!b.oom)
			put_all(fd, b.p, b.len);
		free(b.p);
	} else if (!strcmp(c, "upper")) {
		send_report(fd, &h.upper, h.upper >= 0);
	}
	drop_client(i);
	return !strcmp(c, "stop");
}

static void add_client(int fd)
{
	if (n_clients == cap_clients) {
		int cap = cap_clients ? 2 * cap_clients : 64;
		struct client *more = realloc(clients, sizeof *clients * (size_t)cap);
		if (!more) {
			close(fd);
			return;
		}
		clients = more;
		cap_clients = cap;
	}
	clients[n_clients++] = (struct client){ fd, 0 };
}

/* Serve until something ends us (see the top); then the caller tears down. */
static void serve(int sig)
{
	/* the owner, the FUSE daemons and init: if one dies, we go */
	int watched[MAX_LIST + 2], n_watched = 0;
	pid_t pids[MAX_LIST + 2];
	int n_pids = 0;
	if (h.owner > 0)
		pids[n_pids++] = h.owner;
	for (int k = 0; k < h.daemons.n; k++)
		pids[n_pids++] = h.daemons.v[k];
	if (h.init > 0)
		pids[n_pids++] = h.init;
	for (int k = 0; k < n_pids; k++) {
		int fd = pidfd_open(pids[k]);
		if (fd < 0)
			goto out; /* gone already */
		watched[n_watched++] = fd;
	}
	/* a connection reset between poll and accept must not block us */
	fcntl(h.listener, F_SETFL, fcntl(h.listener, F_GETFL) | O_NONBLOCK);
	long deadline = now_ms() + FIRST_JOIN_MS;
	for (;;) {
		int timeout = -1;
		if (!h.persistent && !joined) {
			long left = deadline - now_ms();
			if (left <= 0)
				goto out;
			timeout = (int)left;
		}
		if (drain) {
			long left = drain - now_ms();
			if (!leases || left <= 0)
				goto out;
			if (timeout < 0 || left < timeout)
				timeout = (int)left;
		}
		int fixed = 2 + n_watched, n = fixed + n_clients;
		struct pollfd *p = calloc((size_t)n, sizeof *p);
		if (!p)
			goto out;
		p[0] = (struct pollfd){ .fd = sig, .events = POLLIN };
		p[1] = (struct pollfd){ .fd = drain ? -1 : h.listener, .events = POLLIN }; /* no joins */
		for (int k = 0; k < n_watched; k++)
			p[2 + k] = (struct pollfd){ .fd = watched[k], .events = POLLIN };
		for (int k = 0; k < n_clients; k++)
			p[fixed + k] = (struct pollfd){ .fd = clients[k].fd, .events = POLLIN };
		int r = poll(p, (nfds_t)n, timeout);
		int end = r < 0 && errno != EINTR;
		for (int k = 2; r > 0 && k < fixed; k++)
			if (p[k].revents)
				end = 1;
		if (r > 0 && p[0].revents) { /* SIGTERM */
			struct signalfd_siginfo si;
			if (read(sig, &si, sizeof si) != (ssize_t)sizeof si || !leases || drain)
				end = 1;
			else
				drain = now_ms() + TERM_GRACE_MS;
		}
		/* clients by fd, from the last: drop_client moves the last one into a hole */
		for (int k = n - 1; r > 0 && !end && k >= fixed; k--) {
			if (!p[k].revents)
				continue;
			for (int j = 0; j < n_clients; j++)
				if (clients[j].fd == p[k].fd) {
					end = client(j);
					break;
				}
			if (!h.persistent && joined && !leases)
				end = 1;
		}
		if (r > 0 && !end && p[1].revents) {
			int fd = accept4(h.listener, NULL, NULL, SOCK_CLOEXEC);
			if (fd >= 0)
				add_client(fd);
			else if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
				end = 1; /* EMFILE and the like: the listener would stay readable */
		}
		free(p);
		if (end)
			goto out;
	}
out:
	for (int k = 0; k < n_watched; k++)
		close(watched[k]);
}

/* Kill init: the kernel kills every process of the namespace at once. */
static void end_init(void)
{
	if (h.init > 0 && h.init_life >= 0) {
		close(h.init_life);
		h.init_life = -1;
		kill(h.init, SIGKILL);
	}
}

/* Reap the killed init, waiting a little: its exit waits until every process of the
 * namespace is reaped by their parents (a rank by the launcher that forked it), which we
 * must not wait for. One still exiting is reaped by whoever inherits it. */
static void reap_init(void)
{
	if (h.init > 0 && exits_within(h.init, INIT_EXIT_MS))
		waitpid(h.init, NULL, 0);
}

/* Our end: the watcher ends what still runs in the container, then exits. */
static void end_watcher(void)
{
	if (h.watcher_conn >= 0) {
		put_all(h.watcher_conn, "end", 3); /* not a death: our files are gone */
		close(h.watcher_conn);
	}
	if (h.watcher > 0) {
		if (!exits_within(h.watcher, WATCHER_EXIT_MS))
			kill(h.watcher, SIGKILL);
		waitpid(h.watcher, NULL, 0);
	}
}

static void teardown(void)
{
	end_init(); /* first: the container's processes go before its mounts */
	for (int i = 0; i < n_clients; i++)
		close(clients[i].fd);
	if (h.listener >= 0)
		close(h.listener);
	for (int k = 0; k < h.daemons.n; k++) /* SIGHUP: the end they do not ignore */
		kill(h.daemons.v[k], SIGHUP);     /* (holder.py `_die_with_holder`) */
	for (int k = 0; k < h.daemons.n; k++) {
		pid_t pid = h.daemons.v[k];
		if (!exits_within(pid, DAEMON_EXIT_MS))
			kill(pid, SIGKILL);
		waitpid(pid, NULL, 0);
	}
	/* the socket first: a join that writes a plan meanwhile sees it gone and removes its
	 * plan (runtime/joinplan.py `remember`) */
	for (int k = 0; h.dir >= 0 && k < h.n_unlink; k++)
		unlinkat(h.dir, h.unlink[k], 0);
	if (h.session && h.session_dir >= 0) {
		/* A setup that failed before pivot_root still has the session tmpfs (and what is
		 * below it) mounted here; after pivot_root this finds nothing to unmount. */
		umount2(h.session, MNT_DETACH);
		const char *slash = strrchr(h.session, '/');
		unlinkat(h.session_dir, slash ? slash + 1 : h.session, AT_REMOVEDIR);
	}
	reap_init(); /* last: nothing above waits for it */
	end_watcher();
}

/* Report `said` on the status pipe, once; 0 if the whole line went. */
static int say(void)
{
	if (h.status < 0)
		return -1;
	size_t n = strlen(h.said), done = 0;
	char line[n + 1];
	memcpy(line, h.said, n);
	line[n] = '\n';
	while (done < n + 1) {
		ssize_t w = write(h.status, line + done, n + 1 - done);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			break;
		done += (size_t)w;
	}
	close(h.status);
	h.status = -1;
	return done == n + 1 ? 0 : -1;
}

static long number(const char *arg, const char *val)
{
	char *end;
	errno = 0;
	long v = strtol(val, &end, 10);
	if (errno || end == val || *end || v < 0 || v > INT_MAX) {
		fprintf(stderr, "rankwire-holder: %s: not a number\n", arg);
		exit(2);
	}
	return v;
}

static void append(struct list *l, const char *arg, const char *val)
{
	if (l->n == MAX_LIST) {
		fprintf(stderr, "rankwire-holder: %s: more than %d of them\n", arg, MAX_LIST);
		exit(2);
	}
	l->v[l->n++] = (int)number(arg, val);
}

/* argv[i] is KEY=VALUE with this key? Then its value. (argv stays as it is: `ps` shows it.) */
static const char *value(const char *arg, const char *key)
{
	size_t n = strlen(key);
	return strncmp(arg, key, n) || arg[n] != '=' ? NULL : arg + n + 1;
}

static void parse(int argc, char **argv)
{
	static const char *keys[] = { "serve", "status", "listener", "dir", "session_dir",
		"upper", "init_life", "watcher_conn", "owner", "init", "watcher" };
	int *ints[] = { &h.serve, &h.status, &h.listener, &h.dir, &h.session_dir, &h.upper,
		&h.init_life, &h.watcher_conn, &h.owner, &h.init, &h.watcher };
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i], *v;
		if ((v = value(a, "mode"))) {
			h.mode = v;
			h.persistent = !strcmp(v, "persistent");
		} else if ((v = value(a, "said"))) {
			h.said = v;
		} else if ((v = value(a, "session"))) {
			h.session = v;
		} else if ((v = value(a, "unlink"))) {
			if (h.n_unlink == MAX_LIST || strchr(v, '/')) {
				fprintf(stderr, "rankwire-holder: %s\n", a);
				exit(2);
			}
			h.unlink[h.n_unlink++] = v;
		} else if ((v = value(a, "ns"))) {
			append(&h.ns, a, v);
		} else if ((v = value(a, "daemon"))) {
			append(&h.daemons, a, v);
		} else {
			size_t j = 0;
			while (j < sizeof keys / sizeof *keys && !(v = value(a, keys[j])))
				j++;
			if (j == sizeof keys / sizeof *keys) {
				fprintf(stderr, "rankwire-holder: unknown argument %s\n", a);
				exit(2);
			}
			*ints[j] = (int)number(a, v);
		}
	}
	if (!h.mode || !h.said || !*h.said || h.said[strlen(h.said) - 1] != '}' ||
	    (h.serve && h.listener < 0)) {
		fprintf(stderr, "rankwire-holder: needs mode=, said={...} and, to serve, listener=\n");
		exit(2);
	}
}

static void close_from(unsigned lo, unsigned hi)
{
	if (lo > hi || close_range(lo, hi, 0) == 0)
		return;
	long max = sysconf(_SC_OPEN_MAX); /* no close_range (Linux < 5.9) */
	for (long fd = lo; fd <= (long)hi && fd < (max > 0 ? max : 1024); fd++)
		close((int)fd);
}

/* Close every descriptor above 2 but `a`, `b` and those in `l` (all above 2): the holder's
 * inheritable ones (a bind's source, the image) are not ours to keep open, unless handed
 * down to `setup` (keep=). */
static void close_except(int a, int b, const struct list *l)
{
	int fds[MAX_LIST + 2], n = 0;
	fds[n++] = a, fds[n++] = b;
	for (int k = 0; k < l->n; k++)
		if (l->v[k] > 2)
			fds[n++] = l->v[k];
	for (int i = 1; i < n; i++) /* sorted */
		for (int j = i; j > 0 && fds[j - 1] > fds[j]; j--) {
			int t = fds[j];
			fds[j] = fds[j - 1], fds[j - 1] = t;
		}
	unsigned lo = 3;
	for (int k = 0; k < n; k++) {
		if ((unsigned)fds[k] > lo)
			close_from(lo, (unsigned)fds[k] - 1);
		if ((unsigned)fds[k] + 1 > lo)
			lo = (unsigned)fds[k] + 1;
	}
	close_from(lo, ~0U);
}

static void close_others(int a, int b)
{
	close_except(a, b, &(struct list){ .n = 0 });
}

/* `rankwire-holder init life=FD status=FD staging=PATH`: PID 1 of the container's PID
 * namespace, forked by the holder (`Holder._start_init`): mounts the namespace's /proc on
 * `staging`, says "ok" (or why not) on `status`, then waits until the holder is gone
 * (`life` at EOF, or the parent-death signal). Orphans of the namespace are reparented to
 * it; with SIGCHLD ignored the kernel reaps them. Init gets only the signals it handles, and
 * it handles none: from outside the namespace too, where only SIGKILL (and SIGSTOP) reach
 * a namespace's init (Slurm's scancel and `--signal` do not end the container here). */
static int init_body(int life, int status, const char *staging);

static int run_init(int argc, char **argv)
{
	int life = -1, status = -1;
	const char *staging = NULL, *v;
	for (int i = 2; i < argc; i++) {
		if ((v = value(argv[i], "life")))
			life = (int)number(argv[i], v);
		else if ((v = value(argv[i], "status")))
			status = (int)number(argv[i], v);
		else if ((v = value(argv[i], "staging")))
			staging = v;
	}
	if (life < 3 || status < 3 || !staging)
		return 2;
	return init_body(life, status, staging);
}

/* Init's life, from run_init or forked by `setup` (which is this program already). */
static int init_body(int life, int status, const char *staging)
{
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	prctl(PR_SET_NAME, "rankwire-init");
	close_others(life, status);
	sigset_t none;
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	for (int sig = 1; sig < NSIG; sig++)
		signal(sig, SIG_DFL);
	signal(SIGCHLD, SIG_IGN);
	struct pollfd p = { .fd = life, .events = POLLIN };
	if (poll(&p, 1, 0) != 0)
		return 0; /* the holder died before the prctl */
	if (mount("proc", staging, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0) {
		dprintf(status, "cannot mount a /proc for it: %s\n", strerror(errno));
		return 0;
	}
	if (write(status, "ok\n", 3) != 3)
		return 0;
	close(status);
	char c;
	ssize_t r;
	while ((r = read(life, &c, 1)) > 0 || (r < 0 && errno == EINTR))
		;
	return 0;
}

/* SIGKILL every process whose mount namespace is `mntns` (but `spare`), until none is left
 * (those forking meanwhile included), for a second at most. */
static void kill_members(int mntns, pid_t spare)
{
	struct stat ns;
	if (fstat(mntns, &ns) < 0)
		return;
	long deadline = now_ms() + 1000;
	while (now_ms() < deadline) {
		int found = 0;
		DIR *d = opendir("/proc");
		if (!d)
			return;
		struct dirent *e;
		while ((e = readdir(d))) {
			char *end;
			long pid = strtol(e->d_name, &end, 10);
			if (*end || pid <= 0 || pid == spare)
				continue;
			char path[64];
			struct stat st;
			snprintf(path, sizeof path, "/proc/%ld/ns/mnt", pid);
			if (stat(path, &st) == 0 && st.st_dev == ns.st_dev && st.st_ino == ns.st_ino &&
			    kill((pid_t)pid, SIGKILL) == 0)
				found = 1;
		}
		closedir(d);
		if (!found)
			return;
		nanosleep(&(struct timespec){ .tv_nsec = 20000000 }, NULL);
	}
}

/* `rankwire-holder watch conn=FD holder=PID [then=ARG...]`: forked by a holder whose
 * container has no PID namespace, before it makes its namespaces (`Holder._start_watcher`).
 * Takes the container's mount namespace (a descriptor, which also keeps its inode from
 * being reused) from `conn`, waits until the holder is gone (EOF: the end of its teardown,
 * said with "end", or its death by SIGKILL), then SIGKILLs every process in that namespace
 * but the holder, so that tasks never run on in a dead container; after a death, execs the
 * `then=` command (the holder's files to remove: holder.py `prune_after`). */
static int watch_body(int conn, pid_t holder, char **then);

static int run_watch(int argc, char **argv)
{
	int conn = -1;
	pid_t holder = 0;
	char *then[16];
	int n_then = 0;
	const char *v;
	for (int i = 2; i < argc; i++) {
		if ((v = value(argv[i], "conn")))
			conn = (int)number(argv[i], v);
		else if ((v = value(argv[i], "holder")))
			holder = (pid_t)number(argv[i], v);
		else if ((v = value(argv[i], "then")) && n_then < 15)
			then[n_then++] = (char *)v;
	}
	then[n_then] = NULL;
	if (conn < 3)
		return 2;
	return watch_body(conn, holder, then);
}

/* The watcher's life, from run_watch or forked by `setup` (which is this program already):
 * `then` ends with NULL. */
static int watch_body(int conn, pid_t holder, char **then)
{
	prctl(PR_SET_NAME, "rankwire-watch");
	close_others(conn, conn);
	ignore_commands_signals(); /* and the holder's group's: they are its own */
	signal(SIGTERM, SIG_IGN);
	char data[16];
	struct iovec iov = { .iov_base = data, .iov_len = sizeof data };
	union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } u;
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
		.msg_controllen = sizeof u.buf };
	ssize_t n;
	while ((n = recvmsg(conn, &msg, MSG_CMSG_CLOEXEC)) < 0 && errno == EINTR)
		;
	struct cmsghdr *c = n > 0 ? CMSG_FIRSTHDR(&msg) : NULL;
	if (!c || c->cmsg_type != SCM_RIGHTS)
		return 0; /* the holder ended before it made its namespaces */
	int mntns;
	memcpy(&mntns, CMSG_DATA(c), sizeof mntns);
	char said[3] = { 0 }; /* the last 3 bytes */
	while ((n = read(conn, data, sizeof data)) > 0 || (n < 0 && errno == EINTR))
		for (ssize_t k = 0; k < n; k++) {
			memmove(said, said + 1, 2);
			said[2] = data[k];
		}
	kill_members(mntns, holder);
	if (memcmp(said, "end", 3) && then[0]) {
		execv(then[0], then);
		return 1;
	}
	return 0;
}

/* ---- setup: a container from an exec plan's recipe, without Python ------------------ */

/* `rankwire-holder setup plan=FD status=FD owner=PID socket=PATH session=PATH [mode=
 * ephemeral|shared] [keep=FD...]`: forked by the C front end (runtime/front.c) for
 * `rankwire exec IMAGE CMD…` when an exec plan fits the request (runtime/joinplan.py
 * `remember_exec`), or a kept launch plan's; or by the plugin's start phase when its kept
 * recipe fits the step's container plan (joinplan.py `kept_holder`: mode=shared, the
 * image and the binds' sources handed down as keep= descriptors). The plan's `r_*`
 * records are what runtime/holder.py did when it set up the same container
 * (`Holder.recipe`): its uid and gid maps, the session tmpfs, the FUSE driver and its
 * options, the mount points it made in the upper dir, each mount with its target already
 * resolved inside the image (whose identity the plan's key holds) and its source as given
 * (a /proc/self/fd/N one is opened again in our mount namespace, as holder.py does), and,
 * without a PID namespace, the watcher's command (`then`). This does those steps in that
 * order, as holder.py does them, decides nothing, and on any failure tears down and
 * reports it (the front end then runs the Python CLI, which plans again and says what is
 * wrong; the plugin's start phase runs holder.py). Then it serves, as after holder.py's
 * exec. */

#include <sched.h>
#include <stdarg.h>
#include <sys/file.h>
#include <sys/statvfs.h>
#include <sys/un.h>
#include <linux/capability.h>

#define MOUNT_WAIT_MS 10000 /* holder.py MOUNT_WAIT_S */
#define MAX_RECIPE 64
#define MAX_THEN 8 /* the watcher's command's words (holder.py notes 4), before our pid, ... */

extern char **environ;

struct rmount { const char *kind, *source, *target, *options; int rec, ro; };

static struct {
	const char *uid_map, *gid_map, *tmpfs, *driver, *fuse, *fuse_opts, *image, *warm;
	const char *points[MAX_RECIPE];
	int point_dir[MAX_RECIPE], n_points;
	struct rmount m[MAX_RECIPE];
	int n_m, writable, bad;
	/* without a PID namespace: the watcher's command after our death, less our pid,
	 * socket and session (holder.py `_start_watcher`) */
	const char *then[MAX_THEN];
	int n_then;
} r;

static void recipe_record(const char *key, char *val, void *ctx)
{
	(void)ctx;
	if (strncmp(key, "r_", 2))
		return; /* the plan's key and process: the front end's */
	key += 2;
	struct rmount *m = r.n_m ? &r.m[r.n_m - 1] : NULL;
	if (!strcmp(key, "uid_map")) r.uid_map = val;
	else if (!strcmp(key, "gid_map")) r.gid_map = val;
	else if (!strcmp(key, "tmpfs")) r.tmpfs = val;
	else if (!strcmp(key, "driver")) r.driver = val;
	else if (!strcmp(key, "fuse")) r.fuse = val;
	else if (!strcmp(key, "fuse_opts")) r.fuse_opts = val;
	else if (!strcmp(key, "image")) r.image = val;
	else if (!strcmp(key, "warm")) r.warm = val; /* a launch plan's warm list */
	else if (!strcmp(key, "writable")) r.writable = !strcmp(val, "1");
	else if (!strcmp(key, "then")) {
		if (r.n_then == MAX_THEN) {
			r.bad = 1;
			return;
		}
		r.then[r.n_then++] = val;
	}
	else if (!strcmp(key, "mkdir") || !strcmp(key, "touch")) {
		if (r.n_points == MAX_RECIPE) {
			r.bad = 1;
			return;
		}
		r.point_dir[r.n_points] = key[0] == 'm';
		r.points[r.n_points++] = val;
	} else if (!strcmp(key, "mount")) {
		if (r.n_m == MAX_RECIPE) {
			r.bad = 1;
			return;
		}
		r.m[r.n_m++] = (struct rmount){ .kind = val, .source = "", .options = "" };
	} else if (m && !strcmp(key, "source")) m->source = val;
	else if (m && !strcmp(key, "target")) m->target = val;
	else if (m && !strcmp(key, "options")) m->options = val;
	else if (m && !strcmp(key, "rec")) m->rec = !strcmp(val, "1");
	else if (m && !strcmp(key, "ro")) m->ro = !strcmp(val, "1");
	else r.bad = 1;
}

static char why[512]; /* the first failure, for the report */

static int fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int fail(const char *fmt, ...)
{
	int err = errno;
	if (!why[0]) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(why, sizeof why, fmt, ap);
		va_end(ap);
	}
	errno = err;
	return -1;
}

/* A path relative to a dir of ours that stays in it: no "..", not absolute, not empty. */
static int inner(const char *rel)
{
	if (!*rel || rel[0] == '/')
		return 0;
	for (const char *c = rel; c; c = strchr(c, '/'), c = c ? c + 1 : c)
		if (c[0] == '.' && c[1] == '.' && (c[2] == '/' || !c[2]))
			return 0;
	return 1;
}

static int join_path(char *out, const char *a, const char *b)
{
	int n = snprintf(out, PATH_MAX, "%s/%s", a, b);
	return n > 0 && n < PATH_MAX ? 0 : fail("path too long: %s/%s", a, b);
}

static int write_text(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return fail("%s: %s", path, strerror(errno));
	ssize_t n = write(fd, text, strlen(text));
	int err = errno;
	close(fd);
	errno = err;
	return n == (ssize_t)strlen(text) ? 0 : fail("%s: %s", path, strerror(errno));
}

/* os.makedirs(path, exist_ok=True) below a dir we made: every part from `from` on. */
static int make_dirs(char *path, size_t from)
{
	for (char *c = path + from;; c++) {
		if (*c != '/' && *c)
			continue;
		char was = *c;
		*c = '\0';
		int ok = mkdir(path, 0777) == 0 || errno == EEXIST;
		*c = was;
		if (!ok)
			return fail("cannot make %s: %s", path, strerror(errno));
		if (!was)
			return 0;
	}
}

/* syscalls.raise_ambient: keep CAP_SYS_ADMIN and CAP_DAC_OVERRIDE (held in our user
 * namespace) across the FUSE driver's exec. */
static int raise_ambient(void)
{
	struct __user_cap_header_struct hdr = { _LINUX_CAPABILITY_VERSION_3, 0 };
	struct __user_cap_data_struct data[2];
	const int caps[] = { CAP_SYS_ADMIN, CAP_DAC_OVERRIDE };
	if (syscall(SYS_capget, &hdr, data))
		return fail("capget: %s", strerror(errno));
	for (int k = 0; k < 2; k++)
		data[caps[k] / 32].inheritable |= 1U << (caps[k] % 32);
	if (syscall(SYS_capset, &hdr, data))
		return fail("capset: %s", strerror(errno));
	for (int k = 0; k < 2; k++)
		if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, caps[k], 0, 0))
			return fail("prctl(PR_CAP_AMBIENT_RAISE): %s", strerror(errno));
	return 0;
}

/* After the setup, as holder.py's exec of this program leaves a holder that is not root in
 * its user namespace (and init, exec'd the same way): CAP_SYS_ADMIN and CAP_DAC_OVERRIDE
 * (its ambient ones: the teardown's unmounts, init's /proc) and no other. */
static int keep_ambient_only(void)
{
	struct __user_cap_header_struct hdr = { _LINUX_CAPABILITY_VERSION_3, 0 };
	struct __user_cap_data_struct data[2] = { { 0 } };
	if (getuid() == 0) /* root keeps every capability across exec */
		return 0;
	for (int k = 0; k < 2; k++) {
		int cap = k ? CAP_DAC_OVERRIDE : CAP_SYS_ADMIN;
		data[cap / 32].effective |= 1U << (cap % 32);
		data[cap / 32].permitted |= 1U << (cap % 32);
		data[cap / 32].inheritable |= 1U << (cap % 32);
	}
	return syscall(SYS_capset, &hdr, data) ? fail("capset: %s", strerror(errno)) : 0;
}

/* syscalls.bind_remount: nosuid (ro if asked), keeping the flags it has (some are
 * locked in a user namespace). */
static int bind_remount(const char *target, int ro)
{
	struct statvfs sv;
	if (statvfs(target, &sv))
		return fail("cannot mount on %s: %s", target, strerror(errno));
	unsigned long kept = sv.f_flag & (ST_RDONLY | ST_NOSUID | ST_NODEV | ST_NOEXEC |
		ST_NOATIME | ST_NODIRATIME | ST_RELATIME);
	unsigned long flags = MS_REMOUNT | MS_BIND | MS_NOSUID | kept | (ro ? MS_RDONLY : 0);
	if (mount(NULL, target, NULL, flags, NULL))
		return fail("cannot mount on %s: %s", target, strerror(errno));
	return 0;
}

/* N for "/proc/self/fd/N" (a descriptor our starter handed down: holder.py `fd_source`),
 * else -1. */
static int fd_source(const char *source)
{
	const char *digits = source + strlen("/proc/self/fd/");
	char *end;
	if (strncmp(source, "/proc/self/fd/", strlen("/proc/self/fd/")) || !*digits ||
	    *digits < '0' || *digits > '9')
		return -1;
	errno = 0;
	long fd = strtol(digits, &end, 10);
	return errno || *end || fd > INT_MAX ? -1 : (int)fd;
}

/* holder.py `_start_watcher`: without a PID namespace, a process forked now, outside the
 * namespaces we make, that kills what runs in the container when we are gone (watch_body)
 * and after our death runs `then` (r.then, our pid, socket and session). */
static int start_watcher(const char *sock, const char *session)
{
	int sv[2];
	pid_t holder = getpid();
	char pid[24];
	char *then[MAX_THEN + 4];
	int n = 0;
	snprintf(pid, sizeof pid, "%d", (int)holder);
	for (int k = 0; k < r.n_then; k++)
		then[n++] = (char *)r.then[k];
	then[n++] = pid, then[n++] = (char *)sock, then[n++] = (char *)session, then[n] = NULL;
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv))
		return fail("socketpair: %s", strerror(errno));
	pid_t watcher = fork();
	if (watcher == 0) {
		sigset_t none;
		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, NULL);
		_exit(watch_body(sv[1], holder, then));
	}
	close(sv[1]);
	if (watcher < 0) {
		close(sv[0]);
		return fail("fork: %s", strerror(errno));
	}
	h.watcher = watcher;
	h.watcher_conn = sv[0];
	return 0;
}

/* holder.py `_spawn_fuse` and `_die_with_holder`: the driver, its output in the session's
 * log, ending with us (SIGHUP) and not on the signals a step's commands get; then wait
 * until `lower` is mounted. */
static int spawn_fuse(const char *session, const char *lower)
{
	char log[PATH_MAX];
	struct stat parent;
	if (snprintf(log, sizeof log, "%s/%s.log", session, r.driver) >= (int)sizeof log ||
	    stat(session, &parent))
		return fail("cannot use %s", session);
	int out = open(log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
	if (out < 0)
		return fail("%s: %s", log, strerror(errno));
	pid_t holder = getpid(), pid = fork();
	if (pid == 0) {
		sigset_t none;
		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, NULL);
		const int theirs[] = { SIGTERM, SIGINT, SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM };
		for (size_t k = 0; k < sizeof theirs / sizeof *theirs; k++)
			signal(theirs[k], SIG_IGN);
		signal(SIGHUP, SIG_DFL);
		signal(SIGPIPE, SIG_DFL); /* and what Python ignores (Popen's restore_signals) */
		signal(SIGXFSZ, SIG_DFL);
		prctl(PR_SET_PDEATHSIG, SIGHUP);
		int null = open("/dev/null", O_RDONLY);
		if (getppid() != holder || null < 0 || dup2(null, 0) < 0 || dup2(out, 1) < 0 ||
		    dup2(out, 2) < 0)
			_exit(127);
		int image = fd_source(r.image); /* the starter's, handed down (the plugin's) */
		if (image > 2)
			close_from(3, (unsigned)image - 1), close_from((unsigned)image + 1, ~0U);
		else
			close_from(3, ~0U);
		char *argv[] = { (char *)r.driver, "-f", "-o", (char *)r.fuse_opts, (char *)r.image,
			(char *)lower, NULL };
		execve(r.fuse, argv, environ);
		dprintf(2, "%s: %s\n", r.fuse, strerror(errno));
		_exit(127);
	}
	close(out);
	if (pid < 0)
		return fail("fork: %s", strerror(errno));
	h.daemons.v[h.daemons.n++] = pid;
	for (long deadline = now_ms() + MOUNT_WAIT_MS;;) {
		struct stat st;
		if (stat(lower, &st) == 0 && st.st_dev != parent.st_dev)
			return 0;
		if (waitpid(pid, NULL, WNOHANG) == pid) {
			h.daemons.n--;
			return fail("%s exited", r.driver);
		}
		if (now_ms() >= deadline)
			return fail("timed out mounting %s", lower);
		nanosleep(&(struct timespec){ .tv_nsec = 1000000 }, NULL);
	}
}

/* holder.py `_start_init`: a PID namespace for our children from now on, and its init
 * (init_body), which mounts the namespace's /proc at `staging`. */
static int start_init(const char *staging)
{
	int life[2], status[2];
	if (unshare(CLONE_NEWPID) || mkdir(staging, 0777))
		return fail("no PID namespace: %s", strerror(errno));
	if (pipe2(life, O_CLOEXEC))
		return fail("pipe: %s", strerror(errno));
	if (pipe2(status, O_CLOEXEC)) {
		close(life[0]);
		close(life[1]);
		return fail("pipe: %s", strerror(errno));
	}
	pid_t pid = fork();
	if (pid == 0)
		_exit(keep_ambient_only() ? 1 : init_body(life[0], status[1], staging));
	close(life[0]);
	close(status[1]);
	if (pid < 0) {
		close(life[1]);
		close(status[0]);
		return fail("fork: %s", strerror(errno));
	}
	h.init = pid;
	h.init_life = life[1];
	char said[128] = { 0 };
	struct pollfd p = { .fd = status[0], .events = POLLIN };
	ssize_t n = 0;
	if (poll(&p, 1, MOUNT_WAIT_MS) == 1)
		n = read(status[0], said, sizeof said - 1);
	close(status[0]);
	if (n == 3 && !memcmp(said, "ok\n", 3))
		return 0;
	return fail("no PID namespace: %s", n > 0 ? said : "its init did not start");
}

#define WARM_MAGIC "rankwire-warm 1\n" /* runtime/warm.py MAGIC */
#define WARM_MAX_BYTES (64L << 20)        /* warm.py MAX_BYTES: read ahead at most */
#define WARM_CHUNK (1 << 20)              /* warm.py CHUNK */
#define WARM_LIST_MAX (1 << 20)           /* warm.py `load` reads at most this much */

/* `path` as warm.py `load` takes it: absolute and normal (posixpath.normpath's: no empty,
 * "." or ".." part, no trailing slash). */
static int normal_path(const char *path, size_t len)
{
	if (!len || path[0] != '/')
		return 0;
	if (len == 1)
		return 1;
	for (size_t at = 1, end; at <= len; at = end + 1) {
		for (end = at; end < len && path[end] != '/'; end++)
			;
		size_t part = end - at;
		if (!part || (part == 1 && path[at] == '.') ||
		    (part == 2 && path[at] == '.' && path[at + 1] == '.'))
			return 0;
	}
	return 1;
}

/* warm.py `prefetch`, in the chrooted reader: each range of `list` (after its magic line:
 * "OFFSET LENGTH PATH" lines, as `load` checks them), in order, into the page cache. */
static void read_ahead(char *list, size_t len)
{
	static char chunk[WARM_CHUNK];
	long budget = WARM_MAX_BYTES;
	char *line = list + strlen(WARM_MAGIC), *end = list + len;
	while (line < end && budget > 0) {
		char *nl = memchr(line, '\n', (size_t)(end - line)), *next = nl ? nl + 1 : end;
		size_t n = (size_t)((nl ? nl : end) - line);
		unsigned long long offset = 0, length = 0;
		size_t k = 0, digits;
		for (digits = 0; k < n && line[k] >= '0' && line[k] <= '9' && digits < 19; k++, digits++)
			offset = offset * 10 + (unsigned)(line[k] - '0');
		int ok = digits && k < n && line[k++] == ' ';
		for (digits = 0; ok && k < n && line[k] >= '0' && line[k] <= '9' && digits < 19;
		     k++, digits++)
			length = length * 10 + (unsigned)(line[k] - '0');
		ok = ok && digits && k < n && line[k++] == ' ' && !memchr(line + k, '\0', n - k) &&
		     normal_path(line + k, n - k) && offset < 1ULL << 62 && length > 0 &&
		     length <= (unsigned long long)WARM_MAX_BYTES;
		if (ok) {
			line[n] = '\0';
			int fd = open(line + k, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
			struct stat st;
			if (fd >= 0 && fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) {
				unsigned long long stop = offset +
					(length < (unsigned long long)budget ? length : (unsigned long long)budget);
				while (offset < stop) {
					size_t want = stop - offset < WARM_CHUNK ? (size_t)(stop - offset) : WARM_CHUNK;
					ssize_t got = pread(fd, chunk, want, (off_t)offset);
					if (got <= 0)
						break;
					offset += (unsigned long long)got;
					budget -= got;
				}
			}
			if (fd >= 0)
				close(fd);
		}
		line = next;
	}
}

/* holder.py `_prefetch`: the launch plan's warm list (`r.warm`, read now: it may have
 * changed since the plan was kept) read ahead from the FUSE mount `lower` by a process of
 * the container's PID namespace that holds none of our descriptors (stdio /dev/null),
 * chrooted into the image: the child of a child that ends at once, so the namespace's init
 * reaps it, and it ends with the container at the latest. A hint: nothing here fails the
 * setup. */
static void prefetch(const char *lower)
{
	int fd = open(r.warm, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
	char *list = fd < 0 ? NULL : malloc(WARM_LIST_MAX + 1);
	size_t len = 0;
	ssize_t got = 1;
	while (list && len < WARM_LIST_MAX && got > 0)
		if ((got = read(fd, list + len, WARM_LIST_MAX - len)) > 0)
			len += (size_t)got;
	int ours = list && len > strlen(WARM_MAGIC) && !memcmp(list, WARM_MAGIC, strlen(WARM_MAGIC));
	if (ours)
		(void)futimens(fd, NULL); /* used: kept longest (warm.py `load`) */
	if (fd >= 0)
		close(fd);
	int image = ours ? open(lower, O_PATH | O_DIRECTORY | O_CLOEXEC) : -1;
	pid_t pid = image < 0 ? -1 : fork();
	if (pid == 0) {
		close_others(image, image);
		int null = open("/dev/null", O_RDWR);
		for (int k = 0; k < 3 && null >= 0; k++)
			dup2(null, k);
		if (null > 2)
			close(null);
		if (fork() == 0 && fchdir(image) == 0 && chroot(".") == 0) {
			close(image);
			read_ahead(list, len);
		}
		_exit(0);
	}
	if (pid > 0)
		while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
			;
	if (image >= 0)
		close(image);
	free(list);
}

/* holder.py `Holder.setup`'s session dir: made under a temporary name, locked (until we
 * exit: `prune_stale` removes only unlocked ones), then renamed into place. */
static int make_session(char *session)
{
	char *slash = strrchr(session, '/'), making[NAME_MAX + 3];
	if (!slash || slash == session || snprintf(making, sizeof making, "t-%s", slash + 1) >=
	    (int)sizeof making)
		return fail("bad session %s", session);
	*slash = '\0';
	h.session_dir = open(session, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	*slash = '/';
	if (h.session_dir < 0 || mkdirat(h.session_dir, making, 0700))
		return fail("cannot make %s: %s", session, strerror(errno));
	int lock = openat(h.session_dir, making, O_RDONLY | O_DIRECTORY); /* kept: never closed */
	if (lock < 0 || flock(lock, LOCK_EX) || renameat(h.session_dir, making, h.session_dir,
							   slash + 1)) {
		int err = errno;
		unlinkat(h.session_dir, making, AT_REMOVEDIR);
		errno = err;
		return fail("cannot make %s: %s", session, strerror(errno));
	}
	h.session = session;
	return 0;
}

static char plan_name[NAME_MAX + 1];

/* holder.py `Holder.setup`'s socket: bound under a temporary name, listening, then
 * hard-linked under its own (under the directory's lock: `instance.unlink_if_dead`). */
static int bind_socket(char *sock, int *taken)
{
	char *slash = strrchr(sock, '/'), temp[NAME_MAX + 1];
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	if (!slash || slash == sock || strlen(slash + 1) < 6 ||
	    strcmp(slash + strlen(slash) - 5, ".sock") ||
	    snprintf(temp, sizeof temp, "t-%d-%s", (int)getpid(), slash + 1) >= (int)sizeof temp ||
	    snprintf(sa.sun_path, sizeof sa.sun_path, "%.*s/%s", (int)(slash - sock), sock, temp) >=
		    (int)sizeof sa.sun_path)
		return fail("bad socket %s", sock);
	*slash = '\0';
	h.dir = open(sock, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	*slash = '/';
	int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (h.dir < 0 || s < 0 || bind(s, (struct sockaddr *)&sa, sizeof sa))
		return fail("cannot bind %s: %s", sock, strerror(errno));
	h.listener = s;
	int linked = listen(s, 128) == 0 && flock(h.dir, LOCK_EX) == 0 &&
		     linkat(h.dir, temp, h.dir, slash + 1, 0) == 0;
	int err = errno;
	flock(h.dir, LOCK_UN);
	unlinkat(h.dir, temp, 0);
	if (!linked) {
		*taken = err == EEXIST;
		errno = err;
		return fail(*taken ? "%s is served by another holder" : "cannot bind %s: %s", sock,
			    strerror(err));
	}
	snprintf(plan_name, sizeof plan_name, "%.*s.plan", (int)strlen(slash + 1) - 5, slash + 1);
	h.unlink[h.n_unlink++] = slash + 1; /* the socket first (see teardown), then its plan */
	h.unlink[h.n_unlink++] = plan_name;
	return 0;
}

static int map_ids(const char *file, const char *map, unsigned id)
{
	unsigned inside, outside, count;
	char line[96];
	if (!map || sscanf(map, "%u %u %u", &inside, &outside, &count) != 3 || outside != id)
		return fail("plan maps %s, but the holder runs as %u", map ? map : "nothing", id);
	snprintf(line, sizeof line, "%u %u %u\n", inside, outside, count);
	return write_text(file, line);
}

/* A mount of the recipe (holder.py `_apply`): its target, already resolved inside the
 * image, below `root`. */
static int apply_mount(const char *root, const char *session, const struct rmount *m)
{
	char target[PATH_MAX], staging[PATH_MAX];
	if (!m->target || m->target[0] != '/' || !inner(m->target + 1) ||
	    join_path(target, root, m->target + 1))
		return fail("bad mount target %s", m->target ? m->target : "(none)");
	const char *source = m->source;
	int rec = m->rec, ro = m->ro;
	if (!strcmp(m->kind, "proc") && h.init > 0) { /* our PID namespace's (holder.py `_apply`) */
		if (join_path(staging, session, "proc"))
			return -1;
		source = staging;
		rec = ro = 0;
	} else if (!strcmp(m->kind, "proc")) { /* no PID namespace: the host's (`_apply`) */
		source = "/proc";
		rec = 1, ro = 0;
	} else if (!strcmp(m->kind, "tmpfs")) {
		if (mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV,
			  *m->options ? m->options : NULL))
			return fail("cannot mount tmpfs on %s: %s", m->target, strerror(errno));
		return 0;
	} else if (strcmp(m->kind, "bind") || source[0] != '/') {
		return fail("cannot mount %s on %s", m->kind, m->target);
	}
	if (mount(source, target, NULL, MS_BIND | (rec ? MS_REC : 0), NULL))
		return fail("cannot mount %s on %s: %s", source, m->target, strerror(errno));
	return bind_remount(target, ro);
}

static int ascii_path(const char *s)
{
	for (; *s; s++)
		if ((unsigned char)*s < 0x20 || (unsigned char)*s >= 0x7f || *s == '"' || *s == '\\')
			return 0;
	return 1;
}

/* A bind's source that is a descriptor we were handed: its path, read before our mount
 * namespace exists (holder.py `_pin_descriptors`), then opened again in it and used only if
 * it is the same file (`_reopen_descriptors`): the mount a descriptor refers to stays in
 * the namespace it was opened in, and binding from it in ours fails. */
static char *pinned[MAX_RECIPE];
static char reopened[MAX_RECIPE][32];

static int pin_descriptors(void)
{
	char path[PATH_MAX];
	for (int k = 0; k < r.n_m; k++) {
		int fd = strcmp(r.m[k].kind, "bind") ? -1 : fd_source(r.m[k].source);
		if (fd < 0)
			continue;
		ssize_t n = readlink(r.m[k].source, path, sizeof path - 1);
		if (n < 0)
			return fail("cannot mount %s on %s: %s", r.m[k].source, r.m[k].target,
				    strerror(errno));
		path[n] = '\0';
		if (!(pinned[k] = strdup(path)))
			return fail("out of memory");
	}
	return 0;
}

static int reopen_descriptors(void)
{
	for (int k = 0; k < r.n_m; k++) {
		if (!pinned[k])
			continue;
		struct stat was, now;
		int fd = open(pinned[k], O_PATH | O_NOFOLLOW | O_CLOEXEC);
		if (fd < 0)
			return fail("cannot mount %s on %s: %s: %s", r.m[k].source, r.m[k].target,
				    pinned[k], strerror(errno));
		if (fstat(fd_source(r.m[k].source), &was) || fstat(fd, &now) ||
		    was.st_dev != now.st_dev || was.st_ino != now.st_ino) {
			close(fd);
			return fail("cannot mount %s on %s: %s is no longer the file that was opened",
				    r.m[k].source, r.m[k].target, pinned[k]);
		}
		snprintf(reopened[k], sizeof reopened[k], "/proc/self/fd/%d", fd);
		r.m[k].source = reopened[k];
	}
	return 0;
}

/* The descriptors our starter handed down (`keep=`: the image, binds' sources) and those
 * reopened from them: closed once the mounts are made. */
static struct list keep;

static void close_kept(void)
{
	for (int k = 0; k < keep.n; k++)
		close(keep.v[k]);
	keep.n = 0;
	for (int k = 0; k < r.n_m; k++)
		if (pinned[k] && r.m[k].source == reopened[k])
			close(fd_source(reopened[k]));
}

/* The steps of the recipe; 0 when the container is ready (we are in it). */
static int set_up_container(char *sock, char *session, int *taken)
{
	char lower[PATH_MAX], upper[PATH_MAX], work[PATH_MAX], root[PATH_MAX], path[PATH_MAX];
	char opts[3 * PATH_MAX + 40];
	/* A PID namespace (it ends the container's processes with us), or, without one (the
	 * plugin's containers: Slurm execs the tasks), the watcher (`then`) */
	if (r.bad || !r.uid_map || !r.gid_map || !r.tmpfs || !r.driver || !r.fuse ||
	    !r.fuse_opts || !r.image || strchr(r.driver, '/') || !ascii_path(sock) ||
	    !ascii_path(session) || !ascii_path(r.driver))
		return fail("the exec plan holds no recipe");
	if ((r.n_then && start_watcher(sock, session)) || make_session(session) ||
	    bind_socket(sock, taken) || pin_descriptors())
		return -1;
	unsigned uid = getuid(), gid = getgid();
	if (unshare(CLONE_NEWUSER | CLONE_NEWNS))
		return fail("unshare: %s", strerror(errno));
	if (write_text("/proc/self/setgroups", "deny") ||
	    map_ids("/proc/self/uid_map", r.uid_map, uid) ||
	    map_ids("/proc/self/gid_map", r.gid_map, gid))
		return -1;
	if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL))
		return fail("mount: %s", strerror(errno));
	if (raise_ambient() || reopen_descriptors())
		return -1;
	if (mount("tmpfs", session, "tmpfs", MS_NOSUID | MS_NODEV, r.tmpfs))
		return fail("cannot mount tmpfs on %s: %s", session, strerror(errno));
	if (join_path(lower, session, "lower") || join_path(upper, session, "upper") ||
	    join_path(work, session, "work") || join_path(root, session, "root"))
		return -1;
	const char *subs[] = { lower, upper, work, root };
	for (int k = 0; k < 4; k++)
		if (mkdir(subs[k], 0777))
			return fail("cannot make %s: %s", subs[k], strerror(errno));
	if (spawn_fuse(session, lower))
		return -1;
	DIR *d = opendir(lower); /* holder.py `_readable_root` */
	if (d)
		errno = 0;
	if (!d || (!readdir(d) && errno)) {
		if (d)
			closedir(d);
		return fail("cannot read the image's root directory: %s", strerror(errno));
	}
	closedir(d);
	for (int k = 0; k < r.n_points; k++) { /* holder.py `_prepare_mountpoints` */
		if (!inner(r.points[k]) || join_path(path, upper, r.points[k]))
			return fail("bad mount point %s", r.points[k]);
		if (r.point_dir[k]) {
			if (make_dirs(path, strlen(upper) + 1))
				return -1;
			continue;
		}
		char *slash = strrchr(path, '/');
		*slash = '\0';
		int made = slash == path + strlen(upper) || make_dirs(path, strlen(upper) + 1) == 0;
		*slash = '/';
		int fd = made ? open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0666) : -1;
		if (fd < 0)
			return made ? fail("cannot make %s: %s", path, strerror(errno)) : -1;
		close(fd);
	}
	if (snprintf(opts, sizeof opts, "lowerdir=%s,upperdir=%s,workdir=%s", lower, upper, work) >=
		    (int)sizeof opts ||
	    mount("overlay", root, "overlay", MS_NOSUID | MS_NODEV, opts))
		return fail("cannot set up the container root: kernel: %s", strerror(errno));
	if (!r.n_then && (join_path(path, session, "proc") || start_init(path)))
		return -1;
	if (r.warm && h.init > 0 && !strncmp(r.driver, "squashfuse", 10))
		prefetch(lower);
	for (int k = 0; k < r.n_m; k++)
		if (apply_mount(root, session, &r.m[k]))
			return -1;
	if (mount(NULL, root, NULL,
		  MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | (r.writable ? 0 : MS_RDONLY), NULL))
		return fail("cannot remount the root: %s", strerror(errno));
	close_kept();
	const char *ns[] = { "/proc/self/ns/user", "/proc/self/ns/mnt", "/proc/self/ns/pid_for_children" };
	for (int k = 0; k < (h.init > 0 ? 3 : 2); k++) {
		int fd = open(ns[k], O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			return fail("%s: %s", ns[k], strerror(errno));
		h.ns.v[h.ns.n++] = fd;
	}
	if (h.watcher_conn >= 0) { /* the namespace whose processes it ends (`watch_body`) */
		char mnt[] = "mnt";
		struct iovec iov = { .iov_base = mnt, .iov_len = 3 };
		union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } u;
		struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
			.msg_controllen = sizeof u.buf };
		struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
		c->cmsg_level = SOL_SOCKET, c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(c), &h.ns.v[1], sizeof(int));
		if (sendmsg(h.watcher_conn, &msg, MSG_NOSIGNAL) != 3)
			return fail("cannot hand the watcher the container: %s", strerror(errno));
	}
	if (chdir(root) || syscall(SYS_pivot_root, ".", ".") || umount2(".", MNT_DETACH) ||
	    chdir("/"))
		return fail("pivot_root: %s", strerror(errno));
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
		return fail("prctl: %s", strerror(errno));
	return keep_ambient_only();
}

static struct buf report;

static void set_up(int argc, char **argv)
{
	int plan = -1, taken = 0;
	char *sock = NULL, *session = NULL;
	const char *v;
	for (int i = 2; i < argc; i++) {
		if ((v = value(argv[i], "plan")))
			plan = (int)number(argv[i], v);
		else if ((v = value(argv[i], "status")))
			h.status = (int)number(argv[i], v);
		else if ((v = value(argv[i], "owner")))
			h.owner = (pid_t)number(argv[i], v);
		else if ((v = value(argv[i], "socket")))
			sock = (char *)v;
		else if ((v = value(argv[i], "session")))
			session = (char *)v;
		else if ((v = value(argv[i], "mode")))
			h.mode = v;
		else if ((v = value(argv[i], "keep")))
			append(&keep, argv[i], v);
	}
	if (!h.mode)
		h.mode = "ephemeral";
	if (plan < 3 || h.status < 3 || h.owner <= 0 || !sock || !session ||
	    (strcmp(h.mode, "ephemeral") && strcmp(h.mode, "shared"))) {
		fprintf(stderr, "rankwire-holder: setup needs plan=, status=, owner=, socket=, "
				"session=, and mode= ephemeral or shared if any\n");
		exit(2);
	}
	/* as holder.py `run_holder`: ^C is for the command; a SIGTERM waits for the teardown
	 * (main's signalfd takes it); stdio /dev/null; nothing of the starter's kept open */
	signal(SIGINT, SIG_IGN);
	sigset_t term;
	sigemptyset(&term);
	sigaddset(&term, SIGTERM);
	sigprocmask(SIG_BLOCK, &term, NULL);
	prctl(PR_SET_NAME, "rankwire-holder");
	int null = open("/dev/null", O_RDWR);
	for (int fd = 0; fd < 3 && null >= 0; fd++)
		dup2(null, fd);
	if (null > 2)
		close(null);
	close_except(plan, h.status, &keep);
	struct stat st = { 0 };
	char *data = NULL;
	ssize_t got = -1;
	if (fstat(plan, &st) == 0 && st.st_size > 0 && st.st_size <= FRAME_MAX &&
	    (data = malloc((size_t)st.st_size)))
		got = pread(plan, data, (size_t)st.st_size, 0);
	close(plan);
	if (got != (ssize_t)st.st_size || frame_parse(data, (size_t)got, recipe_record, NULL))
		fail("cannot read the exec plan");
	else if (set_up_container(sock, session, &taken) == 0)
		h.serve = 1;
	if (h.serve) {
		char head[112];
		snprintf(head, sizeof head, "{\"ok\": true, \"pid\": %d, \"namespaces\": [\"user\", "
			 "\"mount\"%s], \"socket\": \"", (int)getpid(), h.init > 0 ? ", \"pid\"" : "");
		buf_put(&report, head, strlen(head));
		buf_put(&report, sock, strlen(sock));
		buf_put(&report, "\", \"session\": \"", 15);
		buf_put(&report, session, strlen(session));
		buf_put(&report, "\", \"image_driver\": \"", 20);
		buf_put(&report, r.driver, strlen(r.driver));
		char tail[128], init[40] = ""; /* a FUSE image's warm list pays (runtime/warm.py):
						 * its launcher records it from the ranks, seen
						 * from the namespace's init */
		if (h.init > 0)
			snprintf(init, sizeof init, ", \"init_pid\": %d", (int)h.init);
		snprintf(tail, sizeof tail, "\", \"overlay_driver\": \"kernel\"%s%s}",
			 strncmp(r.driver, "squashfuse", 10) ? "" : ", \"fuse_image\": true", init);
		buf_put(&report, tail, strlen(tail) + 1); /* and its NUL */
	} else {
		const char *head = "{\"ok\": false, \"error\": \"";
		buf_put(&report, head, strlen(head));
		for (const char *c = why; *c; c++) /* a JSON string, ASCII */
			if ((unsigned char)*c < 0x20 || (unsigned char)*c >= 0x7f || *c == '"' ||
			    *c == '\\') {
				char esc[8];
				snprintf(esc, sizeof esc, "\\u%04x", (unsigned char)*c);
				buf_put(&report, esc, 6);
			} else {
				buf_put(&report, c, 1);
			}
		const char *tail = taken ? "\", \"taken\": true, \"whole\": false}" :
					   "\", \"taken\": false, \"whole\": false}";
		buf_put(&report, tail, strlen(tail) + 1);
	}
	h.said = report.oom ? "{\"ok\": false, \"error\": \"out of memory\"}" : report.p;
	free(data);
}

int main(int argc, char **argv)
{
	if (argc > 1 && !strcmp(argv[1], "init"))
		return run_init(argc, argv);
	if (argc > 1 && !strcmp(argv[1], "watch"))
		return run_watch(argc, argv);
	if (argc > 1 && !strcmp(argv[1], "setup"))
		set_up(argc, argv);
	else
		parse(argc, argv);
	prctl(PR_SET_NAME, "rankwire-holder");
	signal(SIGPIPE, SIG_IGN);
	ignore_commands_signals();
	/* SIGTERM ends us through the teardown; the holder blocked it before exec, so one
	 * sent meanwhile is pending here */
	sigset_t term;
	sigemptyset(&term);
	sigaddset(&term, SIGTERM);
	sigprocmask(SIG_BLOCK, &term, NULL);
	int sig = signalfd(-1, &term, SFD_CLOEXEC);
	if (sig < 0) /* then SIGTERM ends us without the teardown, as SIGKILL would */
		sigprocmask(SIG_UNBLOCK, &term, NULL);
	/* a starter gone before our report (^C meanwhile) leaves a container nobody knows of:
	 * no serving then */
	if (h.serve && say() == 0)
		serve(sig);
	teardown();
	say();
	return h.serve ? 0 : 1;
}
