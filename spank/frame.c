/* Framed records: the shim's only wire format (no JSON in slurmstepd). */
#include "frame.h"

#include <sched.h>
#include <sys/socket.h>

void buf_put(struct buf *b, const void *s, size_t n)
{
	char *p;

	if (b->oom || !n)
		return;
	if (b->len + n > b->cap && (p = realloc(b->p, b->cap * 2 + n)))
		b->p = p, b->cap = b->cap * 2 + n;
	if (!(b->oom = b->len + n > b->cap))
		memcpy(b->p + b->len, s, n), b->len += n;
}

/* What a task hands the node's PMI bridge server (pmi/bridgeserve.py `_take_task`):
 * `env=K=V` for each entry of `env`, `cpus=` the CPUs we may run on (its bridge runs
 * there), `end=1`. The shim's join_pmi_bridge and the front end's join_node_bridge. */
void frame_hand_over(struct buf *b, char **env)
{
	cpu_set_t cpus;

	for (char **e = env; *e; e++)
		if (**e != '=' && strchr(*e, '='))
			frame_add(b, "env", "%s", *e);
	if (!sched_getaffinity(0, sizeof cpus, &cpus)) {
		struct buf list = {0};
		char one[16];
		for (int c = 0; c < CPU_SETSIZE; c++)
			if (CPU_ISSET(c, &cpus))
				buf_put(&list, one, (size_t)snprintf(one, sizeof one, "%s%d",
								   list.len ? "," : "", c));
		buf_put(&list, "", 1);
		if (!list.oom)
			frame_add(b, "cpus", "%s", list.p);
		free(list.p);
	}
	frame_add(b, "end", "1");
}

/* The PID in `pmix-server.PID;...`, the PMIx server URI of the first of these variables
 * `env` has (libpmix's name for Slurm's PMIx server, slurmstepd), as `.PID`; "" when there
 * is none. The shim's pmi_node_socket and the front end's join_node_bridge. */
void stepd_suffix(char **env, char *out, size_t size)
{
	static const char *const vars[] = {"PMIX_SERVER_URI41=", "PMIX_SERVER_URI4=",
					   "PMIX_SERVER_URI3=", "PMIX_SERVER_URI21=",
					   "PMIX_SERVER_URI2="};
	static const char prefix[] = "pmix-server.";
	const char *uri = NULL;
	size_t n;

	for (size_t i = 0; i < sizeof vars / sizeof *vars && !uri; i++)
		for (char **e = env; *e && !uri; e++)
			if (!strncmp(*e, vars[i], strlen(vars[i])))
				uri = *e + strlen(vars[i]);
	out[0] = '\0';
	if (!uri || strncmp(uri, prefix, sizeof prefix - 1))
		return;
	uri += sizeof prefix - 1;
	n = strspn(uri, "0123456789");
	if (n && uri[n] == ';' && n + 2 <= size)
		snprintf(out, size, ".%.*s", (int)n, uri);
}

/* The shim's pmi2_socket and the front end's join_pmi2_node. */
void maker_suffix(int fd, char *out, size_t size)
{
	struct ucred cred;
	socklen_t len = sizeof cred;

	out[0] = '\0';
	if (!getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) && cred.pid > 0)
		snprintf(out, size, ".%d", (int)cred.pid);
}

/* Keys are the shim's own, values C strings: no NUL, no '=' in a key. */
void frame_add(struct buf *b, const char *key, const char *fmt, ...)
{
	char *val;
	va_list ap;

	va_start(ap, fmt);
	int n = vasprintf(&val, fmt, ap);
	va_end(ap);
	b->oom |= n < 0;
	if (n < 0)
		return;
	buf_put(b, key, strlen(key)), buf_put(b, "=", 1);
	buf_put(b, val, (size_t)n + 1);
	free(val);
}

int frame_parse(char *data, size_t len, frame_fn *fn, void *ctx)
{
	char *p, *nul, *eq;

	if (!len)
		return 0;
	if (len > FRAME_MAX || data[len - 1])
		return -1;
	for (p = data; p < data + len; p = nul + 1) { /* all checked first: no partial effect */
		nul = memchr(p, 0, len - (size_t)(p - data));
		if (!(eq = memchr(p, '=', (size_t)(nul - p))) || eq == p)
			return -1;
	}
	for (p = data; p < data + len; p = nul + 1) {
		nul = p + strlen(p);
		*(eq = strchr(p, '=')) = 0;
		fn(p, eq + 1, ctx);
	}
	return 0;
}

#ifdef FRAME_TEST
/* `make frame-test`: a frame on stdin; `KEY\tVALUE` lines out, or `bad frame` and 2. */
static void print(const char *key, char *val, void *ctx UNUSED)
{
	printf("%s\t%s\n", key, val);
}

int main(void)
{
	struct buf b = {0};
	char chunk[65536];
	ssize_t n;

	while ((n = read(0, chunk, sizeof chunk)) > 0)
		buf_put(&b, chunk, (size_t)n);
	if (n < 0 || b.oom)
		return perror("frame_test: stdin"), 1;
	if (frame_parse(b.p, b.len, print, NULL))
		return fputs("bad frame\n", stderr), 2;
	return fflush(stdout) || ferror(stdout);
}
#endif
