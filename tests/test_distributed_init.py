"""Multi-process start-up (dmljax.distributed): flag checks, cluster detection, a 2-process run.

The detection tests use fake environment dicts and never initialise anything; the last test
trains ``configs/digits_ccp.py:small`` for two steps as two processes (jax.distributed over
127.0.0.1, gloo) sharing one workdir.
"""
import json
import os
import socket
import subprocess
import sys

import pytest

from dmljax import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_TPU = {"tpu_count": lambda: 0}


def _plan(*args, env=None, **kwargs):
  return distributed.plan(*args, env={} if env is None else env, **{**NO_TPU, **kwargs})


def _slurm(ntasks, procid=0, **extra):
  env = {"SLURM_JOB_ID": "123456", "SLURM_STEP_NODELIST": "gpu[017-020]",
         "SLURM_NTASKS": str(ntasks), "SLURM_PROCID": str(procid), "SLURM_LOCALID": "0",
         "SLURM_STEP_NUM_TASKS": str(ntasks)}
  env.update(extra)
  return env


# ============================================================================= flags


@pytest.mark.parametrize("kwargs, match", [
    ({"process_id": 0}, "--process_id needs --num_processes"),
    ({"coordinator_address": "10.0.0.1:1234"}, "--coordinator_address needs --num_processes"),
    ({"num_processes": 2, "process_id": 2, "coordinator_address": "h:1"}, r"in 0\.\.1"),
    ({"num_processes": 2, "process_id": -1, "coordinator_address": "h:1"}, r"in 0\.\.1"),
    ({"num_processes": 2, "process_id": 0}, "needs --coordinator_address"),
    ({"num_processes": 2, "coordinator_address": "h:1"}, "needs --process_id"),
    ({"num_processes": 0}, "must be >= 1"),
    ({"num_processes": 2, "process_id": 0, "coordinator_address": "nohost"}, "HOST:PORT"),
    ({"num_processes": 2, "process_id": 0, "coordinator_address": "h:99999"}, "HOST:PORT"),
    ({"num_processes": 2, "process_id": 0, "coordinator_address": "h:1", "mode": "off"},
     "contradicts --distributed=off"),
    ({"mode": "sometimes"}, "expected one of auto, on, off"),
    ({"local_device_ids": "0,x"}, "comma-separated device numbers"),
    ({"local_device_ids": "1,1"}, "distinct"),
])
def test_inconsistent_flags_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _plan(**kwargs)


