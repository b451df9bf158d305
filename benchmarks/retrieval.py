"""Retrieval-metric benchmark on a synthetic SOP-sized test set (not a test).

    python benchmarks/retrieval.py                 # 60,502 x 128, 11,316 classes
    python benchmarks/retrieval.py --scale 10 --query_limit 6000 --skip floor,faiss_floor
                                                   # 605,020 x 128 gallery, 6,000 queries
    python benchmarks/retrieval.py --repeats 2 --out /tmp/retrieval.json
    python benchmarks/retrieval.py --scale 0.33 --repeats 3 --skip floor,floor_cores,ours_xla,ours_3
                                                   # quick: 19,966 rows, no 1-device floor

Every measured thing runs in a fresh subprocess, so that its peak resident memory
(``ru_maxrss``) is its own; they run interleaved (floor, ours, PML, floor, ours, ...) because the
machine may be shared. Measured:

* ``ours``: ``dmljax.metrics.retrieval_metrics`` for P@1, R-precision, MAP@R,
  Recall@{1,10,100,1000}, nDCG@{10,100}: wall time of the first call (with compilation) and of a
  second call in the same process; JAX with one CPU device per core
  (:func:`dmljax.kernels.knn.use_cpu_cores_as_devices`, what ``python -m dmljax.evaluate`` does)
  and the kNN's compiled CPU selection (:mod:`dmljax.kernels.native`, built before the timing).
  ``ours_xla``: the same with ``DMLJAX_NATIVE=0`` (pure XLA selection). ``ours_3``: only PML's
  three metrics (P@1, R-precision, MAP@R), like for like, one device per core.
* ``ours_user``: the same nine metrics as a plain library user gets them: the child imports
  ``dmljax.metrics`` and calls ``retrieval_metrics``, nothing else (JAX's default devices: one
  CPU device). ``ours_user_1thread``: the same with ``DMLJAX_NATIVE_THREADS=1``, the compiled
  selection on the calling thread only (how it ran before it used XLA's thread pool).
* floors, the bare matrix product plus top-1 (jitted JAX); the ratios use the fastest of:
  ``floor``, the full reference set per block of 256 queries on one CPU device;
  ``floor_cores``, the same with one device per core; ``floor_blocked``, one device per core and
  references scanned in blocks of 2,048 with a running best (the kNN's own blocking, which XLA's
  CPU matrix product runs faster). Where faiss is installed, also faiss ``IndexFlatL2`` with
  k = 2 (self plus the nearest other).
* ``pml``: pytorch-metric-learning's ``AccuracyCalculator`` (faiss kNN, ``k="max_bin_count"``)
  for P@1, R-precision and MAP@R, plus the differences of those three to ours.

The data: class sizes between 2 and 12 with mean 5.35 (SOP's test split), unit-norm class
centres in 128-d and per-sample Gaussian noise, L2-normalised, so that P@1 is about 0.7.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

# Run from a checkout without installing: the repository root holds the dmljax package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NUM, CLASSES, DIM = 60502, 11316, 128


def make_data(scale: float, seed: int = 0):
  """Synthetic SOP-like embeddings: ``scale`` x 60,502 rows in ``scale`` x 11,316 classes."""
  rng = np.random.default_rng(seed)
  c, n = int(round(CLASSES * scale)), int(round(NUM * scale))
  sizes = 2 + rng.binomial(10, 0.335, size=c)
  # Adjust to the exact total without leaving [2, 12].
  while sizes.sum() != n:
    diff = n - sizes.sum()
    idx = rng.integers(0, c, size=min(abs(diff), c))
    if diff > 0:
      idx = idx[sizes[idx] < 12]
      np.add.at(sizes, np.unique(idx), 1)
    else:
      idx = idx[sizes[idx] > 2]
      np.add.at(sizes, np.unique(idx), -1)
  labels = np.repeat(np.arange(c), sizes)
  labels = labels[rng.permutation(n)]
  centres = rng.standard_normal((c, DIM)).astype(np.float32)
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  x = centres[labels] + 0.13 * rng.standard_normal((n, DIM)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x.astype(np.float32), labels.astype(np.int64)


def _peak_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_ours(path: str, query_limit: int = 0, same_as_pml: bool = False) -> dict:
  """All nine metrics; with ``same_as_pml`` only PML's three (P@1, R-precision, MAP@R), like for like."""
  from dmljax.metrics import retrieval_metrics
  data = np.load(path)
  x, y = data["x"], data["y"]
  kwargs = {}
  if query_limit:  # query/gallery split: the first rows query the rest
    x, y, kwargs = x[:query_limit], y[:query_limit], dict(gallery_embeddings=x[query_limit:],
                                                          gallery_labels=y[query_limit:])
  import jax
  from dmljax.kernels import native
  base = _peak_mb()
  out = {"devices": len(jax.devices()), "native": native.available()}
  for name in ("cold", "warm"):
    t0 = time.perf_counter()
    if same_as_pml:  # the search depth is then PML's max_bin_count (R_max = 11 here)
      m = retrieval_metrics(x, y, recall_ks=(1,), **kwargs)
    else:
      m = retrieval_metrics(x, y, recall_ks=(1, 10, 100, 1000), ndcg_ks=(10, 100), **kwargs)
    out[f"wall_s_{name}"] = time.perf_counter() - t0
  out["metrics"] = m
  out["peak_mb_after_load"] = base
  return out


