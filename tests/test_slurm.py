"""The workflow on a real SLURM cluster, through the project's profile (profiles/slurm).

A single-node cluster (Debian's slurmctld, slurmd and munge; `make slurm-packages` installs them as root) is started
on loopback, with its own munge key, ports, state and logs in a temporary folder, a fake GPU (gres on /dev/null) and
a `cpu` (default) and a `gpu` partition, the names the profile uses. The tiny workflow (one rank, up to its summary
and trait tables) runs through `--executor slurm` with a profile derived from the project's: only what this cluster
needs changes (no accounting database, so job states come from squeue; small memory and time limits; fast status
checks). Every job must have been a SLURM job (the plugin's submissions, SLURM's own job completion log), the GPU
rules on the gpu partition with one GPU, and the outputs must be right. The daemons started here are stopped by PID.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import h5py
import pandas as pd
import pytest
import torch
import yaml

from taxotrait.distributed import free_port, stop_process

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "srun", "sinfo", "scancel")
GPU_RULES = {"cache_tokens", "train", "evaluate", "extract_attention", "mask_heads", "train_probes", "saliency_maps",
             "faithfulness"}
RANKS = ["species"]
RUN_TIMEOUT_S = 480


def node_hardware() -> tuple[str, int, int]:
    """(node name, CPUs, memory MB) as slurmd sees this machine."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
    return fields["NodeName"], int(fields["CPUs"]), int(fields["RealMemory"])


class Cluster:
    """munged, slurmctld and slurmd in the foreground, configured under `root`; `stop` ends them by PID."""

    def __init__(self, root: Path):
        self.root, self.processes = root, []
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}

    def start(self):
        root = self.root
        for sub, mode in (("munge", 0o700), ("run", 0o755), ("state", 0o755), ("spool", 0o755), ("log", 0o755)):
            (root / sub).mkdir(mode=mode)
            (root / sub).chmod(mode)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        socket_path = root / "run" / "munge.sock"
        self.spawn("munged", ["munged", "-F", f"--socket={socket_path}", f"--key-file={key}",
                              f"--pid-file={root}/run/munged.pid", f"--log-file={root}/log/munged.log",
                              f"--seed-file={root}/munge/seed"])
        self.wait_for(lambda: socket_path.exists(), "munged's socket")
        name, cpus, memory = node_hardware()
        self.memory_mb = min(memory, 8000)
        (root / "slurm.conf").write_text(f"""\
ClusterName=taxotrait-test
SlurmctldHost={name}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.txt
MinJobAge=600
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
DefMemPerCPU=500
SchedulerParameters=sched_interval=1
NodeName={name} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={self.memory_mb} Gres=gpu:1 State=UNKNOWN
PartitionName=cpu Nodes={name} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes={name} MaxTime=INFINITE State=UP
""")
        (root / "gres.conf").write_text("Name=gpu File=/dev/null\n")  # a GPU to schedule, not to compute on
        # The jobstep executor drops every SLURM_* variable, SLURM_CONF too, before it calls srun inside a job:
        # srun finds this cluster's configuration (not in /etc/slurm) through a wrapper first on the jobs' PATH.
        (root / "bin").mkdir()
        srun = root / "bin" / "srun"
        srun.write_text(f"#!/bin/sh\nSLURM_CONF={root}/slurm.conf exec {shutil.which('srun')} \"$@\"\n")
        srun.chmod(0o755)
        self.path = f"{root}/bin:{os.environ['PATH']}"
        self.spawn("slurmctld", ["slurmctld", "-D"])
        self.wait_for(lambda: self.run("sinfo", "-h").returncode == 0, "slurmctld")
        self.spawn("slurmd", ["slurmd", "-D"])
        self.wait_for(lambda: self.run("sinfo", "-h", "-N", "-o", "%T").stdout.split() == ["idle"] * 2,
                      "the node to become idle")

    def spawn(self, name, command):
        with open(self.root / "log" / f"{name}.out", "w") as out:
            self.processes.append((name, subprocess.Popen(command, env=self.env, stdout=out,
                                                          stderr=subprocess.STDOUT)))

    def run(self, *command):
        return subprocess.run(command, env=self.env, capture_output=True, text=True)

    def wait_for(self, ready, what, timeout_s=60):
        deadline = time.monotonic() + timeout_s
        while not ready():
            dead = [name for name, p in self.processes if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"SLURM test cluster: no {what} after {timeout_s} s (exited: {dead})\n"
                                   + self.logs())
            time.sleep(0.3)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((self.root / "log").glob("*"))
                         if p.is_file())

    def stop(self):
        if any(name == "slurmctld" and p.poll() is None for name, p in self.processes):
            self.run("scancel", "--full", "-u", str(os.getuid()))  # jobs left by a failed run (this cluster's only)
        for _, process in reversed(self.processes):
            stop_process(process, grace_s=20)


def missing_slurm() -> str | None:
    missing = [tool for tool in DAEMONS if shutil.which(tool) is None]
    if missing:
        return (f"SLURM is not installed (missing {', '.join(missing)}); as root, `make slurm-packages` installs "
                "Debian's slurmctld, slurmd, slurm-client and munge")
    if os.getuid() != 0:
        return "the SLURM test cluster runs slurmd, which must run as root"
    return None


