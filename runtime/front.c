/*
 * The `rankwire` command. `rankwire exec instance://NAME CMD [ARG...]` joins the running
 * instance NAME right here, without starting Python, when the Python planner left a plan
 * for exactly this request (runtime/joinplan.py writes it, NAME.plan next to the
 * instance's socket): the same user, working directory and environment, the same instance
 * (its socket's identity and holder pid) and the same planner code (its files'
 * identities). Everything else, and any doubt before the join, runs the Python CLI
 * (`rankwire-py`, installed next to this program) with the same arguments; so the plan
 * always comes from the one planner, and every message but the command's own start
 * failures (said here as runtime/instance.py says them) is the Python CLI's.
 *
 * The join is runtime/instance.py's, step for step: connect to the holder's socket, send
 * "join", receive its report and the container's user, mount (and PID) namespace
 * descriptors; a child enters them (and, with a PID namespace, makes its successor there
 * as our child: CLONE_PARENT), enters the planned working directory and execs the command
 * with the planned environment; we forward signals, wait, send "leave" and, if we were the
 * last lease of a non-persistent holder, wait for it to end. Not under slurmstepd (a task
 * of a step needs `end_with_slurmstepd`): the Python CLI runs those.
 *
 * `rankwire exec [OPTIONS...] IMAGE CMD [ARG...]` (not a task of a step) starts its
 * container here too, when the Python CLI left an exec plan for this image and exactly
 * these option words that fits the request (runtime/joinplan.py `remember_exec`: keyed as
 * a step plan is, and on the boot, the probed host paths and tools): `rankwire-holder setup` (runtime/holdserve.c)
 * does again what the Python holder did for it (the plan's recipe), as an ephemeral
 * holder of ours, and we join it as above. A recipe that fails there leaves nothing
 * (its teardown) and the Python CLI runs. A task of a step shares a step plan instead
 * (below).
 *
 * `apptainer-mpirun WORDS...` (this program installed under that name too) and `rankwire
 * run WORDS...` start a kept launch plan's container and ranks here, when the Python
 * launcher left one for exactly these words that can be started so
 * (launcher/plancache.py `front_start`) and its key holds: the container as an exec
 * plan's, then each rank as `instance.start_in` starts it (our child, in the container's
 * PID namespace, its PMI_FD one end of a socketpair); then `rankwire-py __launch ...` in
 * our place (launcher/execute.py `adopt`) serves their PMI and sees the job to its end.
 * Anything else runs the Python CLI (`rankwire-py __apptainer-mpirun WORDS...`).
 *
 * `rankwire __enter ...` is the Python side's own way into a container it holds a lease
 * on (runtime/instance.py `start_in`: a launcher's ranks, the Python exec's command): the
 * same child as the join's, for its namespace descriptors (`enter`, below).
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <limits.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "frame.h" /* spank/frame.c: the framed records and a growing buffer */

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif

#define MAGIC "rankwire-join-plan 1"
#define STEP_MAGIC "rankwire-step-plan 1"
#define EXEC_MAGIC "rankwire-exec-plan 1"
#define LAUNCH_MAGIC "rankwire-launch-plan 1" /* launcher/plancache.py MAGIC */
#define PLUGIN_MAGIC "rankwire-plugin-plan 1" /* runtime/joinplan.py PLUGIN_MAGIC */
#define KEEP_MAX 16 /* runtime/joinplan.py KEEP_MAX: the image and 15 binds' sources */
#define MAX_RANKS 4096 /* launcher/plancache.py MAX_STARTED */
_Static_assert(MAX_RANKS <= PIPE_BUF, "start_ranks's go bytes: one atomic write");
#define BOOT_ID "/proc/sys/kernel/random/boot_id"
#define STEP_LOCK_VAR "RANKWIRE_STEP_LOCK" /* rankwire/entry.py's */
#define STEP_WAIT_S 30 /* for the step's first task to plan; then Python */
#define BRIDGE_PMIX_TO_PMI "pmix-to-pmi" /* pmi/bridgeplan.py PMIX_TO_PMI */
#define BRIDGE_PMI2_TO_PMIX "pmi2-to-pmix" /* pmi/bridgeplan.py PMI2_TO_PMIX */
#define NODE_WAIT_MS 60000 /* pmi/bridge.py NODE_WAIT, pmi/pmix/pmi2bridge.py START_TIMEOUT */
#define LEAVE_TIMEOUT_MS 10000

extern char **environ;

static const int forwarded[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};
#define NFORWARDED (sizeof forwarded / sizeof forwarded[0])

/* ---- the Python CLI --------------------------------------------------------------- */

static char **saved_argv;

/* Exec `rankwire-py`, next to this program (/proc/self/exe; else argv[0] if it is a path),
 * with `argv`. */
static void exec_python(char **argv) __attribute__((noreturn));
static void exec_python(char **argv)
{
    char self[PATH_MAX], py[PATH_MAX + 16];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n > 0)
        self[n] = '\0';
    else if (strchr(saved_argv[0], '/') && strlen(saved_argv[0]) < sizeof self)
        strcpy(self, saved_argv[0]);
    else {
        fprintf(stderr, "rankwire: cannot find this program's path (/proc/self/exe: %s); "
                "run rankwire-py instead\n", strerror(errno));
        exit(125);
    }
    *strrchr(self, '/') = '\0';
    snprintf(py, sizeof py, "%s/rankwire-py", self);
    (void)prctl(PR_SET_PDEATHSIG, 0); /* a task's: Python arms its own (end_with_slurmstepd) */
    execv(py, argv);
    fprintf(stderr, "rankwire: cannot run %s: %s; reinstall rankwire\n", py, strerror(errno));
    exit(125);
}

/* Anything this program does not do itself: the Python CLI, with our arguments. */
static void run_python(void) __attribute__((noreturn));
static void run_python(void)
{
    exec_python(saved_argv);
}

/* ---- the plan ------------------------------------------------------------------------ */

struct plan {
    char *buf;
    const char *uid, *gid, *cwd, *sock, *sock_id, *holder, *session, *workdir, *nnp;
    const char *image, *image_id, *bridge; /* a step plan's (an exec plan's: the image) */
    const char *boot, *holder_program, *groups; /* an exec plan's */
    const char *front_dir, *ntasks, *stdin_rank, *cpus, *nofile; /* a launch plan's */
    const char **files, **key_env, **env, **task_vars, **exists, **tools, **options, **contents,
        **listings, **words, **args, **fds;
    size_t nfiles, nkey_env, nenv, ntask_vars, nexists, ntools, noptions, ncontents, nlistings,
        nwords, nargs, nfds;
    int magic, step, exec, launch, plugin, complete, bad; /* launch, plugin plans: exec too */
};

static void add(struct plan *p, const char ***list, size_t *n, const char *value)
{
    const char **grown = realloc(*list, (*n + 2) * sizeof **list);
    if (!grown) {
        p->bad = 1;
        return;
    }
    grown[(*n)++] = value;
    grown[*n] = NULL;
    *list = grown;
}

static void plan_record(const char *key, char *value, void *ctx)
{
    struct plan *p = ctx;
    if (!p->magic) { /* the first record */
        p->magic = 1;
        p->step = !strcmp(key, "magic") && !strcmp(value, STEP_MAGIC);
        p->launch = !strcmp(key, "magic") && !strcmp(value, LAUNCH_MAGIC);
        p->plugin = !strcmp(key, "magic") && !strcmp(value, PLUGIN_MAGIC);
        p->exec = !strcmp(key, "magic") && (!strcmp(value, EXEC_MAGIC) || p->launch ||
                                            p->plugin);
        p->bad |= strcmp(key, "magic") || (strcmp(value, MAGIC) && !p->step && !p->exec);
        return;
    }
    if (p->exec && !strncmp(key, "r_", 2)) { /* the recipe: rankwire-holder's */
        p->bad |= p->complete;
        return;
    }
    p->bad |= p->complete; /* nothing after the end */
    if (!strcmp(key, "uid")) p->uid = value;
    else if (!strcmp(key, "gid")) p->gid = value;
    else if (!strcmp(key, "cwd")) p->cwd = value;
    else if (!strcmp(key, "socket")) p->sock = value;
    else if (!strcmp(key, "socket_id")) p->sock_id = value;
    else if (!strcmp(key, "holder")) p->holder = value;
    else if (!strcmp(key, "session")) p->session = value;
    else if (!strcmp(key, "workdir")) p->workdir = value;
    else if (!strcmp(key, "no_new_privs")) p->nnp = value;
    else if (!strcmp(key, "file")) add(p, &p->files, &p->nfiles, value);
    else if (!strcmp(key, "key_env")) add(p, &p->key_env, &p->nkey_env, value);
    else if (!strcmp(key, "env")) add(p, &p->env, &p->nenv, value);
    else if (!strcmp(key, "end")) p->complete = 1;
    else if ((p->step || p->exec) && !strcmp(key, "image")) p->image = value;
    else if ((p->step || p->exec) && !strcmp(key, "image_id")) p->image_id = value;
    else if (p->exec && !strcmp(key, "boot")) p->boot = value;
    else if (p->exec && !strcmp(key, "holder_program")) p->holder_program = value;
    else if (p->exec && !strcmp(key, "exists")) add(p, &p->exists, &p->nexists, value);
    else if (p->exec && !strcmp(key, "tool")) add(p, &p->tools, &p->ntools, value);
    else if (p->exec && !strcmp(key, "content")) add(p, &p->contents, &p->ncontents, value);
    else if (p->exec && !strcmp(key, "listing")) add(p, &p->listings, &p->nlistings, value);
    else if (p->exec && !strcmp(key, "groups")) p->groups = value;
    else if (p->exec && !strcmp(key, "option")) add(p, &p->options, &p->noptions, value);
    else if (p->launch && !strcmp(key, "word")) add(p, &p->words, &p->nwords, value);
    else if (p->launch && !strcmp(key, "arg")) add(p, &p->args, &p->nargs, value);
    else if (p->launch && !strcmp(key, "front_dir")) p->front_dir = value;
    else if (p->launch && !strcmp(key, "ntasks")) p->ntasks = value;
    else if (p->launch && !strcmp(key, "stdin_rank")) p->stdin_rank = value;
    else if (p->launch && !strcmp(key, "cpus")) p->cpus = value;
    else if (p->launch && !strcmp(key, "nofile")) p->nofile = value;
    else if (p->launch && (!strcmp(key, "package") || !strcmp(key, "warm") ||
                           !strcmp(key, "plan"))) {
    } /* Python's (launcher/plancache.py) */
    else if (p->plugin && !strcmp(key, "fd")) add(p, &p->fds, &p->nfds, value);
    else if (p->step && !strcmp(key, "task_var")) add(p, &p->task_vars, &p->ntask_vars, value);
    else if (p->step && !strcmp(key, "bridge")) p->bridge = value;
    else p->bad = 1;
}

/* NAME.plan, parsed by spank/frame.c's `frame_parse`; -1 for anything unexpected (the
 * caller then runs Python). */
static int parse_plan(char *buf, size_t len, struct plan *p)
{
    if (frame_parse(buf, len, plan_record, p) || p->bad || !p->complete || !p->uid ||
        !p->gid || !p->cwd || !p->workdir || !p->nnp ||
        (p->exec ? !p->image || !p->image_id || !p->boot || !p->holder_program || !p->groups
                 : !p->sock || !p->sock_id || !p->holder || !p->session) ||
        (p->step && (!p->image || !p->image_id)) ||
        (p->launch && (!p->front_dir || !p->ntasks || !p->stdin_rank || !p->cpus || !p->nofile ||
                       !p->nargs)) ||
        (p->bridge && strcmp(p->bridge, BRIDGE_PMIX_TO_PMI) &&
         strcmp(p->bridge, BRIDGE_PMI2_TO_PMIX)))
        return -1;
    static const char *none[] = {NULL};
    const char ***lists[] = {&p->env,     &p->key_env,  &p->task_vars, &p->exists, &p->tools,
                             &p->options, &p->contents, &p->listings,  &p->words,  &p->args,
                             &p->fds};
    for (size_t i = 0; i < sizeof lists / sizeof *lists; i++)
        if (!*lists[i])
            *lists[i] = none; /* a list the plan has no record of: empty */
    return 0;
}