def run_user(path: str, query_limit: int = 0) -> dict:
  """The nine metrics exactly as a library user's script computes them: no set-up at all."""
  data = np.load(path)
  x, y = data["x"], data["y"]
  kwargs = {}
  if query_limit:
    x, y, kwargs = x[:query_limit], y[:query_limit], dict(gallery_embeddings=x[query_limit:],
                                                          gallery_labels=y[query_limit:])
  base = _peak_mb()
  from dmljax.metrics import retrieval_metrics
  out = {}
  for name in ("cold", "warm"):
    t0 = time.perf_counter()
    m = retrieval_metrics(x, y, recall_ks=(1, 10, 100, 1000), ndcg_ks=(10, 100), **kwargs)
    out[f"wall_s_{name}"] = time.perf_counter() - t0
  import jax
  from dmljax.kernels import native
  out.update(devices=len(jax.devices()), native=native.available(), metrics=m,
             peak_mb_after_load=base)
  return out


def run_plain(path: str, symmetric: bool = True) -> dict:
  """``retrieval_metrics(embeddings, labels)`` with its defaults, as issue 22 times it: one call
  on a small slice first (builds the compiled kernels, compiles small shapes), then the timed
  call on the full set (its compilation included). ``symmetric=False``: the same with the
  kNN's per-query-block path (no same-set symmetry) for comparison."""
  data = np.load(path)
  x, y = data["x"], data["y"]
  base = _peak_mb()
  from dmljax.kernels import knn as knn_lib
  from dmljax.metrics import retrieval_metrics
  if not symmetric:
    knn_lib.MAX_SYMMETRIC_STATE = -1
  retrieval_metrics(x[:2000], y[:2000])
  t0 = time.perf_counter()
  m = retrieval_metrics(x, y)
  out = {"wall_s_cold": time.perf_counter() - t0, "metrics": m, "peak_mb_after_load": base,
         "load": os.getloadavg()[0]}
  return out


def _time_cold_warm(call, num_devices: int) -> dict:
  """Wall time of a jitted call, first (with compilation) and second."""
  import jax
  out = {"peak_mb_after_load": _peak_mb(), "devices": num_devices}
  for name in ("cold", "warm"):
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    out[f"wall_s_{name}"] = time.perf_counter() - t0
  return out


