"""PROFS (issue 11): the framework against a hand-written loop of Algorithm 1, its loss
adaptations (section 5.3) against naive loops, its configs, end to end, and exact resumption.

The Algorithm 1 oracle (:func:`_algorithm1`) is plain Python over steps with its own SGD update,
its own hardest-negative mining, its own hard-negative-class-mining rule and stored
representative embeddings; only the sampler (tested in tests/test_samplers.py) is shared. The
framework runs through the trainer's real jitted step (:func:`dmljax.train.make_train_step`)
on a linear model, so the hold boundaries, anchor moves and HNCM choices are those of training.
"""
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dmljax import frameworks, losses, optim, train
from dmljax import state as state_lib
from dmljax.configs import base_config, shrink
from dmljax.data import samplers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import preempt  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from dmljax.frameworks import profs as profs_lib
from dmljax.parallel import to_host

L, PER, FEAT, DIM = 6, 6, 5, 3      # classes, samples per class, input features, embedding dim
BATCH, M_PER, HOLD = 8, 2, 3        # K = 4 classes per batch; M = 3 steps per hold
K = BATCH // M_PER
LR, LAM = 0.05, 0.5                 # a large lambda so that the proximal term matters


def _data():
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(L), PER).astype(np.int32)
  centers = rng.normal(size=(L, FEAT))
  x = (0.8 * centers[labels] + rng.normal(size=(L * PER, FEAT))).astype(np.float32)
  return x, labels