/* The whole of the regular file `fd`, ours and private (0600), into a new buffer. */
static int read_private_fd(int fd, char **out, size_t *len)
{
    struct stat st;
    if (fstat(fd, &st) || !S_ISREG(st.st_mode) || st.st_uid != getuid() ||
        (st.st_mode & 077) || st.st_size <= 0 || st.st_size > FRAME_MAX)
        return -1;
    char *buf = malloc((size_t)st.st_size);
    size_t got = 0;
    while (buf && got < (size_t)st.st_size) {
        ssize_t n = pread(fd, buf + got, (size_t)st.st_size - got, (off_t)got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    if (!buf || got != (size_t)st.st_size) {
        free(buf);
        return -1;
    }
    *out = buf;
    *len = got;
    return 0;
}

static int read_private_file(int dirfd, const char *name, char **out, size_t *len)
{
    int fd = openat(dirfd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return -1;
    int failed = read_private_fd(fd, out, len);
    close(fd);
    return failed;
}

static int private_dir(const char *path)
{
    struct stat st;
    return lstat(path, &st) == 0 && S_ISDIR(st.st_mode) && st.st_uid == getuid() &&
           !(st.st_mode & 077);
}

/* `path` as Python's pathlib writes it: no repeated or trailing slash, no "." part;
 * -1 for a relative path (Python decides those). */
static int normalize(char *path)
{
    if (path[0] != '/')
        return -1;
    char *out = path;
    for (const char *in = path; *in;) {
        while (*in == '/')
            in++;
        if (in[0] == '.' && (in[1] == '/' || in[1] == '\0')) {
            in++;
            continue;
        }
        if (!*in)
            break;
        *out++ = '/';
        while (*in && *in != '/')
            *out++ = *in++;
    }
    if (out == path)
        *out++ = '/';
    *out = '\0';
    return 0;
}

/* The user's private runtime dir, as runtime/instance.py `runtime_dir` finds it; -1
 * where that dir is not there and private (Python makes it, or falls back, and says). */
static int runtime_dir(char *out, size_t size)
{
    const char *forced = getenv("RANKWIRE_RUNTIME_DIR");
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    const char *tmp = getenv("TMPDIR");
    int n;
    if (forced && *forced)
        n = snprintf(out, size, "%s", forced);
    else if (xdg && *xdg && access(xdg, W_OK) == 0)
        n = snprintf(out, size, "%s/rankwire", xdg);
    else if (tmp && !*tmp)
        return -1; /* Python's is then relative */
    else
        n = snprintf(out, size, "%s/rankwire-%u", tmp ? tmp : "/tmp", (unsigned)getuid());
    if (n <= 0 || (size_t)n >= size || normalize(out))
        return -1;
    (void)mkdir(out, 0700); /* as Python makes it (a node's first use): checked next */
    return private_dir(out) ? 0 : -1;
}

static int same_number(const char *recorded, unsigned long long actual)
{
    char buf[32];
    snprintf(buf, sizeof buf, "%llu", actual);
    return !strcmp(recorded, buf);
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* `entry` (NAME=VALUE) names one of the plan's task variables (a step plan's). */
static int task_var(const struct plan *p, const char *entry)
{
    for (size_t i = 0; i < p->ntask_vars; i++) {
        size_t n = strlen(p->task_vars[i]);
        if (!strncmp(entry, p->task_vars[i], n) && entry[n] == '=')
            return 1;
    }
    return 0;
}

/* `id` (DEV:INO:SIZE:MTIME_NS:CTIME_NS, then `:` or the end) is `st`'s; returns where the
 * identity ends, or NULL. */
static const char *same_file(const char *id, const struct stat *st)
{
    unsigned long long dev, ino, size, mt, ct;
    int used = 0;
    if (sscanf(id, "%llu:%llu:%llu:%llu:%llu%n", &dev, &ino, &size, &mt, &ct, &used) != 5 ||
        used <= 0 || (id[used] != ':' && id[used] != '\0'))
        return NULL;
    if (st->st_dev != dev || st->st_ino != ino || (unsigned long long)st->st_size != size ||
        (unsigned long long)st->st_mtim.tv_sec * 1000000000ULL + st->st_mtim.tv_nsec != mt ||
        (unsigned long long)st->st_ctim.tv_sec * 1000000000ULL + st->st_ctim.tv_nsec != ct)
        return NULL;
    return id + used;
}

/* shutil.which(name): the first PATH entry (of our environment; else /bin:/usr/bin) where
 * `name` is an executable file, joined as os.path.join does; 1 if that is `want` ("" for
 * none). */
static int which_is(const char *name, const char *want)
{
    const char *path = getenv("PATH");
    char full[PATH_MAX * 2];
    struct stat st;
    for (const char *dir = path ? path : "/bin:/usr/bin";; dir++) {
        const char *end = strchrnul(dir, ':');
        size_t dlen = (size_t)(end - dir);
        int n = dlen == 0 ? snprintf(full, sizeof full, "%s", name)
                          : snprintf(full, sizeof full, "%.*s%s%s", (int)dlen, dir,
                                     dir[dlen - 1] == '/' ? "" : "/", name);
        if (n > 0 && (size_t)n < sizeof full && stat(full, &st) == 0 && !S_ISDIR(st.st_mode) &&
            access(full, X_OK) == 0)
            return !strcmp(full, want);
        if (!*end)
            return !*want;
        dir = end;
    }
}

static int cmp_gid(const void *a, const void *b)
{
    gid_t x = *(const gid_t *)a, y = *(const gid_t *)b;
    return (x > y) - (x < y);
}

/* Our supplementary groups as `joinplan.groups` words them (sorted, once) are `want`. */
static int same_groups(const char *want)
{
    int max = getgroups(0, NULL), n = -1, same = 0;
    gid_t *g = max >= 0 ? calloc((size_t)max + 1, sizeof *g) : NULL;
    char *out = g ? malloc((size_t)max * 11 + 1) : NULL;
    if (out && (n = getgroups(max, g)) >= 0 && n <= max) {
        size_t used = 0;
        qsort(g, (size_t)n, sizeof *g, cmp_gid);
        out[0] = '\0';
        for (int i = 0; i < n; i++)
            if (i == 0 || g[i] != g[i - 1])
                used += (size_t)sprintf(out + used, "%s%u", used ? "," : "", (unsigned)g[i]);
        same = !strcmp(out, want);
    }
    free(out);
    free(g);
    return same;
}

/* A `PATH<TAB>VALUE` record's PATH into `path` (PATH_MAX); its VALUE, or NULL. */
static const char *split_tab(const char *entry, char *path)
{
    const char *tab = strchr(entry, '\t');
    if (!tab || tab - entry >= PATH_MAX)
        return NULL;
    snprintf(path, PATH_MAX, "%.*s", (int)(tab - entry), entry);
    return tab + 1;
}

/* `content=PATH<TAB>VALUE`: PATH (a kernel's file, read as `joinplan.file_content` reads
 * it: 4 KiB at most, whitespace stripped at both ends; "" if unreadable) holds VALUE. */
static int same_content(const char *entry)
{
    char path[PATH_MAX], buf[4097];
    const char *want = split_tab(entry, path);
    ssize_t n = -1;
    if (!want)
        return 0;
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd >= 0) {
        n = read(fd, buf, sizeof buf - 1);
        close(fd);
    }
    char *start = buf, *end = buf + (n > 0 ? n : 0);
    while (start < end && isspace((unsigned char)*start))
        start++;
    while (end > start && isspace((unsigned char)end[-1]))
        end--;
    *end = '\0';
    return !strcmp(start, want);
}

/* `listing=PATTERN<TAB>PATHS`: PATTERN matches PATHS (as `joinplan.listing` words them:
 * sorted, with commas; glob(3) sorts them, in the C locale, as Python's sorted does). */
static int same_listing(const char *entry)
{
    char pattern[PATH_MAX];
    const char *want = split_tab(entry, pattern);
    glob_t g;
    if (!want)
        return 0;
    int rc = glob(pattern, 0, NULL, &g), same = rc == GLOB_NOMATCH && !*want;
    if (rc == 0) {
        same = 1;
        for (size_t i = 0; same && i < g.gl_pathc; i++) {
            size_t len = strlen(g.gl_pathv[i]);
            same = !strncmp(want, g.gl_pathv[i], len) &&
                   want[len] == (i + 1 < g.gl_pathc ? ',' : '\0');
            want += len + 1;
        }
    }
    if (rc == 0 || rc == GLOB_NOMATCH)
        globfree(&g);
    return same;
}

/* An exec plan's host: the same groups and boot (kernel, modules, devices), the probed
 * paths there or not as they were (`exists=1|0:PATH`), each host tool where it was
 * (`tool=NAME:PATH`), each kernel file's content as it was (`content`), the adapters'
 * classes and device nodes as they were listed (`listing`). */
static int host_matches(const struct plan *p)
{
    if (!same_groups(p->groups))
        return 0;
    char boot[64] = {0};
    int fd = open(BOOT_ID, O_RDONLY | O_CLOEXEC);
    ssize_t n = fd < 0 ? -1 : read(fd, boot, sizeof boot - 1);
    if (fd >= 0)
        close(fd);
    if (n <= 0)
        return 0;
    boot[strcspn(boot, "\n")] = '\0';
    if (strcmp(boot, p->boot))
        return 0;
    struct stat st;
    for (size_t i = 0; i < p->nexists; i++) {
        const char *e = p->exists[i];
        if ((e[0] != '0' && e[0] != '1') || e[1] != ':' || (stat(e + 2, &st) == 0) != (e[0] == '1'))
            return 0;
    }
    for (size_t i = 0; i < p->ntools; i++) {
        const char *colon = strchr(p->tools[i], ':');
        char name[64];
        if (!colon || (size_t)(colon - p->tools[i]) >= sizeof name)
            return 0;
        snprintf(name, sizeof name, "%.*s", (int)(colon - p->tools[i]), p->tools[i]);
        if (!which_is(name, colon + 1))
            return 0;
    }
    for (size_t i = 0; i < p->ncontents; i++)
        if (!same_content(p->contents[i]))
            return 0;
    for (size_t i = 0; i < p->nlistings; i++)
        if (!same_listing(p->listings[i]))
            return 0;
    return 1;
}

/* The request is the one the plan was made for: user, directory, environment (but a step
 * plan's task variables), planner code, instance (`sock_path`; a step plan names its
 * own) and a step plan's image, as given (`image`) and by identity. */
static int plan_matches(const struct plan *p, const char *sock_path, const char *image)
{
    char cwd[PATH_MAX];
    struct stat st;
    if (!same_number(p->uid, getuid()) || !same_number(p->gid, getgid()))
        return 0;
    if (!getcwd(cwd, sizeof cwd) || strcmp(cwd, p->cwd))
        return 0;
    if (p->step || p->exec ? !image || strcmp(image, p->image) || stat(image, &st) ||
                                 !same_file(p->image_id, &st) || *same_file(p->image_id, &st)
                           : !sock_path || strcmp(p->sock, sock_path))
        return 0;
    size_t n = 0, kept = 0;
    while (environ[n])
        n++;
    const char **mine = malloc((n + 1) * sizeof *mine);
    if (!mine)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!task_var(p, environ[i]))
            mine[kept++] = environ[i];
    int same = kept == p->nkey_env;
    qsort(mine, kept, sizeof *mine, cmp_str);
    for (size_t i = 0; same && i < kept; i++)
        same = !strcmp(mine[i], p->key_env[i]);
    free(mine);
    if (!same)
        return 0;
    /* file=DEV:INO:SIZE:MTIME_NS:CTIME_NS:PATH, the planner code as Python saw it */
    for (size_t i = 0; i < p->nfiles; i++) {
        const char *path = strchr(p->files[i], ':');
        for (int colons = 1; path && colons < 5; colons++)
            path = strchr(path + 1, ':');
        if (!path || stat(path + 1, &st) || !same_file(p->files[i], &st))
            return 0;
    }
    if (p->exec)
        return host_matches(p);
    char id[64];
    if (lstat(p->sock, &st) || !S_ISSOCK(st.st_mode))
        return 0;
    snprintf(id, sizeof id, "%llu:%llu", (unsigned long long)st.st_dev,
             (unsigned long long)st.st_ino);
    return !strcmp(id, p->sock_id);
}

/* ---- the join ------------------------------------------------------------------------ */

/* poll(2), retried on EINTR with the time left. */
static int poll_for(struct pollfd *fd, int ms)
{
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        clock_gettime(CLOCK_MONOTONIC, &now);
        long spent = (now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000;
        int ready = poll(fd, 1, spent >= ms ? 0 : (int)(ms - spent));
        if (ready >= 0 || errno != EINTR)
            return ready;
    }
}

struct lease {
    int conn, userns, mntns, pidns; /* pidns -1: the container has none */
    char report[4096];              /* the holder's, as JSON */
};

/* `"key": value` in the JSON `text`, followed by its end (`,` or `}`). */
static int has_member(const char *text, const char *key, const char *value)
{
    char want[PATH_MAX + 64];
    int n = snprintf(want, sizeof want, "\"%s\": %s", key, value);
    if (n <= 0 || (size_t)n >= sizeof want)
        return 0;
    const char *at = strstr(text, want);
    return at && (at[n] == ',' || at[n] == '}');
}

/* Join the holder at `sock_path`, if it is the one the plan was made with (its pid and
 * its session dir, a random name, in its report); -1 for anything else. */
static int join(const char *sock_path, const struct plan *p, struct lease *l)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(sock_path) >= sizeof addr.sun_path)
        return -1;
    strcpy(addr.sun_path, sock_path);
    int conn = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (conn < 0)
        return -1;
    if (connect(conn, (struct sockaddr *)&addr, sizeof addr) ||
        send(conn, "join\n", 5, MSG_NOSIGNAL) != 5) {
        close(conn);
        return -1;
    }
    char *data = l->report;
    union {
        struct cmsghdr h;
        char space[CMSG_SPACE(3 * sizeof(int))];
    } ctl;
    struct iovec iov = {data, sizeof l->report - 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.space,
                         .msg_controllen = sizeof ctl.space};
    ssize_t n;
    do
        n = recvmsg(conn, &msg, MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    int fds[3], nfds = 0;
    for (struct cmsghdr *c = n > 0 ? CMSG_FIRSTHDR(&msg) : NULL; c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        int got = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (int i = 0; i < got; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
            if (nfds < 3)
                fds[nfds++] = fd;
            else
                close(fd);
        }
    }
    int ok = n > 0 && !(msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) && (nfds == 2 || nfds == 3);
    if (ok) {
        data[n] = '\0';
        ok = has_member(data, "pid", p->holder) && has_member(data, "session", p->session);
    }
    if (!ok) {
        for (int i = 0; i < nfds; i++)
            close(fds[i]);
        close(conn); /* EOF: the holder ends the lease */
        return -1;
    }
    l->conn = conn;
    l->userns = fds[0];
    l->mntns = fds[1];
    l->pidns = nfds == 3 ? fds[2] : -1;
    return 0;
}

