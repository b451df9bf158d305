"""Tests of dmljax.losses.pair against naive per-pair / per-triplet loops written from the papers.

The oracles below are plain float64 numpy loops over pairs (or triplets) that follow each paper's
formula term by term; their gradients are central finite differences. The JAX losses are checked
against them in value and gradient, without and with references (+ ref_mask), on degenerate
batches, under jit / vmap, with bfloat16 inputs, and for their ValueErrors. An optional test
compares with pytorch-metric-learning when it is installed.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmljax.losses import core, pair

# ----------------------------------------------------------------------------- shared inputs

B, D, R = 8, 3, 6
LABELS = np.array([0, 0, 0, 1, 1, 1, 2, 2])
REF_LABELS = np.array([0, 1, 2, 0, 1, 2])
REF_MASK = np.array([True, True, True, True, True, False])  # one empty memory slot


def _unit(a):
  return a / np.linalg.norm(a, axis=-1, keepdims=True)


_RNG = np.random.default_rng(1234)
X = _unit(_RNG.normal(size=(B, D)))
REFS = _unit(_RNG.normal(size=(R, D)))
# Slightly off the unit sphere, so that nothing depends on unit norm by accident.
X = X * _RNG.uniform(0.8, 1.1, size=(B, 1))
REFS = REFS * _RNG.uniform(0.8, 1.1, size=(R, 1))


# ----------------------------------------------------------------------------- naive oracles


def _pairs(x, y, refs, ry, mask):
  """Yields (i, j, ref_vector, same_class) for every existing pair, by the definition."""
  if refs is None:
    refs, ry, mask = x, y, None
  for i in range(len(x)):
    for j in range(len(refs)):
      if mask is None and i == j:
        continue
      if mask is not None and not mask[j]:
        continue
      yield i, j, refs[j], y[i] == ry[j]


def _dist(u, v):
  return math.sqrt(float(np.sum((u - v) ** 2)))


def _lse(vals):
  vals = list(vals)
  m = max(vals)
  return m + math.log(sum(math.exp(v - m) for v in vals))


def _softplus(v):
  return max(v, 0.0) + math.log1p(math.exp(-abs(v)))


def _mean(vals):
  return sum(vals) / len(vals) if vals else 0.0


def _mean_nonzero(vals):
  return _mean([v for v in vals if v > 0])


def _score(u, v, distance):
  if distance == "euclidean":
    return _dist(u, v)
  if distance == "squared_euclidean":
    return _dist(u, v) ** 2
  return float(np.dot(u, v))


def naive_contrastive(x, y, refs=None, ry=None, mask=None, pos_margin=0.0, neg_margin=1.0,
                      distance="euclidean", power=1.0, reduction="mean_nonzero"):
  pos, neg = [], []
  for i, _, r, same in _pairs(x, y, refs, ry, mask):
    s = _score(x[i], r, distance)
    if distance == "dot":  # similarity: positives should reach pos_margin, negatives stay below
      pos_t, neg_t = pos_margin - s, s - neg_margin
    else:
      pos_t, neg_t = s - pos_margin, neg_margin - s
    (pos if same else neg).append(max(pos_t if same else neg_t, 0.0) ** power)
  red = _mean_nonzero if reduction == "mean_nonzero" else (_mean if reduction == "mean" else sum)
  return red(pos) + red(neg)


def naive_contrastive_xbm(x, y, refs=None, ry=None, mask=None, margin=0.5, pos_eps=1e-5,
                          reduction="mean"):
  """XBM's contrastive (CCP's C1), anchor by anchor: 1 - s for positives below 1 - pos_eps, s for
  negatives above the margin; the anchors' sums averaged over the B batch rows."""
  per_anchor = [0.0] * len(x)
  for i, _, r, same in _pairs(x, y, refs, ry, mask):
    s = float(np.dot(x[i], r))
    if same and s < 1 - pos_eps:
      per_anchor[i] += 1 - s
    elif not same and s > margin:
      per_anchor[i] += s
  return sum(per_anchor) if reduction == "sum" else sum(per_anchor) / len(x)


def naive_triplet_margin(x, y, refs=None, ry=None, mask=None, margin=0.05, swap=False,
                         smooth_loss=False, squared=False, reduction="mean_nonzero"):
  base = x if refs is None else refs
  lab = y if refs is None else ry
  ok = [True] * len(base) if mask is None else list(mask)
  dist = (lambda u, v: _dist(u, v) ** 2) if squared else _dist
  terms = []
  for a in range(len(x)):
    for p in range(len(base)):
      if not ok[p] or (refs is None and p == a) or lab[p] != y[a]:
        continue
      for n in range(len(base)):
        if not ok[n] or lab[n] == y[a]:
          continue
        d_an = dist(x[a], base[n])
        if swap:
          d_an = min(d_an, dist(base[p], base[n]))
        v = dist(x[a], base[p]) - d_an + margin
        terms.append(_softplus(v) if smooth_loss else max(v, 0.0))
  return _mean_nonzero(terms) if reduction == "mean_nonzero" else _mean(terms)


def naive_lifted_structure(x, y, refs=None, ry=None, mask=None, neg_margin=1.0, pos_margin=0.0):
  # Oh Song et al. eq. (4): J_ij = log(sum_{N(i)} e^{m - D_ik} + sum_{N(j)} e^{m - D_jl}) + D_ij.
  def negatives(i):
    return [neg_margin - _dist(x[i], r) for i2, _, r, same in _pairs(x, y, refs, ry, mask)
            if i2 == i and not same]
  terms = []
  for i, j, r, same in _pairs(x, y, refs, ry, mask):
    if not same:
      continue
    negs = negatives(i) + (negatives(j) if refs is None else [])
    if not negs:
      continue
    jij = _lse(negs) + _dist(x[i], r) - pos_margin
    terms.append(max(jij, 0.0) ** 2 / 2.0)
  return _mean(terms)


