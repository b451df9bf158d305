"""CCP / PROFS objectives and the proximal term, against hand-written loops."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dmljax.losses as L
from dmljax.losses import objectives

B, D = 6, 3
LABELS = np.array([0, 0, 1, 1, 2, 2], np.int32)


def _emb(seed, b=B, d=D, scale=0.6):
  return (scale * np.random.default_rng(seed).normal(size=(b, d))).astype(np.float32)


def _params(seed):
  r = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)
  return {"backbone": {"conv": {"kernel": f(2, 3), "bias": f(3)}, "bn": [f(3), f(3)]},
          "head": {"kernel": f(3, 2)}, "proxies": f(4, 2)}


# ----------------------------------------------------------------------------- proximal


def _naive_prox(p, a, lam, names):
  tot = 0.0
  for name in names:
    for x, y in zip(jax.tree_util.tree_leaves(p[name]), jax.tree_util.tree_leaves(a[name])):
      tot += float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
  return lam / 2 * tot


def test_proximal_full_prefix_and_callable_masks():
  p, a = _params(0), _params(1)
  all_names = ["backbone", "head", "proxies"]
  np.testing.assert_allclose(objectives.proximal(p, a, 0.3), _naive_prox(p, a, 0.3, all_names),
                             rtol=1e-5)
  prefix = {"backbone": True, "head": True, "proxies": False}
  want = _naive_prox(p, a, 0.3, ["backbone", "head"])
  np.testing.assert_allclose(objectives.proximal(p, a, 0.3, prefix), want, rtol=1e-5)
  by_path = lambda path: not path.startswith("proxies")
  np.testing.assert_allclose(objectives.proximal(p, a, 0.3, by_path), want, rtol=1e-5)
  # A deeper prefix: only the backbone's conv.
  deep = {"backbone": {"conv": True, "bn": False}, "head": False, "proxies": False}
  conv = 0.3 / 2 * sum(float(np.sum((np.asarray(p["backbone"]["conv"][k])
                                      - np.asarray(a["backbone"]["conv"][k])) ** 2))
                       for k in ("kernel", "bias"))
  np.testing.assert_allclose(objectives.proximal(p, a, 0.3, deep), conv, rtol=1e-5)
  # Callable paths are "/"-joined keys, list indices included.
  seen = []
  objectives.proximal(p, a, 1.0, lambda path: seen.append(path) or False)
  assert sorted(seen) == ["backbone/bn/0", "backbone/bn/1", "backbone/conv/bias",
                          "backbone/conv/kernel", "head/kernel", "proxies"]


def test_proximal_gradient_and_jit():
  p, a = _params(2), _params(3)
  prefix = {"backbone": True, "head": True, "proxies": False}
  g = jax.jit(jax.grad(lambda q: objectives.proximal(q, a, 0.5, prefix)))(p)
  for name in ("backbone", "head"):
    for gx, x, y in zip(*(jax.tree_util.tree_leaves(t[name]) for t in (g, p, a))):
      np.testing.assert_allclose(gx, 0.5 * (np.asarray(x) - np.asarray(y)), rtol=1e-5, atol=1e-7)
  assert not np.asarray(g["proxies"]).any()
  # No gradient flows to the anchor, and the term is 0 at the anchor.
  ga = jax.grad(lambda b: objectives.proximal(p, b, 0.5))(a)
  assert all(not np.asarray(x).any() for x in jax.tree_util.tree_leaves(ga))
  assert objectives.proximal(p, p, 0.5) == 0
  # A traced lam and array-valued mask flags work under jit.
  f = jax.jit(lambda lam, flag: objectives.proximal(p, a, lam, {"backbone": flag, "head": True,
                                                                "proxies": False}))
  np.testing.assert_allclose(f(0.3, jnp.array(True)), objectives.proximal(p, a, 0.3, prefix),
                             rtol=1e-5)
  np.testing.assert_allclose(f(0.3, jnp.array(False)),
                             _naive_prox(p, a, 0.3, ["head"]), rtol=1e-5)


def test_proximal_bad_inputs():
  p, a = _params(4), _params(5)
  with pytest.raises(ValueError, match="lam"):
    objectives.proximal(p, a, -1.0)
  with pytest.raises(ValueError, match="structure"):
    objectives.proximal(p, {"backbone": a["backbone"]}, 1.0)
  bad = dict(a, head={"kernel": jnp.zeros((2, 2))})
  with pytest.raises(ValueError, match="shape"):
    objectives.proximal(p, bad, 1.0)
  with pytest.raises(ValueError, match="prefix"):
    objectives.proximal(p, a, 1.0, {"backbone": True, "head": True})


# ----------------------------------------------------------------------------- CCP


def _naive_contrastive(x, y, refs=None, ref_y=None, ref_mask=None, pos_margin=0.0,
                       neg_margin=1.0):
  """PML ContrastiveLoss with AvgNonZero, float64: mean of the nonzero positive terms plus the
  mean of the nonzero negative terms."""
  x = np.asarray(x, np.float64)
  self_ref = refs is None
  r, ry = (x, y) if self_ref else (np.asarray(refs, np.float64), ref_y)
  ok = np.ones(len(ry), bool) if ref_mask is None else ref_mask
  pos, neg = [], []
  for i in range(len(x)):
    for j in range(len(r)):
      if not ok[j] or (self_ref and i == j):
        continue
      d = math.sqrt(np.sum((x[i] - r[j]) ** 2))
      if y[i] == ry[j]:
        pos.append(max(d - pos_margin, 0.0))
      else:
        neg.append(max(neg_margin - d, 0.0))
  out = 0.0
  for terms in (pos, neg):
    nz = [t for t in terms if t > 0]
    if nz:
      out += sum(nz) / len(nz)
  return out


PROXIES = _emb(40, b=5)
PROXY_LABELS = np.array([0, 1, 2, 0, 3], np.int32)
PROXY_MASK = np.array([True, True, True, False, True])


def test_ccp_objective_matches_naive():
  x = _emb(6)
  total, parts = objectives.ccp_objective(x, LABELS, PROXIES, PROXY_LABELS, proxy_mask=PROXY_MASK)
  want_p = float(_naive_contrastive(x, LABELS, PROXIES, PROXY_LABELS, PROXY_MASK))
  want_b = float(_naive_contrastive(x, LABELS))
  assert want_p > 0 and want_b > 0
  np.testing.assert_allclose(parts["proxy"], want_p, rtol=1e-5)
  np.testing.assert_allclose(parts["batch"], want_b, rtol=1e-5)
  np.testing.assert_allclose(total, 1.0 * want_p + 0.1 * want_b, rtol=1e-5)
  # Weights, kwargs and batch_loss=None.
  kw = dict(pos_margin=0.2, neg_margin=0.6)
  total, parts = objectives.ccp_objective(x, LABELS, PROXIES, PROXY_LABELS, proxy_weight=2.0,
                                          batch_weight=0.0, proxy_loss_kwargs=kw,
                                          batch_loss=None)
  want_p = float(_naive_contrastive(x, LABELS, PROXIES, PROXY_LABELS, **kw))
  np.testing.assert_allclose(total, 2 * want_p, rtol=1e-5)
  assert parts["batch"] == 0


def test_ccp_objective_gradient_with_callables_and_names():
  x = _emb(7)
  def naive_total(e):
    return (_naive_contrastive(e, LABELS, PROXIES, PROXY_LABELS)
            + 0.1 * _naive_contrastive(e, LABELS))
  def ccp(e, loss):
    return objectives.ccp_objective(e, LABELS, PROXIES, PROXY_LABELS, proxy_loss=loss,
                                    batch_loss=loss)[0]
  g_name = jax.grad(lambda e: ccp(e, "contrastive"))(x)
  g_fn = jax.grad(lambda e: ccp(e, L.contrastive))(x)
  np.testing.assert_array_equal(g_name, g_fn)
  # Central differences of the float64 oracle (no hinge or count changes within +-1e-5).
  eps = 1e-5
  num = np.zeros(x.shape)
  for idx in np.ndindex(*x.shape):
    xp, xm = x.astype(np.float64), x.astype(np.float64)
    xp[idx] += eps
    xm[idx] -= eps
    num[idx] = (naive_total(xp) - naive_total(xm)) / (2 * eps)
  np.testing.assert_allclose(g_name, num, rtol=1e-4, atol=1e-5)
  # Proxies can be learnable: the objective is differentiable w.r.t. them too.
  gp = jax.grad(lambda p: objectives.ccp_objective(x, LABELS, p, PROXY_LABELS)[0])(PROXIES)
  assert np.all(np.isfinite(gp)) and np.abs(gp).sum() > 0


def test_ccp_objective_any_registered_loss_and_jit():
  x = _emb(8)
  f = jax.jit(lambda e, p: objectives.ccp_objective(
      e, LABELS, p, PROXY_LABELS, proxy_loss="multi_similarity", batch_loss="triplet_margin"))
  total, parts = f(x, PROXIES)
  want_p = L.multi_similarity(x, LABELS, ref_embeddings=PROXIES, ref_labels=PROXY_LABELS)
  want_b = L.triplet_margin(x, LABELS)
  np.testing.assert_allclose(parts["proxy"], want_p, rtol=1e-5)
  np.testing.assert_allclose(total, want_p + 0.1 * want_b, rtol=1e-5)


def test_ccp_objective_degenerate_and_errors():
  x = _emb(9)
  f = lambda e: objectives.ccp_objective(e, np.zeros(B, np.int32), PROXIES, PROXY_LABELS,
                                         proxy_mask=np.zeros(5, bool))[0]
  v, g = jax.value_and_grad(f)(x)
  assert np.isfinite(v) and np.all(np.isfinite(g))
  with pytest.raises(ValueError, match="Unknown loss"):
    objectives.ccp_objective(x, LABELS, PROXIES, PROXY_LABELS, proxy_loss="nope")
  with pytest.raises(ValueError, match="batch_weight"):
    objectives.ccp_objective(x, LABELS, PROXIES, PROXY_LABELS, batch_weight=-0.1)
  with pytest.raises(ValueError, match="ref_embeddings"):
    objectives.ccp_objective(x, LABELS, PROXIES[:, :2], PROXY_LABELS)


# ----------------------------------------------------------------------------- PROFS


def _naive_profs_pairs(x, y, reps, rep_y, eps_pos, eps_neg, rep_mask=None):
  """Eq. 4.6 (pair part): sum over representatives l and samples j."""
  terms = []
  for l in range(len(reps)):
    if rep_mask is not None and not rep_mask[l]:
      continue
    for j in range(len(x)):
      d = math.sqrt(float(np.sum((np.asarray(reps[l], np.float64) - x[j]) ** 2)))
      t = max(d - eps_pos, 0.0) if rep_y[l] == y[j] else max(eps_neg - d, 0.0)
      terms.append(t)
  return sum(terms), terms


def test_profs_objective_matches_eq_4_6():
  x = _emb(10)
  reps = x[[0, 2, 4]]  # one representative per class, taken from the batch (PROFS batches)
  rep_y = LABELS[[0, 2, 4]]
  want, terms = _naive_profs_pairs(x, LABELS, reps, rep_y, 1.0, 1.4)
  total, parts = objectives.profs_objective(x, LABELS, reps, rep_y)
  np.testing.assert_allclose(total, want, rtol=1e-5)
  assert parts["proximal"] == 0
  np.testing.assert_allclose(
      objectives.profs_objective(x, LABELS, reps, rep_y, reduction="mean")[0],
      want / len(terms), rtol=1e-5)
  nz = [t for t in terms if t > 0]
  np.testing.assert_allclose(
      objectives.profs_objective(x, LABELS, reps, rep_y, reduction="mean_nonzero")[0],
      want / len(nz), rtol=1e-5)
  # Other margins and a representative mask.
  mask = np.array([True, False, True])
  want, _ = _naive_profs_pairs(x, LABELS, reps, rep_y, 0.3, 0.9, mask)
  np.testing.assert_allclose(objectives.profs_objective(
      x, LABELS, reps, rep_y, rep_mask=mask, pos_margin=0.3, neg_margin=0.9)[0], want, rtol=1e-5)


def test_profs_objective_gradient_and_proximal():
  x = _emb(11)
  reps, rep_y = _emb(12, b=3), np.array([0, 1, 2], np.int32)
  p, a = _params(13), _params(14)
  mask = {"backbone": True, "head": True, "proxies": False}

  def f(e, r, q):
    return objectives.profs_objective(e, LABELS, r, rep_y, params=q, anchor=a, lam=1e-3,
                                      param_mask=mask)[0]

  total = f(x, reps, p)
  want = _naive_profs_pairs(x, LABELS, reps, rep_y, 1.0, 1.4)[0] + _naive_prox(
      p, a, 1e-3, ["backbone", "head"])
  np.testing.assert_allclose(total, want, rtol=1e-5)
  # Hand gradient w.r.t. the samples: d/dx_j of each active hinge is +-(x_j - r_l)/d.
  gx = jax.jit(jax.grad(f))(x, reps, p)
  want_g = np.zeros_like(x, np.float64)
  for l in range(3):
    for j in range(B):
      diff = x[j].astype(np.float64) - reps[l]
      d = np.linalg.norm(diff)
      if rep_y[l] == LABELS[j] and d > 1.0:
        want_g[j] += diff / d
      elif rep_y[l] != LABELS[j] and d < 1.4:
        want_g[j] -= diff / d
  np.testing.assert_allclose(gx, want_g, rtol=1e-4, atol=1e-6)
  gq = jax.grad(f, argnums=2)(x, reps, p)
  np.testing.assert_allclose(gq["head"]["kernel"], 1e-3 * (p["head"]["kernel"]
                                                           - a["head"]["kernel"]), rtol=1e-5)
  assert not np.asarray(gq["proxies"]).any()


def test_profs_objective_degenerate_and_errors():
  x = _emb(15)
  reps, rep_y = x[:2], LABELS[:2]
  # Representative identical to a batch sample: d = 0 pair, finite gradient.
  v, g = jax.value_and_grad(lambda e: objectives.profs_objective(e, LABELS, e[:2], rep_y)[0])(x)
  assert np.isfinite(v) and np.all(np.isfinite(g))
  v, g = jax.value_and_grad(lambda e: objectives.profs_objective(
      e, LABELS, reps, rep_y, rep_mask=np.zeros(2, bool), reduction="mean")[0])(x)
  assert v == 0 and not np.asarray(g).any()
  with pytest.raises(ValueError, match="pos_margin"):
    objectives.profs_objective(x, LABELS, reps, rep_y, pos_margin=1.5, neg_margin=1.0)
  with pytest.raises(ValueError, match="neg_margin"):
    objectives.profs_objective(x, LABELS, reps, rep_y, neg_margin=-1.0)
  with pytest.raises(ValueError, match="reduction"):
    objectives.profs_objective(x, LABELS, reps, rep_y, reduction="none")
  with pytest.raises(ValueError, match="anchor"):
    objectives.profs_objective(x, LABELS, reps, rep_y, params=_params(0))


def test_profs_objective_batch_as_references_and_pair_mask():
  """The ``profs`` framework's call (issue 11): the batch is its own reference set with the
  representative flags as ``rep_mask``, i.e. eq. 4.6 over (representative, sample) pairs with
  the representatives inside the batch; ``pair_mask`` drops (sample, representative) pairs."""
  x = _emb(15)
  is_rep = np.array([True, False, True, False, True, False])
  want, _ = _naive_profs_pairs(x, LABELS, x[is_rep], LABELS[is_rep], 1.0, 1.4)
  total, _ = objectives.profs_objective(x, LABELS, x, LABELS, rep_mask=is_rep)
  np.testing.assert_allclose(total, want, rtol=1e-5)
  pm = np.ones((B, B), bool)
  pm[:, 0] = False  # no pair with the first representative
  want, _ = _naive_profs_pairs(x, LABELS, x[[2, 4]], LABELS[[2, 4]], 1.0, 1.4)
  np.testing.assert_allclose(objectives.profs_objective(
      x, LABELS, x, LABELS, rep_mask=is_rep, pair_mask=pm)[0], want, rtol=1e-5)
