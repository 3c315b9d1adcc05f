#!/usr/bin/env bash
# Install a single-node SLURM (Debian's slurm-wlm) and munge for tests/test_runner_slurm.py.
# Idempotent: does nothing when slurmctld, slurmd and munged are already there.
# Never fails the CI run: without root, apt or the packages it says why and exits 0,
# and the SLURM tests skip.
set -u

if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    echo "install_slurm: slurm-wlm and munge already installed"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "install_slurm: not root, cannot apt-get install slurm-wlm munge; the SLURM tests will skip"
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "install_slurm: no apt-get on this machine; the SLURM tests will skip"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if apt-get update -q && apt-get install -y -q --no-install-recommends slurm-wlm munge; then
    echo "install_slurm: installed slurm-wlm and munge"
else
    echo "install_slurm: apt-get install slurm-wlm munge failed; the SLURM tests will skip"
fi
exit 0