def naive_generalized_lifted_structure(x, y, refs=None, ry=None, mask=None, neg_margin=1.0,
                                       pos_margin=0.0):
  out = []
  for i in range(len(x)):
    pos = [_dist(x[i], r) - pos_margin for i2, _, r, s in _pairs(x, y, refs, ry, mask)
           if i2 == i and s]
    neg = [neg_margin - _dist(x[i], r) for i2, _, r, s in _pairs(x, y, refs, ry, mask)
           if i2 == i and not s]
    out.append(max((_lse(pos) if pos else 0.0) + (_lse(neg) if neg else 0.0), 0.0))
  return _mean(out)


def naive_npairs(x, y, refs=None, ry=None, mask=None):
  seen, anchors, positives = set(), [], []
  for i in range(len(x)):
    if y[i] in seen:
      continue
    cand = [r for i2, _, r, s in _pairs(x, y, refs, ry, mask) if i2 == i and s]
    if cand:
      seen.add(y[i])
      anchors.append(x[i])
      positives.append(cand[0])
  losses = []
  for c, a in enumerate(anchors):
    logits = [float(np.dot(a, q)) for q in positives]
    losses.append(_lse(logits) - logits[c])
  return _mean(losses)


def naive_angular(x, y, refs=None, ry=None, mask=None, alpha=40.0):
  t2 = math.tan(math.radians(alpha)) ** 2
  out = []
  for i, _, r, same in _pairs(x, y, refs, ry, mask):
    if not same:
      continue
    negs = [n for i2, _, n, s in _pairs(x, y, refs, ry, mask) if i2 == i and not s]
    f = [4 * t2 * float(np.dot(x[i] + r, n)) - 2 * (1 + t2) * float(np.dot(x[i], r)) for n in negs]
    out.append(math.log(1.0 + sum(math.exp(v) for v in f)))
  return _mean(out)


def naive_margin(x, y, refs=None, ry=None, mask=None, margin=0.2, nu=0.0, beta=1.2):
  beta = np.asarray(beta, np.float64)
  b_of = (lambda i: float(beta)) if beta.ndim == 0 else (lambda i: float(beta[y[i]]))
  terms = []
  for i, _, r, same in _pairs(x, y, refs, ry, mask):
    d = _dist(x[i], r)
    terms.append(max(d - b_of(i) + margin, 0.0) if same else max(b_of(i) - d + margin, 0.0))
  nz = [t for t in terms if t > 0]
  return (sum(nz) / len(nz) if nz else 0.0) + nu * _mean([b_of(i) for i in range(len(x))])


def naive_multi_similarity(x, y, refs=None, ry=None, mask=None, alpha=2.0, beta=50.0, base=0.5):
  out = []
  for i in range(len(x)):
    sp = [float(np.dot(x[i], r)) for i2, _, r, s in _pairs(x, y, refs, ry, mask) if i2 == i and s]
    sn = [float(np.dot(x[i], r)) for i2, _, r, s in _pairs(x, y, refs, ry, mask)
          if i2 == i and not s]
    out.append(math.log(1 + sum(math.exp(-alpha * (v - base)) for v in sp)) / alpha
               + math.log(1 + sum(math.exp(beta * (v - base)) for v in sn)) / beta)
  return _mean(out)


def naive_binomial_deviance(x, y, refs=None, ry=None, mask=None, alpha=2.0, beta=0.5, cost=25.0):
  # Yi et al.: log(1 + exp(-alpha (s - beta) m)), m = 1 / -cost, weights 1/#pos and 1/#neg.
  pos, neg = [], []
  for i, _, r, same in _pairs(x, y, refs, ry, mask):
    m = 1.0 if same else -cost
    (pos if same else neg).append(_softplus(-alpha * (float(np.dot(x[i], r)) - beta) * m))
  return _mean(pos) + _mean(neg)


def naive_ntxent(x, y, refs=None, ry=None, mask=None, temperature=0.07):
  out = []
  for i, _, r, same in _pairs(x, y, refs, ry, mask):
    if not same:
      continue
    num = math.exp(float(np.dot(x[i], r)) / temperature)
    den = num + sum(math.exp(float(np.dot(x[i], n)) / temperature)
                    for i2, _, n, s in _pairs(x, y, refs, ry, mask) if i2 == i and not s)
    out.append(-math.log(num / den))
  return _mean(out)


def naive_supcon(x, y, refs=None, ry=None, mask=None, temperature=0.1):
  all_pairs = list(_pairs(x, y, refs, ry, mask))
  if not any(s for *_, s in all_pairs) or all(s for *_, s in all_pairs):
    return 0.0
  out = []
  for i in range(len(x)):
    row = [(float(np.dot(x[i], r)) / temperature, s) for i2, _, r, s in all_pairs if i2 == i]
    pos = [v for v, s in row if s]
    if not pos:
      out.append(0.0)
      continue
    den = _lse([v for v, _ in row])
    out.append(-sum(v - den for v in pos) / len(pos))
  return _mean_nonzero(out)