static void close_ns(struct lease *l)
{
    close(l->userns);
    close(l->mntns);
    if (l->pidns >= 0)
        close(l->pidns);
}

/* Wait (without reaping) until `pid` has exited, at most `ms`; 1 if it has. */
static int wait_exit(pid_t pid, int ms)
{
    int fd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (fd < 0)
        return errno == ESRCH;
    struct pollfd gone = {fd, POLLIN, 0};
    int ready = poll_for(&gone, ms);
    close(fd);
    return ready == 1;
}

/* Leave, as `Lease.close`: if we were the last lease, wait (bounded) until the holder has
 * cleaned up; if it does not answer (SIGKILLed), wait until it has gone, and the Python CLI
 * removes what it left (its socket, session dir and plan: its report names them), then
 * exits with `code`. */
static void leave(struct lease *l, pid_t holder, int code)
{
    char said[64];
    ssize_t n = -1;
    struct pollfd pfd = {l->conn, POLLIN, 0};
    if (send(l->conn, "leave\n", 6, MSG_NOSIGNAL) == 6 && poll_for(&pfd, LEAVE_TIMEOUT_MS) == 1)
        do
            n = read(l->conn, said, sizeof said - 1);
        while (n < 0 && errno == EINTR);
    close(l->conn);
    if (n > 0) {
        if ((size_t)n == sizeof "last=1" && !memcmp(said, "last=1", sizeof "last=1"))
            wait_exit(holder, LEAVE_TIMEOUT_MS);
        return;
    }
    if (!wait_exit(holder, LEAVE_TIMEOUT_MS))
        return;
    char status[16];
    snprintf(status, sizeof status, "%d", code);
    char *report = strtok(l->report, "\n");
    char *argv[] = {saved_argv[0], "front-end-holder-gone", report ? report : "{}", status, NULL};
    exec_python(argv);
}

/* ---- the command's start failures, said as rankwire/errors.py says them ------------- */

/* One message line, written at once (as `instance._say`): never interleaved with another
 * process's on a shared stderr. The buffer is spank/frame.c's. */
static void puts_(struct buf *m, const char *text)
{
    buf_put(m, text, strlen(text));
}

static int say_fd = 2;          /* `__enter` for a launcher: its errors pipe */
static const char *say_tag;     /* and this rank's tag there */

/* `m`, a message that starts "rankwire: ", as one line on stderr; for a launcher's rank
 * (`say_tag`), as `instance._say` words it: `TAG\tMESSAGE` in one write of at most
 * PIPE_BUF bytes, never interleaved with another rank's. */
static void say(struct buf *m)
{
    static const char prefix[] = "rankwire: ";
    struct buf line = {0};
    if (say_tag && !m->oom) {
        size_t skip = m->len >= sizeof prefix - 1 && !memcmp(m->p, prefix, sizeof prefix - 1)
                          ? sizeof prefix - 1 : 0;
        puts_(&line, say_tag);
        puts_(&line, "\t");
        buf_put(&line, m->p + skip, m->len - skip);
        if (line.len > PIPE_BUF - 1)
            line.len = PIPE_BUF - 1;
        free(m->p);
        *m = line;
    }
    buf_put(m, "\n", 1);
    if (!m->oom) {
        ssize_t n = write(say_fd, m->p, m->len);
        (void)n; /* nowhere to say it: the exit code still does */
    }
    free(m->p);
}

/* rankwire/errors.py `shown`: one printable line, control characters and bytes that are
 * not UTF-8 escaped. */
static void shown(struct buf *m, const char *text)
{
    const unsigned char *s = (const unsigned char *)text;
    char esc[8];
    while (*s) {
        unsigned char c = *s;
        size_t len = 0;
        if (c == '\n' || c == '\r' || c == '\t') {
            puts_(m, c == '\n' ? "\\n" : c == '\r' ? "\\r" : "\\t");
            s++;
            continue;
        }
        if (c < 0x20 || c == 0x7f) {
            snprintf(esc, sizeof esc, "\\x%02x", c);
            puts_(m, esc);
            s++;
            continue;
        }
        if (c < 0x80) {
            buf_put(m, (const char *)s, 1);
            s++;
            continue;
        }
        unsigned char lo = 0x80, hi = 0xbf;
        if (c >= 0xc2 && c <= 0xdf)
            len = 2;
        else if (c >= 0xe0 && c <= 0xef) {
            len = 3;
            if (c == 0xe0)
                lo = 0xa0;
            if (c == 0xed)
                hi = 0x9f;
        } else if (c >= 0xf0 && c <= 0xf4) {
            len = 4;
            if (c == 0xf0)
                lo = 0x90;
            if (c == 0xf4)
                hi = 0x8f;
        }
        size_t ok = len ? 1 : 0;
        while (ok && ok < len && s[ok] >= (ok == 1 ? lo : 0x80) && s[ok] <= (ok == 1 ? hi : 0xbf))
            ok++;
        if (len && ok == len) {
            buf_put(m, (const char *)s, len);
            s += len;
        } else {
            snprintf(esc, sizeof esc, "\\x%02x", c);
            puts_(m, esc);
            s++;
        }
    }
}

#define WHERE "in the container"

/* `cannot start PROGRAM in the container: [Errno N] CALL: STRERROR`, as Python words a
 * failed system call in `_child` (`syscalls._check`; os.pidfd_open's, call NULL, has no
 * CALL: part). */
static void say_call(const char *program, const char *call, int err)
{
    struct buf m = {0};
    char num[64];
    puts_(&m, "rankwire: cannot start ");
    shown(&m, program);
    snprintf(num, sizeof num, " " WHERE ": [Errno %d] ", err);
    puts_(&m, num);
    if (call) {
        puts_(&m, call);
        puts_(&m, ": ");
    }
    puts_(&m, strerror(err));
    say(&m);
}

static void say_workdir(const char *workdir, int err)
{
    struct buf m = {0};
    puts_(&m, "rankwire: working directory ");
    shown(&m, workdir);
    if (err == ENOENT)
        puts_(&m, " does not exist");
    else if (err == ENOTDIR)
        puts_(&m, " is not a directory");
    else if (err == EACCES)
        puts_(&m, " cannot be entered (permission denied)");
    else {
        puts_(&m, " cannot be entered (");
        puts_(&m, strerror(err));
        puts_(&m, ")");
    }
    puts_(&m, " " WHERE ": pass --pwd DIR or bind it with -B");
    say(&m);
}

static int say_exec(const char *program, int err)
{
    struct buf m = {0};
    struct stat st;
    int has_slash = strchr(program, '/') != NULL;
    int code = 126;
    puts_(&m, "rankwire: ");
    if (err == ENOENT && !has_slash) {
        shown(&m, program);
        puts_(&m, ": command not found " WHERE);
        code = 127;
    } else if (err == ENOENT && stat(program, &st) != 0) {
        shown(&m, program);
        puts_(&m, ": no such file " WHERE ": check the path, or bind it in with -B");
        code = 127;
    } else if (err == ENOENT) {
        shown(&m, program);
        puts_(&m, ": cannot run it " WHERE ": its #! interpreter or loader is missing");
    } else if (err == EACCES && stat(program, &st) == 0 && S_ISDIR(st.st_mode)) {
        shown(&m, program);
        puts_(&m, ": is a directory " WHERE ", not a program: give the program's path");
    } else if (err == EACCES) {
        shown(&m, program);
        puts_(&m, ": permission denied " WHERE ": it is not an executable file (chmod +x it, "
                  "or run it through its interpreter)");
    } else if (err == ENOEXEC) {
        shown(&m, program);
        puts_(&m, ": exec format error " WHERE ": not a program for this machine, or a "
                  "script without a #! line");
    } else {
        puts_(&m, "cannot start ");
        shown(&m, program);
        puts_(&m, " " WHERE ": ");
        puts_(&m, strerror(err));
        code = 125;
    }
    say(&m);
    return code;
}

/* Python's os.execvpe: PATH from the planned environment (else /bin:/usr/bin); the first
 * error other than "not there", else the last. Returns that errno. */
static int exec_planned(char **argv, char **envp)
{
    const char *file = argv[0];
    if (strchr(file, '/')) {
        execve(file, argv, envp);
        return errno;
    }
    const char *path = "/bin:/usr/bin";
    for (char **e = envp; *e; e++)
        if (!strncmp(*e, "PATH=", 5))
            path = *e + 5;
    int saved = 0, last = ENOENT;
    for (const char *dir = path;; dir++) {
        const char *end = strchrnul(dir, ':');
        size_t dlen = (size_t)(end - dir);
        char full[PATH_MAX * 2];
        int n;
        if (dlen == 0)
            n = snprintf(full, sizeof full, "%s", file);
        else
            n = snprintf(full, sizeof full, "%.*s%s%s", (int)dlen, dir,
                         dir[dlen - 1] == '/' ? "" : "/", file);
        if (n < 0 || (size_t)n >= sizeof full)
            errno = ENAMETOOLONG;
        else
            execve(full, argv, envp);
        last = errno;
        if (last != ENOENT && last != ENOTDIR && !saved)
            saved = last;
        if (!*end)
            break;
        dir = end;
    }
    return saved ? saved : last;
}

/* ---- the run --------------------------------------------------------------------------- */

/* fork(), except that the child's parent is our parent (CLONE_PARENT) */
static long fork_sibling(void)
{
#if defined(__s390x__) || defined(__s390__)
    return syscall(SYS_clone, 0, CLONE_PARENT, 0, 0, 0);
#else
    return syscall(SYS_clone, CLONE_PARENT, 0, 0, 0, 0);
#endif
}

