/* spank/frame.c's parser under ASan/UBSan, driven by tools/fuzz.py (target frame-c).
 * stdin: inputs, each a 4-byte little-endian length then that many bytes. Per input one
 * line out, written at once (so a crash names its input): `bad` or `ok <records>`.
 * A parsed frame must re-encode (frame_add) to exactly its bytes, or the driver aborts;
 * an input parsed for longer than 2 s ends it with SIGALRM (a hang). */
#include <stdint.h>
#include "frame.h"

static size_t records;
static struct buf again;

static void record(const char *key, char *val, void *ctx UNUSED)
{
	records++;
	frame_add(&again, key, "%s", val);
}

int main(void)
{
	uint32_t n;
	char line[40];

	while (fread(&n, sizeof n, 1, stdin) == 1) {
		char *data = malloc(n ? n : 1), *orig = malloc(n ? n : 1);

		if (!data || !orig || fread(data, 1, n, stdin) != n)
			return 1;
		memcpy(orig, data, n);
		records = 0, again.len = 0, again.oom = 0;
		alarm(2);
		int rc = frame_parse(data, n, record, NULL);
		alarm(0);
		if (!rc && n && (again.oom || again.len != n || memcmp(again.p, orig, n)))
			abort();
		int len = rc ? snprintf(line, sizeof line, "bad\n")
			     : snprintf(line, sizeof line, "ok %zu\n", records);
		if (write(1, line, (size_t)len) != len)
			return 1;
		free(data), free(orig);
	}
	free(again.p);
	return 0;
}