def naive_circle(x, y, refs=None, ry=None, mask=None, m=0.4, gamma=80.0, frozen=None):
  # The self-paced weights a_p, a_n are constants (no gradient): they come from `frozen`, the
  # point at which the gradient is taken, when finite differences perturb `x`.
  fx, frefs = frozen if frozen is not None else (x, refs)
  out = []
  for i in range(len(x)):
    lp, ln = [], []
    fpairs = list(_pairs(fx, y, frefs, ry, mask))
    for (i2, _, r, s), (_, _, fr, _) in zip(_pairs(x, y, refs, ry, mask), fpairs):
      if i2 != i:
        continue
      sim, fsim = float(np.dot(x[i], r)), float(np.dot(fx[i], fr))
      if s:
        lp.append(-gamma * max(1 + m - fsim, 0.0) * (sim - (1 - m)))
      else:
        ln.append(gamma * max(fsim + m, 0.0) * (sim - m))
    out.append(_softplus(_lse(lp) + _lse(ln)) if lp and ln else 0.0)
  return _mean_nonzero(out)


NAIVE = {
    "contrastive": naive_contrastive,
    "contrastive_xbm": naive_contrastive_xbm,
    "triplet_margin": naive_triplet_margin,
    "lifted_structure": naive_lifted_structure,
    "generalized_lifted_structure": naive_generalized_lifted_structure,
    "npairs": naive_npairs,
    "angular": naive_angular,
    "margin": naive_margin,
    "multi_similarity": naive_multi_similarity,
    "binomial_deviance": naive_binomial_deviance,
    "ntxent": naive_ntxent,
    "supcon": naive_supcon,
    "circle": naive_circle,
}

# (loss name, keyword arguments) — defaults plus the variants the papers use.
CASES = [
    ("contrastive", {}),
    ("contrastive", dict(pos_margin=0.2, neg_margin=0.9, power=2.0)),  # C2 / PROFS eq. 3.1 form
    # The hinge form on similarities (C1 itself is contrastive_xbm, whose negative term is s).
    ("contrastive", dict(distance="dot", pos_margin=1.0, neg_margin=0.3, reduction="sum")),
    ("contrastive_xbm", {}),  # CCP's C1 (XBM's implementation, margin 0.5)
    ("contrastive_xbm", dict(margin=0.1, reduction="sum")),
    ("triplet_margin", dict(margin=0.3)),
    ("triplet_margin", dict(margin=0.3, squared=True, reduction="mean")),  # PROFS eq. 3.2
    ("triplet_margin", dict(margin=0.3, swap=True, smooth_loss=True)),
    ("lifted_structure", {}),
    ("generalized_lifted_structure", dict(neg_margin=0.8, pos_margin=0.1)),
    ("npairs", {}),
    ("angular", {}),
    ("margin", {}),
    ("margin", dict(beta=np.array([1.1, 1.3, 0.9]), nu=0.1)),
    ("multi_similarity", {}),
    ("binomial_deviance", {}),
    ("ntxent", dict(temperature=0.5)),
    ("supcon", {}),
    ("circle", dict(gamma=8.0)),
]
# Default hyperparameters are checked with and without references, the variants with references.
ORACLE_CASES = [(n, kw, refs) for n, kw in CASES for refs in ((False, True) if not kw else (True,))]
ORACLE_IDS = [f"{n}-{i}-{'refs' if r else 'batch'}" for i, (n, _, r) in enumerate(ORACLE_CASES)]
LOSS_NAMES = sorted(NAIVE)


def _call_naive(name, x, refs, kw, mask=REF_MASK, labels=LABELS, ref_labels=REF_LABELS):
  kw = dict(kw)
  if refs is None:
    return NAIVE[name](x, labels, **kw)
  return NAIVE[name](x, labels, refs, ref_labels, mask, **kw)


def _fd_grad(f, theta, h=1e-6):
  g = np.zeros_like(theta)
  for k in range(theta.size):
    e = np.zeros_like(theta)
    e.flat[k] = h
    g.flat[k] = (f(theta + e) - f(theta - e)) / (2 * h)
  return g


def _ours(name, x, refs, kw, mask=REF_MASK, labels=LABELS, ref_labels=REF_LABELS):
  fn = getattr(pair, name)
  if refs is None:
    return fn(x, labels, **kw)
  return fn(x, labels, ref_embeddings=refs, ref_labels=ref_labels, ref_mask=mask, **kw)


def _naive_value_and_grad(name, kw, use_refs):
  """Naive value and finite-difference gradient w.r.t. embeddings (and references)."""
  refs = REFS if use_refs else None

  def unpack(theta):
    return theta[:B * D].reshape(B, D), (theta[B * D:].reshape(R, D) if use_refs else None)

  theta0 = np.concatenate([X.ravel()] + ([REFS.ravel()] if use_refs else []))
  if name == "circle":  # weights are constants: freeze them at the base point
    f = lambda t: _call_naive(name, *unpack(t), dict(kw, frozen=(X, refs)))  # noqa: E731
  else:
    f = lambda t: _call_naive(name, *unpack(t), kw)  # noqa: E731
  g = _fd_grad(f, theta0)
  return f(theta0), g[:B * D].reshape(B, D), (g[B * D:].reshape(R, D) if use_refs else None)


def _close(actual, expected, rtol=2e-4, atol=2e-5):
  scale = max(1.0, float(np.max(np.abs(expected))))
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol * scale)


# ----------------------------------------------------------------------------- oracle tests


