"""A one-node Slurm cluster for tests, all of it in a temporary folder: munged, slurmctld and
slurmd on localhost (free ports, their own munge key and socket), one partition "cpu". The
node declares count-only GPUs (gres "gpu", device files that are copies of /dev/null) so that
the shipped sbatch files' `--gres=gpu:N` is honoured as written; no job sees a real GPU, and
gpu_runner grades on gloo. Needs root and Debian's slurmctld, slurmd, slurm-client and munge
(.ci/setup-system.sh)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run here (not installed, not root, a daemon that would not start)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, base: Path, cpus: int = 64, gpus: int = 8):
        missing = [t for t in TOOLS if shutil.which(t) is None]
        if missing:
            raise SlurmUnavailable(f"Slurm is not installed ({', '.join(missing)} missing): "
                                   ".ci/setup-system.sh installs slurmctld, slurmd, "
                                   "slurm-client and munge")
        if os.geteuid() != 0:
            raise SlurmUnavailable("the test cluster's daemons run as root (as in CI)")
        self.base = Path(base)
        self.conf = self.base / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self._write_config(cpus, gpus)

    def _write_config(self, cpus, gpus):
        b = self.base
        for name in ("state", "spool", "log", "run"):
            (b / name).mkdir(parents=True, exist_ok=True)
        key = b / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for i in range(gpus):
            dev = b / f"fake-gpu{i}"
            if not dev.exists():
                os.mknod(dev, 0o600 | 0o020000, os.makedev(1, 3))   # char device, as /dev/null
        host = socket.gethostname().split(".")[0]
        self.munge_socket = b / "run" / "munge.sock"
        self.conf.write_text(f"""ClusterName=tptest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={b / 'state'}
SlurmdSpoolDir={b / 'spool'}
SlurmctldPidFile={b / 'run' / 'slurmctld.pid'}
SlurmdPidFile={b / 'run' / 'slurmd.pid'}
SlurmctldLogFile={b / 'log' / 'slurmctld.log'}
SlurmdLogFile={b / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
MinJobAge=3600
SlurmdParameters=config_overrides
GresTypes=gpu
MailProg=/bin/true
NodeName=tpnode NodeHostname={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 Gres=gpu:{gpus} State=UNKNOWN
PartitionName=cpu Nodes=tpnode Default=YES MaxTime=INFINITE State=UP
""")
        (b / "gres.conf").write_text(
            f"NodeName=tpnode Name=gpu File={b}/fake-gpu[0-{gpus - 1}]\n")

    @property
    def env(self) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _daemon(self, argv):
        log = open(self.base / "log" / f"{Path(argv[0]).name}.out", "w")
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                           env=self.env, start_new_session=True))

    def start(self, timeout: float = 60) -> None:
        b = self.base
        self._daemon(["munged", "--foreground", "--force", f"--key-file={b / 'munge.key'}",
                      f"--socket={self.munge_socket}", f"--pid-file={b / 'run' / 'munged.pid'}",
                      f"--log-file={b / 'log' / 'munged.log'}",
                      f"--seed-file={b / 'run' / 'munged.seed'}"])
        self._wait(lambda: self.munge_socket.exists(), 20, "munged")
        self._daemon(["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._daemon(["slurmd", "-D", "-N", "tpnode", "-f", str(self.conf)])
        self._wait(lambda: self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
                   == "idle", timeout, "the node to be idle")

    def _wait(self, ready, timeout, what):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ready():
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.5)
        raise SlurmUnavailable(f"the test cluster did not start ({what}): {self.logs()}")

    def logs(self) -> str:
        return " | ".join(f"{p.name}: {p.read_text()[-600:]}"
                          for p in sorted((self.base / "log").iterdir()) if p.is_file())

    def run(self, *argv, check=True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, text=True, env=self.env, check=check,
                              timeout=60, **kw)

    def sbatch(self, script: Path, *options, cwd: Path, env: dict) -> str:
        """Submit `script` as shipped, with `env` added to the submitting environment (the
        job gets all of it: --export=ALL) and `options` on the command line, as a user would
        give them; the job id."""
        return subprocess.run(["sbatch", "--parsable", "--export=ALL", *options, str(script)],
                              capture_output=True, text=True, check=True, timeout=60, cwd=cwd,
                              env={**self.env, **env}).stdout.strip().split(";")[0]

    def wait(self, job: str, timeout: float) -> dict[str, str]:
        """Wait until every task of `job` has ended; {task: 'STATE exit'}."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.run("squeue", "-h", "-j", job, check=False).stdout.strip():
                break
            time.sleep(1)
        else:
            raise AssertionError(f"job {job} still running after {timeout} s: "
                                 + self.run("squeue", check=False).stdout)
        out = self.run("scontrol", "-o", "show", "job", job).stdout
        states = {}
        for line in out.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            task = fields.get("ArrayTaskId", fields["JobId"])
            states[task] = f"{fields['JobState']} {fields['ExitCode']}"
        return states

    def stop(self) -> None:
        self.run("scancel", "--full", "-u", "root", check=False)
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
