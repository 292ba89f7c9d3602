#!/usr/bin/env bash
# The main job on the embedded default, as far as rankwire goes today: build a SIF image
# holding an MPI program (Debian MPICH) from host binaries, then run it inside an
# unprivileged container started by rankwire's own runtime. No Slurm, no setuid.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/rankwire-demo.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "== rankwire doctor"
rankwire doctor | sed -n '1,3p'

echo "== compile the MPI hello with Debian MPICH"
mpicc.mpich -O1 "$here/hello_mpi.c" -o "$work/hello_mpich"

echo "== build app.sif from host binaries (MPICH + UCX plugins)"
python "$here/../tests/harness/images.py" "$work/rootfs" \
    --binary "$work/hello_mpich" --tree /usr/lib/x86_64-linux-gnu/ucx \
    --copy "$work/hello_mpich:/opt/hello_mpich"
rankwire build "$work/app.sif" "$work/rootfs" --label demo=rankwire \
    --env GREETING="hello from the image"
rankwire inspect "$work/app.sif" | sed -n '1,12p'

echo "== run inside the container (unprivileged user + mount namespace)"
rankwire exec "$work/app.sif" sh -c 'cat /etc/os-release | head -1; echo "$GREETING"; id'
rankwire exec "$work/app.sif" /opt/hello_mpich
echo "demo ok"