@pytest.mark.parametrize("name,kw,use_refs", ORACLE_CASES, ids=ORACLE_IDS)
def test_value_and_grad_match_naive_loop(name, kw, use_refs):
  want, gx_want, gr_want = _naive_value_and_grad(name, kw, use_refs)
  x = jnp.asarray(X, jnp.float32)
  refs = jnp.asarray(REFS, jnp.float32)
  if use_refs:
    val, (gx, gr) = jax.value_and_grad(
        lambda a, r: _ours(name, a, r, kw), argnums=(0, 1))(x, refs)
    _close(gr, gr_want)
  else:
    val, gx = jax.value_and_grad(lambda a: _ours(name, a, None, kw))(x)
  assert want != 0.0  # the case exercises the loss
  _close(val, want, atol=1e-6)
  _close(gx, gx_want)


def test_margin_gradient_wrt_learnable_per_class_beta():
  beta = np.array([1.1, 1.3, 0.9])
  kw = dict(nu=0.1)
  f = lambda bt: naive_margin(X, LABELS, REFS, REF_LABELS, REF_MASK, beta=bt, **kw)  # noqa: E731
  want = _fd_grad(f, beta)
  got = jax.grad(lambda bt: pair.margin(
      X, LABELS, ref_embeddings=REFS, ref_labels=REF_LABELS, ref_mask=REF_MASK, beta=bt, **kw))(
          jnp.asarray(beta, jnp.float32))
  _close(got, want)
  # A scalar learnable beta too: the gradient is the sum of its per-class uses.
  g_scalar = jax.grad(lambda bt: pair.margin(X, LABELS, beta=bt))(jnp.float32(1.2))
  want_scalar = _fd_grad(lambda bt: naive_margin(X, LABELS, beta=float(bt[0])), np.array([1.2]))
  _close(g_scalar, want_scalar[0])


def test_hand_checked_2d_case():
  # a = (0, 0) and b = (0.6, 0) are class 0, c = (0, 0.8) is class 1:
  # d(a, b) = 0.6, d(a, c) = 0.8, d(b, c) = 1.0.
  x = jnp.array([[0.0, 0.0], [0.6, 0.0], [0.0, 0.8]])
  y = jnp.array([0, 0, 1])
  # Contrastive (pos_margin 0, neg_margin 1): positive terms (a,b), (b,a) = 0.6 -> mean 0.6;
  # negative terms (a,c), (c,a) = 1 - 0.8 = 0.2 and (b,c), (c,b) = 1 - 1 = 0 (dropped as zero)
  # -> mean over non-zero 0.2. Total 0.8. With reduction="mean": 0.6 + (0.2+0.2+0+0)/4 = 0.7.
  np.testing.assert_allclose(pair.contrastive(x, y), 0.8, rtol=1e-6)
  np.testing.assert_allclose(pair.contrastive(x, y, reduction="mean"), 0.7, rtol=1e-6)
  np.testing.assert_allclose(
      pair.contrastive(x, y, reduction="none"),
      [[0, 0.6, 0.2], [0.6, 0, 0], [0.2, 0, 0]], atol=1e-6)
  # Triplet (margin 0.3): anchor a: 0.6 - 0.8 + 0.3 = 0.1; anchor b: 0.6 - 1.0 + 0.3 < 0 -> 0;
  # c has no positive. mean_nonzero = 0.1, mean over the 2 triplets = 0.05.
  np.testing.assert_allclose(pair.triplet_margin(x, y, margin=0.3), 0.1, rtol=1e-5)
  np.testing.assert_allclose(pair.triplet_margin(x, y, margin=0.3, reduction="mean"), 0.05,
                             rtol=1e-5)
  # Its gradient: only a's triplet is active: d/da [|a-b| - |a-c|] = (a-b)/0.6 - (a-c)/0.8
  # = (-1, 0) - (0, -1) = (-1, 1); d/db = (1, 0); d/dc = (0, -1).
  g = jax.grad(lambda e: pair.triplet_margin(e, y, margin=0.3))(x)
  np.testing.assert_allclose(g, [[-1, 1], [1, 0], [0, -1]], atol=1e-6)
  # Squared distances (PROFS eq. 3.2), margin 0.3: a: 0.36 - 0.64 + 0.3 = 0.02;
  # b: 0.36 - 1 + 0.3 < 0.
  np.testing.assert_allclose(pair.triplet_margin(x, y, margin=0.3, squared=True), 0.02, rtol=1e-4)
  # Margin loss (beta 1.2, margin 0.2): positives (a,b),(b,a): 0.6 - 1.2 + 0.2 < 0 -> 0;
  # negatives: (a,c),(c,a): 1.2 - 0.8 + 0.2 = 0.6; (b,c),(c,b): 1.2 - 1.0 + 0.2 = 0.4.
  # Sum 2.0 over 4 non-zero terms = 0.5.
  np.testing.assert_allclose(pair.margin(x, y), 0.5, rtol=1e-6)


# ----------------------------------------------------------------------------- degenerate batches

DEGENERATE = {
    # name: (labels, use refs, ref_mask)
    "single_class": (np.zeros(B, int), False, None),
    "singletons": (np.arange(B), False, None),
    "empty_ref_mask": (LABELS, True, np.zeros(R, bool)),
    "refs_no_positive": (np.full(B, 7), True, REF_MASK),
}


