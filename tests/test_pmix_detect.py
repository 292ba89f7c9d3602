"""`pmi_kind`: which PMI an image's MPI needs, from its file list (pure)."""

from __future__ import annotations

import pytest

from rankwire.pmi.pmix.detect import pmi_kind

DEBIAN_OMPI = [
    "squashfs-root/usr/lib/x86_64-linux-gnu/openmpi/lib/libmpi.so.40.30.4",
    "squashfs-root/usr/lib/x86_64-linux-gnu/libmpi.so.40",
    "squashfs-root/usr/lib/x86_64-linux-gnu/openmpi/lib/openmpi3/mca_pmix_ext3x.so",
    "squashfs-root/usr/lib/x86_64-linux-gnu/libpmix.so.2",
]
DEBIAN_MPICH = [
    "squashfs-root/usr/lib/x86_64-linux-gnu/libmpich.so.12",
    "squashfs-root/usr/lib/x86_64-linux-gnu/libmpich.so.12.2.2",
    "squashfs-root/usr/lib/x86_64-linux-gnu/mpich/lib/libmpi.so.12",
]


@pytest.mark.parametrize(
    ("paths", "needed", "want"),
    [
        (DEBIAN_OMPI, None, "pmix"),
        (["/opt/openmpi-4.1.6/lib/libopen-pal.so.40"], None, "pmix"),
        (["/usr/lib64/openmpi/lib/libmpi.so.40.30.5"], None, "pmix"),
        (DEBIAN_MPICH, None, "pmi1/2"),
        (DEBIAN_MPICH, ["libc.so.6", "libhwloc.so.15"], "pmi1/2"),
        # an MPICH built --with-pmix: its libmpi links libpmix
        (DEBIAN_MPICH, ["libpmix.so.2", "libc.so.6"], "pmix"),
        ([*DEBIAN_MPICH, "/usr/lib/libpmix.so.2"], None, "pmix"),
        # DT_NEEDED facts win over a libpmix that merely lies around
        ([*DEBIAN_MPICH, "/usr/lib/libpmix.so.2"], ["libc.so.6"], "pmi1/2"),
        (["/opt/intel/mpi/lib/release/libmpi.so.12"], None, "pmi1/2"),
        ([*DEBIAN_OMPI, *DEBIAN_MPICH], None, "both"),
        (["/usr/bin/ls", "/usr/lib/x86_64-linux-gnu/libc.so.6"], None, None),
        ([], None, None),
        (["/usr/share/doc/openmpi-common/copyright"], None, None),
    ],
)
def test_pmi_kind(paths: list[str], needed: list[str] | None, want: str | None) -> None:
    assert pmi_kind(paths, needed) == want


def test_unsquashfs_listing_lines() -> None:
    listing = "squashfs-root\nsquashfs-root/usr\nsquashfs-root/usr/lib/libmpich.so.12\n"
    assert pmi_kind(listing.splitlines()) == "pmi1/2"