class _Linear(nn.Module):
  """A bias-free linear embedding: the "network" of the Algorithm 1 checks."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    return nn.Dense(DIM, use_bias=False, kernel_init=nn.initializers.normal(0.6))(
        x.reshape(x.shape[0], -1))


LOSS_KWARGS = {
    "contrastive": {"pos_margin": 0.0, "neg_margin": 1.0},
    "margin": {"margin": 0.2, "beta": 1.0, "nu": 0.05},
    "triplet_margin": {"margin": 0.3},
    "lifted_structure": {"neg_margin": 1.0},
    "npairs": {},
    "profs": {"pos_margin": 0.3, "neg_margin": 1.2},
}


def _config(loss="contrastive", **profs):
  c = shrink(base_config())
  c.framework = "profs"
  c.loss.name = loss
  c.loss.kwargs = ml_collections.ConfigDict(LOSS_KWARGS[loss])
  c.batch_size, c.sampler.m = BATCH, M_PER
  c.optim.name, c.optim.momentum, c.optim.learning_rate = "sgd", 0.0, LR
  c.optim.weight_decay, c.optim.grad_clip_norm = 0.0, 0.0
  c.optim.lr_multipliers["beta"] = 2.0
  c.profs.lam = LAM
  for k, v in profs.items():
    c.profs[k] = v
  return c


def _framework(c, num_classes=L):
  return frameworks.get_framework(c, num_classes=num_classes, embedding_dim=DIM)


# ----------------------------------------------------------------------------- hold length, checks


def test_hold_steps_from_rho_and_validation_errors():
  # M = ceil(rho I L / B): 6 * 2 * 6 / 8 = 9; rho = 1.5 -> ceil(2.25) = 3; an explicit M wins.
  assert _framework(_config()).hold_steps == 9 == samplers.profs_hold_steps(L, BATCH, M_PER)
  assert _framework(_config(rho=1.5)).hold_steps == 3
  assert _framework(_config(hold_steps=5)).hold_steps == 5
  fw = _framework(_config(hold_steps=4))
  s = fw.make_sampler(_data()[1])
  assert isinstance(s, samplers.ClassRepresentativeSampler) and s.hold_steps == 4
  auto = {"contrastive": "hard_negatives", "margin": "hard_negatives",
          "triplet_margin": "hard_negatives", "lifted_structure": "representative_pairs",
          "npairs": "none", "profs": "objective"}
  for loss, want in auto.items():
    assert _framework(_config(loss)).adaptation == want, loss
  proxy_loss = _config()
  proxy_loss.loss.name = "proxy_anchor"
  one_per_class, too_many_classes = _config(), _config()
  one_per_class.sampler.m = 1
  too_many_classes.batch_size = 2 * L * M_PER  # 12 classes per batch, 6 exist
  bad = [
      (proxy_loss, "pair loss"),
      (_config(adaptation="sideways"), "adaptation"),
      (_config(adaptation="objective"), "objective"),
      (_config("profs", adaptation="none"), "objective"),
      (_config(rho=0.0), "rho"),
      (_config(lam=-1.0), "lam"),
      (_config(hold_steps=-2), "hold_steps"),
      (_config(hncm=True, hncm_neighbors=K), "hncm_neighbors"),
      (one_per_class, "sampler.m"),
      (too_many_classes, "classes"),
  ]
  for c, match in bad:
    with pytest.raises(ValueError, match=match):
      _framework(c)
  with pytest.raises(ValueError, match="every class"):
    _framework(_config()).make_sampler(np.array([0, 0, 2, 2, 3, 3, 4, 4, 5, 5, 1, 7]))


# ----------------------------------------------------------------------------- Algorithm 1 oracle


def _ref_hard_pairs(emb, y, is_rep):
  """Positive pairs (representative, classmate) and one hardest negative per positive pair, the
  r-th positive (batch order) with the r-th closest other-class sample, by loops."""
  pos, neg = [], []
  for a in np.flatnonzero(is_rep):
    d = {j: float(np.linalg.norm(emb[a] - emb[j])) for j in range(len(y))}
    positives = [j for j in range(len(y)) if j != a and y[j] == y[a]]
    negatives = sorted((j for j in range(len(y)) if y[j] != y[a]), key=lambda j: (d[j], j))
    for r, j in enumerate(positives):
      pos.append((a, j))
      neg.append((a, negatives[r]))
  return np.array(pos), np.array(neg)


def _pair_d(e, pairs):
  return jnp.sqrt(jnp.sum((e[pairs[:, 0]] - e[pairs[:, 1]]) ** 2, axis=1))


def _mean_nonzero(t):
  return jnp.sum(t) / jnp.maximum(jnp.sum(jax.lax.stop_gradient(t) > 0), 1)


def _ref_data_loss(loss, theta, e, y, pos, neg):
  kw = LOSS_KWARGS[loss]
  dp, dn = _pair_d(e, pos), _pair_d(e, neg)
  if loss == "contrastive":
    return (_mean_nonzero(jax.nn.relu(dp - kw["pos_margin"]))
            + _mean_nonzero(jax.nn.relu(kw["neg_margin"] - dn)))
  beta = theta["beta"]
  terms = jnp.concatenate([jax.nn.relu(dp - beta[y[pos[:, 0]]] + kw["margin"]),
                           jax.nn.relu(beta[y[neg[:, 0]]] - dn + kw["margin"])])
  return _mean_nonzero(terms) + kw["nu"] * jnp.mean(beta[y])


def _ref_neighbors(store, filled, n):
  out = np.full((L, n), -1)
  for c in range(L):
    if not filled[c]:
      continue
    others = sorted((o for o in range(L) if o != c and filled[o]),
                    key=lambda o: (float(np.sum((store[c] - store[o]) ** 2)), o))
    out[c, :len(others[:n])] = others[:n]
  return out


def _ref_hncm_classes(seed, step, table):
  """The documented HNCM rule, written again: K distinct uniform seeds; each seed not chosen yet
  brings itself and its nearest not-yet-chosen classes, until K classes."""
  seeds = np.random.default_rng([seed, profs_lib._TAG_HNCM, step]).choice(L, size=K,
                                                                           replace=False)
  chosen = []
  for s in seeds:
    if s in chosen:
      continue
    for c in [s] + [t for t in table[s] if t >= 0]:
      if c not in chosen and len(chosen) < K:
        chosen.append(int(c))
  return np.array(chosen[:K])


def _algorithm1(loss, c, x, y, theta0, steps, hncm):
  """Algorithm 1, by hand: hold k keeps its representatives for M steps, every step is
  theta <- theta - lr grad(lam/2 ||theta^(k) - theta||^2 + L(theta; B)), then theta^(k+1) <-
  theta. With HNCM the representatives' embeddings are stored as they are embedded and the next
  hold's classes come from the stored embeddings (nearest classes)."""
  sampler = samplers.ClassRepresentativeSampler(y, BATCH, M_PER, hold_steps=HOLD, seed=c.seed)
  mult = {"model": 1.0, "beta": 2.0}
  theta = jax.tree.map(np.asarray, theta0)
  apply = lambda w, xb: xb @ w["Dense_0"]["kernel"]  # noqa: E731  (the linear model)
  store, filled, table = np.zeros((L, DIM), np.float32), np.zeros(L, bool), None

  def objective(th, anchor, xb, yb, pos, neg):
    prox = sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(th["model"]),
                                                       jax.tree.leaves(anchor)))
    return _ref_data_loss(loss, th, apply(th["model"], xb), yb, pos, neg) + LAM / 2 * prox

  grad_fn = jax.jit(jax.grad(objective))  # the same shapes every step: one compile
  out = []
  for step in range(steps):
    if step % HOLD == 0:
      anchor = jax.tree.map(np.copy, theta["model"])  # theta^(k): where hold k starts
    classes = None if table is None else _ref_hncm_classes(c.seed, step, table)
    idx = sampler.global_batch(step, classes)
    xb, yb = x[idx], y[idx]
    is_rep = np.arange(BATCH) % M_PER == 0
    emb = np.asarray(apply(theta["model"], xb))
    pos, neg = _ref_hard_pairs(emb, yb, is_rep)
    grads = grad_fn(theta, anchor, xb, yb, pos, neg)
    theta = {g: jax.tree.map(lambda p, d: np.asarray(p - LR * mult[g] * d), theta[g], grads[g])
             for g in theta}
    if hncm:
      store[yb[is_rep]] = emb[is_rep]
      filled[yb[is_rep]] = True
      if (step + 1) % HOLD == 0:
        table = _ref_neighbors(store, filled, c.profs.hncm_neighbors)
    out.append(dict(idx=idx, classes=classes, theta=theta, anchor=anchor, store=store.copy(),
                    table=None if table is None else table.copy()))
  return out