static int bridge_fd = -1; /* a step plan's PMI bridge: the command's PMI_FD (join_node_bridge) */
static volatile int child_pidfd = -1;
static volatile pid_t child_pid;

static void forward(int sig)
{
    int saved = errno;
    if (child_pidfd >= 0) /* names the child, even once its pid is reused */
        syscall(SYS_pidfd_send_signal, child_pidfd, sig, NULL, 0);
    else if (child_pid > 0) /* unreaped until our waitpid returns: still ours */
        kill(child_pid, sig);
    errno = saved;
}

static void child(struct lease *l, const struct plan *p, char **argv, pid_t parent,
                  int report) __attribute__((noreturn));
static void child(struct lease *l, const struct plan *p, char **argv, pid_t parent, int report)
{
    if (prctl(PR_SET_PDEATHSIG, SIGKILL)) {
        say_call(argv[0], "prctl", errno);
        _exit(125);
    }
    if (getppid() != parent)
        _exit(125); /* rankwire is gone: so must the command be */
    if (l->conn >= 0)
        close(l->conn);
    int parent_fd = -1;
    if (report >= 0 && (parent_fd = (int)syscall(SYS_pidfd_open, parent, 0)) < 0) {
        say_call(argv[0], NULL, errno);
        _exit(125);
    }
    if (setns(l->userns, CLONE_NEWUSER) ||
        (l->pidns >= 0 && setns(l->pidns, CLONE_NEWPID)) || setns(l->mntns, CLONE_NEWNS)) {
        say_call(argv[0], "setns", errno);
        _exit(125);
    }
    close_ns(l);
    if (report >= 0) { /* our successor, in the PID namespace, is our parent's child */
        long pid = fork_sibling();
        if (pid < 0) {
            say_call(argv[0], "clone", errno);
            _exit(125);
        }
        if (pid > 0) {
            char buf[24];
            int len = snprintf(buf, sizeof buf, "%ld", pid);
            _exit(write(report, buf, (size_t)len) == len ? 0 : 125);
        }
        close(report);
        struct pollfd died = {parent_fd, POLLIN, 0};
        if (prctl(PR_SET_PDEATHSIG, SIGKILL)) {
            say_call(argv[0], "prctl", errno);
            _exit(125);
        }
        if (poll(&died, 1, 0) != 0)
            _exit(125); /* the parent died before the prctl */
        close(parent_fd);
    }
    if (chdir(p->workdir)) {
        say_workdir(p->workdir, errno);
        _exit(125);
    }
    if (!strcmp(p->nnp, "1") && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) {
        say_call(argv[0], "prctl", errno);
        _exit(125);
    }
    if (bridge_fd >= 0 && fcntl(bridge_fd, F_SETFD, 0)) {
        say_call(argv[0], "fcntl", errno);
        _exit(125);
    }
    int err = exec_planned(argv, (char **)p->env);
    _exit(say_exec(argv[0], err));
}

/* `runtime/instance.py` `run_in`: start the command in the container, forward signals to
 * it, return its exit code (128+N for signal N); -1 if nothing started. */
static int run(struct lease *l, const struct plan *p, char **argv)
{
    pid_t parent = getpid();
    int pipefd[2] = {-1, -1};
    if (l->pidns >= 0 && pipe2(pipefd, O_CLOEXEC))
        return -1;
    pid_t pid = fork();
    if (pid < 0) {
        if (pipefd[0] >= 0) {
            close(pipefd[0]);
            close(pipefd[1]);
        }
        return -1;
    }
    if (pid == 0) {
        for (size_t i = 0; i < NFORWARDED; i++)
            signal(forwarded[i], SIG_DFL);
        signal(SIGPIPE, SIG_DFL); /* as runtime/instance.py `_child` */
        signal(SIGXFSZ, SIG_DFL);
        if (pipefd[0] >= 0)
            close(pipefd[0]);
        child(l, p, argv, parent, pipefd[1]);
    }
    if (bridge_fd >= 0) { /* the command's now: its exit is its bridge's EOF */
        close(bridge_fd);
        bridge_fd = -1;
    }
    if (pipefd[0] >= 0) {
        char buf[24] = {0};
        close(pipefd[1]);
        ssize_t n;
        do
            n = read(pipefd[0], buf, sizeof buf - 1);
        while (n < 0 && errno == EINTR);
        close(pipefd[0]);
        if (n > 0) { /* the first child made the successor and left */
            while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
                ;
            pid = (pid_t)atol(buf);
        }
    }
    int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    struct sigaction sa = {.sa_handler = forward, .sa_flags = SA_RESTART}, old[NFORWARDED];
    sigemptyset(&sa.sa_mask);
    child_pidfd = pidfd;
    child_pid = pid;
    for (size_t i = 0; i < NFORWARDED; i++)
        sigaction(forwarded[i], &sa, &old[i]);
    /* wait without reaping: until the handlers are gone, the pid stays the child's */
    siginfo_t info;
    int status = 0, got;
    while ((got = waitid(P_PID, (id_t)pid, &info, WEXITED | WNOWAIT)) < 0 && errno == EINTR)
        ;
    for (size_t i = 0; i < NFORWARDED; i++)
        sigaction(forwarded[i], &old[i], NULL);
    child_pidfd = -1;
    child_pid = 0;
    if (got == 0)
        while ((got = waitpid(pid, &status, 0)) < 0 && errno == EINTR)
            ;
    if (pidfd >= 0)
        close(pidfd);
    if (got < 0)
        return 125;
    if (WIFSIGNALED(status))
        return 128 + WTERMSIG(status);
    return WEXITSTATUS(status);
}

/* Our parent's name is `comm` (1), is not (0), or we cannot tell (-1). */
static int parent_is(const char *comm)
{
    char path[64], got[32] = {0};
    snprintf(path, sizeof path, "/proc/%d/comm", (int)getppid());
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, got, sizeof got - 1);
    close(fd);
    if (n <= 0)
        return -1;
    got[strcspn(got, "\n")] = '\0';
    return !strcmp(got, comm);
}

/* ---- a task of a step: the step plan ---------------------------------------------- */

static pid_t stepd;

/* `instance.end_with_slurmstepd`: slurmstepd died (the parent-death signal; it also
 * comes when the thread that forked us ends, hence the check): end as on SIGTERM. */
static void stepd_gone(int sig)
{
    (void)sig;
    if (getppid() == stepd)
        return;
    if (child_pidfd >= 0 || child_pid > 0)
        forward(SIGTERM);
    else {
        signal(SIGTERM, SIG_DFL);
        raise(SIGTERM);
    }
}

static void alarm_rang(int sig)
{
    (void)sig;
}

static int digits(const char *s)
{
    if (!s || !*s || strlen(s) > 20)
        return 0;
    for (; *s; s++)
        if (*s < '0' || *s > '9')
            return 0;
    return 1;
}

/* This node's tasks of the step (SLURM_STEP_TASKS_PER_NODE, as "2(x3),1", at
 * SLURM_NODEID) outnumber the CPUs slurmstepd may run on (the step's). Only then do the
 * tasks wait for the first one's plan: their Pythons would queue for the CPUs anyway, and
 * a join in C spares them. With a CPU each, a Python per task runs alongside the first
 * one's; waiting for it would only cost, a whole planning time when the plan does not
 * fit them (a PMI bridge). */
static int tasks_outnumber_cpus(void)
{
    const char *s = getenv("SLURM_STEP_TASKS_PER_NODE"), *node = getenv("SLURM_NODEID");
    if (!s || !digits(node))
        return 0;
    long want = atol(node), first = 0, tasks = -1;
    while (*s && tasks < 0) {
        char *end;
        long count = strtol(s, &end, 10), reps = 1;
        if (end == s || count < 0)
            return 0;
        if (end[0] == '(') {
            if (end[1] != 'x')
                return 0;
            reps = strtol(end + 2, &end, 10);
            if (*end++ != ')' || reps < 1)
                return 0;
        }
        if (want < first + reps)
            tasks = count;
        first += reps;
        if (*end == ',')
            end++;
        else if (*end)
            return 0;
        s = end;
    }
    cpu_set_t cpus;
    return tasks > 0 && !sched_getaffinity(getppid(), sizeof cpus, &cpus) &&
           tasks > CPU_COUNT(&cpus);
}

/* The step plan in `fd` (locked), parsed into `p`: 0 none (empty, cut short, not a step
 * plan, its container gone), 1 one that does not fit this request, 2 one that does (its
 * exec environment then takes this task's own task variables). */
static int step_plan_fits(int fd, struct plan *p, const char *image)
{
    size_t len;
    struct stat st;
    if (read_private_fd(fd, &p->buf, &len) || parse_plan(p->buf, len, p) || !p->step ||
        lstat(p->sock, &st) || !S_ISSOCK(st.st_mode))
        return 0;
    if (!plan_matches(p, NULL, image))
        return 1;
    size_t n = 0, used = 0;
    for (char **e = environ; *e; e++)
        n++;
    const char **env = malloc((p->nenv + n + 3) * sizeof *env); /* + a bridge's two */
    if (!env)
        return 1;
    for (size_t i = 0; i < p->nenv; i++)
        if (!task_var(p, p->env[i]))
            env[used++] = p->env[i];
    for (char **e = environ; *e; e++) /* a bridge's task gets PMI_RANK and PMI_FD instead */
        if (task_var(p, *e) && !(p->bridge && (!strncmp(*e, "PMI_", 4) || !strncmp(*e, "PMIX_", 5))))
            env[used++] = *e;
    env[used] = NULL;
    p->env = env;
    p->nenv = used;
    return 2;
}

/* `srun … rankwire exec IMAGE CMD…` (no option; runtime/joinplan.py), with more of the
 * step's tasks on this node than CPUs: the step's first task to come locks
 * instances/step-JOB.STEP.plan and runs Python, which plans, starts or joins the node's
 * shared container and writes the plan there; the others wait for that lock, and join in
 * C if the plan fits them. Returns only to join (`p` filled). */
static void step_plan(const char *image, struct plan *p)
{
    const char *job = getenv("SLURM_JOB_ID"), *step = getenv("SLURM_STEP_ID");
    char dir[PATH_MAX], instances[PATH_MAX + 16], name[64], num[16];
    if (!digits(job) || !digits(step) || getenv(STEP_LOCK_VAR) || parent_is("slurmstepd") != 1 ||
        !tasks_outnumber_cpus() || runtime_dir(dir, sizeof dir))
        run_python();
    snprintf(instances, sizeof instances, "%s/instances", dir);
    (void)mkdir(instances, 0700); /* as Python's runtime_dir makes it: checked next */
    snprintf(name, sizeof name, "step-%s.%s.plan", job, step);
    int dirfd = private_dir(instances) ? open(instances, O_RDONLY | O_DIRECTORY | O_CLOEXEC) : -1;
    int fd = dirfd < 0 ? -1 :
             openat(dirfd, name, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK, 0600);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) || !S_ISREG(st.st_mode) || st.st_uid != getuid() ||
        (st.st_mode & 077))
        run_python();
    close(dirfd);
    pid_t parent = getppid();
    if (flock(fd, LOCK_EX | LOCK_NB) == 0) {
        int fits = step_plan_fits(fd, p, image);
        if (fits == 2) {
            close(fd);
            return;
        }
        /* Another task's plan, whose container runs: theirs to keep (we plan in Python,
         * without the lock). None: we are the first, and plan holding the lock
         * (rankwire/entry.py takes it), the others waiting for it. */
        snprintf(num, sizeof num, "%d", fd);
        if (fits == 1 || fcntl(fd, F_SETFD, 0) || setenv(STEP_LOCK_VAR, num, 1)) {
            close(fd);
            run_python();
        }
        run_python();
    }
    struct sigaction ring = {.sa_handler = alarm_rang}, old;
    sigset_t alarm_only, mask;
    sigemptyset(&ring.sa_mask);
    sigemptyset(&alarm_only);
    sigaddset(&alarm_only, SIGALRM);
    sigaction(SIGALRM, &ring, &old); /* no SA_RESTART: the alarm ends flock's wait */
    sigprocmask(SIG_UNBLOCK, &alarm_only, &mask);
    alarm(STEP_WAIT_S);
    int locked = flock(fd, LOCK_SH) == 0;
    alarm(0);
    sigprocmask(SIG_SETMASK, &mask, NULL);
    sigaction(SIGALRM, &old, NULL);
    if (getppid() != parent) { /* slurmstepd died meanwhile: end_with_slurmstepd */
        signal(SIGTERM, SIG_DFL);
        raise(SIGTERM);
        _exit(128 + SIGTERM);
    }
    if (!locked || step_plan_fits(fd, p, image) != 2)
        run_python();
    close(fd);
}

