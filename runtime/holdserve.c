/*
 * `rankwire-holder`: the serving half of a container's holder. runtime/holder.py sets the
 * container up (namespaces, image, overlay, binds, pivot_root) and then execs this program
 * in its place (by descriptor: the holder is inside the container by then, hence a static
 * program), keeping its pid, its children (FUSE daemons, the PID namespace's init, the
 * watcher) and the descriptors it names in its arguments. A long-lived holder is then a
 * small C process instead of a Python interpreter forked from the CLI.
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
#define MAX_LIST 16 /* unlink=, ns=, daemon= */
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

/* Close every descriptor above 2 but `a` and `b` (both above 2): the holder's inheritable
 * ones (a bind's source, the image) are not ours to keep open. */
static void close_others(int a, int b)
{
	unsigned lo = (unsigned)(a < b ? a : b), hi = (unsigned)(a < b ? b : a);
	close_from(3, lo - 1);
	close_from(lo + 1, hi - 1);
	close_from(hi + 1, ~0U);
}

/* `rankwire-holder init life=FD status=FD staging=PATH`: PID 1 of the container's PID
 * namespace, forked by the holder (`Holder._start_init`): mounts the namespace's /proc on
 * `staging`, says "ok" (or why not) on `status`, then waits until the holder is gone
 * (`life` at EOF, or the parent-death signal). Orphans of the namespace are reparented to
 * it; with SIGCHLD ignored the kernel reaps them. Init gets only the signals it handles, and
 * it handles none: from outside the namespace too, where only SIGKILL (and SIGSTOP) reach
 * a namespace's init (Slurm's scancel and `--signal` do not end the container here). */
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
	if (memcmp(said, "end", 3) && n_then) {
		execv(then[0], then);
		return 1;
	}
	return 0;
}

int main(int argc, char **argv)
{
	if (argc > 1 && !strcmp(argv[1], "init"))
		return run_init(argc, argv);
	if (argc > 1 && !strcmp(argv[1], "watch"))
		return run_watch(argc, argv);
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