@pytest.fixture(scope="module")
def cluster():
    reason = missing_slurm()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))  # short: unix socket paths
    root.chmod(0o755)  # munged wants its socket's folders searchable by everyone
    cluster = Cluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def derived_profile(folder: Path, cluster: Cluster) -> Path:
    """The project's profile with what this test cluster needs changed: nothing about partitions or GPUs."""
    profile = yaml.safe_load(PROFILE.read_text())
    profile.update({
        "slurm-status-command": "squeue",  # no slurmdbd: sacct cannot answer; MinJobAge keeps jobs in squeue
        "slurm-init-seconds-before-status-checks": 2,
        "seconds-between-status-checks": 1,  # Snakemake's default 10 s, at each of the run's 8 levels of jobs
        "slurm-logdir": str(folder / "slurm_logs"),
        "slurm-keep-successful-logs": True,
        "retries": 0,
        "latency-wait": 5,
        "max-threads": 2,  # the node's CPUs: a job asking for more (prepare, cache_tokens: 8) would never start
    })
    small = {"mem_mb": 1000, "runtime": 10}
    profile["default-resources"] = {**profile.get("default-resources", {}), **small}
    for resources in profile.get("set-resources", {}).values():
        resources.update(small)
        if "cpus_per_gpu" in resources:
            resources["cpus_per_gpu"] = 1
    (folder / "profile").mkdir()
    (folder / "profile" / "config.yaml").write_text(yaml.safe_dump(profile))
    return folder / "profile"


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory):
    folder = tmp_path_factory.mktemp("slurm_run")
    config = folder / "cluster.yaml"
    # one rank, one GPU per GPU job; for time, the targets leave out the figures and the explanations' evaluation
    # (tests/test_workflow.py runs them)
    config.write_text(yaml.safe_dump({"ranks": RANKS, "resources": {"gpu": 1}, "evaluation": {"enabled": False}}))
    results = folder / "results" / "tiny"
    targets = [f"{results}/{name}" for name in ("summary.md", "hierarchy_traits.parquet", "species/traits.parquet")]
    command = [sys.executable, "-m", "snakemake", *targets, "--profile", str(derived_profile(folder, cluster)),
               "--configfile", "tests/data/tiny.yaml", str(config), "--config", f"results={folder}/results"]
    env = {**cluster.env, "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}:{cluster.path}"}
    started = time.monotonic()
    with open(folder / "snakemake.log", "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            process.wait(RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGINT)  # snakemake cancels its SLURM jobs on SIGINT (not on SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    output = (folder / "snakemake.log").read_text()
    seconds = time.monotonic() - started
    if process.returncode:
        raise AssertionError(f"snakemake --executor slurm failed (exit {process.returncode}, {seconds:.0f} s):\n"
                             f"{output[-6000:]}\n{cluster.logs()}")
    print(f"workflow through SLURM: {seconds:.0f} s")
    jobs = {}  # SLURM's own record of each finished job: slurmctld's completion log, and the job itself
    for line in (cluster.root / "log" / "jobcomp.txt").read_text().splitlines():
        record = dict(re.findall(r"(\w+)=(\S*)", line))
        shown = cluster.run("scontrol", "show", "job", "-o", record["JobId"]).stdout  # kept for MinJobAge
        jobs[record["JobId"]] = {**record, "TresPerJob": dict(re.findall(r"(\w+)=(\S*)", shown)).get("TresPerJob")}
    return folder, output, jobs


def planned_jobs(output: str) -> Counter:
    """Snakemake's own 'Job stats' table of the run: jobs per rule."""
    table = output.split("Job stats:", 1)[1].split("total", 1)[0]
    return Counter({m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)})


def test_every_job_ran_as_a_slurm_job(slurm_run):
    folder, output, finished = slurm_run
    submitted = re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+)\)", output)
    rules = Counter(re.search(r"rule_(\w+)", log)[1] for _, log in submitted)
    planned = planned_jobs(output)
    assert rules == planned and len({job for job, _ in submitted}) == len(submitted)
    for job_id, log in submitted:
        record = finished[job_id]
        rule = re.search(r"rule_(\w+)", log)[1]
        assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", (rule, record)
        assert record["Partition"] == ("gpu" if rule in GPU_RULES else "cpu"), (rule, record)
        assert record["TresPerJob"] == ("gres:gpu:1" if rule in GPU_RULES else None), (rule, record)
        assert Path(log).is_file(), log  # the plugin's log of the SLURM job
    assert {"train", "mask_heads", "summary"} <= set(rules)


def test_outputs_are_right(slurm_run):
    folder, _, _ = slurm_run
    results = folder / "results" / "tiny"
    classes = pd.read_parquet(results / "classes.parquet")
    assert classes.groupby("rank").size().to_dict() == {"species": 16}  # the tiny taxonomy's 16 species
    for rank, num_classes in (("species", 16),):
        payload = torch.load(results / rank / "model.pt", weights_only=True)
        assert payload["metadata"]["rank"] == rank and payload["state_dict"]["class_prompts"].shape[0] == num_classes
        assert pd.read_parquet(results / rank / "train_log.parquet")["epoch"].tolist() == [1, 2, 3]
        metrics = pd.read_parquet(results / rank / "metrics.parquet")
        assert metrics.query("taxon == '__all__' and split == 'test'")["n_images"].tolist() == [32]
        with h5py.File(results / rank / "attention.h5") as h5:
            assert len(h5["class_names"]) == num_classes and h5.attrs["rank"] == rank
            assert h5["scores"].shape == h5["classes"].shape == (32, h5["attention"].shape[1])
        heads = pd.read_parquet(results / rank / "heads.parquet")
        assert len(heads) % 6 == 0 and (heads.groupby("image_id")["is_trait_head"].sum() >= 1).all()
        traits = pd.read_parquet(results / rank / "traits.parquet")
        assert traits["frequency"].between(0, 1).all() and (traits["n_images"] >= 1).all()
    assert set(pd.read_parquet(results / "hierarchy_traits.parquet")["rank"]) <= {"species"}
    assert "## Targets" in (results / "summary.md").read_text()
