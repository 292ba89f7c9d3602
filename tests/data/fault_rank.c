/* One rank of a job that fails on purpose (tests/test_faults.py).
 *   fault_rank WHEN ACTION RANK [CODE]
 * Every rank prints "start rank=R pid=P" before MPI_Init. Then rank RANK, and only it:
 *   WHEN=before   does ACTION before MPI_Init;
 *   WHEN=fence    does ACTION 1 s into MPI_Init's fence (SIGALRM), which cannot complete:
 *                 the last rank sleeps 60 s before its MPI_Init;
 *   WHEN=after    does ACTION after MPI_Init and a barrier.
 * ACTION: exit (exit CODE, no MPI_Finalize), segv (a real invalid write), sleep (prints
 * "ready rank=R pid=P" after MPI_Init, then sleeps 60 s: something else kills it).
 */
#include <mpi.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *action;
static int code;

static void act(void)
{
    if (strcmp(action, "exit") == 0)
        _exit(code);
    if (strcmp(action, "segv") == 0) {
        signal(SIGSEGV, SIG_DFL);
        *(volatile int *)0 = 1;
    }
}

static void on_alarm(int sig)
{
    (void)sig;
    act();
}

int main(int argc, char **argv)
{
    int rank, size;
    const char *when = argc > 1 ? argv[1] : "";
    const char *env_rank = getenv("PMI_RANK") ? getenv("PMI_RANK") : getenv("PMIX_RANK");
    const char *env_size = getenv("PMI_SIZE") ? getenv("PMI_SIZE") : "1";
    int me = env_rank ? atoi(env_rank) : 0, target = argc > 3 ? atoi(argv[3]) : 0;

    action = argc > 2 ? argv[2] : "";
    code = argc > 4 ? atoi(argv[4]) : 1;
    printf("start rank=%d pid=%d\n", me, (int)getpid());
    fflush(stdout);
    if (me == target && strcmp(when, "before") == 0)
        act();
    if (strcmp(when, "fence") == 0) {
        if (me == atoi(env_size) - 1 && me != target)
            sleep(60);
        if (me == target) {
            signal(SIGALRM, on_alarm);
            alarm(1);
        }
    }
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Barrier(MPI_COMM_WORLD);
    if (strcmp(action, "sleep") == 0) {
        printf("ready rank=%d pid=%d\n", rank, (int)getpid());
        fflush(stdout);
        sleep(60);
    } else if (rank == target && strcmp(when, "after") == 0)
        act();
    MPI_Barrier(MPI_COMM_WORLD);
    MPI_Finalize();
    return 0;
}
