"""The lean step (issue 17): what only evaluations change stays out of the donated jitted step, and
k steps in one dispatch (a scan over stacked batches) equal k single steps (bitwise on this dense
model; the trainer run with a CNN in tests/test_train.py agrees to float rounding)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dmljax import frameworks, optim, parallel, train
from dmljax import state as state_lib
from dmljax.configs import base_config


class _Dense(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(4)(x.reshape(len(x), -1))


class _Held(frameworks.Framework):
  """A proximal term on the anchor, a per-step counter and a held snapshot the step never sees;
  the loss is NaN when a batch's first label is negative."""
  held_state_keys = ("snap",)

  def loss(self, params, emb, labels, state, rng, extras=None):
    self.seen.append(("snap" in state.framework, state.best is not None))  # at each trace
    fs = dict(state.framework, count=state.framework["count"] + 1)
    prox = sum(jnp.sum((p - a) ** 2) for p, a in zip(jax.tree.leaves(params["model"]),
                                                     jax.tree.leaves(state.anchor)))
    value = (jnp.mean((emb - labels[:, None]) ** 2) + 0.1 * prox
             + jax.random.uniform(rng) * 1e-3) * jnp.where(labels[0] < 0, jnp.nan, 1.0)
    return value, ({"prox": prox}, fs)


def _state(tx):
  params = _Dense().init(jax.random.PRNGKey(0), jnp.ones((1, 3)))["params"]
  st = state_lib.create_train_state(rng=jax.random.PRNGKey(1), model_params=params,
                                    batch_stats={}, extra_params={}, tx=tx,
                                    framework_state={"count": jnp.asarray(0, jnp.int32)})
  snap = {"params": state_lib.copy_tree(st.params)}
  return st.replace(framework=dict(st.framework, snap=snap),
                    anchor=jax.tree.map(lambda a: a + 0.25, st.anchor))


def test_k_steps_per_dispatch_equal_k_single_steps():
  # The anchor moving inside the step (PROFS) is covered by test_framework_profs's trainer runs.
  k, b = 4, 4
  tx = optim.make_optimizer(base_config().optim, 10)
  fw = _Held(base_config(), num_classes=2, embedding_dim=4)
  fw.seen = []
  step_fn, traces = train.make_train_step(_Dense(), fw, tx)
  mesh = parallel.make_mesh(jax.devices()[:2])                # each batch split over 2 devices
  rng = np.random.default_rng(0)
  images = rng.normal(size=(k, b, 3)).astype(np.float32)
  labels = rng.integers(0, 2, size=(k, b)).astype(np.int32)
  labels[2, 0] = -1                                          # step 2: NaN loss, never applied

  ref, ref_m = parallel.replicate(_state(tx), mesh), []      # the whole state, plain jit
  plain = jax.jit(step_fn)
  for i in range(k):
    ref, m = plain(ref, *parallel.global_batch((images[i], labels[i]), mesh), {})
    ref_m.append(m)

  dispatch = train.StepDispatcher(step_fn, fw, mesh, k)
  singles = parallel.replicate(_state(tx), mesh)
  held_before = singles.framework["snap"]
  for i in range(k):
    x, y = parallel.global_batch((images[i], labels[i]), mesh)
    singles, _ = dispatch(singles, x, y, {}, 1)
  scanned = parallel.replicate(_state(tx), mesh)
  best, anchor0 = scanned.best, scanned.anchor
  x, y = parallel.global_batch((images, labels), mesh, stacked=True)
  scanned, metrics = dispatch(scanned, x, y, {}, k)

  leaves = lambda s: jax.tree.leaves((s.step, s.params, s.opt_state, s.tracker, s.anchor,
                                      s.framework["count"]))
  for got in (singles, scanned):
    for a, r in zip(leaves(got), leaves(ref)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(r))
  assert int(scanned.step) == k and int(scanned.tracker["nonfinite_steps"]) == 1
  np.testing.assert_array_equal(np.asarray(metrics["nonfinite_streak"]), [0, 0, 1, 0])
  np.testing.assert_array_equal(np.asarray(metrics["loss"]),
                                np.asarray([float(m["loss"]) for m in ref_m], np.float32))
  # What the step never sees is the same objects, alive (not donated), in the returned state.
  assert scanned.best is best and singles.framework["snap"] is held_before
  jax.block_until_ready(jax.tree.leaves((best, held_before)))
  if not fw.step_moves_anchor:                               # a read-only input, not donated
    assert scanned.anchor is anchor0
    jax.block_until_ready(jax.tree.leaves(anchor0))
  assert traces[0] == 3                                      # plain jit, one step, the scan
  assert fw.seen == [(True, True), (False, False), (False, False)]  # the dispatcher's: lean


def test_dispatch_length_stops_at_every_boundary():
  c = ml_collections.ConfigDict({"total_steps": 30, "eval_every_steps": 10,
                                 "checkpoint": {"enabled": True, "every_steps": 15}})
  step, lengths = 0, []
  while step < c.total_steps:
    lengths.append(train.dispatch_length(step, 4, c))
    step += lengths[-1]
  # 0-8 in two dispatches, 8 and 9 alone (evaluation at 10), 10-14, 14 (checkpoint at 15), ...
  assert lengths == [4, 4, 1, 1, 4, 1, 4, 1, 4, 4, 1, 1]
  # A pure function of the step: a run resumed at any dispatch boundary (a checkpoint or a
  # preemption save) dispatches the remaining steps as the uninterrupted run.
  ends = np.cumsum(lengths)
  for start in ends[:-1]:
    step, rest = start, []
    while step < c.total_steps:
      rest.append(train.dispatch_length(step, 4, c))
      step += rest[-1]
    assert rest == lengths[list(ends).index(start) + 1:]
  assert train.dispatch_length(0, 1, c) == 1
