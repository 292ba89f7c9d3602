/* Framed records (runtime/frame.py): `KEY=VALUE\0` records, a key repeats for a list; the
 * whole stream until EOF is one frame, at most FRAME_MAX bytes. */
#ifndef RANKWIRE_FRAME_H
#define RANKWIRE_FRAME_H
#define _GNU_SOURCE
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define FRAME_MAX (4 << 20)
#define UNUSED __attribute__((unused))

/* A growing byte buffer; `oom` once an append failed (the rest are then dropped). */
struct buf { char *p; size_t len, cap; int oom; };

void buf_put(struct buf *b, const void *s, size_t n);
/* Append the record KEY=VALUE, VALUE printf-formatted. */
void frame_add(struct buf *b, const char *key, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
/* A task's hand-over records to the node's PMI bridge server: env=, cpus=, end=1. */
void frame_hand_over(struct buf *b, char **env);
/* pmi/bridge.py `stepd_of`: `.PID` of the task's slurmstepd (`env`'s PMIx server URI), or
 * "", in `out`: the end of the node's PMI bridge socket name. */
void stepd_suffix(char **env, char *out, size_t size);
/* pmi/pmix/pmi2bridge.py `socket_path`'s `stepd`: `.PID` of the process that made socket
 * `fd` (SO_PEERCRED; slurmstepd makes each task's PMI_FD socketpair), or "", in `out`:
 * the end of the node's PMI-2 bridge socket name. */
void maker_suffix(int fd, char *out, size_t size);
/* fn(key, value, ctx) per record, in order, both NUL-terminated in place; -1 (and no call
 * at all) unless data[0..len) is a well-formed frame. */
typedef void frame_fn(const char *key, char *val, void *ctx);
int frame_parse(char *data, size_t len, frame_fn *fn, void *ctx);
#endif
