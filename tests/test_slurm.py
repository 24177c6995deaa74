"""Slurm: `ember launch` reads the job's rendezvous from SLURM_* when the seeds' variables are
absent, and examples/slurm/ runs for real.

The last test starts a real one-node Slurm (Debian's `slurm-wlm` with `munge`: munged, slurmctld
and slurmd in the foreground, their configuration and state in a temporary folder, free ports)
and submits examples/slurm/pretrain_llama2_7b.sbatch tiny with two tasks, which act as two
nodes. Where Slurm is not installed (CI), cannot run (not root, the host name does not resolve)
or does not come up within seconds, it is skipped with the reason.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_utils import free_port, read_metrics

ROOT = Path(__file__).resolve().parent.parent
BIN = str(Path(sys.executable).parent)
SLURM_PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")


def _plan(argv: list[str], monkeypatch, env: dict[str, str]):
    from ember.commands.launch import add_arguments, plan_from_args

    for name in list(os.environ):
        if name.startswith(("SLURM_", "PET_")) or name in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
                                                           "GPUS_PER_NODE", "EMBER_TINY"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return plan_from_args(parser.parse_args(argv))


# --------------------------------------------------------------------------- host lists

HOSTLISTS = {
    "vm": ["vm"],
    "node[01-03,07]": ["node01", "node02", "node03", "node07"],
    "gpu[8-11],login1": ["gpu8", "gpu9", "gpu10", "gpu11", "login1"],
    "a[1-2]-b[09-10]": ["a1-b09", "a1-b10", "a2-b09", "a2-b10"],
    "x[098-101],z": ["x098", "x099", "x100", "x101", "z"],
}


@pytest.mark.parametrize("nodelist", HOSTLISTS)
def test_host_lists_expand_as_slurm_does(nodelist, tmp_path):
    """The parser used where Slurm's own `scontrol` is absent; checked against `scontrol show
    hostnames` itself where it is installed (it wants a configuration file, even a minimal one)."""
    from ember.commands.cluster_env import expand_hostlist

    assert expand_hostlist(nodelist) == HOSTLISTS[nodelist]
    if shutil.which("scontrol"):
        (tmp_path / "slurm.conf").write_text("ClusterName=x\nSlurmctldHost=localhost\n")
        done = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10,
                              env=dict(os.environ, SLURM_CONF=str(tmp_path / "slurm.conf")))
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == HOSTLISTS[nodelist]


@pytest.mark.parametrize("nodelist", ["node[01-03", "node[3-1]", "node[a-b]", ""])
def test_bad_host_lists_are_one_line_errors(nodelist):
    from ember.commands.cluster_env import expand_hostlist
    from ember.errors import EmberError

    with pytest.raises(EmberError, match="Slurm host list"):
        expand_hostlist(nodelist)


# --------------------------------------------------------------------------- the launch plan

STEP = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "2", "SLURM_NODEID": "2",
        "SLURM_STEP_NUM_TASKS": "4", "SLURM_NNODES": "4", "SLURM_NTASKS": "4",
        "SLURM_STEP_NODELIST": "gpu[07-08,10],login1", "SLURM_JOB_NODELIST": "gpu[07-08,10],login1"}


def test_launch_help_names_the_cluster_variables():
    from ember.commands.launch import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert "$SLURM_PROCID" in text and "10000 + Slurm job id % 50000" in text and "--emit" in text


def test_srun_task_gives_the_rendezvous(monkeypatch):
    """`srun --ntasks-per-node=1 ember launch -- ...` with nothing else set: node rank = the task's
    rank, nodes = the step's tasks, master = the first host, port from the job id."""
    plan = _plan(["--nproc-per-node", "8", "--", "x"], monkeypatch, STEP)
    assert (plan.nnodes, plan.node_rank, plan.master_addr, plan.master_port) == (4, 2, "gpu07", 10000 + 4242)
    assert plan.cluster == "slurm" and plan.world_size == 32


def test_seed_variables_win_over_slurm(monkeypatch):
    plan = _plan(["--", "x"], monkeypatch, dict(STEP, NNODES="4", NODE_RANK="1", MASTER_ADDR="10.0.0.1",
                                                    MASTER_PORT="6000", GPUS_PER_NODE="8"))
    assert (plan.nnodes, plan.node_rank, plan.master_addr, plan.master_port) == (4, 1, "10.0.0.1", 6000)
    # the sbatch examples: NNODES and MASTER_* set, NODE_RANK empty -> each task's own
    plan = _plan(["--", "x"], monkeypatch, dict(STEP, NNODES="4", NODE_RANK="", MASTER_ADDR="gpu07",
                                                    MASTER_PORT="6000", GPUS_PER_NODE="8"))
    assert (plan.nnodes, plan.node_rank) == (4, 2)


def test_slurm_misuse_is_one_line(monkeypatch):
    from ember.errors import EmberError

    batch = {k: v for k, v in STEP.items() if k not in ("SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS")}
    with pytest.raises(EmberError, match=r"batch script of a 4-node Slurm job.*srun --ntasks-per-node=1"):
        _plan(["--", "x"], monkeypatch, batch)
    with pytest.raises(EmberError, match=r"NNODES=2 but slurm started 4"):
        _plan(["--", "x"], monkeypatch, dict(STEP, NNODES="2"))


def test_kubeflow_pet_variables(monkeypatch):
    """A PyTorchJob pod: the operator's MASTER_ADDR/MASTER_PORT and torchrun's PET_* variables."""
    plan = _plan(["--", "x"], monkeypatch, {"PET_NNODES": "3", "PET_NODE_RANK": "2", "PET_NPROC_PER_NODE": "8",
                                            "MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456"})
    assert (plan.nnodes, plan.node_rank, plan.nproc_per_node, plan.master_addr, plan.cluster) == (
        3, 2, 8, "job-master-0", "kubeflow")
    elastic = _plan(["--", "x"], monkeypatch, {"PET_NNODES": "1:3", "PET_NPROC_PER_NODE": "8",
                                               "PET_RDZV_ENDPOINT": "job-worker-0:23456"})
    assert (elastic.nnodes_spec, elastic.rdzv_backend, elastic.master_addr, elastic.master_port) == (
        "1:3", "c10d", "job-worker-0", 23456)


# --------------------------------------------------------------------------- every sbatch script, stubbed

STUB_SRUN = """#!/bin/bash
# srun, as for two nodes with one task each: the command once per task, with the task's variables
while [[ "$1" == --* ]]; do shift; done
for ((i = 0; i < SLURM_NTASKS; i++)); do
    SLURM_PROCID=$i SLURM_NODEID=$i SLURM_LOCALID=0 SLURM_STEP_ID=0 SLURM_STEP_NUM_TASKS=$SLURM_NTASKS \\
    SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST "$@" || exit $?
done
"""
STUB_EMBER = """#!/bin/bash
# ember, recording each call: its arguments and the rendezvous variables it would read
exec "$PYTHON" -c 'import json, os, sys
names = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE", "SLURM_PROCID")
record = {"argv": sys.argv[1:], "env": {k: os.environ[k] for k in os.environ if k in names or k.startswith("SLURM_")}}
path = os.path.join(os.environ["RECORD_DIR"], "call-%s-%d.json" % (os.environ.get("SLURM_PROCID", "x"), os.getpid()))
open(path, "w").write(json.dumps(record))' "$@"
"""
STUB_SCONTROL = """#!/bin/bash
# scontrol show hostnames LIST, where Slurm is not installed
exec "$PYTHON" -c 'import sys
from ember.commands.cluster_env import expand_hostlist
print("\\n".join(expand_hostlist(sys.argv[3])))' "$@"
"""
BLOOM_ARGS = ["dlc", "unused", "unused", "7.1B", "1", "64", "2048", "1e-5", "1e-6", "bf16", "4", "1", "sel",
              "true", "true", "10000", "/data/wudao_text_document", "none", "1000000000", "10000000", "out"]
SBATCH = {"pretrain_llama2_7b.sbatch": [], "pretrain_grok1_40b.sbatch": [], "pretrain_bloom.sbatch": BLOOM_ARGS,
          "pretrain_llama3_70b_msrun.sbatch": [], "pretrain_qwen3_8b.sbatch": []}


@pytest.mark.parametrize("script", SBATCH)
def test_each_sbatch_script_gives_every_node_its_rank(script, tmp_path, monkeypatch):
    """Each script run as the batch step of a 2-node job (srun and ember stubbed): every task's
    `ember launch` call forms the 2-node plan with its own node rank and node01 as the master."""
    import json

    from ember.commands.launch import add_arguments, plan_from_args

    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in (("srun", STUB_SRUN), ("ember", STUB_EMBER)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    records = tmp_path / "records"
    records.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in (
        "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE", "EMBER_TINY", "WORLD_SIZE", "RANK")}
    env.update(PATH=f"{stubs}{os.pathsep}{env.get('PATH', '')}", PYTHON=sys.executable, RECORD_DIR=str(records),
               SLURM_JOB_ID="77", SLURM_NNODES="2", SLURM_NTASKS="2", SLURM_JOB_NODELIST="node[01-02]",
               SLURM_SUBMIT_DIR=str(ROOT), SLURM_GPUS_ON_NODE="8")
    if not shutil.which("scontrol"):  # the scripts ask scontrol for the host names
        (stubs / "scontrol").write_text(STUB_SCONTROL)
        (stubs / "scontrol").chmod(0o755)
    env["SLURM_CONF"] = str(tmp_path / "slurm.conf")  # scontrol wants one, even to expand names
    (tmp_path / "slurm.conf").write_text("ClusterName=x\nSlurmctldHost=localhost\n")
    done = subprocess.run(["bash", str(ROOT / "examples" / "slurm" / script), *SBATCH[script]], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    calls = [json.loads(p.read_text()) for p in sorted(records.glob("call-*.json"))]
    launches = [call for call in calls if call["argv"][:1] == ["launch"]]
    assert sorted(call["env"]["SLURM_PROCID"] for call in launches) == ["0", "1"], calls
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for call in launches:
        for name in list(os.environ):
            if name.startswith("SLURM_") or name in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
                                                     "GPUS_PER_NODE"):
                monkeypatch.delenv(name)
        for name, value in call["env"].items():
            monkeypatch.setenv(name, value)
        plan = plan_from_args(parser.parse_args(call["argv"][1:]))
        rank = int(call["env"]["SLURM_PROCID"])
        assert (plan.nnodes, plan.node_rank, plan.master_addr, plan.master_port, plan.nproc_per_node) == (
            2, rank, "node01", 10000 + 77, 8), (script, call)


# --------------------------------------------------------------------------- a real Slurm


def _slurm_unavailable() -> str | None:
    missing = [name for name in SLURM_PROGRAMS if not shutil.which(name)]
    if missing:
        return f"Slurm is not installed (no {', '.join(missing)}; Debian: apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "a test Slurm runs its daemons as root here; not root"
    try:
        socket.getaddrinfo(socket.gethostname(), None)
    except OSError:
        return f"this host's name {socket.gethostname()!r} does not resolve (slurmd needs it)"
    return None


def _start(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in reversed(processes):
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for process in reversed(processes):
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _write_config(folder: Path) -> dict[str, str]:
    munge = folder / "munge"
    munge.mkdir(mode=0o700)
    node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=20).stdout.splitlines()[0]
    (folder / "slurm.conf").write_text("\n".join([
        "ClusterName=embertest", f"SlurmctldHost={socket.gethostname()}", "SlurmUser=root", "SlurmdUser=root",
        f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
        "AuthType=auth/munge", f"AuthInfo=socket={munge}/munge.sock", "CredType=cred/munge",
        f"StateSaveLocation={folder}/state", f"SlurmdSpoolDir={folder}/spool",
        f"SlurmctldPidFile={folder}/slurmctld.pid", f"SlurmdPidFile={folder}/slurmd.pid",
        "ProctrackType=proctrack/pgid", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core", "SchedulerType=sched/builtin", "MpiDefault=none", "ReturnToService=2",
        "JobCompType=jobcomp/none", "AccountingStorageType=accounting_storage/none", "SlurmctldTimeout=30",
        f"{node} State=UNKNOWN", f"PartitionName=ember Nodes={node.split()[0].split('=')[1]} Default=YES "
        "MaxTime=INFINITE State=UP", ""]))
    (folder / "state").mkdir()
    (folder / "spool").mkdir()
    return {"SLURM_CONF": str(folder / "slurm.conf"), "MUNGE": str(munge)}


@pytest.fixture
def slurm(tmp_path_factory):
    """A one-node Slurm for this test, or a skip that says why not."""
    reason = _slurm_unavailable()
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("slurm")
    folder.chmod(0o700)
    paths = _write_config(folder)
    munge = Path(paths.pop("MUNGE"))
    env = dict(os.environ, **paths)
    processes = []
    try:
        subprocess.run(["mungekey", "-c", "-k", str(munge / "munge.key")], check=True, capture_output=True,
                       timeout=20)
        processes.append(_start(["munged", "-F", "-f", f"--socket={munge}/munge.sock",
                                 f"--key-file={munge}/munge.key", f"--pid-file={munge}/munged.pid",
                                 f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed"],
                                folder / "munged.out", env))
        processes.append(_start(["slurmctld", "-D", "-i"], folder / "slurmctld.log", env))
        processes.append(_start(["slurmd", "-D"], folder / "slurmd.log", env))
        deadline = time.monotonic() + 30
        while True:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env, timeout=10)
            if state.stdout.strip() == "idle":
                break
            dead = [p.args[0] for p in processes if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "; ".join(f"{name}: {(folder / name).read_text()[-300:]!r}"
                                 for name in ("slurmctld.log", "slurmd.log") if (folder / name).exists())
                pytest.skip(f"the test Slurm did not come up ({', '.join(dead) or 'timeout'} ; sinfo "
                            f"{state.stdout.strip() or state.stderr.strip()!r}); {logs}")
            time.sleep(0.3)
        yield env
    finally:
        subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True, timeout=10, check=False)
        _stop(processes)


def _wait_for_job(job: str, env: dict[str, str], timeout: float) -> str:
    """`scontrol show job` once the job has ended (cancelled past `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=env, timeout=10)
        if not re.search(r"JobState=(PENDING|RUNNING|CONFIGURING|COMPLETING)\b", shown.stdout):
            return shown.stdout
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job], env=env, capture_output=True, timeout=10)
            pytest.fail(f"the Slurm job did not finish within {timeout} s:\n{shown.stdout}")
        time.sleep(0.5)


