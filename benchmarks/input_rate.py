"""Input at accelerator rate (issue 17, item 5): the short-side-256 copy and the loader's changes.

  nice -n -10 python benchmarks/input_rate.py --out input_rate.json

On Cars-shaped JPEGs (~770 x 530, the size of the real ones; written in the Cars196 layout and
prepared twice with the project's own ``prepare``: as distributed, and with ``--short_side=256``),
each part printed as one JSON line and all of them written to ``--out`` as they finish:

* ``data``: preparation times and the mean file size of each copy;
* ``decode``: images/s on one core (this process, one thread) for each copy: the decode alone as
  the eval pipeline does it (the full files take the half-scale DCT decode, the copies a full
  decode), the full files decoded at full resolution (what a 700 x 480 file costs), and decode +
  eval transform (256 -> centre 227) and decode + train transform (random resized crop 227 +
  flip), through ``pipeline.load_batch``;
* ``loader``: a ``BatchLoader`` with ``--workers`` processes at batch 32, train transform, batches
  consumed as fast as they come: the loader as it was (``--before``: ``dmljax/data/pipeline.py``
  at that git revision, loaded beside the current one: one read per record, ``np.stack``, every
  batch copied out of shared memory) against the current one (one batched read, each image
  written into the batch array in shared memory, no copy in the main process), on each copy:
  images/s, per worker, and the main process's CPU time per batch;
* ``hncm``: PROFS with hard negative class mining (hold of ``--hold_steps`` steps, a neighbour
  table per hold) behind a simulated device step of ``--step_ms``: before, each batch decoded in
  the main process when drawn (``BatchLoader.load``, a thread per worker); now, the hold's table
  published once and its batches decoded ahead by the workers (``HoldBoard``): how long the loop
  waits for its batch per step, and steps/s;
* ``quality``: what the copy changes: the mean absolute difference (grey levels, 0-255) of the
  eval transform's output (and of the train transform's, same random draws) between the copies,
  and MAP@R on the test classes of the same network on each copy: untrained (random init), and
  after a short run (``--train_steps``) trained on the full copy.

The figures of one run are comparable with one another (same machine, same load); record the
load average beside them.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402


def cars_shaped(root, train_classes, test_classes, per_class):
  """Cars-shaped JPEGs (~770 x 530, quality 90, sensor-like noise) in the Cars196 layout, prepared
  as distributed into ``root/data`` and as the short-side-256 copy into
  ``root/data_short_side_256``; returns ``(full_dir, short_dir, {seconds})``."""
  from dmljax.data import prepare as prepare_lib  # pylint: disable=g-import-not-at-top
  from dmljax.data import tiny  # pylint: disable=g-import-not-at-top
  t = time.perf_counter()
  full = tiny.prepare_tiny("cars", root, train_classes=train_classes, test_classes=test_classes,
                           per_class=per_class, photo_scale=19)  # ~40 x 28 -> ~770 x 530
  t_full = time.perf_counter() - t
  t = time.perf_counter()
  short = os.path.join(root, "data_short_side_256")
  prepare_lib.prepare("cars", os.path.join(root, "manual"), short, short_side=256)
  return full, short, {"write_and_prepare_full_s": t_full,
                       "prepare_short_side_256_s": time.perf_counter() - t}


def _rate(fn, items, reps):
  """Images/s of ``fn`` over ``items`` (median of ``reps`` passes)."""
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    for x in items:
      fn(x)
    times.append(time.perf_counter() - t)
  return len(items) / float(np.median(times))


def decode_part(splits, reps):
  from dmljax.data import pipeline, transforms  # pylint: disable=g-import-not-at-top
  ev = transforms.TransformConfig(kind="eval", size=227, resize=256)
  tr = transforms.TransformConfig(kind="train", size=227, resize=256)
  out = {"decoder": transforms.DECODER, "resizer": transforms.RESIZER}
  for copy, split in splits.items():
    recs = [split[i] for i in range(len(split))]
    data = [r["image"] for r in recs]
    n = len(recs)
    row = {"images": n, "mean_file_kb": float(np.mean([len(d) for d in data])) / 1024,
           "mean_short_long_side": [
               float(np.mean([min(r["width"], r["height"]) for r in recs])),
               float(np.mean([max(r["width"], r["height"]) for r in recs]))],
           "decode_as_eval_per_s": _rate(lambda d: transforms.decode(d, 256), data, reps),
           "decode_full_resolution_per_s": _rate(transforms.decode, data, reps)}
    idx = np.arange(n)
    for name, cfg in (("eval_transform_per_s", ev), ("train_transform_per_s", tr)):
      times = []
      for _ in range(reps):
        t = time.perf_counter()
        for lo in range(0, n, 32):
          pipeline.load_batch(split, cfg, idx[lo:lo + 32], seed=0, step=lo)
        times.append(time.perf_counter() - t)
      row[name] = n / float(np.median(times))
    out[copy] = row
  return out


def _before_module(rev, tmp):
  """``dmljax/data/pipeline.py`` at git revision ``rev`` as the module ``pipeline_before`` (on
  sys.path and PYTHONPATH, so that spawned workers import it too)."""
  src = subprocess.run(["git", "show", f"{rev}:dmljax/data/pipeline.py"], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout
  with open(os.path.join(tmp, "pipeline_before.py"), "w") as f:
    f.write(src)
  sys.path.insert(0, tmp)
  os.environ["PYTHONPATH"] = os.pathsep.join([tmp, ROOT, os.environ.get("PYTHONPATH", "")])
  import pipeline_before  # pylint: disable=g-import-not-at-top
  return pipeline_before


class _Batches:
  """Picklable step -> 32 record indices (a fixed random draw per step)."""

  def __init__(self, n, batch):
    self.n, self.batch = n, batch

  def __call__(self, step):
    return np.random.default_rng([5, step]).choice(self.n, self.batch, replace=False)


def _loader_rate(module, split, cfg, workers, batches, batch):
  loader = module.BatchLoader(split, cfg, 0, _Batches(len(split), batch), num_workers=workers,
                              prefetch=2 * workers)
  with loader:
    t = time.perf_counter()
    next(loader)  # start-up: spawning the workers, the first batch
    first = time.perf_counter() - t
    t, c = time.perf_counter(), time.process_time()
    for _ in range(batches):
      next(loader)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
  rate = batches * batch / wall
  return {"images_per_s": rate, "per_worker": rate / workers, "first_batch_s": first,
          "main_cpu_ms_per_batch": 1e3 * cpu / batches}


def loader_part(splits, before, workers, batches, rounds):
  from dmljax.data import pipeline, transforms  # pylint: disable=g-import-not-at-top
  cfg = transforms.TransformConfig(kind="train", size=227, resize=256)
  out = {"workers": workers, "batch": 32, "batches": batches}
  for copy, split in splits.items():
    runs = {"before": [], "now": []}
    for _ in range(rounds):  # alternate, so both see the same load
      runs["before"].append(_loader_rate(before, split, cfg, workers, batches, 32))
      runs["now"].append(_loader_rate(pipeline, split, cfg, workers, batches, 32))
    out[copy] = {k: {m: float(np.median([r[m] for r in v])) for m in v[0]}
                 for k, v in runs.items()}
  return out


def hncm_part(split, before, workers, steps, hold_steps, step_ms):
  from dmljax.data import pipeline, samplers, transforms  # pylint: disable=g-import-not-at-top
  from dmljax.frameworks import profs  # pylint: disable=g-import-not-at-top
  cfg = transforms.TransformConfig(kind="train", size=227, resize=256)
  labels = split.labels
  num = int(labels.max()) + 1
  sampler = samplers.ClassRepresentativeSampler(labels, 32, 4, hold_steps=hold_steps, seed=0)
  fn = profs.HNCMBatch(sampler, 0, 8, 0, 1)
  rng = np.random.default_rng(0)
  tables = {h: None if h == 0 else
            np.stack([rng.permutation(np.delete(np.arange(num), c))[:3] for c in range(num)])
            .astype(np.int32) for h in range(steps // hold_steps + 1)}
  out = {"workers": workers, "steps": steps, "hold_steps": hold_steps, "step_ms": step_ms}

  def run(make_batch, first=0):
    waits = []
    t = time.perf_counter()
    for step in range(steps):
      w = time.perf_counter()
      make_batch(step)
      waits.append(time.perf_counter() - w)
      time.sleep(step_ms / 1e3)  # the device step
    wall = time.perf_counter() - t
    return {"wait_ms_per_step": 1e3 * float(np.mean(waits[1:])),
            "wait_ms_first_of_hold": 1e3 * float(np.mean(
                waits[(-first) % hold_steps::hold_steps][1:] or [0])),
            "steps_per_s": steps / wall}

  # Before: indices from the table, then the batch decoded in this process when drawn.
  loader = before.BatchLoader(split, cfg, 0, None, num_workers=workers)
  with loader:
    out["before"] = run(lambda s: loader.load(s, fn(s, tables[s // hold_steps])))
  # Now: the table published once per hold; the workers decode the hold's batches ahead.
  board = pipeline.HoldBoard()
  loader = pipeline.BatchLoader(split, cfg, 0, pipeline.HoldIndices(fn, board, hold_steps),
                                num_workers=workers, prefetch=2 * workers)
  with loader:

    def now(step):
      if step % hold_steps == 0:
        board.publish(step // hold_steps, tables[step // hold_steps])
      got = next(loader)
      assert got[0] == step and np.array_equal(got[2], fn(step, tables[step // hold_steps]))

    t = time.perf_counter()
    now(0)  # start-up (spawning the workers), not counted
    out["now_start_s"] = time.perf_counter() - t
    out["now"] = run(lambda s: now(s + 1), first=1)
  return out


def quality_part(splits, root, train_steps):
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from dmljax import export, train  # pylint: disable=g-import-not-at-top
  from dmljax.configs import ccp_paper_config  # pylint: disable=g-import-not-at-top
  from dmljax.data import pipeline, transforms  # pylint: disable=g-import-not-at-top
  from dmljax.metrics import retrieval  # pylint: disable=g-import-not-at-top
  ev = transforms.TransformConfig(kind="eval", size=227, resize=256)
  tr = transforms.TransformConfig(kind="train", size=227, resize=256)
  out = {}
  tests = {copy: s["test"] for copy, s in splits.items()}
  n = len(tests["full"])
  idx = np.arange(n)
  images = {copy: pipeline.load_batch(t, ev, idx) for copy, t in tests.items()}
  diff = np.abs(images["full"].astype(np.float32) - images["short_side_256"])
  out["eval_transform_abs_diff"] = {"mean": float(diff.mean()),
                                    "p99": float(np.percentile(diff, 99)),
                                    "max": float(diff.max())}
  aug = {copy: pipeline.load_batch(t, tr, idx, seed=3, step=1) for copy, t in tests.items()}
  out["train_transform_abs_diff_mean"] = float(
      np.abs(aug["full"].astype(np.float32) - aug["short_side_256"]).mean())
  # A short run on the full copy (small CNN at 227, contrastive loss), then the same network
  # (trained, and at its random initialisation) on the test images of each copy.
  c = ccp_paper_config("cars", "small")
  c.framework = "standard"
  c.dataset.data_dir = splits["full"]["train"].data_dir
  c.dataset.options = ml_collections.ConfigDict({"val_fraction": 0.0})  # all classes train
  c.dataset.val_split = "test"
  c.input.size, c.input.resize, c.input.num_workers = 227, 256, 1
  c.model.widths, c.model.embedding_dim = (8, 16), 32
  c.batch_size, c.sampler.m = 32, 4
  c.total_steps, c.eval_every_steps, c.log_every_steps = train_steps, train_steps, train_steps
  c.checkpoint.every_steps, c.baselines, c.progress, c.num_devices = 0, (), False, 1
  c.eval_batch_size = 64
  workdir = os.path.join(root, "run")
  t = time.perf_counter()
  result = train.train_and_evaluate(c, workdir)
  out["train_s"] = time.perf_counter() - t
  out["run_test_map_at_r"] = result.get("test/map_at_r")
  model = export.load_model(export.export(workdir, step="last"))
  init = model.network.init(jax.random.PRNGKey(0), np.zeros((1, 227, 227, 3), np.uint8),
                            train=False)
  untrained = export.Model(model.meta, init)
  labels = tests["full"].labels
  for name, m in (("untrained", untrained), ("trained", model)):
    row = {}
    for copy, x in images.items():
      r = retrieval.retrieval_metrics(m.embed(x), labels)
      row[copy] = {"map_at_r": r["map_at_r"], "precision_at_1": r["precision_at_1"]}
    row["map_at_r_change"] = row["short_side_256"]["map_at_r"] - row["full"]["map_at_r"]
    out[name] = row
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--train_classes", type=int, default=16)
  ap.add_argument("--test_classes", type=int, default=24)
  ap.add_argument("--per_class", type=int, default=8)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--workers", type=int, default=0, help="0: one per available core")
  ap.add_argument("--batches", type=int, default=16)
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--before", default="442ce23",
                  help="git revision of the loader to compare with (the one before issue 17 "
                  "item 5)")
  ap.add_argument("--hncm_steps", type=int, default=40)
  ap.add_argument("--hold_steps", type=int, default=10)
  ap.add_argument("--step_ms", type=float, default=100.0,
                  help="simulated device step (the CCP paper: ~100 ms on a 2080 Ti)")
  ap.add_argument("--train_steps", type=int, default=30)
  ap.add_argument("--out", default="input_rate.json")
  ap.add_argument("--skip", default="")
  args = ap.parse_args(argv)
  skip = set(filter(None, args.skip.split(",")))
  from dmljax import inputs  # pylint: disable=g-import-not-at-top
  from dmljax.data import records  # pylint: disable=g-import-not-at-top
  workers = args.workers or inputs.available_cores()
  result = {"cpu_count": os.cpu_count(), "available_cores": inputs.available_cores(),
            "nice": os.nice(0), "load_average_start": os.getloadavg()}

  def put(k, v):
    result[k] = v
    result["load_average_now"] = os.getloadavg()
    print(json.dumps({k: v, "load_average": os.getloadavg()}, default=str), flush=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2, default=str)

  with tempfile.TemporaryDirectory() as root:
    full, short, times = cars_shaped(os.path.join(root, "cars"), args.train_classes,
                                     args.test_classes, args.per_class)
    put("data", dict(times, train_classes=args.train_classes, test_classes=args.test_classes,
                     per_class=args.per_class))
    ds = {"full": records.open_prepared("cars", full),
          "short_side_256": records.open_prepared("cars", short)}
    train_splits = {k: v["train"] for k, v in ds.items()}
    if "decode" not in skip:
      put("decode", decode_part(train_splits, args.reps))
    before = _before_module(args.before, root)
    if "loader" not in skip:
      put("loader", loader_part(train_splits, before, workers, args.batches, args.rounds))
    if "hncm" not in skip:
      put("hncm", {copy: hncm_part(s, before, workers, args.hncm_steps, args.hold_steps, args.step_ms)
                   for copy, s in train_splits.items()})
    if "quality" not in skip:
      put("quality", quality_part(ds, root, args.train_steps))
  return result


if __name__ == "__main__":
  main()