@pytest.mark.parametrize("flags, message", [
    (["--process_id=1"], "--process_id needs --num_processes"),
    (["--num_processes=2", "--process_id=0"], "--num_processes=2 needs --coordinator_address"),
    (["--num_processes=2", "--process_id=2", "--coordinator_address=127.0.0.1:1"],
     "--process_id=2 must be in 0..1"),
])
def test_main_reports_bad_flags_in_one_line(tmp_path, flags, message):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DMLJAX_"))}
  r = subprocess.run([sys.executable, "-m", "dmljax.main", "--config=configs/digits_ccp.py:small",
                      f"--workdir={tmp_path / 'run'}", *flags], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 2
  error, hint = r.stderr.splitlines()  # one line of error, one pointing at --verbose
  assert error.startswith(f"python -m dmljax.main: error: {message}"), error
  assert "--verbose" in hint
  assert not (tmp_path / "run").exists()  # refused before anything started


def test_explicit_flags_and_env_defaults():
  p = _plan("127.0.0.1:1234", 2, 1, "0,1")
  assert p == distributed.Plan("flags", "127.0.0.1:1234", 2, 1, (0, 1))
  assert p.initialize_kwargs() == {
      "coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1,
      "local_device_ids": [0, 1], "cluster_detection_method": "deactivate"}
  env = {"DMLJAX_COORDINATOR_ADDRESS": "h:5", "DMLJAX_NUM_PROCESSES": "4",
         "DMLJAX_PROCESS_ID": "3"}
  assert _plan(env=env) == distributed.Plan("flags", "h:5", 4, 3)
  assert _plan(process_id=2, env=env).process_id == 2  # a flag wins over its variable
  with pytest.raises(ValueError, match="DMLJAX_NUM_PROCESSES='four' is not an integer"):
    _plan(env={"DMLJAX_NUM_PROCESSES": "four"})
  # One process is a plain run, also with a coordinator given; "off" never initialises.
  assert _plan(num_processes=1) is None
  assert _plan("h:1", 1, 0) is None
  assert _plan(env=_slurm(4), mode="off") is None
  assert _plan(env={"DMLJAX_DISTRIBUTED": "off", **_slurm(4)}) is None


# ============================================================================= detection


def test_no_cluster_no_init():
  assert _plan() is None
  assert _plan(env={"PATH": "/usr/bin", "HOME": "/root"}) is None
  # The real machine running the tests (no SLURM step, no TPU): nothing to initialise.
  real = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DMLJAX_"))}
  assert distributed.plan(env=real) is None


def test_slurm_detection():
  assert _plan(env=_slurm(1)) is None  # srun -n 1
  p = _plan(env=_slurm(2, procid=1))
  # Coordinator: the first node of the step, on jax's port for the job id.
  assert p == distributed.Plan("slurm", f"gpu017:{123456 % 4096 + 61440}", 2, 1)
  assert p.initialize_kwargs()["cluster_detection_method"] == "deactivate"
  assert p.initialize_kwargs()["local_device_ids"] is None  # all devices the task sees
  assert _plan(env=_slurm(4, JAX_COORDINATOR_PORT="7777")).coordinator_address == "gpu017:7777"
  assert _plan(env=_slurm(4, SLURM_STEP_NODELIST="a1,a2")).coordinator_address.startswith("a1:")
  assert _plan(env=_slurm(2), local_device_ids="0").local_device_ids == (0,)
  # The batch script (no srun step) of a 4-task job, or salloc on a login node: one process.
  batch = {k: v for k, v in _slurm(4).items() if not k.startswith("SLURM_STEP_")}
  assert _plan(env=batch) is None
  # Explicit flags win over the SLURM environment.
  assert _plan("h:9", 2, 0, env=_slurm(8)).source == "flags"
  with pytest.raises(ValueError, match="SLURM_PROCID='5' is not in 0..1"):
    _plan(env=_slurm(2, procid=5))


def test_first_slurm_host():
  f = distributed._first_slurm_host  # pylint: disable=protected-access
  assert f("node001") == "node001"
  assert f("node001,host2") == "node001"
  assert f("node[001-0015],host2") == "node001"
  assert f("node[001,007-015],host2") == "node001"
  assert f("gpu[7]") == "gpu7"


def test_tpu_detection():
  env = {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}
  # Not a TPU VM: never initialise, never query metadata.
  assert distributed.tpu_process_count(env, on_tpu_vm=False) == 0
  assert distributed.tpu_process_count(env, on_tpu_vm=True) == 4
  assert distributed.tpu_process_count({**env, "MEGASCALE_NUM_SLICES": "2"}, on_tpu_vm=True) == 8
  assert distributed.tpu_process_count({}, on_tpu_vm=True, gce_worker_count=lambda: 8) == 8
  assert distributed.tpu_process_count({}, on_tpu_vm=True, gce_worker_count=lambda: 1) == 1
  assert distributed.tpu_process_count({"TPU_SKIP_MDS_QUERY": "1"}, on_tpu_vm=True,
                                       gce_worker_count=lambda: 1 / 0) == 1
  # v4-8 (one host): a single process; v4-64 (eight hosts): jax.distributed, jax detects.
  assert _plan(tpu_count=lambda: 1) is None
  p = _plan(tpu_count=lambda: 8)
  assert p == distributed.Plan("tpu", num_processes=8)
  assert "cluster_detection_method" not in p.initialize_kwargs()
  assert _plan(mode="on") == distributed.Plan("jax")


def test_maybe_initialize_single_process_does_nothing():
  import jax  # pylint: disable=g-import-not-at-top
  assert distributed.maybe_initialize(num_processes=1) is False
  assert not jax.distributed.is_initialized()
  assert distributed.is_primary()


# ============================================================================= two processes

_WRITES_HOOK = r"""
import atexit, json, os, runpy, sys
workdir, log = os.path.realpath(sys.argv[1]), sys.argv[2]
writes = set()
def hook(event, args):
  if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) and (
      any(c in str(args[1] or "") for c in "wax+") or (args[2] or 0) & (os.O_WRONLY | os.O_RDWR)):
    path = os.path.realpath(os.fsdecode(args[0]))
  elif event == "os.rename":
    path = os.path.realpath(os.fsdecode(args[1]))
  else:
    return
  if path.startswith(workdir + os.sep):
    writes.add(os.path.relpath(path, workdir))
sys.addaudithook(hook)
atexit.register(lambda: open(log + ".json", "w").write(json.dumps(sorted(writes))))
sys.argv = ["dmljax.main"] + sys.argv[3:]
runpy.run_module("dmljax.main", run_name="__main__", alter_sys=True)
"""


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_process_training_run(tmp_path):
  """Both processes exit 0 with process_count 2; only process 0 writes logs and metrics."""
  workdir = tmp_path / "run"
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONPATH=ROOT)
  for k in list(env):
    if k.startswith(("SLURM_", "DMLJAX_COORDINATOR", "DMLJAX_NUM", "DMLJAX_PROCESS")):
      del env[k]
  args = ["--config=configs/digits_ccp.py:small", f"--workdir={workdir}",
          "--config.total_steps=2", "--config.eval_every_steps=2", "--config.log_every_steps=2",
          "--config.checkpoint.every_steps=2", "--config.progress=False",
          "--config.baselines=()", f"--coordinator_address=127.0.0.1:{port}",
          "--num_processes=2"]
  procs = [subprocess.Popen(
      [sys.executable, "-c", _WRITES_HOOK, str(workdir), str(tmp_path / f"writes{i}"), *args,
       f"--process_id={i}"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=240)[0].decode())
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i}:\n{out[-3000:]}"
    assert f"process {i} of 2, 1 local of 2 devices" in out, out[-3000:]
  assert "map_at_r" in outs[0] and "map_at_r" not in outs[1]  # the final table: process 0 only

  writes = [set(json.loads((tmp_path / f"writes{i}.json").read_text())) for i in range(2)]
  top = [{w.split(os.sep)[0] for w in ws} for ws in writes]
  for name in ("metrics.jsonl", "config.json", "final_metrics.json", "tensorboard"):
    assert name in top[0], sorted(writes[0])
  # Process 1 writes only its part of the (collective) Orbax checkpoints, if anything.
  assert top[1] <= {"checkpoints"}, sorted(writes[1])
  # One event file (process 0's), beside the projector files of the end of the run.
  assert len([f for f in os.listdir(workdir / "tensorboard") if f.startswith("events.")]) == 1
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["kind"] for r in records].count("final") == 1
  final = json.loads((workdir / "final_metrics.json").read_text())
  assert final["step"] == 2
  assert os.path.isdir(workdir / "checkpoints")
