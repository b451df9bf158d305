"""Loss benchmark: jitted forward + backward of dmljax losses, against PML where installed.

Run (a few minutes on a 2-core CPU)::

    python benchmarks/losses.py [--repeats 7] [--only proxy_anchor,...] [--single-thread]

Cases (unit-norm float32 inputs, D = 128; the numbers are recorded in docs/benchmarks_losses.md):

* ``multi_similarity``: B = 256, the batch as its own reference set.
* ``proxy_anchor``: B = 256 against 45,272 proxies (SOP: 11,318 classes x 4 proxies).
* ``soft_triple``: B = 256 against 98 classes x 10 centres, with the centre regulariser.
* ``contrastive``: B = 256 against an 8,192-slot cross-batch memory (``ref_mask`` all set;
  the memory is a constant, as in XBM, so only the embeddings get a gradient).

Each timing is the median of ``--repeats`` runs after a warm-up (the JAX compile is excluded),
with ``block_until_ready`` for JAX. PML (pytorch-metric-learning, the optional ``bench``
extra) runs its loss with its default configuration on the same inputs in the same process,
with ``torch.set_num_threads`` set to the number of CPU threads XLA uses (one per core, or one
with ``--single-thread``, which also restricts XLA to one thread). The JAX and PML runs of a
case alternate (JAX, PML, JAX, PML, ...) so that both see the same machine load: on a shared
machine the load changes within seconds, and timing one after the other skewed the ratio.
For every JAX case the compiled HLO is scanned for any buffer with ``B x refs x D`` elements or
more, which would mean a difference tensor was formed instead of matrix products.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dmljax import losses as L  # noqa: E402

D = 128
B = 256


def _unit(rng, n, d=D):
  x = rng.normal(size=(n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_cases(seed=0):
  """name -> (jax loss kwargs builder, dict of numpy inputs, pml builder, grad wrt refs?)."""
  rng = np.random.default_rng(seed)
  cases = {}

  # Batch sampled as 64 classes x 4 (the usual m-per-class sampler).
  x = _unit(rng, B)
  y = np.repeat(np.arange(B // 4), 4).astype(np.int32)
  cases["multi_similarity"] = dict(
      x=x, y=y, refs=None, hp={}, grad_refs=False, num_refs=B,
      pml=lambda losses, n: losses.MultiSimilarityLoss(),
      note="B=256 (64 classes x 4), no references")

  classes, k = 11318, 4
  p = _unit(rng, classes * k)
  py = np.repeat(np.arange(classes), k).astype(np.int32)
  yb = rng.choice(classes, size=B // 4, replace=False).repeat(4).astype(np.int32)
  cases["proxy_anchor"] = dict(
      x=_unit(rng, B), y=yb, refs=(p, py, None), hp={}, grad_refs=True, num_refs=classes * k,
      # PML keeps one proxy per class: same work with 45,272 "classes" and the label of each
      # sample pointing at the first proxy of its class.
      pml=lambda losses, n: losses.ProxyAnchorLoss(n, D), pml_labels=yb * k,
      # The value PML computes is dmljax's with those one-proxy-per-class labels.
      equiv=(yb * k, np.arange(classes * k, dtype=np.int32)),
      note="B=256 vs 45,272 proxies (11,318 classes x 4)")

  classes, k = 98, 10
  p = _unit(rng, classes * k)
  py = np.repeat(np.arange(classes), k).astype(np.int32)
  cases["soft_triple"] = dict(
      x=_unit(rng, B), y=rng.integers(0, classes, size=B).astype(np.int32), refs=(p, py, None),
      hp={"centers_per_class": k}, grad_refs=True, num_refs=classes * k,
      pml=lambda losses, n: _pml_soft_triple(losses, classes, k),
      note="B=256 vs 98 classes x 10 centres, regulariser weight 0.2")

  slots = 8192
  mem = _unit(rng, slots)
  mem_y = rng.integers(0, 1000, size=slots).astype(np.int32)
  cases["contrastive"] = dict(
      x=_unit(rng, B), y=rng.integers(0, 1000, size=B).astype(np.int32),
      refs=(mem, mem_y, np.ones(slots, bool)), hp={}, grad_refs=False, num_refs=slots,
      pml=lambda losses, n: losses.ContrastiveLoss(pos_margin=0.0, neg_margin=1.0),
      note="B=256 vs 8,192-slot memory (ref_mask), gradient w.r.t. embeddings")
  return cases


def _pml_soft_triple(losses, classes, k):
  from pytorch_metric_learning import regularizers
  return losses.SoftTripleLoss(classes, D, centers_per_class=k,
                               weight_regularizer=regularizers.SparseCentersRegularizer(classes, k),
                               weight_reg_weight=0.2)


def median_times(fns, repeats):
  """Median seconds per call of each function, calls interleaved round-robin after a warm-up."""
  for fn in fns:
    fn()  # warm-up (and compile)
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, ts in zip(fns, times):
      t0 = time.perf_counter()
      fn()
      ts.append(time.perf_counter() - t0)
  return [statistics.median(ts) for ts in times]


_SHAPE = re.compile(r"\b(?:f32|bf16|f16|f64|s32|pred)\[([0-9,]*)\]")


def largest_buffer(compiled_text: str) -> int:
  """Element count of the largest array shape anywhere in compiled HLO text."""
  best = 0
  for m in _SHAPE.finditer(compiled_text):
    dims = [int(d) for d in m.group(1).split(",") if d]
    n = int(np.prod(dims)) if dims else 1
    best = max(best, n)
  return best


def prepare_jax(name, case):
  """Compiles a case: (run, compile seconds, largest HLO buffer, value)."""
  fn = L.LOSSES[name]
  hp = case["hp"]
  x, y = jnp.asarray(case["x"]), jnp.asarray(case["y"])
  if case["refs"] is None:
    f = jax.jit(jax.value_and_grad(lambda e, lab: fn(e, lab, **hp)))
    args = (x, y)
  else:
    p, py, mask = case["refs"]
    p, py = jnp.asarray(p), jnp.asarray(py)
    mask = None if mask is None else jnp.asarray(mask)
    if case["grad_refs"]:
      def loss(e, lab, r):
        return fn(e, lab, ref_embeddings=r, ref_labels=py, ref_mask=mask, **hp)
      f = jax.jit(jax.value_and_grad(loss, argnums=(0, 2)))
    else:
      def loss(e, lab, r):
        return fn(e, lab, ref_embeddings=r, ref_labels=py, ref_mask=mask, **hp)
      f = jax.jit(jax.value_and_grad(loss))
    args = (x, y, p)
  t0 = time.perf_counter()
  compiled = f.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  biggest = largest_buffer(compiled.as_text())
  run = lambda: jax.block_until_ready(compiled(*args))  # noqa: E731
  value = float(run()[0])
  if "equiv" in case:  # same inputs under PML's labelling, to compare values with PML
    lab, ref_lab = case["equiv"]
    value = float(jax.jit(lambda e, r: fn(e, jnp.asarray(lab), ref_embeddings=r,
                                          ref_labels=jnp.asarray(ref_lab), **hp))(x, args[2]))
  return run, compile_s, biggest, value


def prepare_pml(case):
  """Builds PML's loss for a case: (run, value)."""
  import torch
  from pytorch_metric_learning import losses
  x = torch.tensor(case["x"], requires_grad=True)
  y = torch.tensor(case.get("pml_labels", case["y"]).astype(np.int64))
  loss_fn = case["pml"](losses, case["num_refs"])
  params = list(loss_fn.parameters())
  if case["refs"] is not None and params:
    p = case["refs"][0]
    if params[0].shape[0] == p.shape[0]:
      params[0].data = torch.tensor(p)
    else:
      params[0].data = torch.tensor(p.T.copy())
  kwargs = {}
  if case["refs"] is not None and not params:
    kwargs = dict(ref_emb=torch.tensor(case["refs"][0]),
                  ref_labels=torch.tensor(case["refs"][1].astype(np.int64)))

  def run():
    x.grad = None
    for q in params:
      q.grad = None
    out = loss_fn(x, y, **kwargs)
    out.backward()
    return out

  value = float(run().item())
  return run, value


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--only", default="", help="comma-separated case names")
  parser.add_argument("--single-thread", action="store_true",
                      help="one CPU thread for both XLA and torch (steadier on a loaded machine)")
  args = parser.parse_args(argv)

  threads = os.cpu_count() or 1
  if args.single_thread:
    # Read when the XLA backend starts (first jax.devices() call below), not at import.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen="
                               "false intra_op_parallelism_threads=1")
    threads = 1
  have_pml = (importlib.util.find_spec("torch") is not None
              and importlib.util.find_spec("pytorch_metric_learning") is not None)
  if have_pml:
    import torch
    torch.set_num_threads(threads)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {threads} CPU threads"
        + (f"; torch {torch.__version__} with set_num_threads({threads})" if have_pml else
           "; PML not installed (pip install -e .[bench]) -- JAX timings only"))
  cases = make_cases()
  names = [n for n in cases if not args.only or n in args.only.split(",")]
  header = (f"{'case':18s} {'jax ms':>9s} {'compile s':>9s} {'pml ms':>9s} {'speed-up':>8s} "
            f"{'largest buffer':>14s} {'B*R*D':>10s}  value jax / pml")
  print(header)
  print("-" * len(header))
  for name in names:
    case = cases[name]
    if name not in L.LOSSES:
      print(f"{name:18s} not in dmljax.losses.LOSSES yet -- skipped")
      continue
    run_jax, t_comp, biggest, v_jax = prepare_jax(name, case)
    brd = B * case["num_refs"] * D
    ok = "ok" if biggest < brd else "B*R*D-SIZED BUFFER!"
    if have_pml:
      run_pml, v_pml = prepare_pml(case)
      t_jax, t_pml = median_times([run_jax, run_pml], args.repeats)
    else:
      (t_jax,) = median_times([run_jax], args.repeats)
    if have_pml:
      pml_s, ratio, vals = f"{1e3 * t_pml:9.1f}", f"{t_pml / t_jax:7.2f}x", f"{v_jax:.5f} / {v_pml:.5f}"
    else:
      pml_s, ratio, vals = f"{'-':>9s}", f"{'-':>8s}", f"{v_jax:.5f}"
    print(f"{name:18s} {1e3 * t_jax:9.1f} {t_comp:9.1f} {pml_s} {ratio} {biggest:14,d} "
          f"{brd:10,d}  {vals}  [{ok}]  ({case['note']})")


if __name__ == "__main__":
  main()