def _run_framework(c, x, y, steps):
  """The framework through the trainer's jitted step on the linear model."""
  fw = _framework(c)
  sampler = fw.make_sampler(y)
  model = _Linear()
  tx = optim.make_optimizer(c.optim, steps)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, FEAT)))["params"]
  extra, fs = fw.init(jax.random.PRNGKey(1), params, {})
  st = state_lib.create_train_state(rng=jax.random.PRNGKey(2), model_params=params,
                                    batch_stats={}, extra_params=extra, framework_state=fs,
                                    tx=tx)
  theta0 = jax.tree.map(np.asarray, st.params)
  step_fn, traces = train.make_train_step(model, fw, tx)
  step_fn = jax.jit(step_fn)
  out = []
  for step in range(steps):
    classes = fw.batch_classes(st, step)
    idx, extras = fw.sample(sampler, st, step)
    np.testing.assert_array_equal(extras["is_rep"], np.arange(BATCH) % M_PER == 0)
    np.testing.assert_array_equal(idx[::M_PER], sampler.representatives(step)[y[idx[::M_PER]]])
    st, metrics = step_fn(st, x[idx], y[idx], extras)
    host = to_host({"params": st.params, "anchor": st.anchor, "fs": st.framework})
    out.append(dict(idx=idx, classes=classes, metrics=to_host(metrics), **host))
  assert traces[0] == 1
  return theta0, out