@pytest.mark.parametrize("case", sorted(DEGENERATE))
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_degenerate_batches_finite_and_match_naive(name, case):
  labels, use_refs, mask = DEGENERATE[case]
  refs = REFS if use_refs else None
  want = _call_naive(name, X, refs, {}, mask=mask, labels=labels)
  fn = getattr(pair, name)
  kw = dict(ref_embeddings=REFS, ref_labels=REF_LABELS, ref_mask=mask) if use_refs else {}
  val, g = jax.value_and_grad(lambda a: fn(a, labels, **kw))(jnp.asarray(X, jnp.float32))
  assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(g)))
  _close(val, want, atol=1e-6)
  if case == "empty_ref_mask":
    assert float(val) == 0.0 and not np.any(np.asarray(g))


def _values_and_jacobian(x, y, **kw):
  """Every pair loss (default hyperparameters) and its gradient, stacked, so that one compile
  covers all losses."""
  out = [jax.value_and_grad(getattr(pair, n))(x, y, **kw) for n in LOSS_NAMES]
  return jnp.stack([v for v, _ in out]), jnp.stack([g for _, g in out])


def test_single_example_batch_is_zero():
  vals, jac = jax.jit(_values_and_jacobian)(jnp.ones((1, D)), jnp.array([3]))
  np.testing.assert_array_equal(vals, np.zeros(len(LOSS_NAMES)))
  assert np.all(np.isfinite(np.asarray(jac)))


# ----------------------------------------------------------------------------- jit / vmap / dtypes


def test_jit_vmap_grad_consistent():
  """jit(vmap(value_and_grad)) over a leading axis of problems equals the naive oracle and the
  un-jitted value_and_grad of each problem on its own."""
  xs = jnp.asarray(np.stack([X, X[::-1] * 0.9]), jnp.float32)
  ys = jnp.asarray(np.stack([LABELS, LABELS[::-1]]))
  kw = dict(ref_embeddings=REFS, ref_labels=REF_LABELS, ref_mask=REF_MASK)
  fn = lambda x, y: _values_and_jacobian(x, y, **kw)  # noqa: E731
  batched_v, batched_j = jax.jit(jax.vmap(fn))(xs, ys)
  for k in range(2):
    want = [_call_naive(n, np.asarray(xs[k], np.float64), REFS, {}, labels=np.asarray(ys[k]))
            for n in LOSS_NAMES]
    np.testing.assert_allclose(batched_v[k], want, rtol=2e-5, atol=1e-6)
    for i, n in enumerate(LOSS_NAMES):  # un-jitted, one problem at a time
      v, g = jax.value_and_grad(getattr(pair, n))(xs[k], ys[k], **kw)
      np.testing.assert_allclose(batched_v[k, i], v, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(batched_j[k, i], g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_bfloat16_inputs(name):
  fn = getattr(pair, name)
  x16 = jnp.asarray(X, jnp.bfloat16)
  val, g = jax.value_and_grad(lambda a: fn(a, LABELS))(x16)
  assert val.dtype == jnp.float32 and g.dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(g, np.float32)))
  # Computed in float32 inside: equal to the float32 loss of the bf16-rounded inputs.
  ref = fn(x16.astype(jnp.float32), LABELS)
  np.testing.assert_allclose(val, ref, rtol=1e-6, atol=1e-7)


def test_reduction_none_shapes_and_consistency():
  x = jnp.asarray(X, jnp.float32)
  kw = dict(ref_embeddings=REFS, ref_labels=REF_LABELS, ref_mask=REF_MASK)
  assert pair.contrastive(x, LABELS, reduction="none", **kw).shape == (B, R)
  t = pair.triplet_margin(x, LABELS, margin=0.3, reduction="none", **kw)
  assert t.shape == (B, R, R)
  np.testing.assert_allclose(jnp.sum(t), pair.triplet_margin(x, LABELS, margin=0.3,
                                                             reduction="sum", **kw), rtol=1e-5)
  for name in ("generalized_lifted_structure", "multi_similarity", "supcon", "circle", "npairs"):
    per = getattr(pair, name)(x, LABELS, reduction="none", **kw)
    assert per.shape == (B,)
    np.testing.assert_allclose(jnp.sum(per), getattr(pair, name)(x, LABELS, reduction="sum", **kw),
                               rtol=1e-5)
  for name in ("lifted_structure", "angular", "ntxent", "binomial_deviance", "margin"):
    per = getattr(pair, name)(x, LABELS, reduction="none", **kw)
    assert per.shape == (B, R)
    assert not np.any(np.asarray(per)[:, ~REF_MASK])  # empty slot: no term


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_bad_shapes_and_labels_raise(name):
  fn = getattr(pair, name)
  with pytest.raises(ValueError, match="embeddings"):
    fn(jnp.ones((B,)), LABELS)
  with pytest.raises(ValueError, match="labels"):
    fn(jnp.ones((B, D)), LABELS[:-1])
  with pytest.raises(ValueError, match="integer"):
    fn(jnp.ones((B, D)), LABELS.astype(np.float32))
  with pytest.raises(ValueError, match="ref_embeddings"):
    fn(jnp.ones((B, D)), LABELS, ref_embeddings=jnp.ones((R, D + 1)), ref_labels=REF_LABELS)
  with pytest.raises(ValueError, match="reduction"):
    fn(jnp.ones((B, D)), LABELS, reduction="average")


