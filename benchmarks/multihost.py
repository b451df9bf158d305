"""Multi-process checkpointing and evaluation, against one process, on local CPU processes.

  python benchmarks/multihost.py [--processes=1,2,4] [--params_millions=12] [--repeats=3]

For each process count P (one CPU device per process, jax.distributed over gloo on 127.0.0.1):

* **checkpoint**: save and restore time of a BN-Inception-sized train state through
  :class:`dmljax.checkpoint.Checkpointer` (what the trainer uses): ``params_millions`` million
  float32 parameters, their two Adam moments, the proximal anchor and the best copy (5 copies,
  about 240 MB at 12 M), replicated over the mesh as the trainer holds it;
* **evaluation**: MAP@R, R-precision and P@1 of an SOP-sized test set (60,502 x 128 float32
  embeddings, 11,316 classes) with :func:`dmljax.metrics.retrieval_metrics`, its queries sharded
  over every device of every process.

Every process runs the same code; process 0 prints. P = 1 is the reference, measured in the
same run. On one machine the processes share its cores, so this measures the overhead of the
multi-process paths (coordination, gathering the neighbour lists, Orbax's multi-process save),
not a speed-up.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOP_TEST, SOP_CLASSES, DIM = 60502, 11316, 128


def _state(params_millions: float):
  """A pytree of five float32 copies of a ``params_millions`` M parameter set, in 20 leaves."""
  n = int(params_millions * 1e6) // 4
  rng = np.random.default_rng(0)
  leaf = lambda: rng.standard_normal(n, dtype=np.float32)
  return {part: {f"w{i}": leaf() for i in range(4)}
          for part in ("params", "mu", "nu", "anchor", "best")}


def _worker(pid: int, nproc: int, port: int, args, out_path: str):
  import jax  # pylint: disable=g-import-not-at-top
  if nproc > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc,
                               process_id=pid)
  sys.path.insert(0, ROOT)
  from dmljax import checkpoint, metrics, parallel  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh()
  result = {"processes": nproc, "devices": jax.device_count()}

  # ------------------------------------------------------------------- checkpoint
  state = parallel.replicate(_state(args.params_millions), mesh)
  nbytes = sum(x.size * 4 for x in jax.tree.leaves(state))
  saves, restores = [], []
  for r in range(args.repeats):
    workdir = os.path.join(args.tmp, f"ckpt_{nproc}_{r}")
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=1, save_best=False)
    multihost_utils.sync_global_devices("before save")
    t0 = time.perf_counter()
    ckpt.save(1, state, {"step": 1})
    multihost_utils.sync_global_devices("after save")
    saves.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    restored, _ = ckpt.restore(state)
    jax.block_until_ready(restored)
    multihost_utils.sync_global_devices("after restore")
    restores.append(time.perf_counter() - t0)
    ckpt.close()
  result.update(state_mb=nbytes / 2**20, save_s=float(np.median(saves)),
                restore_s=float(np.median(restores)))

  # ------------------------------------------------------------------- evaluation
  rng = np.random.default_rng(1)
  labels = rng.integers(0, SOP_CLASSES, SOP_TEST)
  centres = rng.standard_normal((SOP_CLASSES, DIM)).astype(np.float32)
  emb = centres[labels] + 1.5 * rng.standard_normal((SOP_TEST, DIM)).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  metrics.retrieval_metrics(emb[:4096], labels[:4096])  # compile the small shapes once
  times, m = [], None
  for _ in range(args.repeats):
    multihost_utils.sync_global_devices("before eval")
    t0 = time.perf_counter()
    m = metrics.retrieval_metrics(emb, labels)
    times.append(time.perf_counter() - t0)
  result.update(eval_s=float(np.median(times)), eval_first_s=times[0],
                map_at_r=m["map_at_r"])
  if pid == 0:
    with open(out_path, "w") as f:
      json.dump(result, f)
  if nproc > 1:
    jax.distributed.shutdown()


def _run(nproc: int, args) -> dict:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  out = os.path.join(args.tmp, f"result_{nproc}.json")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--tmp", args.tmp,
         "--params_millions", str(args.params_millions), "--repeats", str(args.repeats)]
  procs = [subprocess.Popen(cmd + ["--pid", str(i), "--nproc", str(nproc), "--port", str(port),
                                   "--out", out], env=env) for i in range(nproc)]
  for p in procs:
    if p.wait() != 0:
      raise SystemExit(f"worker failed with exit code {p.returncode}")
  with open(out) as f:
    return json.load(f)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--processes", default="1,2,4")
  ap.add_argument("--params_millions", type=float, default=12.0)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--tmp", default=None)
  ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--pid", type=int, default=0, help=argparse.SUPPRESS)
  ap.add_argument("--nproc", type=int, default=1, help=argparse.SUPPRESS)
  ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
  ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.worker:
    _worker(args.pid, args.nproc, args.port, args, args.out)
    return
  with tempfile.TemporaryDirectory() as tmp:
    args.tmp = tmp
    rows = [_run(int(p), args) for p in args.processes.split(",")]
  ref = rows[0]
  print(f"\nmachine: {os.cpu_count()} CPU cores; one CPU device per process; "
        f"reference: the {ref['processes']}-process row, same run")
  print(f"{'processes':>9} {'state MB':>9} {'save s':>8} {'restore s':>10} "
        f"{'eval s':>8} {'eval vs ref':>11} {'MAP@R':>8}")
  for r in rows:
    print(f"{r['processes']:>9} {r['state_mb']:>9.0f} {r['save_s']:>8.2f} "
          f"{r['restore_s']:>10.2f} {r['eval_s']:>8.2f} {r['eval_s'] / ref['eval_s']:>10.2f}x "
          f"{r['map_at_r']:>8.4f}")
  same = all(abs(r["map_at_r"] - ref["map_at_r"]) < 1e-6 for r in rows)
  print(f"MAP@R identical across process counts: {same}")


if __name__ == "__main__":
  main()
