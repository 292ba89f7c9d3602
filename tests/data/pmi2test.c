#include <slurm/pmi2.h>
#include <stdio.h>
/* Slurm's libpmi2 client: init, put, fence, get the neighbour's key, job attribute. */
#define CHECK(call) do { int rc_ = (call); if (rc_ != PMI2_SUCCESS) { \
    printf("FAILED %s rc=%d\n", #call, rc_); return 1; } } while (0)
int main(void) {
    int spawned, size, rank, appnum, found, vallen;
    char jobid[256], key[64], value[PMI2_MAX_VALLEN], mapping[PMI2_MAX_VALLEN];
    CHECK(PMI2_Init(&spawned, &size, &rank, &appnum));
    CHECK(PMI2_Job_GetId(jobid, sizeof jobid));
    snprintf(key, sizeof key, "pmi2test-%d", rank);
    snprintf(value, sizeof value, "v=%d;semi", rank);
    CHECK(PMI2_KVS_Put(key, value));
    CHECK(PMI2_KVS_Fence());
    snprintf(key, sizeof key, "pmi2test-%d", (rank + 1) % size);
    CHECK(PMI2_KVS_Get(jobid, PMI2_ID_NULL, key, value, sizeof value, &vallen));
    CHECK(PMI2_Info_GetJobAttr("PMI_process_mapping", mapping, sizeof mapping, &found));
    printf("pmi2 rank=%d size=%d appnum=%d jobid=%s neighbour=%s mapping=%s\n",
           rank, size, appnum, jobid, value, found ? mapping : "ABSENT");
    fflush(stdout);
    CHECK(PMI2_Finalize());
    return 0;
}
