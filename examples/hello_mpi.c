/* MPI hello: every rank prints its rank, the job size, its host and an Allreduce
 * result the caller can check: sum over ranks of (rank + 1) = size * (size + 1) / 2. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    int rank, size, value, sum, expected;
    char host[256];

    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    gethostname(host, sizeof host);
    host[sizeof host - 1] = '\0';
    value = rank + 1;
    MPI_Allreduce(&value, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    expected = size * (size + 1) / 2;
    printf("hello rank=%d size=%d host=%s sum=%d %s\n", rank, size, host, sum,
           sum == expected ? "ok" : "WRONG");
    fflush(stdout);
    MPI_Finalize();
    return sum == expected ? 0 : 1;
}
