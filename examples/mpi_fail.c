/* Controlled failures for launcher tests.
 *   mpi_fail exit-before-init RANK CODE   RANK exits CODE before MPI_Init
 *   mpi_fail abort RANK CODE              RANK calls MPI_Abort(COMM_WORLD, CODE)
 *   mpi_fail sleep SECONDS                every rank initializes, prints "ready", sleeps
 *   mpi_fail silent RANK SECONDS          RANK sleeps before MPI_Init (never fences)
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    int rank;
    const char *mode = argc > 1 ? argv[1] : "";
    /* The rank before MPI_Init: PMI-1/PMI-2 launchers set PMI_RANK, PMIx ones PMIX_RANK. */
    const char *env_rank = getenv("PMI_RANK") ? getenv("PMI_RANK") : getenv("PMIX_RANK");

    if (strcmp(mode, "exit-before-init") == 0 && argc > 3 && env_rank &&
        atoi(env_rank) == atoi(argv[2]))
        return atoi(argv[3]);
    if (strcmp(mode, "silent") == 0 && argc > 3 && env_rank && atoi(env_rank) == atoi(argv[2]))
        sleep((unsigned)atoi(argv[3]));
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    if (strcmp(mode, "abort") == 0 && argc > 3 && rank == atoi(argv[2]))
        MPI_Abort(MPI_COMM_WORLD, atoi(argv[3]));
    if (strcmp(mode, "sleep") == 0 && argc > 2) {
        printf("ready rank=%d pid=%d\n", rank, (int)getpid());
        fflush(stdout);
        sleep((unsigned)atoi(argv[2]));
    }
    MPI_Barrier(MPI_COMM_WORLD);
    MPI_Finalize();
    return 0;
}