static long long now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000LL + t.tv_nsec / 1000000;
}

/* Connect to a node's bridge server at `sa` that our user serves (SO_PEERCRED), by
 * `deadline` (now_ms): a full backlog (EAGAIN) is waited for; no server (ENOENT,
 * ECONNREFUSED) is not, the node's first task having taken the socket before it let us
 * read its plan. The descriptor (non-blocking), or -1. */
static int connect_node(const struct sockaddr_un *sa, long long deadline)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -1;
    while (connect(fd, (const struct sockaddr *)sa, sizeof *sa)) {
        if ((errno != EAGAIN && errno != EINTR) || now_ms() >= deadline)
            return close(fd), -1;
        (void)poll(NULL, 0, 5);
    }
    struct ucred cred = {0, (uid_t)-1, (gid_t)-1};
    socklen_t len = sizeof cred;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) || cred.uid != getuid())
        return close(fd), -1;
    return fd;
}

/* `fds` go with `msg`'s bytes (SCM_RIGHTS), in `space`: `size` bytes, CMSG_SPACE of them,
 * aligned for a cmsghdr. */
static void with_fds(struct msghdr *msg, char *space, size_t size, const int *fds, size_t n)
{
    msg->msg_control = space;
    msg->msg_controllen = size;
    struct cmsghdr *c = CMSG_FIRSTHDR(msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(n * sizeof *fds);
    memcpy(CMSG_DATA(c), fds, n * sizeof *fds);
}

/* A step plan's PMIx-to-PMI bridge (pmi/bridge.py `task_pmi_env`, as a task that is not
 * the node's first): a socketpair whose one end this task's command gets as PMI_FD, the
 * other handed, with our stderr, our environment (`env=K=V` records) and CPUs (`cpus=`),
 * to the node's bridge server, which forks our bridge (pmi/bridgeserve.py; the SPANK
 * shim's join_pmi_bridge, the same way). Nothing comes back: the command's PMI client
 * waits on PMI_FD. 0 with PMI_RANK (our PMIX_RANK) and PMI_FD added to `p->env` (its end
 * in `bridge_fd`, close-on-exec until the command's exec); -1, nothing handed over, when
 * the server does not listen (Python then waits for it and says why) or anything fails
 * before; 2, said as Python says it, when the hand-over was cut short (the server has
 * our socket end: handing over again would take another task's place). */
static int join_node_bridge(struct plan *p)
{
    const char *job = getenv("SLURM_JOB_ID"), *step = getenv("SLURM_STEP_ID"),
               *node = getenv("SLURM_NODEID"), *rank = getenv("PMIX_RANK");
    char dir[PATH_MAX];
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (!digits(job) || !digits(step) || !digits(node) || !digits(rank) ||
        runtime_dir(dir, sizeof dir))
        return -1;
    char stepd[24];
    stepd_suffix(environ, stepd, sizeof stepd);
    int n = snprintf(sa.sun_path, sizeof sa.sun_path, "%s/pmibridge.%s.%s.%s%s", dir, job, step,
                     node, stepd);
    if (n <= 0 || (size_t)n >= sizeof sa.sun_path)
        return -1;
    struct buf b = {0};
    frame_hand_over(&b, environ);
    int sv[2] = {-1, -1}, fd = -1, ok = 0;
    long long deadline = now_ms() + NODE_WAIT_MS;
    if (b.oom || socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) ||
        (fd = connect_node(&sa, deadline)) < 0)
        goto out;
    int fds[2] = {sv[1], 2};
    union {
        struct cmsghdr h;
        char b[CMSG_SPACE(sizeof fds)];
    } cbuf;
    memset(&cbuf, 0, sizeof cbuf);
    size_t sent = 0;
    while (sent < b.len) { /* the descriptors go with the first bytes */
        struct iovec iov = {b.p + sent, b.len - sent};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
        if (!sent)
            with_fds(&msg, cbuf.b, sizeof cbuf.b, fds, 2);
        long long left = deadline - now_ms();
        struct pollfd out = {fd, POLLOUT, 0};
        if (left <= 0 || poll_for(&out, (int)left) <= 0) {
            errno = ETIMEDOUT;
            goto cut;
        }
        ssize_t got = sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (got < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (got < 0)
            goto cut;
        sent += (size_t)got;
    }
    char *pmi_rank = malloc(strlen(rank) + 10), *pmi_fd = malloc(32);
    if (!pmi_rank || !pmi_fd) {
        free(pmi_rank);
        free(pmi_fd);
        goto out;
    }
    sprintf(pmi_rank, "PMI_RANK=%s", rank);
    sprintf(pmi_fd, "PMI_FD=%d", sv[0]);
    p->env[p->nenv++] = pmi_rank;
    p->env[p->nenv++] = pmi_fd;
    p->env[p->nenv] = NULL;
    bridge_fd = sv[0];
    sv[0] = -1;
    ok = 1;
    goto out;
cut: /* pmi/bridge.py `_hand_over`'s words */
    if (sent > 0) {
        struct buf m = {0};
        puts_(&m, "rankwire: cannot hand the task to the node's PMI bridge server (");
        puts_(&m, errno == ETIMEDOUT ? "it took no data in time" : strerror(errno));
        puts_(&m, "); retry the step");
        say(&m);
        ok = 2;
    }
out:
    if (fd >= 0)
        close(fd);
    if (sv[0] >= 0)
        close(sv[0]);
    if (sv[1] >= 0)
        close(sv[1]);
    free(b.p);
    return ok == 1 ? 0 : ok == 2 ? 2 : -1;
}

/* pmi/pmix/pmi2bridge.py `reply_ended`: a whole `follower_reply`. */
static int reply_ended(const struct buf *b)
{
    static const char end[] = "end=1"; /* and its NUL */
    return b->len >= sizeof end && !memcmp(b->p + b->len - sizeof end, end, sizeof end) &&
           (b->len == sizeof end || b->p[b->len - sizeof end - 1] == '\0');
}

struct pmi2_reply {
    struct plan *p;
    const char *error;
    size_t set;
};

static void on_pmi2_reply(const char *key, char *value, void *ctx)
{
    struct pmi2_reply *r = ctx;
    if (!strcmp(key, "error") && !r->error)
        r->error = value;
    else if (!strcmp(key, "setenv") && strchr(value, '=')) { /* the bridge's value wins */
        size_t name = (size_t)(strchr(value, '=') - value) + 1, i = 0;
        while (i < r->p->nenv && strncmp(r->p->env[i], value, name))
            i++;
        if (i < r->p->nenv)
            r->p->env[i] = value;
        else
            add(r->p, &r->p->env, &r->p->nenv, value);
        r->set++;
    }
}

/* A step plan's PMI-2-to-PMIx bridge (pmi/pmix/pmi2bridge.py `follow`, the shim's
 * join_pmi2_bridge): connect to the node's server (the first task's `start_node` took its
 * socket before it let us read its plan), hand over our Slurm PMI-2 socket and stderr with
 * "RANK JOBID", read our rank's PMIx variables (`setenv=K=V`, or `error=LINE`; `end=1`)
 * into `p->env`. 0 with `*conn` the connection, which we keep until the command ended
 * (then its exit code goes on it, as `Pmi2Bridge.finish`); -1, nothing handed over (then
 * Python); 2 after saying why the bridge failed, our PMI-2 socket gone to it. */
static int join_pmi2_node(struct plan *p, int *conn)
{
    const char *pmi_fd = getenv("PMI_FD"), *rank = getenv("PMI_RANK"),
               *jobid = getenv("PMI_JOBID"), *node = getenv("SLURM_NODEID");
    char dir[PATH_MAX];
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    struct stat st;
    if (!digits(pmi_fd) || !digits(rank) || !digits(node) || !jobid || !*jobid ||
        strpbrk(jobid, "/ \n") || strlen(jobid) > 64 || runtime_dir(dir, sizeof dir) ||
        fstat(atoi(pmi_fd), &st) || !S_ISSOCK(st.st_mode))
        return -1;
    char stepd[24];
    maker_suffix(atoi(pmi_fd), stepd, sizeof stepd);
    int n = snprintf(sa.sun_path, sizeof sa.sun_path, "%s/pmi2bridge.%s.%s%s", dir, jobid, node,
                     stepd);
    if (n <= 0 || (size_t)n >= sizeof sa.sun_path)
        return -1;
    long long deadline = now_ms() + NODE_WAIT_MS;
    int fd = connect_node(&sa, deadline);
    if (fd < 0)
        return -1;
    char said[96];
    int fds[2] = {atoi(pmi_fd), 2};
    union {
        struct cmsghdr h;
        char b[CMSG_SPACE(sizeof fds)];
    } cbuf;
    memset(&cbuf, 0, sizeof cbuf);
    struct iovec iov = {said, (size_t)snprintf(said, sizeof said, "%s %s\n", rank, jobid)};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf.b,
                         .msg_controllen = sizeof cbuf.b};
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof fds);
    memcpy(CMSG_DATA(c), fds, sizeof fds);
    ssize_t sent;
    do
        sent = sendmsg(fd, &msg, MSG_NOSIGNAL);
    while (sent < 0 && errno == EINTR);
    if (sent != (ssize_t)iov.iov_len) /* all or nothing: a few bytes into an empty socket */
        return close(fd), -1;
    close(fds[0]); /* the bridge's now */
    struct buf b = {0};
    int late = 0;
    char data[4096];
    while (!b.oom && b.len <= FRAME_MAX && !reply_ended(&b)) {
        long long left = deadline - now_ms();
        struct pollfd in = {fd, POLLIN, 0};
        if (left <= 0 || poll_for(&in, (int)left) <= 0) {
            late = 1;
            break;
        }
        ssize_t got = recv(fd, data, sizeof data, 0);
        if (got < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (got <= 0)
            break;
        buf_put(&b, data, (size_t)got);
    }
    struct pmi2_reply r = {p, NULL, 0};
    struct buf m = {0};
    puts_(&m, "rankwire: ");
    if (late)
        puts_(&m, "the node's PMI-2 bridge (its first task's) did not start within 60 s; "
                  "see that task's message");
    else if (b.oom || b.len > FRAME_MAX || !reply_ended(&b) ||
             frame_parse(b.p, b.len, on_pmi2_reply, &r) || p->bad)
        puts_(&m, "the node's PMI-2 bridge ended during start-up; see its message");
    else if (r.error)
        shown(&m, r.error);
    else {
        free(m.p);
        *conn = fd; /* b's records are p->env's now: kept */
        return 0;
    }
    say(&m);
    close(fd);
    return 2;
}

/* ---- `rankwire exec IMAGE CMD…`: the exec plan ------------------------------------ */

/* Start the container of the exec plan `p` (its file open on `fd`): `rankwire-holder setup`
 * (runtime/holdserve.c) does what the Python holder did for this request, as an
 * ephemeral holder of ours (its owner: us), at a fresh socket and session dir in the
 * runtime dir `dir`, as `instance.start_holder` names them; then join it. 0 with `l` the
 * lease and `*holder` its pid; -1 if it did not start (it has torn down and exited). */
/* Start the container of `p` (its recipe open on `fd`) with `rankwire-holder setup`, an
 * ephemeral holder of ours in `dir`, and join it (`l`, `holder`): 0, or -1 with nothing
 * left. `owner` (a plugin plan's: slurmstepd's pid): a holder shared by the step's tasks
 * instead, in a session of its own, its stdio /dev/null before its exec (ours are the
 * shim's sockets), keeping descriptors 3 ... 3 + nkeep - 1 (the image, the binds'
 * sources) until its mounts are made. */