def run_floor(path: str) -> dict:
  """Blocked matrix product plus top-1 per query, query blocks sharded over all devices."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, PartitionSpec as P
  data = np.load(path)
  x = data["x"]
  qb = 256
  n = x.shape[0]
  devices = jax.devices()
  pad = -(-n // (qb * len(devices))) * qb * len(devices)
  q = jnp.asarray(np.pad(x, ((0, pad - n), (0, 0)))).reshape(-1, qb, x.shape[1])
  r = jnp.asarray(x)
  half = -0.5 * jnp.sum(r * r, axis=1)

  def body(q, r, half):
    return jax.lax.map(lambda b: jnp.argmax(b @ r.T + half, axis=1), q)

  top1 = jax.jit(jax.shard_map(body, mesh=Mesh(np.asarray(devices), ("q",)),
                               in_specs=(P("q"), P(), P()), out_specs=P("q"), check_vma=False))
  return _time_cold_warm(lambda: top1(q, r, half), len(devices))


def run_floor_blocked(path: str) -> dict:
  """Matrix product plus top-1 scanned in 2,048-reference blocks (the kNN's own blocking, which
  XLA's CPU matmul runs faster than one product against all references), with a running best."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, PartitionSpec as P
  data = np.load(path)
  x = data["x"]
  qb, rb = 512, 2048
  n = x.shape[0]
  devices = jax.devices()
  pad = -(-n // (qb * len(devices))) * qb * len(devices)
  q = jnp.asarray(np.pad(x, ((0, pad - n), (0, 0)))).reshape(-1, qb, x.shape[1])
  n_ref = -(-n // rb) * rb
  r = jnp.asarray(np.pad(x, ((0, n_ref - n), (0, 0))))
  half = -0.5 * jnp.sum(r * r, axis=1)
  half = jnp.where(jnp.arange(n_ref) < n, half, -jnp.inf)

  def block(b):
    def step(j, carry):
      best, arg = carry
      rj = jax.lax.dynamic_slice_in_dim(r, j * rb, rb)
      s = b @ rj.T + jax.lax.dynamic_slice_in_dim(half, j * rb, rb)
      m, a = s.max(axis=1), jnp.argmax(s, axis=1) + j * rb
      return jnp.where(m > best, m, best), jnp.where(m > best, a, arg)
    init = (jnp.full((qb,), -jnp.inf), jnp.zeros((qb,), jnp.int32))
    return jax.lax.fori_loop(0, n_ref // rb, step, init)[1]

  top1 = jax.jit(jax.shard_map(lambda q: jax.lax.map(block, q),
                               mesh=Mesh(np.asarray(devices), ("q",)), in_specs=P("q"),
                               out_specs=P("q"), check_vma=False))
  return _time_cold_warm(lambda: top1(q), len(devices))


def run_faiss_floor(path: str) -> dict:
  import faiss
  x = np.load(path)["x"]
  out = {"peak_mb_after_load": _peak_mb()}
  t0 = time.perf_counter()
  index = faiss.IndexFlatL2(x.shape[1])
  index.add(x)
  index.search(x, 2)  # self plus the nearest other
  out["wall_s_cold"] = time.perf_counter() - t0
  return out


def run_pml(path: str) -> dict:
  import torch
  torch.set_num_threads(int(os.environ.get("PML_TORCH_THREADS", "2")))
  from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
  data = np.load(path)
  x, y = data["x"], data["y"]
  out = {"peak_mb_after_load": _peak_mb()}
  calc = AccuracyCalculator(include=("precision_at_1", "r_precision",
                                     "mean_average_precision_at_r"),
                            k="max_bin_count", device=torch.device("cpu"))
  t0 = time.perf_counter()
  m = calc.get_accuracy(x, y)
  out["wall_s_cold"] = time.perf_counter() - t0
  out["metrics"] = m
  return out


#: Children that run JAX with one XLA CPU device per core (the others use JAX's default, one).
PER_CORE = ("ours", "ours_xla", "ours_3", "floor_cores", "floor_blocked")
#: Floors: the bare matrix product plus top-1, three ways; ratios use the fastest.
FLOORS = ("floor", "floor_cores", "floor_blocked")
OURS = ("ours", "ours_xla", "ours_user", "ours_user_1thread", "ours_3", "ours_plain",
        "ours_plain_asym")


def _measure(what: str, path: str, python: str, query_limit: int = 0) -> dict:
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
    res_path = f.name
  cmd = [python, __file__, "--child", what, "--data", path, "--result", res_path,
         "--query_limit", str(query_limit)]
  env = dict(os.environ)
  if what == "ours_xla":  # the kNN's pure XLA path, without the compiled CPU selection
    env["DMLJAX_NATIVE"] = "0"
  if what == "ours_user_1thread":  # the compiled selection without XLA's thread pool
    env["DMLJAX_NATIVE_THREADS"] = "1"
  load_before = os.getloadavg()
  t0 = time.perf_counter()
  subprocess.run(cmd, check=True, env=env)
  with open(res_path) as f:
    res = json.load(f)
  os.unlink(res_path)
  res["process_wall_s"] = time.perf_counter() - t0
  res["loadavg_before"], res["loadavg_after"] = load_before, os.getloadavg()
  return res


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--scale", type=float, default=1,
                 help="rows = scale x 60,502 (e.g. 0.33 for a quick run, 10 with --query_limit)")
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--skip", default="",
                 help="comma list of: ours,ours_xla,ours_user,ours_user_1thread,ours_3,floor,"
                      "floor_cores,floor_blocked,faiss_floor,pml")
  p.add_argument("--query_limit", type=int, default=0,
                 help="ours only: the first N rows query the others (gallery mode), to show "
                      "memory at --scale 10 without the hours a full same-set pass takes")
  p.add_argument("--out", default=None)
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  p.add_argument("--data", default=None, help=argparse.SUPPRESS)
  p.add_argument("--result", default=None, help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if a.child:
    if a.child in PER_CORE:
      from dmljax.kernels.knn import use_cpu_cores_as_devices
      assert use_cpu_cores_as_devices()
    fn = {"ours": lambda path: run_ours(path, a.query_limit),
          "ours_xla": lambda path: run_ours(path, a.query_limit),
          "floor_blocked": run_floor_blocked,
          "ours_user": lambda path: run_user(path, a.query_limit),
          "ours_user_1thread": lambda path: run_user(path, a.query_limit),
          "ours_plain": run_plain,
          "ours_plain_asym": lambda path: run_plain(path, symmetric=False),
          "floor_cores": run_floor,
          "ours_3": lambda path: run_ours(path, a.query_limit, same_as_pml=True),
          "floor": run_floor,
          "faiss_floor": run_faiss_floor,
          "pml": run_pml}[a.child]
    res = fn(a.data)
    res["peak_mb"] = _peak_mb()
    with open(a.result, "w") as f:
      json.dump(res, f)
    return

  from dmljax.kernels import native
  try:  # build (or find) the compiled kNN selection once, outside every timing
    print(f"compiled CPU kNN kernel: {native.build_library()}", flush=True)
  except native.NativeBuildError as e:
    print(f"compiled CPU kNN kernel unavailable, ours uses the XLA path: {e}", flush=True)
  x, y = make_data(a.scale)
  tmp = tempfile.mkdtemp()
  path = os.path.join(tmp, "data.npz")
  np.savez(path, x=x, y=y)
  print(f"data: {x.shape[0]} x {x.shape[1]}, {len(np.unique(y))} classes, "
        f"mean class size {x.shape[0] / len(np.unique(y)):.2f}, cpus {os.cpu_count()}", flush=True)
  things = ["floor", "floor_cores", "floor_blocked", "ours", "ours_user", "ours_user_1thread",
            "ours_xla", "ours_3", "ours_plain", "ours_plain_asym"]
  # Optional extras, looked up without importing them here.
  if importlib.util.find_spec("faiss"):
    things.insert(1, "faiss_floor")
    if a.scale == 1 and all(importlib.util.find_spec(m)
                            for m in ("torch", "pytorch_metric_learning")):
      things.append("pml")
  things = [t for t in things if t not in a.skip.split(",")]
  results = {t: [] for t in things}
  for rep in range(a.repeats):
    for t in things:
      r = _measure(t, path, sys.executable, a.query_limit)
      results[t].append(r)
      walls = {k: round(v, 2) for k, v in r.items() if k.startswith("wall_s")}
      tag = {True: " native", False: " xla"}.get(r.get("native"), "")
      print(f"[{rep}] {t:13s}{tag} {walls} peak {r['peak_mb']:.0f} MB "
            f"(after load {r['peak_mb_after_load']:.0f} MB) load avg before "
            f"{'/'.join(f'{v:.2f}' for v in r['loadavg_before'])} after "
            f"{'/'.join(f'{v:.2f}' for v in r['loadavg_after'])}", flush=True)
  summary = {}
  for t, rs in results.items():
    key = "wall_s_warm" if "wall_s_warm" in rs[0] else "wall_s_cold"
    summary[t] = {"wall_s_best": min(r[key] for r in rs),
                  "wall_s_cold_best": min(r["wall_s_cold"] for r in rs),
                  "peak_mb_max": max(r["peak_mb"] for r in rs)}
  floors = [summary[t]["wall_s_best"] for t in FLOORS if t in summary]
  for t in OURS:
    if t in summary and floors:
      summary[t]["x_floor"] = summary[t]["wall_s_best"] / min(floors)
    if t in summary and "pml" in summary:
      summary[t]["x_pml"] = summary[t]["wall_s_best"] / summary["pml"]["wall_s_best"]
  # Ratios within each repeat (things measured back to back), robust to a machine whose load drifts.
  def wall(t, i):
    r = results[t][i]
    return r.get("wall_s_warm", r["wall_s_cold"])
  summary["per_repeat"] = []
  for i in range(a.repeats):
    row = {}
    fl = [wall(t, i) for t in FLOORS if t in results]
    for t in OURS:
      if t in results and fl:
        row[f"{t}_x_floor"] = round(wall(t, i) / min(fl), 3)
      if t in results and "pml" in results:
        row[f"{t}_x_pml"] = round(wall(t, i) / wall("pml", i), 3)
      if t in results and t != "ours" and "ours" in results:
        row[f"{t}_x_ours"] = round(wall(t, i) / wall("ours", i), 3)
    summary["per_repeat"].append(row)
  if "ours" in results:
    summary["ours_metrics"] = results["ours"][0]["metrics"]
  mine = next((t for t in ("ours", "ours_user", "ours_plain") if t in results), None)
  if "pml" in results and mine:
    pm, om = results["pml"][0]["metrics"], results[mine][0]["metrics"]
    summary["pml_metrics"] = pm
    summary["abs_diff_vs_pml"] = {
        "precision_at_1": abs(pm["precision_at_1"] - om["precision_at_1"]),
        "r_precision": abs(pm["r_precision"] - om["r_precision"]),
        "map_at_r": abs(pm["mean_average_precision_at_r"] - om["map_at_r"])}
  print(json.dumps(summary, indent=1))
  # The plain library call beside the command line's set-up (one device per core), per repeat.
  for i, row in enumerate(summary["per_repeat"]):
    parts = [f"{k} {v:.2f}" for k, v in row.items() if k.startswith(("ours_user", "ours_plain"))]
    if parts:
      print(f"[{i}] " + ", ".join(parts))
  if a.out:
    with open(a.out, "w") as f:
      json.dump({"summary": summary, "runs": results}, f, indent=1)


if __name__ == "__main__":
  main()