@pytest.mark.slow
def test_sbatch_example_runs_tiny_on_a_real_slurm(slurm, tmp_path):
    """examples/slurm/pretrain_llama2_7b.sbatch (seed 000, TP=1 PP=2), submitted as written with
    EMBER_TINY=1 on one machine as two tasks: each task's `ember launch` is one node of a two-node
    job (its rank from SLURM_PROCID, the master from the node list); the two pipeline stages train
    on the two "nodes" together to the end."""
    out = tmp_path / "slurm"
    out.mkdir()
    env = dict(slurm, PATH=BIN + os.pathsep + os.environ.get("PATH", ""), EMBER_TINY="1", EMBER_TINY_ITERS="3",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               MASTER_PORT=str(free_port()))
    for name in ("NNODES", "NODE_RANK", "MASTER_ADDR", "GPUS_PER_NODE", "WORLD_SIZE", "RANK"):
        env.pop(name, None)
    started = time.monotonic()
    submitted = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0",
                                f"--chdir={out}", f"--output={out}/slurm-%j.out", "--time=3",
                                "examples/slurm/pretrain_llama2_7b.sbatch"],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    state = _wait_for_job(job, env, timeout=150)  # (sbatch --wait polls at up to 32 s intervals)
    outputs = "\n".join(p.read_text() for p in out.glob("slurm-*.out"))
    assert "JobState=COMPLETED" in state and "ExitCode=0:0" in state, f"{state}\n{outputs[-4000:]}"
    print(f"real Slurm job: {time.monotonic() - started:.1f} s")
    assert "node 0/2 (slurm), 1 process(es) here, world size 2" in outputs, outputs
    assert "node 1/2 (slurm), 1 process(es) here, world size 2" in outputs, outputs
    assert f"master {socket.gethostname()}:" in outputs
    train, _ = read_metrics(out / "ckpt" / "llama-2-7b")  # the example's --save folder
    assert sorted(train) == [1, 2, 3]
    assert (out / "logs" / "worker_0.log").is_file() and (out / "logs" / "worker_1.log").is_file()
    state = (out / "ckpt" / "llama-2-7b" / "latest").read_text().strip()
    assert state == "iter_0000003"
