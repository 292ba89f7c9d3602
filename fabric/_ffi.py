"""cffi ABI-mode binding of libfabric's exported discovery functions (no compiler needed).

Only real exported symbols are declared (fi_getinfo & co.); everything else in libfabric
is a static inline reached through ops tables and needs compiled code (see pingpong.c).
The structs follow the libfabric 1.17 headers. Later releases only append fields to
fi_domain_attr, so reading structs the library allocated stays correct on newer
libraries; never allocate these structs from Python (use fi_dupinfo(NULL)).
"""

from __future__ import annotations

from typing import Any, Optional

from rankwire.errors import UserError

SONAME = "libfabric.so.1"
CDEF = """
typedef struct fid *fid_t;
struct fid { size_t fclass; void *context; void *ops; };
struct fi_tx_attr {
    uint64_t caps; uint64_t mode; uint64_t op_flags; uint64_t msg_order; uint64_t comp_order;
    size_t inject_size; size_t size; size_t iov_limit; size_t rma_iov_limit; uint32_t tclass;
};
struct fi_rx_attr {
    uint64_t caps; uint64_t mode; uint64_t op_flags; uint64_t msg_order; uint64_t comp_order;
    size_t total_buffered_recv; size_t size; size_t iov_limit;
};
struct fi_ep_attr {
    int type; uint32_t protocol; uint32_t protocol_version;
    size_t max_msg_size; size_t msg_prefix_size; size_t max_order_raw_size;
    size_t max_order_war_size; size_t max_order_waw_size; uint64_t mem_tag_format;
    size_t tx_ctx_cnt; size_t rx_ctx_cnt; size_t auth_key_size; uint8_t *auth_key;
};
struct fi_domain_attr {
    void *domain; char *name;
    int threading; int control_progress; int data_progress; int resource_mgmt; int av_type;
    int mr_mode;
    size_t mr_key_size; size_t cq_data_size; size_t cq_cnt; size_t ep_cnt; size_t tx_ctx_cnt;
    size_t rx_ctx_cnt; size_t max_ep_tx_ctx; size_t max_ep_rx_ctx; size_t max_ep_stx_ctx;
    size_t max_ep_srx_ctx; size_t cntr_cnt; size_t mr_iov_limit;
    uint64_t caps; uint64_t mode; uint8_t *auth_key; size_t auth_key_size;
    size_t max_err_data; size_t mr_cnt; uint32_t tclass;
};
struct fi_fabric_attr {
    void *fabric; char *name; char *prov_name; uint32_t prov_version; uint32_t api_version;
};
struct fi_device_attr {
    char *name; char *device_id; char *device_version; char *vendor_id; char *driver;
    char *firmware;
};
struct fi_pci_attr { uint16_t domain_id; uint8_t bus_id; uint8_t device_id; uint8_t function_id; };
struct fi_bus_attr { int bus_type; union { struct fi_pci_attr pci; } attr; };
struct fi_link_attr { char *address; size_t mtu; size_t speed; int state; char *network_type; };
struct fid_nic {
    struct fid fid; struct fi_device_attr *device_attr; struct fi_bus_attr *bus_attr;
    struct fi_link_attr *link_attr; void *prov_attr;
};
struct fi_info {
    struct fi_info *next; uint64_t caps; uint64_t mode; uint32_t addr_format;
    size_t src_addrlen; size_t dest_addrlen; void *src_addr; void *dest_addr; fid_t handle;
    struct fi_tx_attr *tx_attr; struct fi_rx_attr *rx_attr; struct fi_ep_attr *ep_attr;
    struct fi_domain_attr *domain_attr; struct fi_fabric_attr *fabric_attr;
    struct fid_nic *nic;
};
uint32_t fi_version(void);
int fi_getinfo(uint32_t version, const char *node, const char *service, uint64_t flags,
               const struct fi_info *hints, struct fi_info **info);
void fi_freeinfo(struct fi_info *info);
struct fi_info *fi_dupinfo(const struct fi_info *info);
const char *fi_strerror(int errnum);
char *fi_tostr(const void *data, int datatype);
"""

# Sizes (x86_64) of the 1.17 structs, from the C headers; tests compare them with a compiler.
STRUCT_SIZES = {
    "struct fi_info": 120,
    "struct fi_tx_attr": 80,
    "struct fi_rx_attr": 64,
    "struct fi_ep_attr": 96,
    "struct fi_domain_attr": 192,
    "struct fi_fabric_attr": 32,
    "struct fid_nic": 56,
}

_loaded: Optional[tuple[Any, Any]] = None


def load() -> tuple[Any, Any]:
    """(ffi, lib) for the libfabric.so.1 the dynamic loader finds; loaded once."""
    global _loaded
    if _loaded is None:
        try:
            import cffi
        except ImportError as err:  # pragma: no cover - a packaging problem
            raise UserError("cffi is missing: reinstall rankwire (pip install cffi)") from err
        ffi = cffi.FFI()
        ffi.cdef(CDEF)
        try:
            lib = ffi.dlopen(SONAME)
        except OSError as err:
            raise UserError(
                f"{SONAME} cannot be loaded ({str(err).splitlines()[0]}): install libfabric "
                "(apt-get install libfabric1) or put its directory on LD_LIBRARY_PATH"
            ) from None
        _loaded = (ffi, lib)
    return _loaded
