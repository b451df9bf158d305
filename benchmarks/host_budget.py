"""The run's host budget on Cars-shaped data (issue 17): evaluation, dispatch, checkpoint waits.

  python benchmarks/host_budget.py                    # ~1,000 validation images of ~770 x 530
  python benchmarks/host_budget.py --per_class 12     # fewer images (figures scale per 1,000)

Parts (each printed as one JSON line, and all of them written to ``--out``):

* ``data``: Cars-shaped JPEGs (~770 x 530, the size of the real ones) written in the Cars196
  layout (``car_ims/`` + ``cars_annos.mat``) and prepared with the project's own ``prepare``;
* ``eval``: the host's work in one validation evaluation at the paper's settings (protocol eval
  transform 256 -> 227, eval batch 128): the evaluation's wall time minus the model's own
  compute for those images measured alone (the same jitted embedding over the same batches
  already on the device), per 1,000 images; once streaming (every evaluation decodes, as before
  the caches), once from the host cache (the first evaluation, which builds it, reported apart).
  The model is the small CNN (4 and 8 channels) at 227 x 227: cheap, but not free, so its
  compute is subtracted rather than assumed away;
* ``dispatch``: ms per step of dispatch with the CCP paper's train state (BN-Inception, Cars:
  98 x 8 proxies): a jitted, donating no-op over the whole state (the step before the lean
  step), and a no-op step through the trainer's :class:`~dmljax.train.StepDispatcher` (the lean
  state) with one and with ``--steps_per_dispatch`` steps per dispatch;
* ``checkpoint``: seconds one save of that state blocks the loop, synchronous and asynchronous
  (and asynchronous as before the checkpointer's own host copy: Orbax given the jax.Arrays).
"""
import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import device_check  # noqa: E402  (the Cars-shaped writer)


