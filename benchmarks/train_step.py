"""Train-step benchmarks: standard proxy-contrastive vs CCP step, k-center re-init, sampler speed.

  python benchmarks/train_step.py            # all three parts
  python benchmarks/train_step.py --quick    # fewer repetitions

Prints one line per measurement; docs/benchmarks_train.md records the figures.

* Step time at batch 32, D = 128, with 98 x 8 and 11,318 x 4 proxies: the ``standard``
  framework with C1 contrastive against learnable proxies (the proxy baseline) and the ``ccp``
  framework in a projection > 0 (1.0 x sample-to-proxy + 0.1 x in-batch C1 + proximal term over
  the model). Same model (the glyphs small CNN on 32x32 images), same jitted trainer step.
* Greedy k-center re-initialisation at SOP scale (11,318 classes, pool 7, 4 proxies, D = 128),
  seeded with the previous proxies; excludes embedding the pool.
* Sampler: m-per-class batch indices + gathering the images on the host, per batch, vs the step.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dmljax.configs import glyphs_base  # noqa: E402
from dmljax import frameworks, models, optim, parallel, train  # noqa: E402
from dmljax import state as state_lib  # noqa: E402


def _timeit(fn, reps, warmup=3):
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times)), float(np.percentile(times, 10)), float(np.percentile(times, 90))


def bench_step(framework_name, num_classes, per_class, reps):
  c = glyphs_base()
  c.model.embedding_dim = 128
  c.framework = framework_name
  c.loss.kwargs.neg_margin = 0.5
  if framework_name == "standard":
    c.standard.use_proxies = True
    c.standard.proxies_per_class = per_class
  else:
    c.ccp.proxies_per_class = per_class
    c.ccp.pool_size = per_class
  model = models.get_model(c.model)
  fw = frameworks.get_framework(c, num_classes=num_classes, embedding_dim=128)
  tx = optim.make_optimizer(c.optim, 1000)
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)), train=False)
  extra, fs = fw.init(jax.random.PRNGKey(1), v["params"], v["batch_stats"])
  if "proxies" in extra:  # random unit proxies for both (CCP would take them from k-center)
    extra["proxies"] = jax.random.normal(jax.random.PRNGKey(2), extra["proxies"].shape) * 0.1
  if framework_name == "ccp":
    fs["projection"] = jnp.asarray(1, jnp.int32)  # proximal term on
  st = state_lib.create_train_state(rng=jax.random.PRNGKey(3), model_params=v["params"],
                                    batch_stats=v["batch_stats"], extra_params=extra,
                                    framework_state=fs, tx=tx)
  mesh = parallel.make_mesh(jax.devices()[:1])
  st = parallel.replicate(st, mesh)
  step_fn, _ = train.make_train_step(model, fw, tx)
  step = train.jit_train_step(step_fn, mesh)
  rng = np.random.default_rng(0)
  x = parallel.global_batch(rng.uniform(size=(32, 32, 32, 1)).astype(np.float32), mesh)
  y = parallel.global_batch(np.repeat(rng.choice(num_classes, 8, replace=False), 4)
                            .astype(np.int32), mesh)
  box = [st]

  def run():
    box[0], m = step(box[0], x, y, {})
    jax.block_until_ready(m["loss"])

  return run


def compare_steps(num_classes, per_class, reps, rounds=5):
  """Times standard and CCP steps in alternating rounds (so machine-load drift hits both)."""
  runs = {name: bench_step(name, num_classes, per_class, reps) for name in ("standard", "ccp")}
  times = {name: [] for name in runs}
  for _ in range(rounds):
    for name, run in runs.items():
      med, _, _ = _timeit(run, max(1, reps // rounds), warmup=2)
      times[name].append(med)
  return {name: (float(np.median(t)), float(np.min(t)), float(np.max(t)))
          for name, t in times.items()}


def bench_kcenter(reps):
  from dmljax.kernels.kcenter import greedy_kcenter
  c, b, k, d = 11318, 7, 4, 128
  rng = np.random.default_rng(0)
  points = jnp.asarray(rng.normal(size=(c, b, d)), jnp.float32)
  seeds = jnp.asarray(rng.normal(size=(c, k, d)), jnp.float32)
  pm, sm = jnp.ones((c, b), bool), jnp.ones((c, k), bool)

  def run():
    jax.block_until_ready(greedy_kcenter(points, pm, seeds, sm, k).centers)

  return _timeit(run, reps, warmup=1)


def bench_sampler(reps):
  from dmljax.data.samplers import MPerClassSampler
  labels = np.repeat(np.arange(11318), 5)
  images = np.random.default_rng(0).uniform(size=(len(labels), 32, 32, 1)).astype(np.float32)
  s = MPerClassSampler(labels, 4, 32, seed=0)
  counter = [0]

  def run():
    idx = s.batch(counter[0])
    _ = images[idx], labels[idx]
    counter[0] += 1

  return _timeit(run, reps, warmup=5)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  args = ap.parse_args()
  reps = 10 if args.quick else 30
  print(f"jax {jax.__version__}, devices: {jax.devices()}, CPU cores: {os.cpu_count()}")
  rows = {}
  for num_classes, per_class in ((98, 8), (11318, 4)):
    res = compare_steps(num_classes, per_class, reps)
    for name, (med, lo, hi) in res.items():
      rows[(name, num_classes)] = med
      print(f"step {name:8s} {num_classes:5d}x{per_class}: median {med*1e3:8.2f} ms "
            f"(round medians {lo*1e3:.2f} .. {hi*1e3:.2f})")
    ovh = rows[("ccp", num_classes)] / rows[("standard", num_classes)] - 1
    print(f"  CCP overhead at {num_classes}x{per_class}: {ovh*100:+.1f}%")
  med, p10, p90 = bench_kcenter(max(3, reps // 5))
  print(f"greedy k-center 11318 classes, pool 7, k 4, D 128: median {med*1e3:.1f} ms "
        f"(p10 {p10*1e3:.1f}, p90 {p90*1e3:.1f})")
  med, _, _ = bench_sampler(reps * 10)
  step_ms = rows[("ccp", 11318)] * 1e3
  print(f"sampler m-per-class (11318 classes, batch 32, m 4) + host gather: {med*1e3:.3f} ms "
        f"per batch = {step_ms / (med * 1e3):.0f}x faster than the CCP step ({step_ms:.1f} ms)")


if __name__ == "__main__":
  main()