@pytest.mark.parametrize("name,kw,match", [
    ("contrastive", dict(neg_margin=-0.1), "neg_margin"),
    ("contrastive", dict(pos_margin=-0.1), "pos_margin"),
    ("contrastive", dict(power=0.5), "power"),
    ("contrastive", dict(distance="cosine"), "distance"),
    ("contrastive_xbm", dict(pos_eps=-1e-5), "pos_eps"),
    ("triplet_margin", dict(margin=-0.05), "margin"),
    ("triplet_margin", dict(squared=True, distance="dot"), "squared"),
    ("lifted_structure", dict(neg_margin=-1.0), "neg_margin"),
    ("generalized_lifted_structure", dict(pos_margin=-1.0), "pos_margin"),
    ("angular", dict(alpha=90.0), "alpha"),
    ("angular", dict(alpha=0.0), "alpha"),
    ("margin", dict(margin=-0.2), "margin"),
    ("margin", dict(nu=-1.0), "nu"),
    ("margin", dict(beta=np.ones((2, 2))), "beta"),
    ("multi_similarity", dict(alpha=0.0), "alpha"),
    ("multi_similarity", dict(beta=-1.0), "beta"),
    ("binomial_deviance", dict(cost=0.0), "cost"),
    ("ntxent", dict(temperature=0.0), "temperature"),
    ("supcon", dict(temperature=-0.1), "temperature"),
    ("circle", dict(gamma=0.0), "gamma"),
    ("circle", dict(m=1.0), "m"),
])
def test_bad_hyperparameters_raise(name, kw, match):
  with pytest.raises(ValueError, match=match):
    getattr(pair, name)(jnp.ones((B, D)), LABELS, **kw)


def test_registry_lists_every_pair_loss():
  from dmljax import losses
  assert set(pair.__all__) == set(NAIVE)
  assert all(losses.PAIR_LOSSES[n] is getattr(pair, n) for n in pair.__all__)
  # C1 can be named in configs (CCP checks PAIR_LOSSES; get_loss reads LOSSES).
  assert losses.get_loss("contrastive_xbm") is losses.PAIR_LOSSES["contrastive_xbm"]


# ----------------------------------------------------------------------------- C1 (XBM)


def test_contrastive_xbm_matches_xbm_definition_with_memory():
  # Guards C1 as XBM computes it: negative term s (not s - margin), near-duplicate positives
  # dropped, sum over all anchors divided by the number of batch rows (not of references).
  x = _unit(np.random.default_rng(7).normal(size=(4, 3)))
  y = np.array([0, 0, 1, 1])
  mem = np.concatenate([x[:1], _unit(np.random.default_rng(8).normal(size=(6, 3)))])
  mem_y = np.array([0, 0, 1, 2, 0, 1, 2])  # slot 0: an exact copy of x[0] (s = 1, dropped)
  mask = np.array([True, True, True, True, True, True, False])
  kw = dict(ref_embeddings=jnp.asarray(mem, jnp.float32), ref_labels=mem_y, ref_mask=mask)
  f = lambda e: pair.contrastive_xbm(e, y, **kw)  # noqa: E731
  val, g = jax.value_and_grad(f)(jnp.asarray(x, jnp.float32))
  want = naive_contrastive_xbm(x, y, mem, mem_y, mask)
  s = x @ mem.T
  assert (s[:, :6][y[:, None] != mem_y[None, :6]] > 0.5).any()  # some negative is above margin
  _close(val, want, atol=1e-6)
  _close(g, _fd_grad(lambda t: naive_contrastive_xbm(t.reshape(4, 3), y, mem, mem_y, mask),
                     x.ravel()).reshape(4, 3))
  # Written out: the hinge form misses 0.5 per negative above the margin (divided by B = 4).
  hinge = pair.contrastive(x, y, distance="dot", pos_margin=1.0, neg_margin=0.5,
                           reduction="sum", **kw) / 4
  n_above = int(((s > 0.5) & (y[:, None] != mem_y[None, :]) & mask[None, :]).sum())
  dup = 1 - float(s[0, 0])  # the duplicate's ~0 positive term, which XBM leaves out
  _close(val, float(hinge) + 0.5 * n_above / 4 - dup / 4, atol=1e-6)
  # Without references the self-pairs (s = 1) are excluded and the divisor is B as well.
  _close(pair.contrastive_xbm(x, y), naive_contrastive_xbm(x, y), atol=1e-6)
  per = pair.contrastive_xbm(x, y, reduction="none", **kw)
  assert per.shape == (4,)
  _close(jnp.sum(per), naive_contrastive_xbm(x, y, mem, mem_y, mask, reduction="sum"), atol=1e-6)


# ----------------------------------------------------------------------------- optional: PML

PML_CASES = [
    ("contrastive", {}, "ContrastiveLoss", {}),
    ("contrastive", dict(pos_margin=0.2, neg_margin=0.5), "ContrastiveLoss",
     dict(pos_margin=0.2, neg_margin=0.5)),
    ("contrastive", dict(distance="dot", pos_margin=0.9, neg_margin=0.3), "ContrastiveLoss",
     dict(pos_margin=0.9, neg_margin=0.3, distance="cosine")),
    ("triplet_margin", dict(margin=0.3), "TripletMarginLoss", dict(margin=0.3)),
    ("triplet_margin", dict(margin=0.3, smooth_loss=True), "TripletMarginLoss",
     dict(margin=0.3, smooth_loss=True)),
    ("triplet_margin", dict(margin=0.3, swap=True), "TripletMarginLoss",
     dict(margin=0.3, swap=True)),
    ("lifted_structure", {}, "LiftedStructureLoss", {}),
    ("generalized_lifted_structure", {}, "GeneralizedLiftedStructureLoss", {}),
    ("npairs", {}, "NPairsLoss", {}),
    ("angular", {}, "AngularLoss", {}),
    ("multi_similarity", {}, "MultiSimilarityLoss", {}),
    ("ntxent", {}, "NTXentLoss", {}),
    ("supcon", {}, "SupConLoss", {}),
    ("circle", {}, "CircleLoss", {}),
]
# PML defines these only without references (it indexes batch rows with reference indices).
PML_BATCH_ONLY = {"npairs", "lifted_structure"}