static int start_exec(struct plan *p, int fd, const char *dir, struct lease *l, pid_t *holder,
                      const char *owner, int nkeep)
{
    static char sock[PATH_MAX], session[PATH_MAX], pid_s[24], session_s[PATH_MAX + 2];
    unsigned char rnd[6];
    char token[13], a_plan[32], a_status[32], a_owner[32], a_sock[PATH_MAX + 8],
        a_session[PATH_MAX + 8], a_keep[KEEP_MAX][16];
    if (getrandom(rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd)
        return -1;
    for (size_t i = 0; i < sizeof rnd; i++)
        snprintf(token + 2 * i, 3, "%02x", rnd[i]);
    for (const char *c = dir; *c; c++) /* the report's JSON strings hold them as they are */
        if ((unsigned char)*c < 0x20 || (unsigned char)*c >= 0x7f || *c == '"' || *c == '\\')
            return -1;
    if (snprintf(sock, sizeof sock, "%s/e-%s.sock", dir, token) >=
            (int)sizeof((struct sockaddr_un *)0)->sun_path - 16 ||
        snprintf(session, sizeof session, "%s/s-%s", dir, token) >= (int)sizeof session)
        return -1;
    int status[2];
    if (pipe2(status, O_CLOEXEC))
        return -1;
    snprintf(a_plan, sizeof a_plan, "plan=%d", fd);
    snprintf(a_status, sizeof a_status, "status=%d", status[1]);
    if (owner)
        snprintf(a_owner, sizeof a_owner, "owner=%s", owner);
    else
        snprintf(a_owner, sizeof a_owner, "owner=%d", (int)getpid());
    snprintf(a_sock, sizeof a_sock, "socket=%s", sock);
    snprintf(a_session, sizeof a_session, "session=%s", session);
    char *args[8 + KEEP_MAX + 1] = {"rankwire-holder", "setup", a_plan, a_status, a_owner,
                                    a_sock, a_session, owner ? "mode=shared" : NULL}; /* NULL */
    for (int i = 0; owner && i < nkeep && i < KEEP_MAX; i++) {
        snprintf(a_keep[i], sizeof a_keep[i], "keep=%d", 3 + i);
        args[8 + i] = a_keep[i];
    }
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        int null = owner ? open("/dev/null", O_RDWR | O_CLOEXEC) : -1;
        if (owner && (setsid() < 0 || null < 0 || dup2(null, 0) || dup2(null, 1) != 1 ||
                      dup2(null, 2) != 2))
            _exit(127);
        if (fcntl(fd, F_SETFD, 0) == 0 && fcntl(status[1], F_SETFD, 0) == 0)
            execve(p->holder_program, args, environ);
        _exit(127);
    }
    close(status[1]);
    char said[4096];
    size_t got = 0;
    while (pid > 0 && got < sizeof said - 1 && !memchr(said, '\n', got)) {
        ssize_t n = read(status[0], said + got, sizeof said - 1 - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    close(status[0]);
    said[got] = '\0';
    snprintf(pid_s, sizeof pid_s, "%d", (int)pid);
    snprintf(session_s, sizeof session_s, "\"%s\"", session);
    p->holder = pid_s;
    p->session = session_s;
    if (pid > 0 && !strncmp(said, "{\"ok\": true,", 12) && join(sock, p, l) == 0) {
        *holder = pid;
        return 0;
    }
    if (pid > 0) { /* its teardown is done once it said; its end, not long after */
        kill(pid, SIGTERM);
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
            ;
    }
    return -1;
}

/* Remove the plan `name` in `dir` if it is still the file open on `fd`: one whose
 * container could not be started is not to be tried again (Python plans, and writes
 * anew). */
static void drop_plan(const char *dir, const char *name, int fd)
{
    int dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dirfd < 0)
        return;
    struct stat now, was;
    if (fstatat(dirfd, name, &now, AT_SYMLINK_NOFOLLOW) == 0 && fstat(fd, &was) == 0 &&
        now.st_dev == was.st_dev && now.st_ino == was.st_ino)
        unlinkat(dirfd, name, 0);
    close(dirfd);
}

/* 64-bit FNV-1a of `words`, each with its NUL (runtime/joinplan.py `fnv1a`). */
static unsigned long long fnv1a(char **words, int n)
{
    unsigned long long h = 0xcbf29ce484222325ULL;
    for (int i = 0; i < n; i++)
        for (const unsigned char *c = (const unsigned char *)words[i];; c++) {
            h = (h ^ *c) * 0x100000001b3ULL;
            if (!*c)
                break;
        }
    return h;
}

/* `rankwire exec [OPTIONS…] IMAGE CMD…` not in a task of a step: the exec plan Python left
 * for this image and exactly these option words (runtime/joinplan.py `remember_exec`), if
 * it fits this request, and the container started from it. IMAGE is argv[2], or, after
 * options, the first word whose plan was made for the words before it (click reads
 * options left to right: the words before a word decide whether it is the image). Returns
 * only then: IMAGE's index (`p` filled, `l` the lease). */
static int exec_plan(int argc, char **argv, struct plan *p, struct lease *l, pid_t *holder)
{
    char dir[PATH_MAX], name[128];
    struct stat st;
    size_t len;
    int at = 2, fd = -1, dirfd = -1;
    if (runtime_dir(dir, sizeof dir) || (dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0)
        run_python();
    for (at = argv[2][0] == '-' ? 3 : 2; at < argc - 1; at++) {
        if (at > 2) { /* past the options? click takes a word as an option's value only
                       * right after an option word, and a dash word as IMAGE only after -- */
            int after_option = argv[at - 1][0] == '-';
            int after_value = at > 3 && argv[at - 2][0] == '-' && strcmp(argv[at - 2], "--") &&
                              !after_option;
            if (!after_option && !after_value)
                break; /* nothing of the command is looked at */
            if (argv[at][0] == '-' && strcmp(argv[at - 1], "--"))
                continue;
        }
        if (stat(argv[at], &st) || !S_ISREG(st.st_mode)) {
            if (at == 2)
                run_python();
            continue;
        }
        snprintf(name, sizeof name, "exec-%llu-%llu-%016llx.plan", (unsigned long long)st.st_dev,
                 (unsigned long long)st.st_ino, fnv1a(argv + 2, at - 2));
        fd = openat(dirfd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
        if (fd < 0 && at == 2)
            run_python();
        if (fd < 0)
            continue;
        *p = (struct plan){0};
        if (read_private_fd(fd, &p->buf, &len) || parse_plan(p->buf, len, p) || !p->exec ||
            p->launch)
            run_python();
        int same = p->noptions == (size_t)(at - 2);
        for (int i = 2; same && i < at; i++)
            same = !strcmp(argv[i], p->options[i - 2]);
        if (same)
            break;
        free(p->buf); /* another request's words with the same hash: not ours */
        close(fd);
        fd = -1;
        if (at == 2)
            run_python();
    }
    close(dirfd);
    if (fd < 0 || !*argv[at + 1] || !plan_matches(p, NULL, argv[at]))
        run_python(); /* an empty command: Python says it */
    if (start_exec(p, fd, dir, l, holder, NULL, 0)) {
        drop_plan(dir, name, fd);
        run_python();
    }
    (void)futimens(fd, NULL); /* used: kept before the plans used least lately */
    close(fd);
    return at;
}

/* ---- a plugin step's container, for the SPANK shim ---------------------------------- */

/* The shim's request (spank/ticket.c `rw_fresh_start`, from root's fresh ticket). */
struct fresh {
    const char *plan, *runtime, *owner;
    char *image, *binds[KEEP_MAX];
    int nbinds, bad;
};

static void fresh_record(const char *key, char *value, void *ctx)
{
    struct fresh *f = ctx;
    if (!strcmp(key, "plan")) f->plan = value;
    else if (!strcmp(key, "runtime_dir")) f->runtime = value;
    else if (!strcmp(key, "owner")) f->owner = value;
    else if (!strcmp(key, "fresh_image")) f->image = value;
    else if (!strcmp(key, "fresh_bind") && f->nbinds < KEEP_MAX - 1) f->binds[f->nbinds++] = value;
    else if (!strcmp(key, "fresh_bind")) f->bad = 1;
}

/* `entry` "ID<TAB>PATH<TAB>REAL" (spank/helper.py `_fresh_records`): PATH opened as root's
 * check opened it (`flags`), if it holds REAL; the descriptor (`st` its stat), or -1. ID
 * stays in `entry`. */
static int open_as_checked(char *entry, int flags, struct stat *st)
{
    char *path = strchr(entry, '\t'), *real = path ? strchr(path + 1, '\t') : NULL;
    char proc[32], link[PATH_MAX + 1];
    if (!real)
        return -1;
    *path++ = '\0';
    *real++ = '\0';
    int fd = open(path, flags | O_CLOEXEC | O_NOCTTY);
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
    ssize_t n = fd < 0 ? -1 : readlink(proc, link, sizeof link - 1);
    if (n < 0 || n >= (ssize_t)sizeof link - 1 || (link[n] = '\0', strcmp(link, real)) ||
        fstat(fd, st)) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    return fd;
}

/* A bind's ID "MODE:DEV:INO:DIR" (MODE octal, DIR 1: opened as a directory), against `st`
 * of what `open_as_checked` opened with O_PATH and the flags DIR asks for. */
static int open_bind(char *entry)
{
    unsigned mode;
    unsigned long long dev, ino;
    int dir, used = 0;
    struct stat st;
    if (sscanf(entry, "%o:%llu:%llu:%d%n", &mode, &dev, &ino, &dir, &used) != 4 ||
        entry[used] != '\t' || (dir != 0 && dir != 1))
        return -1;
    int fd = open_as_checked(entry, O_PATH | (dir ? O_DIRECTORY : 0), &st);
    if (fd >= 0 && ((unsigned)(st.st_mode & S_IFMT) != mode || st.st_dev != dev ||
                    st.st_ino != ino)) {
        close(fd);
        return -1;
    }
    return fd;
}

/* The plugin plan's `fd` records (runtime/joinplan.py `_fd_ids`) describe descriptors
 * 3 ... 2 + n as they are. */
static int same_fds(const struct plan *p, int n)
{
    char id[128];
    struct stat st;
    if (p->nfds != (size_t)n)
        return 0;
    for (int i = 0; i < n; i++) {
        if (fstat(3 + i, &st))
            return 0;
        if (i == 0)
            snprintf(id, sizeof id, "3:%llu:%llu:%llu:%llu:%llu", (unsigned long long)st.st_dev,
                     (unsigned long long)st.st_ino, (unsigned long long)st.st_size,
                     (unsigned long long)st.st_mtim.tv_sec * 1000000000ULL + st.st_mtim.tv_nsec,
                     (unsigned long long)st.st_ctim.tv_sec * 1000000000ULL + st.st_ctim.tv_nsec);
        else
            snprintf(id, sizeof id, "%d:%llu:%llu:%o", 3 + i, (unsigned long long)st.st_dev,
                     (unsigned long long)st.st_ino, (unsigned)(st.st_mode & S_IFMT));
        if (strcmp(id, p->fds[i]))
            return 0;
    }
    return 1;
}

/* The reply on stdout (the shim's socket): `started=1` and [lease, user ns, mount ns], or
 * `miss=1` (the shim then runs the helper, which says why if it fails too). */
static int plugin_reply(const struct lease *l)
{
    struct buf b = {0};
    frame_add(&b, l ? "started" : "miss", "1");
    int fds[3] = {l ? l->conn : -1, l ? l->userns : -1, l ? l->mntns : -1};
    union {
        struct cmsghdr h;
        char space[CMSG_SPACE(sizeof fds)];
    } ctl = {0};
    struct iovec iov = {b.p, b.len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (l)
        with_fds(&msg, ctl.space, sizeof ctl.space, fds, 3);
    ssize_t n = b.oom ? -1 : sendmsg(1, &msg, MSG_NOSIGNAL);
    free(b.p);
    return n == (ssize_t)iov.iov_len ? 0 : 1;
}

/* `rankwire spank-helper start-kept`, run by the SPANK shim as exactly the job user (as
 * the helper's start phase is) for a step its fresh ticket holds for (spank/ticket.c):
 * the image and the binds' sources opened as root's check opened them, each the file it
 * found (`fresh_image`, `fresh_bind`), as descriptors 3, 4, ... (where the start phase
 * had them); the plugin plan (runtime/joinplan.py `remember_plugin`) read, its key checked
 * as an exec plan's (`plan_matches`: the user, the environment, the code, the host) and
 * its descriptors' files; then `rankwire-holder setup` makes the container from its
 * recipe and we join it. Anything else: `miss=1`, nothing left. */
static int plugin_start(void)
{
    struct buf req = {0};
    char chunk[65536], *data = NULL;
    struct fresh f = {0};
    struct plan p = {0};
    struct lease l;
    size_t len = 0;
    ssize_t n;
    int fds[KEEP_MAX], nfds = 0, plan_fd = -1, dirfd = -1;
    pid_t holder = 0;
    struct stat st;
    if (prctl(PR_SET_DUMPABLE, 0)) /* our user cannot take our stdout, the shim's socket */
        return plugin_reply(NULL);
    while ((n = read(0, chunk, sizeof chunk)) > 0 && req.len <= FRAME_MAX)
        buf_put(&req, chunk, (size_t)n);
    if (n != 0 || req.oom || req.len > FRAME_MAX ||
        frame_parse(req.p, req.len, fresh_record, &f) || f.bad || !f.plan || !f.runtime ||
        !f.owner || !f.image || strchr(f.plan, '/') || strncmp(f.plan, "plugin-", 7) ||
        !private_dir(f.runtime))
        return plugin_reply(NULL);
    if ((fds[0] = open_as_checked(f.image, O_RDONLY | O_NONBLOCK, &st)) < 0)
        goto miss;
    nfds = 1;
    if (!S_ISREG(st.st_mode) || !same_file(f.image, &st) || *same_file(f.image, &st))
        goto miss;
    for (; nfds <= f.nbinds; nfds++)
        if ((fds[nfds] = open_bind(f.binds[nfds - 1])) < 0)
            goto miss;
    for (int i = 0; i < nfds; i++) { /* to 3, 4, ... (above them first: none overwrites) */
        int high = fcntl(fds[i], F_DUPFD_CLOEXEC, 3 + KEEP_MAX);
        close(fds[i]);
        fds[i] = high;
    }
    for (int i = 0; i < nfds; i++) {
        if (fds[i] < 0 || dup2(fds[i], 3 + i) != 3 + i)
            goto miss;
        close(fds[i]);
        fds[i] = 3 + i; /* inheritable: the holder keeps them */
    }
    if ((dirfd = open(f.runtime, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0 ||
        (plan_fd = openat(dirfd, f.plan, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK)) < 0 ||
        read_private_fd(plan_fd, &data, &len) || parse_plan(data, len, &p) || !p.plugin ||
        !plan_matches(&p, NULL, p.image) || !same_fds(&p, nfds) ||
        start_exec(&p, plan_fd, f.runtime, &l, &holder, f.owner, nfds))
        goto miss;
    (void)futimens(plan_fd, NULL); /* used: kept before the plans used least lately */
    return plugin_reply(&l); /* the holder lives on: its lease is the shim's now */
miss:
    for (int i = 0; i < nfds; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    if (dirfd >= 0)
        close(dirfd);
    if (plan_fd >= 0)
        close(plan_fd);
    return plugin_reply(NULL);
}

/* ---- a kept launch plan, started here, served by Python ---------------------------- */

static int number(const char *s, int *out);

/* The CPUs we may run on (launcher/facts.py `usable_cpus`), -1 if unknown. */
static long usable_cpus(void)
{
    for (int n = 1024; n <= 1 << 20; n *= 2) {
        cpu_set_t *set = CPU_ALLOC(n);
        size_t size = CPU_ALLOC_SIZE(n);
        if (!set)
            return -1;
        if (sched_getaffinity(0, size, set) == 0) {
            long count = CPU_COUNT_S(size, set);
            CPU_FREE(set);
            return count;
        }
        CPU_FREE(set);
        if (errno != EINVAL)
            return -1;
    }
    return -1;
}

/* The limits the launch planner read (launcher/plancache.py `_limits`): the same CPUs and
 * RLIMIT_NOFILE ("SOFT:HARD", RLIM_INFINITY as 1 << 30, launcher/facts.py). */
static int same_limits(const struct plan *p)
{
    struct rlimit rl;
    char nofile[64];
    if (getrlimit(RLIMIT_NOFILE, &rl))
        return 0;
    unsigned long long soft = rl.rlim_cur == RLIM_INFINITY ? 1ULL << 30 : rl.rlim_cur;
    unsigned long long hard = rl.rlim_max == RLIM_INFINITY ? 1ULL << 30 : rl.rlim_max;
    snprintf(nofile, sizeof nofile, "%llu:%llu", soft, hard);
    long cpus = usable_cpus();
    return cpus > 0 && same_number(p->cpus, (unsigned long long)cpus) && !strcmp(p->nofile, nofile);
}

/* This program's dir is the one of the install that kept the plan (its `rankwire-py`). */
static int same_install(const struct plan *p)
{
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0)
        return 0;
    self[n] = '\0';
    char *slash = strrchr(self, '/');
    if (!slash)
        return 0;
    *slash = '\0';
    return !strcmp(self, p->front_dir);
}

/* `apptainer-mpirun WORDS…` and `rankwire run WORDS…` (`words`: the command, then its words
 * as given): the launch plan Python kept for exactly these words in this directory
 * (launcher/plancache.py `remember`, with what the C front end needs: `front_start`), if
 * its key holds, its container started from the holder's recipe, as an exec plan's. Returns
 * only then: the plan's descriptor (`p` filled, `l` the lease); otherwise the Python CLI
 * runs (which plans, or takes a plan this cannot start). */
static int launch_plan(char **words, int nwords, struct plan *p, struct lease *l, pid_t *holder)
{
    char dir[PATH_MAX], cwd[PATH_MAX], name[64];
    size_t len;
    int ntasks, stdin_rank;
    if (nwords > 4096 || runtime_dir(dir, sizeof dir) || !getcwd(cwd, sizeof cwd))
        run_python();
    char **hashed = malloc((size_t)(nwords + 1) * sizeof *hashed);
    if (!hashed)
        run_python();
    hashed[0] = cwd;
    memcpy(hashed + 1, words, (size_t)nwords * sizeof *words);
    snprintf(name, sizeof name, "launch-%016llx.plan", fnv1a(hashed, nwords + 1));
    free(hashed);
    int dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    int fd = dirfd < 0 ? -1 : openat(dirfd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (dirfd >= 0)
        close(dirfd);
    if (fd < 0)
        run_python();
    *p = (struct plan){0};
    if (read_private_fd(fd, &p->buf, &len) || parse_plan(p->buf, len, p) || !p->launch ||
        p->nwords != (size_t)nwords || number(p->ntasks, &ntasks) || ntasks < 1 ||
        ntasks > MAX_RANKS || number(p->stdin_rank, &stdin_rank))
        run_python();
    for (int i = 0; i < nwords; i++)
        if (strcmp(words[i], p->words[i]))
            run_python(); /* another request's words with the same hash */
    if (!*p->args[0])
        run_python(); /* an empty command: Python says it */
    if (!same_install(p) || !same_limits(p) || !plan_matches(p, NULL, p->image))
        run_python();
    if (start_exec(p, fd, dir, l, holder, NULL, 0) || l->pidns < 0) {
        if (*holder > 0) { /* none without a PID namespace: not ours to start ranks in */
            close_ns(l);
            close(l->conn);
            while (waitpid(*holder, NULL, 0) < 0 && errno == EINTR)
                ;
        } /* (a recipe that failed left nothing) */
        drop_plan(dir, name, fd);
        run_python();
    }
    (void)futimens(fd, NULL); /* used: kept before the plans used least lately */
    return fd;
}

/* Rank `rank`'s environment: the plan's, its PMI variables in place of any of theirs
 * (launcher/execute.py `_Job.spawn`: `PmiServer.rank_env` over the process's). */
static const char **rank_env(const struct plan *p, int rank, int size, const char *jobid, int fd)
{
    static char vars[4][96];
    snprintf(vars[0], sizeof vars[0], "PMI_RANK=%d", rank);
    snprintf(vars[1], sizeof vars[1], "PMI_SIZE=%d", size);
    snprintf(vars[2], sizeof vars[2], "PMI_JOBID=%s", jobid);
    snprintf(vars[3], sizeof vars[3], "PMI_FD=%d", fd);
    const char **env = malloc((p->nenv + 5) * sizeof *env);
    size_t n = 0;
    if (!env)
        return NULL;
    for (size_t i = 0; i < p->nenv; i++) {
        int ours = 0;
        for (int k = 0; k < 4; k++)
            ours |= !strncmp(p->env[i], vars[k], (size_t)(strchr(vars[k], '=') - vars[k] + 1));
        if (!ours)
            env[n++] = p->env[i];
    }
    for (int k = 0; k < 4; k++)
        env[n++] = vars[k];
    env[n] = NULL;
    return env;
}

/* Start the plan's ranks in the container of lease `l`, as `instance.start_in` (each our
 * child through CLONE_PARENT, in the container's PID namespace), all first, then their
 * pids: rank r's PMI_FD the other end of `ours[r]`, our stdin only for `stdin_rank`, why one
 * could not start on `errors` (`<rank>\t<why>`). A rank whose way in failed before its
 * successor was made is that child (125, said): `pids` holds it, unreaped. -1: a fork, a
 * pipe or a socketpair failed: then no rank has run (each waits for `go` before its way in,
 * and finds it closed) and none is left. */
static int start_ranks(struct lease *l, const struct plan *p, int size, int stdin_rank,
                       const char *jobid, int errors, pid_t *pids, int *ours)
{
    pid_t parent = getpid();
    int *reports = malloc((size_t)size * sizeof *reports), started = 0, go[2];
    if (!reports || pipe2(go, O_CLOEXEC)) {
        free(reports);
        return -1;
    }
    for (; started < size; started++) {
        int sv[2], report[2];
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv))
            break;
        if (pipe2(report, O_CLOEXEC)) {
            close(sv[0]);
            close(sv[1]);
            break;
        }
        fflush(NULL);
        pid_t pid = fork();
        if (pid == 0) {
            char byte;
            close(go[1]);
            if (read(go[0], &byte, 1) != 1)
                _exit(125); /* another rank could not be forked: none runs */
            close(go[0]);
            sigset_t none; /* as posix_spawn's setsigmask: not ours, held for Python */
            sigemptyset(&none);
            sigprocmask(SIG_SETMASK, &none, NULL);
            for (size_t i = 0; i < NFORWARDED; i++)
                signal(forwarded[i], SIG_DFL);
            signal(SIGPIPE, SIG_DFL);
            signal(SIGXFSZ, SIG_DFL);
            char tag[16];
            snprintf(tag, sizeof tag, "%d", started);
            say_fd = errors;
            say_tag = tag;
            if (started != stdin_rank) {
                int null = open("/dev/null", O_RDONLY);
                if (null < 0 || dup2(null, 0) < 0)
                    _exit(125);
                close(null);
            }
            struct plan mine = *p;
            mine.env = rank_env(p, started, size, jobid, sv[1]);
            if (!mine.env)
                _exit(125);
            bridge_fd = sv[1]; /* inherited by the command, as a step plan's PMI_FD */
            close(report[0]);
            child(l, &mine, (char **)p->args, parent, report[1]);
        }
        close(sv[1]);
        close(report[1]);
        if (pid < 0) {
            close(sv[0]);
            close(report[0]);
            break;
        }
        pids[started] = pid;
        ours[started] = sv[0];
        reports[started] = report[0];
    }
    close(go[0]);
    int all = started == size;
    if (all) { /* every rank is forked: on their way in, each its byte (one write: at most
                * PIPE_BUF bytes, MAX_RANKS, so all or none) */
        char *bytes = malloc((size_t)size);
        ssize_t put = -1;
        if (bytes) {
            memset(bytes, 'g', (size_t)size);
            do
                put = write(go[1], bytes, (size_t)size);
            while (put < 0 && errno == EINTR);
            free(bytes);
        }
        all = put == size;
    }
    close(go[1]); /* EOF: those still waiting end */
    if (!all) {
        for (int r = 0; r < started; r++) {
            while (waitpid(pids[r], NULL, 0) < 0 && errno == EINTR)
                ;
            close(ours[r]);
            close(reports[r]);
        }
        free(reports);
        return -1;
    }
    for (int r = 0; r < started; r++) { /* the successor's pid, once its parent said it */
        char buf[24] = {0};
        ssize_t n;
        do
            n = read(reports[r], buf, sizeof buf - 1);
        while (n < 0 && errno == EINTR);
        close(reports[r]);
        if (n > 0) {
            while (waitpid(pids[r], NULL, 0) < 0 && errno == EINTR)
                ;
            pids[r] = (pid_t)atol(buf);
        }
    }
    free(reports);
    return 0;
}

/* The launch of a kept plan: its container (`launch_plan`), its ranks (`start_ranks`),
 * then the Python side (`rankwire-py __launch …`: launcher/execute.py `adopt`) in our
 * place, which serves their PMI and sees the job to its end; the ranks and the holder stay
 * our (its) children. */
static void launch(char **words, int nwords) __attribute__((noreturn));
static void launch(char **words, int nwords)
{
    struct plan p;
    struct lease l = {.conn = -1};
    pid_t holder = 0;
    int planfd = launch_plan(words, nwords, &p, &l, &holder);
    int size = atoi(p.ntasks), stdin_rank = atoi(p.stdin_rank), errors[2];
    char jobid[48];
    snprintf(jobid, sizeof jobid, "rankwire-%d-0", (int)getpid());
    pid_t *pids = calloc((size_t)size, sizeof *pids);
    int *ours = calloc((size_t)size, sizeof *ours);
    char **argv = calloc((size_t)size + 15, sizeof *argv);
    /* The signals we forward are held from now until Python has its handlers (`_Job.run`),
     * which then forward them: a ^C or scancel while it starts is the ranks', as it is
     * once it serves (the ranks start without them held). */
    sigset_t held;
    sigemptyset(&held);
    for (size_t i = 0; i < NFORWARDED; i++)
        sigaddset(&held, forwarded[i]);
    sigprocmask(SIG_BLOCK, &held, NULL);
    int piped = pipe2(errors, O_CLOEXEC) == 0;
    if (piped) /* a line per rank that could not start, unread until Python runs */
        (void)fcntl(errors[1], F_SETPIPE_SZ, 1 << 20);
    if (!pids || !ours || !argv || !piped ||
        start_ranks(&l, &p, size, stdin_rank, jobid, errors[1], pids, ours)) {
        close_ns(&l); /* nothing started: our holder goes; Python plans, and says why */
        close(l.conn);
        while (waitpid(holder, NULL, 0) < 0 && errno == EINTR)
            ;
        sigprocmask(SIG_UNBLOCK, &held, NULL);
        run_python();
    }
    char nums[9][24], *report = strtok(l.report, "\n");
    int fds[] = {planfd, errors[0], errors[1], (int)holder, l.conn, l.userns, l.mntns, l.pidns};
    int n = 0;
    const char *base = strrchr(saved_argv[0], '/') ? strrchr(saved_argv[0], '/') + 1 : saved_argv[0];
    argv[n++] = saved_argv[0];
    argv[n++] = "__launch";
    argv[n++] = (char *)base; /* the name ps shows it by */
    for (int k = 0; k < 8; k++) {
        snprintf(nums[k], sizeof nums[k], "%d", fds[k]);
        argv[n++] = nums[k];
        if (k != 3 && fcntl(fds[k], F_SETFD, 0))
            _exit(125); /* the ranks and the holder see us gone: nothing is left */
    }
    argv[n++] = jobid;
    argv[n++] = report ? report : "{}";
    for (int r = 0; r < size; r++) {
        char *word = malloc(32);
        if (!word || fcntl(ours[r], F_SETFD, 0))
            _exit(125);
        snprintf(word, 32, "%d:%d", (int)pids[r], ours[r]);
        argv[n++] = word;
    }
    argv[n] = NULL;
    exec_python(argv);
}

/* `rankwire __enter PARENT USERNS MNTNS PIDNS REPORT ERRORS TAG WORKDIR NNP N K=V... --
 * CMD...`: `runtime/instance.py` `start_in`'s way into a container it holds a lease on,
 * for the process it spawns (posix_spawn: no copy of a Python process per rank). The
 * namespace descriptors are inherited under those numbers; PIDNS and REPORT (the pipe for
 * the successor's pid) both -1 without a PID namespace (CMD is then exec'd in this
 * process); ERRORS and TAG where a failed start is said (-1: stderr); WORKDIR and NNP
 * ("1": no_new_privs) the process plan's; the N words K=V CMD's environment (ours is the
 * caller's: the container's LD_PRELOAD is no business of the host's loader). Exits as
 * `child` does. */
static int number(const char *s, int *out)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (!*s || *end || v < -1 || v > INT_MAX)
        return -1;
    *out = (int)v;
    return 0;
}

static void enter(int argc, char **argv) __attribute__((noreturn));
static void enter(int argc, char **argv)
{
    int parent, errors, report, nenv;
    struct lease l = {.conn = -1};
    struct plan p = {0};
    if (argc < 14 || number(argv[2], &parent) || parent <= 0 || number(argv[3], &l.userns) ||
        l.userns < 0 || number(argv[4], &l.mntns) || l.mntns < 0 ||
        number(argv[5], &l.pidns) || number(argv[6], &report) || (l.pidns < 0) != (report < 0) ||
        number(argv[7], &errors) || (strcmp(argv[10], "0") && strcmp(argv[10], "1")) ||
        number(argv[11], &nenv) || nenv < 0 || nenv > argc - 14 || strcmp(argv[12 + nenv], "--"))
        run_python(); /* not ours: the Python CLI says what is wrong with the words */
    char **cmd = argv + 13 + nenv;
    argv[12 + nenv] = NULL; /* the end of CMD's environment */
    for (size_t i = 0; i < NFORWARDED; i++)
        signal(forwarded[i], SIG_DFL);
    signal(SIGPIPE, SIG_DFL); /* Python ignores them; exec keeps what is ignored */
    signal(SIGXFSZ, SIG_DFL);
    if (errors >= 0) { /* the launcher's pipe: not the command's */
        say_fd = errors;
        say_tag = argv[8];
        if (fcntl(errors, F_SETFD, FD_CLOEXEC))
            _exit(125);
    }
    if (!*cmd[0]) { /* execve refuses it; say what is wrong, not EACCES of a PATH dir */
        struct buf m = {0};
        puts_(&m, "rankwire: the command is empty " WHERE ": give the program to run");
        say(&m);
        _exit(125);
    }
    p.workdir = argv[9];
    p.nnp = argv[10];
    p.env = (const char **)(argv + 12);
    child(&l, &p, cmd, (pid_t)parent, report);
}

int main(int argc, char **argv)
{
    saved_argv = argv;
    if (argc > 1 && !strcmp(argv[1], "__enter"))
        enter(argc, argv);
    if (argc == 3 && !strcmp(argv[1], "spank-helper") && !strcmp(argv[2], "start-kept"))
        return plugin_start();
    const char *base = strrchr(argv[0], '/') ? strrchr(argv[0], '/') + 1 : argv[0];
    if (!strcmp(base, "apptainer-mpirun")) { /* this program, installed under that name */
        char **py = malloc((size_t)(argc + 2) * sizeof *py), **words = py ? py + 1 : NULL;
        if (!py) {
            fprintf(stderr, "apptainer-mpirun: out of memory\n");
            return 125;
        }
        py[0] = argv[0]; /* the Python CLI's word for it */
        py[1] = "__apptainer-mpirun";
        memcpy(py + 2, argv + 1, (size_t)argc * sizeof *argv); /* and the NULL */
        saved_argv = py;
        if (argc < 3 || parent_is("slurmstepd") != 0)
            run_python();
        char **kept = malloc((size_t)argc * sizeof *kept); /* the words a plan is kept under */
        if (!kept)
            run_python();
        kept[0] = "apptainer-mpirun";
        memcpy(kept + 1, words + 1, (size_t)(argc - 1) * sizeof *kept);
        signal(SIGCHLD, SIG_DFL);
        launch(kept, argc);
    }
    if (argc >= 3 && !strcmp(argv[1], "run") && parent_is("slurmstepd") == 0) {
        signal(SIGCHLD, SIG_DFL);
        launch(argv + 1, argc - 1);
    }
    static const char prefix[] = "instance://";
    if (argc < 4 || strcmp(argv[1], "exec") || (argv[2][0] != '-' && !*argv[3]))
        run_python();
    signal(SIGCHLD, SIG_DFL); /* an inherited SIG_IGN would reap our children for us */
    struct plan p = {0};
    struct lease l;
    char sock[PATH_MAX + 64];
    pid_t started = 0;
    if (argv[2][0] == '-' || strncmp(argv[2], prefix, sizeof prefix - 1)) {
        if (argv[2][0] != '-' && strstr(argv[2], "://"))
            run_python();
        if (parent_is("slurmstepd") == 0) {
            int at = exec_plan(argc, argv, &p, &l, &started);
            int code = run(&l, &p, argv + at + 1);
            close_ns(&l);
            if (code < 0) { /* nothing started: our holder goes; Python tries, and says why */
                close(l.conn);
                while (waitpid(started, NULL, 0) < 0 && errno == EINTR)
                    ;
                run_python();
            }
            leave(&l, started, code);
            /* reaped here, as Python's `HolderHandle.wait` does (leave waited for its exit) */
            while (waitpid(started, NULL, WNOHANG) < 0 && errno == EINTR)
                ;
            return code;
        }
        if (argv[2][0] == '-') /* options: only an exec plan takes them */
            run_python();
        step_plan(argv[2], &p);
        snprintf(sock, sizeof sock, "%s", p.sock);
        stepd = getppid();
        struct sigaction gone = {.sa_handler = stepd_gone, .sa_flags = SA_RESTART};
        sigemptyset(&gone.sa_mask);
        if (sigaction(SIGRTMIN + 2, &gone, NULL) || prctl(PR_SET_PDEATHSIG, SIGRTMIN + 2))
            run_python();
        stepd_gone(SIGRTMIN + 2); /* it died before the prctl */
    } else {
        const char *name = argv[2] + sizeof prefix - 1;
        if (!*name || name[0] == '.' || strchr(name, '/') || parent_is("slurmstepd") != 0)
            run_python();
        char dir[PATH_MAX], instances[PATH_MAX + 16], planfile[PATH_MAX];
        if (runtime_dir(dir, sizeof dir))
            run_python();
        snprintf(instances, sizeof instances, "%s/instances", dir);
        int n = snprintf(sock, sizeof sock, "%s/%s.sock", instances, name);
        if (n <= 0 || (size_t)n >= sizeof((struct sockaddr_un *)0)->sun_path ||
            !private_dir(instances) || snprintf(planfile, sizeof planfile, "%s.plan", name) <= 0)
            run_python();
        int dirfd = open(instances, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        size_t len;
        if (dirfd < 0 || read_private_file(dirfd, planfile, &p.buf, &len))
            run_python();
        close(dirfd);
        if (parse_plan(p.buf, len, &p) || p.step || !plan_matches(&p, sock, NULL))
            run_python();
    }
    if (join(sock, &p, &l))
        run_python();
    int pmi2 = -1, said = p.bridge && !strcmp(p.bridge, BRIDGE_PMI2_TO_PMIX) ?
                                 join_pmi2_node(&p, &pmi2) : p.bridge ? join_node_bridge(&p) : 0;
    if (said < 0) { /* nothing handed over: Python (says why) */
        close_ns(&l);
        close(l.conn);
        run_python();
    }
    if (said > 0) { /* the bridge failed, our PMI socket is gone: said, as Python */
        close_ns(&l);
        leave(&l, (pid_t)atol(p.holder), said);
        if (strcmp(p.bridge, BRIDGE_PMI2_TO_PMIX)) { /* the step's other ranks would wait */
            char code[16], *args[] = {saved_argv[0], "front-end-pmi-abort", code, NULL};
            snprintf(code, sizeof code, "%d", said);
            exec_python(args);
        }
        return said;
    }
    int code = run(&l, &p, argv + 3);
    if (pmi2 >= 0) { /* `Pmi2Bridge.finish`: how the task ended */
        char num[24];
        int len = snprintf(num, sizeof num, "%d\n", code);
        if (code >= 0 && send(pmi2, num, (size_t)len, MSG_NOSIGNAL) != len) {
        } /* as finish: a bridge gone meanwhile (the step's end) has nothing to hear */
        close(pmi2);
    }
    close_ns(&l);
    if (code < 0 && p.bridge) { /* handed over: a second bridge for our rank would not do */
        say_call(argv[3], "fork", errno);
        code = 125;
    } else if (code < 0) { /* nothing started: leave, and let Python try (and say why) */
        close(l.conn);
        run_python();
    }
    leave(&l, (pid_t)atol(p.holder), code);
    return code;
}
