"""Several processes on 127.0.0.1 (jax.distributed over gloo, one CPU device each).

* evaluation across 2 and 4 processes equals one process (queries sharded over every device of
  every process, only the ``[Q, k]`` neighbour lists cross processes);
* a 2-process CCP run equals a 1-process run; killed with SIGKILL (both processes, or one of
  them) and started again it ends with exactly the uninterrupted 2-process metrics;
* SIGTERM to one process only: both save the same step and exit, and the resumed run is exact;
* a checkpoint written by 2 processes restores on 1 process with another device count.

Run as a script (``python tests/test_multihost.py MODE PROCESS_ID NUM_PROCESSES PORT ARGS...``)
it is the worker of these tests.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TIMEOUT = 300


def _config():
  sys.path.insert(0, ROOT)
  from dmljax.configs import base_config, shrink  # pylint: disable=g-import-not-at-top
  c = shrink(base_config())       # CCP on digits: proxies, anchor, Adam, best copy, sampler
  c.batch_size = 20               # 5 classes x 4, 10 rows per process
  c.total_steps = 120
  c.eval_every_steps = 40
  c.log_every_steps = 20
  # Projections end at the evaluations of steps 40, 80 and 120 (k-center over both processes' pool
  # embeddings), so the kills below resume before and across a projection end.
  c.ccp.max_projection_steps = 40
  c.checkpoint.every_steps = 20
  c.checkpoint.max_to_keep = 30
  c.eval_batch_size = 64
  c.baselines = ("untrained",)
  c.progress = False
  return c


def _final(result: dict) -> dict:
  return {k: v for k, v in result.items() if k.startswith(("val/", "test/", "untrained/"))
          or k in ("step", "best_step")}


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices_per_process: int = 1):
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count="
              f"{devices_per_process}", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)


def _start(mode: str, nproc: int, *args: str):
  port = _free_port()
  return [subprocess.Popen([sys.executable, os.path.abspath(__file__), mode, str(i), str(nproc),
                            str(port), *args], env=_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT) for i in range(nproc)]


def _wait(procs, ok=(0,)):
  outs = []
  for p in procs:
    out, _ = p.communicate(timeout=TIMEOUT)
    outs.append(out.decode())
    assert p.returncode in ok, f"exit {p.returncode}:\n{outs[-1][-4000:]}"
  return outs


def _wait_for(path: str, procs, timeout: float = TIMEOUT):
  t0 = time.time()
  while not os.path.exists(path):
    if any(p.poll() is not None for p in procs):
      raise AssertionError(f"a worker exited before {path} appeared: "
                           f"{[p.poll() for p in procs]}")
    if time.time() - t0 > timeout:
      raise AssertionError(f"{path} did not appear in {timeout} s")
    time.sleep(0.01)


def _ckpt(workdir, step):
  return os.path.join(workdir, "checkpoints", str(step))


# ----------------------------------------------------------------------------- evaluation


def _eval_inputs():
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(203, 8)).astype(np.float32)
  labels = rng.integers(0, 17, size=203)
  gallery = rng.normal(size=(150, 8)).astype(np.float32)
  g_labels = rng.integers(0, 17, size=150)
  return emb, labels, gallery, g_labels


def _eval_metrics():
  from dmljax import metrics  # pylint: disable=g-import-not-at-top
  emb, labels, gallery, g_labels = _eval_inputs()
  ks = dict(recall_ks=(1, 2, 50), precision_ks=(5,), map_ks=(10,), ndcg_ks=(10,))
  same = metrics.retrieval_metrics(emb, labels, query_block=32, **ks)
  qg = metrics.retrieval_metrics(emb, labels, gallery_embeddings=gallery,
                                 gallery_labels=g_labels, query_block=32, **ks)
  return {"same": same, "query_gallery": qg}


@pytest.mark.parametrize("nproc", [2, 4])
def test_evaluation_across_processes_equals_one_process(nproc, tmp_path):
  out = tmp_path / "metrics.json"
  _wait(_start("eval", nproc, str(out)))
  got = json.loads(out.read_text())
  want = _eval_metrics()
  for mode in want:
    assert got[mode].keys() == want[mode].keys()
    for k, v in want[mode].items():
      assert got[mode][k] == pytest.approx(v, abs=1e-6), (mode, k)


# ----------------------------------------------------------------------------- input pipeline


def _pipeline_batches(data_dir):
  """The first 3 training batches of a CUB-like run as the trainer builds its loader."""
  from dmljax import frameworks, train  # pylint: disable=g-import-not-at-top
  from dmljax.configs import ccp_paper_config  # pylint: disable=g-import-not-at-top
  c = ccp_paper_config("cub", "small")
  c.dataset.data_dir, c.batch_size = data_dir, 8
  data = train.create_input(c)
  fw = frameworks.get_framework(c, num_classes=data.num_classes,
                                embedding_dim=c.model.embedding_dim)
  sampler = train.make_sampler(c, fw, data.train_labels)
  with train.make_train_loader(c, data, fw, sampler, 0) as loader:
    return [(idx.tolist(), images.tolist()) for _, images, idx in
            (next(loader) for _ in range(3))]


def test_two_processes_read_disjoint_halves_of_the_global_batch(tmp_path):
  sys.path.insert(0, HERE)
  import tinydata  # pylint: disable=g-import-not-at-top
  data_dir = tinydata.prepare_tiny("cub", str(tmp_path / "cub"))
  outs = [str(tmp_path / f"p{i}.json") for i in range(2)]
  procs = _start("pipeline", 2, data_dir, str(tmp_path / "p{}.json"))
  _wait(procs)
  halves = [json.loads(open(o).read()) for o in outs]
  whole = _pipeline_batches(data_dir)
  for step in range(3):
    a, b = halves[0][step], halves[1][step]
    assert len(a[0]) == len(b[0]) == 4
    assert not set(a[0]) & set(b[0])                    # disjoint records
    assert a[0] + b[0] == whole[step][0]                # in order: the global batch
    np.testing.assert_array_equal(np.asarray(a[1] + b[1], np.uint8),
                                  np.asarray(whole[step][1], np.uint8))  # same augmentation


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def two_process_reference(tmp_path_factory):
  """The uninterrupted 2-process run (its final metrics and its workdir)."""
  workdir = str(tmp_path_factory.mktemp("mh_ref") / "run")
  out = os.path.join(workdir + "_result.json")
  _wait(_start("train", 2, workdir, out))
  return json.loads(open(out).read()), workdir


def test_two_processes_equal_one_process(two_process_reference, tmp_path):
  from dmljax import train  # pylint: disable=g-import-not-at-top
  ref, workdir = two_process_reference
  c = _config()
  c.num_devices = 2  # the same device count as the 2-process run
  one = train.train_and_evaluate(c, str(tmp_path / "one"))
  assert ref["step"] == one["step"] == 120
  for k, v in _final(one).items():
    assert ref[k] == pytest.approx(v, abs=2e-3), k
  # The projections ended (the 2-process run embedded its pool across processes).
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    ends = [r["ccp/projection"] for r in map(json.loads, f) if "ccp/projection" in r]
  assert ends == [1, 2, 3], ends
  # Only process 0 writes logs, TensorBoard and the config.
  names = sorted(os.listdir(workdir))
  assert {"metrics.jsonl", "config.json", "tensorboard", "checkpoints"} <= set(names), names
  assert not [n for n in names if n.endswith(".tmp") or ".tmp." in n], names


def test_sigkill_both_then_resume_is_exact(two_process_reference, tmp_path):
  ref, _ = two_process_reference
  workdir, out = str(tmp_path / "run"), str(tmp_path / "result.json")
  procs = _start("train", 2, workdir, out)
  _wait_for(_ckpt(workdir, 60), procs)
  for p in procs:
    p.send_signal(signal.SIGKILL)
  _wait(procs, ok=(-signal.SIGKILL, 0))
  assert not os.path.exists(out), "the run finished before it was killed"
  _wait(_start("train", 2, workdir, out))
  assert _final(json.loads(open(out).read())) == _final(ref)


def test_sigkill_one_process_then_resume_is_exact(two_process_reference, tmp_path):
  """Process 1 dies; process 0 is left waiting in a collective (or fails) and is killed too,
  as a scheduler would; the restarted pair resumes exactly."""
  ref, _ = two_process_reference
  workdir, out = str(tmp_path / "run"), str(tmp_path / "result.json")
  procs = _start("train", 2, workdir, out)
  _wait_for(_ckpt(workdir, 40), procs)
  procs[1].send_signal(signal.SIGKILL)
  try:
    procs[0].wait(timeout=5)
  except subprocess.TimeoutExpired:
    procs[0].send_signal(signal.SIGKILL)
  for p in procs:
    p.communicate(timeout=TIMEOUT)
  assert not os.path.exists(out)
  _wait(_start("train", 2, workdir, out))
  assert _final(json.loads(open(out).read())) == _final(ref)


def test_sigterm_on_one_process_saves_the_same_step_everywhere(two_process_reference, tmp_path):
  ref, _ = two_process_reference
  workdir, out = str(tmp_path / "run"), str(tmp_path / "result.json")
  procs = _start("train", 2, workdir, out)
  _wait_for(_ckpt(workdir, 40), procs)
  procs[1].send_signal(signal.SIGTERM)  # only process 1 sees the signal
  outs = _wait(procs)
  steps = [json.loads(o.strip().splitlines()[-1])["preempted_at"] for o in outs]
  assert steps[0] == steps[1] and 40 <= steps[0] < 120, outs
  assert os.path.isdir(_ckpt(workdir, steps[0]))
  _wait(_start("train", 2, workdir, out))
  assert _final(json.loads(open(out).read())) == _final(ref)


def test_two_process_checkpoint_restores_on_one_process_with_other_devices(
    two_process_reference, tmp_path):
  """The finished 2-process run, opened by one process on 4 devices: the restored best
  parameters give the 2-process final metrics (new mesh, resharded on restore)."""
  import shutil  # pylint: disable=g-import-not-at-top
  from dmljax import train  # pylint: disable=g-import-not-at-top
  ref, workdir = two_process_reference
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  # Without its final metrics the finished run is not "already finished": it restores its last
  # checkpoint (step 120, nothing left to train) and the best parameters, and evaluates again.
  os.remove(os.path.join(copy, "final_metrics.json"))
  c = _config()
  c.num_devices = 4
  again = train.train_and_evaluate(c, copy)
  assert os.path.isfile(os.path.join(copy, "final_metrics.json"))
  assert again["step"] == 120 and again["best_step"] == ref["best_step"]
  for k, v in _final(ref).items():
    assert again[k] == pytest.approx(v, abs=2e-3), k


# ----------------------------------------------------------------------------- worker


def _worker(mode, pid, nproc, port, args):
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_default_matmul_precision", "highest")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc,
                             process_id=pid)
  assert jax.process_count() == nproc and jax.device_count() == nproc
  if mode == "pipeline":
    with open(args[1].format(pid), "w") as f:
      json.dump(_pipeline_batches(args[0]), f)
  elif mode == "eval":
    result = _eval_metrics()
    if pid == 0:
      with open(args[0], "w") as f:
        json.dump(result, f)
  else:
    from dmljax import train  # pylint: disable=g-import-not-at-top
    workdir, out = args
    result = train.train_and_evaluate(_config(), workdir)
    if result.get("preempted"):
      print(json.dumps({"preempted_at": result["step"]}), flush=True)
    elif pid == 0:
      tmp = out + ".tmp"
      with open(tmp, "w") as f:
        json.dump({k: v for k, v in result.items() if k != "table"}, f)
      os.replace(tmp, out)
  jax.distributed.shutdown()


if __name__ == "__main__":
  _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:])