def _tangent(g, x):
  """Component of the gradient along the unit sphere (PML normalises inside its distances)."""
  x = _unit(x)
  return g - np.sum(g * x, axis=1, keepdims=True) * x


@pytest.mark.parametrize("use_refs", [False, True], ids=["batch", "refs"])
@pytest.mark.parametrize("name,kw,pml_name,pml_kw", PML_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(PML_CASES)])
def test_matches_pytorch_metric_learning(name, kw, pml_name, pml_kw, use_refs):
  torch = pytest.importorskip("torch")
  pml = pytest.importorskip("pytorch_metric_learning")
  from pytorch_metric_learning import distances as pml_distances
  from pytorch_metric_learning import losses as pml_losses
  if use_refs and (name in PML_BATCH_ONLY or kw.get("swap")):
    pytest.skip("PML's reference handling differs by design here (see the docstring).")
  del pml
  pml_kw = dict(pml_kw)
  if pml_kw.get("distance") == "cosine":
    pml_kw["distance"] = pml_distances.CosineSimilarity()
  x, refs = _unit(X), _unit(REFS)
  xt = torch.tensor(x, requires_grad=True)
  rt = torch.tensor(refs, requires_grad=True)
  loss_fn = getattr(pml_losses, pml_name)(**pml_kw)
  if use_refs:
    keep = torch.tensor(REF_MASK)
    out = loss_fn(xt, torch.tensor(LABELS), ref_emb=rt[keep],
                  ref_labels=torch.tensor(REF_LABELS)[keep])
  else:
    out = loss_fn(xt, torch.tensor(LABELS))
  out.backward()
  args = (jnp.asarray(x, jnp.float32), jnp.asarray(refs, jnp.float32))
  f = lambda a, r: _ours(name, a, r if use_refs else None, kw)  # noqa: E731
  val, (gx, gr) = jax.value_and_grad(f, argnums=(0, 1))(*args)
  np.testing.assert_allclose(float(val), out.item(), rtol=1e-5, atol=1e-6)
  _close(_tangent(np.asarray(gx, np.float64), x), _tangent(xt.grad.numpy(), x), atol=1e-5)
  if use_refs:
    _close(_tangent(np.asarray(gr, np.float64), refs), _tangent(rt.grad.numpy(), refs), atol=1e-5)


def test_margin_relates_to_pml_triplet_form():
  """PML's MarginLoss counts each pair once per opposite pair of its anchor (triplets)."""
  torch = pytest.importorskip("torch")
  pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
  x = _unit(X)
  want = pml_losses.MarginLoss()(torch.tensor(x), torch.tensor(LABELS)).item()
  terms = np.asarray(pair.margin(x, LABELS, reduction="none"), np.float64)
  p = core.check_inputs(x, LABELS)
  pos, neg = np.asarray(p.pos), np.asarray(p.neg)
  n_pos, n_neg = pos.sum(1, keepdims=True), neg.sum(1, keepdims=True)
  # Each positive term of anchor a appears n_neg(a) times, each negative term n_pos(a) times.
  weights = np.where(pos, n_neg, 0) + np.where(neg, n_pos, 0)
  ours_as_triplets = np.sum(weights * terms) / np.sum(weights * (terms > 0))
  np.testing.assert_allclose(ours_as_triplets, want, rtol=1e-5)


