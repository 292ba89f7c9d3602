#!/usr/bin/env bash
# The main job on the embedded default: build a SIF image holding an MPI program (Debian
# MPICH) from host binaries, then run 4 ranks of it inside one unprivileged container,
# wired up by rankwire's own PMI server. No Slurm, no setuid, no admin help.
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

echo "== a command inside the container (unprivileged user + mount namespace)"
rankwire exec "$work/app.sif" sh -c 'head -1 /etc/os-release; echo "$GREETING"; id'

echo "== apptainer-mpirun -n 4: 4 MPI ranks in one shared container, our PMI server"
apptainer-mpirun -n 4 --tag-output "$work/app.sif" /opt/hello_mpich | sort
echo "demo ok"