def _eval_part(data_dir, reps):
  from dmljax import evaluation, frameworks, inputs, models, optim, parallel, train  # pylint: disable=g-import-not-at-top
  from dmljax.configs import ccp_paper_config  # pylint: disable=g-import-not-at-top
  c = ccp_paper_config("cars")
  c.dataset.data_dir = data_dir
  c.model.name, c.model.pretrained, c.model.freeze_bn = "small_cnn", "", "none"
  c.model.widths, c.model.convs_per_block = (4, 8), 1
  c.num_devices = 1
  data = inputs.create_input(c)
  model = models.get_model(c.model)
  fw = frameworks.get_framework(c, num_classes=data.num_classes,
                                embedding_dim=c.model.embedding_dim)
  tx = optim.make_optimizer(c.optim, c.total_steps)
  mesh = parallel.make_mesh(jax.devices()[:1])
  state = parallel.replicate(train.create_state(c, model, fw, tx, data), mesh)
  p, bs = state.params["model"], state.batch_stats
  n = len(data.val)
  out = {"val_images": n, "eval_batch": int(c.eval_batch_size),
         "workers": inputs.input_workers(c, data)}
  # The model alone: the same batches, already on the device.
  ev = evaluation.Evaluator(c.copy_and_resolve_references(), model, mesh, data)
  cache = ev.cache(data.val.images)  # host cache (the default budgets on CPU)
  dev = [parallel.global_batch(cache.host[b * cache.batch_size:(b + 1) * cache.batch_size], mesh)
         for b in range(len(cache.host) // cache.batch_size)]
  jax.block_until_ready([ev.embed_fn(p, bs, x) for x in dev])
  t = time.perf_counter()
  for _ in range(reps):
    jax.block_until_ready([ev.embed_fn(p, bs, x) for x in dev])
  model_s = (time.perf_counter() - t) / reps
  out["model_s"] = model_s
  out["cache_build_s"] = ev.build_seconds.get("val")
  ev.close()
  for mode, (dev_mb, host_mb) in {"streamed": (0.0, 0.0), "host_cache": (0.0, 4096.0)}.items():
    cfg = c.copy_and_resolve_references()
    cfg.eval_cache.device_mb, cfg.eval_cache.host_mb = dev_mb, host_mb
    ev = evaluation.Evaluator(cfg, model, mesh, data)
    t = time.perf_counter()
    ev.evaluate(p, bs, "val")
    first = time.perf_counter() - t
    times = []
    for _ in range(reps):
      t = time.perf_counter()
      ev.evaluate(p, bs, "val")
      times.append(time.perf_counter() - t)
    ev.close()
    steady = float(np.median(times))
    out[mode] = {"first_eval_s": first, "eval_s": steady,
                 "host_s_per_1000": 1000.0 * (steady - model_s) / n}
  return out


def _paper_state():
  from dmljax import frameworks, inputs, models, optim, parallel, train  # pylint: disable=g-import-not-at-top
  from dmljax.configs import ccp_paper_config  # pylint: disable=g-import-not-at-top
  from dmljax.data import transforms  # pylint: disable=g-import-not-at-top
  c = ccp_paper_config("cars")
  c.model.pretrained = ""
  labels = np.repeat(np.arange(98), 4)
  none = transforms.TransformConfig(kind="none")
  data = inputs.Input(train=None, val=None, test=None, train_labels=labels, num_classes=98,
                      image_shape=(227, 227, 3), train_transform=none, eval_transform=none)
  model = models.get_model(c.model)
  fw = frameworks.get_framework(c, num_classes=98, embedding_dim=c.model.embedding_dim)
  tx = optim.make_optimizer(c.optim, c.total_steps)
  mesh = parallel.make_mesh(jax.devices()[:1])
  return parallel.replicate(train.create_state(c, model, fw, tx, data), mesh), fw, mesh


def _dispatch_part(state, fw, mesh, reps, k):
  """ms per step of dispatch: before the lean step (a jitted donating no-op over the whole
  state, as the step was), and through the trainer's own :class:`~dmljax.train.StepDispatcher`
  (the lean state: ``best`` and CCP's per-projection copy left out, the anchor read-only) with
  one and with ``k`` steps per dispatch. The step itself is a no-op (the counter + 1) over a
  one-byte-per-row batch of 8, so what is timed is the dispatch, not the model or the input."""
  from dmljax import numerics, parallel, state as state_lib, train  # pylint: disable=g-import-not-at-top

  def timed(call, st, steps):
    st = call(st)                                   # compiles
    jax.block_until_ready(st.step)
    t = time.perf_counter()
    for _ in range(reps):
      st = call(st)
    jax.block_until_ready(st.step)
    return 1e3 * (time.perf_counter() - t) / reps / steps, st

  noop = jax.jit(lambda s: s.replace(step=s.step + 1), donate_argnums=(0,))
  before_ms, st = timed(noop, numerics.copy_tree(state), 1)
  out = {"before": {"ms_per_step": before_ms, "leaves": len(jax.tree.leaves(st))}}

  def step_fn(s, images, labels, extras):
    del images, extras
    return s.replace(step=s.step + 1), {"loss": jnp.sum(labels).astype(jnp.float32)}
  disp = train.StepDispatcher(step_fn, fw, mesh, k)
  carry, anchor, held = state_lib.split_for_step(numerics.copy_tree(state), disp.held_keys,
                                                 disp.anchor_in_step)
  out["lean_leaves"] = {"donated": len(jax.tree.leaves(carry)),
                        "read_only_anchor": len(jax.tree.leaves(anchor)),
                        "held_outside": len(jax.tree.leaves(held))}
  st = state_lib.merge_after_step(carry, anchor, held)
  for steps in sorted({1, k}):
    shape = (steps, 8, 1) if steps > 1 else (8, 1)
    x = parallel.global_batch(np.zeros(shape, np.uint8), mesh, stacked=steps > 1)
    y = parallel.global_batch(np.zeros(shape[:-1], np.int32), mesh, stacked=steps > 1)
    ms, st = timed(lambda s, x=x, y=y, n=steps: disp(s, x, y, {}, n)[0], st, steps)
    out[f"lean_k{steps}"] = {"ms_per_step": ms, "steps_per_dispatch": steps}
  return out


def _checkpoint_part(state, root):
  from dmljax import checkpoint  # pylint: disable=g-import-not-at-top
  out = {}
  host_copy = checkpoint._host_copy  # pylint: disable=protected-access
  # "async_jax_arrays": the asynchronous save as it was before the checkpointer copied to host
  # itself (Orbax given the jax.Arrays: its per-array work on the loop thread).
  for mode in ("sync", "async", "async_jax_arrays"):
    checkpoint._host_copy = (lambda t: t) if mode == "async_jax_arrays" else host_copy  # pylint: disable=protected-access
    ck = checkpoint.Checkpointer(os.path.join(root, mode), save_best=False,
                                 async_save=mode != "sync")
    ck.save(1, state, {"step": 1})  # the first save also creates the folders
    ck.wait_until_finished()
    ck.blocked_seconds = 0.0
    t = time.perf_counter()
    ck.save(2, state, {"step": 2})
    blocked = ck.blocked_seconds
    ck.wait_until_finished()
    out[mode] = {"blocked_s": blocked, "written_s": time.perf_counter() - t}
    ck.close()
  checkpoint._host_copy = host_copy  # pylint: disable=protected-access
  for mode in ("async", "async_jax_arrays"):
    out[f"{mode}_blocked_fraction_of_sync"] = out[mode]["blocked_s"] / out["sync"]["written_s"]
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--per_class", type=int, default=50, help="images per Cars class")
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--out", default="host_budget.json")
  ap.add_argument("--skip", default="", help="parts left out: eval,dispatch,checkpoint")
  ap.add_argument("--steps_per_dispatch", type=int, default=8,
                  help="k of the dispatch part's scan (the trainer's default on GPU/TPU)")
  ap.add_argument("--dispatch_reps", type=int, default=20)
  args = ap.parse_args(argv)
  skip = set(filter(None, args.skip.split(",")))
  result = {"cpu_count": os.cpu_count()}

  def put(k, v):
    result[k] = v
    print(json.dumps({k: v}, default=str), flush=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2, default=str)

  with tempfile.TemporaryDirectory() as root:
    if "eval" not in skip:
      t = time.perf_counter()
      data_dir = device_check.cars_like(os.path.join(root, "cars"), per_class=args.per_class,
                                        test_classes=2)
      put("data", {"write_and_prepare_s": time.perf_counter() - t,
                   "per_class": args.per_class})
      put("eval", _eval_part(data_dir, args.reps))
    if not {"dispatch", "checkpoint"} <= skip:
      state, fw, mesh = _paper_state()
      if "dispatch" not in skip:
        put("dispatch", _dispatch_part(state, fw, mesh, args.dispatch_reps,
                                       args.steps_per_dispatch))
      if "checkpoint" not in skip:
        put("checkpoint", _checkpoint_part(state, root))
  return result


if __name__ == "__main__":
  main()