@pytest.mark.parametrize("reduction", ["mean_nonzero", "mean", "sum"])
def test_contrastive_blocked_path_matches_naive(monkeypatch, reduction):
  """Long reference sets (a memory bank) are reduced in blocks; force it with tiny blocks."""
  monkeypatch.setattr(pair, "_BLOCK_REFS", 4)  # R = 23 > 2 * 4: blocked, with 1 padded slot
  rng = np.random.default_rng(7)
  x = rng.normal(size=(5, 3)) * 0.6
  refs = rng.normal(size=(23, 3)) * 0.6
  y, ry = np.array([0, 1, 2, 0, 1]), rng.integers(0, 3, 23)
  mask = np.ones(23, bool)
  mask[[3, 17]] = False

  def ours(xx):
    return pair.contrastive(xx, jnp.asarray(y), ref_embeddings=jnp.asarray(refs, jnp.float32),
                            ref_labels=jnp.asarray(ry), ref_mask=jnp.asarray(mask),
                            pos_margin=0.2, neg_margin=1.0, reduction=reduction)

  def naive(xx):
    return naive_contrastive(xx, y, refs, ry, mask, pos_margin=0.2, neg_margin=1.0,
                             reduction=reduction)

  value, grad = jax.value_and_grad(ours)(jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(value, naive(x), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad, _fd_grad(naive, x), rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------- mined pair masks
# (issue 11) Every pair loss takes ``pair_mask=`` ([B, R] bool), ANDed with its own positive and
# negative masks. The oracle: the naive loops above with the masked pairs removed from the pair
# enumeration itself (``_pairs`` filtered), plus loops of their own for the two losses whose
# oracle does not enumerate pairs through ``_pairs`` (triplet, N-pair).

_UNMASKED_PAIRS = _pairs
_PM_RNG = np.random.default_rng(99)
PAIR_MASK_BATCH = _PM_RNG.random((B, B)) < 0.7
PAIR_MASK_REFS = _PM_RNG.random((B, R)) < 0.7
PAIR_MASK_BATCH[0, 1] = PAIR_MASK_BATCH[3, 4] = True  # keep a positive pair in each mask


def _masked_pairs(pm):
  def pairs(x, y, refs, ry, mask):
    for i, j, r, same in _UNMASKED_PAIRS(x, y, refs, ry, mask):
      if pm[i][j]:
        yield i, j, r, same
  return pairs


def naive_triplet_masked(x, y, refs, ry, mask, pm, tm=None, margin=0.05):
  base, lab = (x, y) if refs is None else (refs, ry)
  ok = [True] * len(base) if mask is None else list(mask)
  terms = []
  for a in range(len(x)):
    for p in range(len(base)):
      if not ok[p] or (refs is None and p == a) or lab[p] != y[a] or not pm[a][p]:
        continue
      for n in range(len(base)):
        if not ok[n] or lab[n] == y[a] or not pm[a][n] or (tm is not None and not tm[a][p][n]):
          continue
        terms.append(max(_dist(x[a], base[p]) - _dist(x[a], base[n]) + margin, 0.0))
  return _mean_nonzero(terms)


def naive_npairs_masked(x, y, refs, ry, mask, pm):
  base = x if refs is None else refs
  ok = [True] * len(base) if mask is None else list(mask)

  def kept(i, j):  # the pair (i, j) exists and is in the mask
    return ok[j] and pm[i][j] and not (refs is None and i == j)

  seen, anchors = set(), []  # (anchor index, index of its positive)
  for i in range(len(x)):
    if y[i] in seen:
      continue
    cand = [j for j in range(len(base)) if kept(i, j) and (y if refs is None else ry)[j] == y[i]]
    if cand:
      seen.add(y[i])
      anchors.append((i, cand[0]))
  losses = []
  for i, j in anchors:
    logits = {q: float(np.dot(x[i], base[q])) for _, q in anchors if kept(i, q)}
    losses.append(_lse(list(logits.values())) - logits[j])
  return _mean(losses)


def _masked_naive(name, x, refs, pm, tm=None):
  kw = dict(mask=REF_MASK) if refs is not None else {}
  ry = REF_LABELS if refs is not None else None
  if name == "triplet_margin":
    return naive_triplet_masked(x, LABELS, refs, ry, kw.get("mask"), pm, tm)
  if name == "npairs":
    return naive_npairs_masked(x, LABELS, refs, ry, kw.get("mask"), pm)
  extra = dict(frozen=(X, REFS if refs is not None else None)) if name == "circle" else {}
  old = globals()["_pairs"]
  globals()["_pairs"] = _masked_pairs(pm)
  try:
    return _call_naive(name, x, refs, extra, mask=REF_MASK)
  finally:
    globals()["_pairs"] = old


@pytest.mark.parametrize("use_refs", [False, True], ids=["batch", "refs"])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_pair_mask_matches_naive_loop_without_masked_pairs(name, use_refs):
  refs = REFS if use_refs else None
  pm = PAIR_MASK_REFS if use_refs else PAIR_MASK_BATCH

  def unpack(theta):
    return theta[:B * D].reshape(B, D), (theta[B * D:].reshape(R, D) if use_refs else None)

  theta0 = np.concatenate([X.ravel()] + ([REFS.ravel()] if use_refs else []))
  f = lambda t: _masked_naive(name, *unpack(t), pm)  # noqa: E731
  want, g_want = f(theta0), _fd_grad(f, theta0)

  def ours(a, r, mask):
    return _ours(name, a, r if use_refs else None, dict(pair_mask=mask))

  args = (jnp.asarray(X, jnp.float32), jnp.asarray(REFS, jnp.float32))
  val, (gx, gr) = jax.value_and_grad(ours, argnums=(0, 1))(*args, jnp.asarray(pm))
  assert want != 0.0 and abs(want - _call_naive(name, X, refs, {})) > 1e-6  # the mask matters
  _close(val, want, atol=1e-6)
  _close(gx, g_want[:B * D].reshape(B, D))
  if use_refs:
    _close(gr, g_want[B * D:].reshape(R, D))
  # An all-True mask is the loss itself; an all-False one leaves no term (0, zero gradient).
  full = ours(*args, np.ones(pm.shape, bool))
  assert float(full) == float(ours(*args, None))
  v0, g0 = jax.value_and_grad(ours)(*args, np.zeros(pm.shape, bool))
  assert float(v0) == 0.0 and not np.any(np.asarray(g0))


def test_triplet_mask_matches_naive_loop_and_shape_checks():
  tm = _PM_RNG.random((B, B, B)) < 0.5
  pm = PAIR_MASK_BATCH
  x = jnp.asarray(X, jnp.float32)
  want = naive_triplet_masked(X, LABELS, None, None, None, pm, tm)
  f = lambda t: naive_triplet_masked(t.reshape(B, D), LABELS, None, None, None, pm, tm)  # noqa
  val, g = jax.value_and_grad(
      lambda a: pair.triplet_margin(a, LABELS, pair_mask=pm, triplet_mask=tm))(x)
  _close(val, want, atol=1e-6)
  _close(g, _fd_grad(f, X.ravel()).reshape(B, D))
  with pytest.raises(ValueError, match="triplet_mask"):
    pair.triplet_margin(x, LABELS, triplet_mask=tm[:, :, :3])
  for name in LOSS_NAMES:
    with pytest.raises(ValueError, match="pair_mask"):
      getattr(pair, name)(x, LABELS, pair_mask=pm[:, :3])
