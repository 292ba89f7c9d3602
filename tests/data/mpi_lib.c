/* An MPI program that reports which MPI library its rank runs on: the first line of
 * MPI_Get_library_version, and the MPI library it mapped (path, dev:inode from
 * /proc/self/maps); used by tests/test_host_mpi.py to prove the host's library is the one
 * loaded. */
#include <mpi.h>
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv)
{
	int rank, size, sum = 0, one, len;
	char version[MPI_MAX_LIBRARY_VERSION_STRING], line[4096], path[4000] = "", dev[32] = "";
	unsigned long inode = 0;

	MPI_Init(&argc, &argv);
	MPI_Comm_rank(MPI_COMM_WORLD, &rank);
	MPI_Comm_size(MPI_COMM_WORLD, &size);
	one = rank + 1;
	MPI_Allreduce(&one, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
	MPI_Get_library_version(version, &len);
	version[strcspn(version, "\n")] = '\0';
	FILE *maps = fopen("/proc/self/maps", "r");
	while (maps && fgets(line, sizeof(line), maps)) {
		char p[4000] = "", d[32];
		unsigned long ino;
		if (sscanf(line, "%*s %*s %*s %31s %lu %3999s", d, &ino, p) == 3 &&
		    strstr(p, "/libmpi")) {
			strcpy(path, p);
			strcpy(dev, d);
			inode = ino;
			break;
		}
	}
	if (maps)
		fclose(maps);
	printf("mpilib rank=%d size=%d sum=%d library=%s devino=%s:%lu version=%s\n", rank, size,
	       sum, path[0] ? path : "none", dev[0] ? dev : "-", inode, version);
	MPI_Finalize();
	return 0;
}
