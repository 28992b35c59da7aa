#!/usr/bin/env bash
# System packages the grading sandbox (and the Postgres gradebook test) need. Idempotent and
# quiet: installs only what is missing. Run as root (CI) or through sudo.
#   bubblewrap  - bwrap: namespaces + read-only/hidden filesystem view for student kernels
#   util-linux  - prlimit (resource limits) and setpriv (drop to an unprivileged uid)
#   postgresql  - initdb/pg_ctl for the throwaway Postgres gradebook in tests/test_grade_class.py
#   slurmctld, slurmd, slurm-client, munge - a one-node Slurm cluster started by
#                 tests/test_grade_class_gpu.py (tests/slurm_cluster.py), which runs the
#                 shipped gpu_runner/slurm/*.sbatch files
#                 (the daemons are not started here: the test starts its own, in a temp dir)
#   chromium, chromium-driver - the headless browser of tests/test_browser.py (what a person sees
#                 in JupyterLab, the formgrader and the feedback), driven through selenium
set -euo pipefail
need=()
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)
{ command -v prlimit && command -v setpriv; } >/dev/null 2>&1 || need+=(util-linux)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v slurmctld >/dev/null 2>&1 || need+=(slurmctld)
command -v slurmd >/dev/null 2>&1 || need+=(slurmd)
command -v sbatch >/dev/null 2>&1 || need+=(slurm-client)
command -v munged >/dev/null 2>&1 || need+=(munge)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq >/dev/null
    # policy-rc.d 101: the packages' postinst scripts must not start system-wide daemons
    # (munged, slurmctld, slurmd); tests start private ones.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
        $SUDO chmod 755 /usr/sbin/policy-rc.d
        trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# A trial sandbox: fails loudly here rather than in the middle of grading.
bwrap --ro-bind / / --unshare-pid --unshare-net --die-with-parent --proc /proc --dev /dev true \
    || { echo "setup-system: bwrap is installed but cannot create namespaces here" >&2; exit 1; }
