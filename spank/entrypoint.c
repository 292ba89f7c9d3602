/* rankwire-entrypoint: a task's first program when its step runs the image's ENTRYPOINT
 * (srun --container-entrypoint). slurmstepd execs the tasks' argv, which a SPANK plugin
 * cannot make longer; so the shim's task_init makes argv[0] this program (opened on the
 * host, run as /proc/self/fd/N in the container; static: it needs nothing of the image)
 * and leaves in ENTRY_VAR the words to run first: the ENTRYPOINT's, then the command's
 * own argv[0], each as "LEN:WORD". This execs them followed by argv[1..], as
 * `docker run IMAGE COMMAND` runs ENTRYPOINT + COMMAND; ENTRY_VAR goes. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define ENTRY_VAR "RANKWIRE_ENTRYPOINT_ARGV"

int main(int argc, char **argv)
{
	const char *p = getenv(ENTRY_VAR);
	char **out, *end;
	size_t n = 0;

	if (!p || !*p) {
		fprintf(stderr, "rankwire: %s is not set: rankwire-entrypoint is the plugin's, "
			"for srun --container-entrypoint\n", ENTRY_VAR);
		return 127;
	}
	/* At most one word per 2 bytes ("0:"), plus argv[1..] and the NULL. */
	if (!(out = calloc(strlen(p) / 2 + (size_t)argc + 1, sizeof *out)))
		return perror("rankwire: entrypoint"), 127;
	while (*p) {
		unsigned long len = strtoul(p, &end, 10);
		if (*p < '0' || *p > '9' || *end != ':' || strnlen(end + 1, len) < len) {
			fprintf(stderr, "rankwire: %s is malformed\n", ENTRY_VAR);
			return 127;
		}
		if (!(out[n++] = strndup(end + 1, len)))
			return perror("rankwire: entrypoint"), 127;
		p = end + 1 + len;
	}
	unsetenv(ENTRY_VAR);
	for (int i = 1; i < argc; i++)
		out[n++] = argv[i];
	out[n] = NULL;
	execvp(out[0], out);
	fprintf(stderr, "rankwire: cannot run the image's entrypoint %s: %s\n", out[0],
		strerror(errno));
	return errno == ENOENT ? 127 : 126;
}