@pytest.mark.parametrize("loss,hncm", [("contrastive", True), ("margin", False)])
def test_matches_hand_written_algorithm1_over_holds(loss, hncm):
  """Hold periods, anchor moves, HNCM class choices, stored representative embeddings and the
  parameters (model and the margin loss's learnable beta, with its lr multiplier) of the
  framework's jitted steps equal a hand-written loop of Algorithm 1 over four holds."""
  x, y = _data()
  c = _config(loss, hold_steps=HOLD, hncm=hncm, hncm_neighbors=1)
  steps = 4 * HOLD
  theta0, got = _run_framework(c, x, y, steps)
  want = _algorithm1(loss, c, x, y, theta0, steps, hncm)
  for step, (g, w) in enumerate(zip(got, want)):
    np.testing.assert_array_equal(g["idx"], w["idx"], err_msg=f"batch of step {step}")
    assert int(g["metrics"]["profs/hold"]) == step // HOLD
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 g["params"], w["theta"])
    # After any step of hold k, the anchor is theta^(k), the weights hold k started from.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 g["anchor"], w["anchor"])
    assert int(g["fs"]["anchor_hold"]) == step // HOLD
    if hncm:
      np.testing.assert_allclose(g["fs"]["rep_emb"], w["store"], rtol=1e-4, atol=1e-6)
      if step >= HOLD:
        np.testing.assert_array_equal(g["classes"], w["classes"], err_msg=f"step {step}")
      else:
        assert g["classes"] is None  # hold 0: uniform classes, no table yet
      if (step + 1) % HOLD == 0:
        np.testing.assert_array_equal(g["fs"]["hncm_neighbors"], w["table"])
        assert int(g["fs"]["hncm_hold"]) == step // HOLD + 1
  # The anchor really moves: theta^(3) is neither theta^(0) nor the final weights.
  a0, a3 = got[0]["anchor"]["Dense_0"]["kernel"], got[-1]["anchor"]["Dense_0"]["kernel"]
  assert np.abs(a3 - a0).max() > 1e-3
  assert np.abs(got[-1]["params"]["model"]["Dense_0"]["kernel"] - a3).max() > 1e-4
  np.testing.assert_allclose(a3, want[3 * HOLD - 1]["theta"]["model"]["Dense_0"]["kernel"],
                             rtol=1e-4, atol=1e-6)
  if hncm:
    # Mined batches are groups of a seed and its nearest stored class (hncm_neighbors = 1).
    checked = 0
    for step in range(HOLD, steps):
      table, cls = want[step // HOLD * HOLD - 1]["table"], got[step]["classes"]
      if table[cls[0], 0] >= 0:
        assert cls[1] == table[cls[0], 0]
        checked += 1
    assert checked
  else:
    # The learnable beta got gradients: it moved, per class, for the classes seen.
    beta = got[-1]["params"]["beta"]
    assert beta.shape == (L,) and np.abs(beta - 1.0).max() > 1e-3


# ----------------------------------------------------------------------------- loss adaptations


def _batch(seed=3):
  rng = np.random.default_rng(seed)
  y = np.repeat(rng.permutation(L)[:K], M_PER).astype(np.int32)
  emb = rng.normal(size=(BATCH, DIM)).astype(np.float32) * 0.6
  is_rep = np.arange(BATCH) % M_PER == 0
  return emb, y, is_rep


def _naive_lifted_rep_pairs(e, y, is_rep, neg_margin=1.0):
  """Lifted structure (Oh Song et al. eq. 4) with every term between two non-representatives
  left out, as PROFS adapts it: float64 loops over ordered positive pairs and their negatives."""
  b = len(y)
  kept = lambda i, j: bool(is_rep[i] or is_rep[j])  # noqa: E731
  dist = lambda i, j: float(np.sqrt(np.sum((e[i] - e[j]) ** 2)))  # noqa: E731
  terms = []
  for i in range(b):
    for j in range(b):
      if i == j or y[i] != y[j] or not kept(i, j):
        continue
      negs = [neg_margin - dist(i, k) for k in range(b) if y[k] != y[i] and kept(i, k)]
      negs += [neg_margin - dist(j, k) for k in range(b) if y[k] != y[j] and kept(j, k)]
      jij = np.logaddexp.reduce(negs) + dist(i, j)
      terms.append(max(jij, 0.0) ** 2 / 2)
  return sum(terms) / len(terms)


def _fd_grad(f, x, h=1e-6):
  g = np.zeros_like(x, np.float64)
  for k in range(x.size):
    e = np.zeros(x.shape)
    e.flat[k] = h
    g.flat[k] = (f(x + e) - f(x - e)) / (2 * h)
  return g


def test_lifted_structure_drops_pairs_between_non_representatives():
  e, y, is_rep = _batch()
  fw = _framework(_config("lifted_structure"))
  got, g_got = jax.jit(jax.value_and_grad(lambda a: fw._data_loss({}, a, y, is_rep)))(e)
  want = _naive_lifted_rep_pairs(e.astype(np.float64), y, is_rep)
  g_want = _fd_grad(lambda a: _naive_lifted_rep_pairs(a, y, is_rep), e.astype(np.float64))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(g_got, g_want, rtol=1e-4, atol=1e-5)
  plain = _framework(_config("lifted_structure", adaptation="none"))
  full = jax.jit(lambda a: plain._data_loss({}, a, y, is_rep))(e)
  assert abs(float(full) - float(got)) > 1e-4  # the adaptation changes the loss


def test_adaptations_against_naive_loops():
  """Triplet with one hardest negative per positive pair (representative anchors), N-pair as is,
  eq. (4.6) over (sample, representative) pairs, contrastive's mined pairs, the margin loss's
  beta gradient (all framework losses in one compile)."""
  e, y, is_rep = _batch(4)
  fws = {n: _framework(_config(n)) for n in ("triplet_margin", "npairs", "profs", "contrastive",
                                             "margin")}
  beta0 = fws["margin"].init(None, {}, {})[0]

  def all_losses(a, p):
    out = {n: f._data_loss({}, a, y, is_rep) for n, f in fws.items() if n != "margin"}
    out["npairs_plain"] = losses.npairs(a, y)
    out["beta_grad"] = jax.grad(lambda q: fws["margin"]._data_loss(q, a, y, is_rep))(p)["beta"]
    return out

  got = jax.jit(all_losses)(e, beta0)
  pos, neg = _ref_hard_pairs(e, y, is_rep)
  d = lambda i, j: float(np.linalg.norm(e[i] - e[j]))  # noqa: E731
  # Triplet: anchor a, its r-th positive and its r-th hardest negative.
  terms = [max(d(a, p) - d(a, n) + 0.3, 0.0) for (a, p), (_, n) in zip(pos, neg)]
  nz = [t for t in terms if t > 0]
  np.testing.assert_allclose(got["triplet_margin"], sum(nz) / max(len(nz), 1), rtol=1e-5)
  # N-pair: unchanged (the library loss on the PROFS batch; its anchors are the representatives).
  np.testing.assert_allclose(got["npairs"], got["npairs_plain"], rtol=1e-6)
  # Eq. (4.6): sum over every (representative, sample) pair of the hinge terms.
  want = 0.0
  for r in np.flatnonzero(is_rep):
    for j in range(BATCH):
      want += max(d(r, j) - 0.3, 0) if y[r] == y[j] else max(1.2 - d(r, j), 0)
  np.testing.assert_allclose(got["profs"], want, rtol=1e-5)
  # Contrastive: exactly the mined pairs (pos. part over positives, neg. part over negatives).
  pt = [d(a, j) for a, j in pos]
  nt = [max(1.0 - d(a, j), 0.0) for a, j in neg]
  want = sum(pt) / len(pt) + (sum(nt) / max(sum(t > 0 for t in nt), 1))
  np.testing.assert_allclose(got["contrastive"], want, rtol=1e-5)
  # Margin: beta is a per-class parameter with a gradient for the classes of the batch only.
  g = np.asarray(got["beta_grad"])
  assert g.shape == (L,) and np.all(np.isfinite(g))
  assert np.all(g[np.unique(y)] != 0) and np.all(g[np.setdiff1d(np.arange(L), y)] == 0)
  scalar = _framework(_config("margin", beta_per_class=False))
  assert scalar.init(None, {}, {})[0]["beta"].shape == ()


def test_nearest_classes_blockwise_matches_brute_force(monkeypatch):
  rng = np.random.default_rng(5)
  emb = rng.normal(size=(11, 4)).astype(np.float32)
  filled = rng.random(11) < 0.8
  monkeypatch.setattr(profs_lib, "_NEIGHBOR_BLOCK", 2)  # 11 > 2 * 2: the blocked path
  got = np.asarray(profs_lib.nearest_classes(emb, filled, 3))
  for c in range(11):
    others = sorted((o for o in range(11) if o != c and filled[o]),
                    key=lambda o: float(np.sum((emb[c] - emb[o]) ** 2)))[:3]
    want = others + [-1] * (3 - len(others)) if filled[c] else [-1] * 3
    np.testing.assert_array_equal(got[c], want)


def test_hncm_class_choice_rule():
  """The host-side rule: K distinct classes, deterministic in (seed, step), every seed not yet in
  the batch followed by its nearest classes; classes without a table row come alone."""
  table = np.array([[1, 2], [0, 2], [1, 0], [-1, -1], [5, 3], [4, -1]])
  for step in range(20):
    got = profs_lib.hncm_classes(0, step, table, 4)
    assert len(set(got.tolist())) == 4 and got.min() >= 0 and got.max() < 6
    np.testing.assert_array_equal(got, profs_lib.hncm_classes(0, step, table, 4))
    np.testing.assert_array_equal(got, _ref_hncm_classes_table(0, step, table, 4))
    first = got[0]
    if table[first, 0] >= 0:
      assert got[1] == table[first, 0]
  assert any(not np.array_equal(profs_lib.hncm_classes(0, s, table, 4),
                                profs_lib.hncm_classes(1, s, table, 4)) for s in range(5))


def _ref_hncm_classes_table(seed, step, table, k):
  seeds = np.random.default_rng([seed, profs_lib._TAG_HNCM, step]).choice(len(table), size=k,
                                                                          replace=False)
  chosen = []
  for s in seeds:
    if s not in chosen:
      chosen += [c for c in [s] + list(table[s]) if c >= 0 and c not in chosen]
  return np.array(chosen[:k])


# ----------------------------------------------------------------------------- end to end




def _e2e_config():
  """PROFS + HNCM on closed-set digits (10 classes): B = 16, I = 4, M = ceil(6 * 4 * 10 / 16) =
  15 from rho; 75 steps = 5 holds; evaluations with NMI / F1 and Recall@1/2/4/8."""
  c = shrink(base_config())
  c.framework = "profs"
  c.dataset.name = "digits_closed"
  c.batch_size, c.sampler.m = 16, 4
  c.profs.hncm, c.profs.hncm_neighbors = True, 1
  c.total_steps, c.eval_every_steps, c.checkpoint.every_steps = 75, 25, 25
  c.clustering, c.recall_ks = True, (1, 2, 4, 8)
  c.baselines = ("untrained",)
  c.progress, c.num_devices = False, 1
  return c




@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
  del cache_dir
  workdir = str(tmp_path_factory.mktemp("profs_ref"))
  return train.train_and_evaluate(_e2e_config(), workdir)


def _final(result):
  return {k: v for k, v in result.items() if k != "table"}


def test_end_to_end_learns_and_reports_clustering(reference):
  assert reference["step"] == 75 and reference["train_step_traces"] == 1
  assert reference["nonfinite_steps"] == 0
  assert reference["val/map_at_r"] > reference["untrained/val/map_at_r"] + 0.05
  for k in ("val/nmi", "val/f1", "val/recall_at_8", "test/nmi", "test/f1"):
    assert 0.0 <= reference[k] <= 1.0, k


def test_resume_mid_hold_is_exact(reference, tmp_path, monkeypatch):
  """Stopped after step 40 (hold 2, step 10 of 15, HNCM table of hold 2 in the state) and
  resumed: the same final metrics as the uninterrupted run."""
  disarm = preempt.stop_after(monkeypatch, train, profs_lib.PROFSFramework, 40)
  workdir = str(tmp_path / "run")
  out = train.train_and_evaluate(_e2e_config(), workdir)
  assert out == {"preempted": True, "step": 40} and 40 % 15 != 0
  disarm()
  resumed = train.train_and_evaluate(_e2e_config(), workdir)
  assert _final(resumed) == _final(reference)


@pytest.mark.parametrize("name", ["glyphs_profs", "glyphs_profs_hncm"])
def test_configs_build(name):
  """The PROFS configs' settings (tests/test_configs.py runs two steps of each, NMI included)."""
  import importlib  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(f"configs.{name}")
  c = module.get_config("small")
  assert c.framework == "profs" and c.clustering and tuple(c.recall_ks) == (1, 2, 4, 8)
  assert c.profs.hncm == name.endswith("hncm")
  with pytest.raises(ValueError, match="variant"):
    module.get_config("large")
