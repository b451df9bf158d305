"""DRO pair weighting (Qi et al.): naive per-pair oracles, the LS / MS recovery identities,
numerics at the paper's gammas and batch sizes (float64 references), jit / vmap, degenerate
batches and input checks."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dmljax.losses as L
from dmljax.losses import core, dro

B, D = 6, 4
LABELS = np.array([0, 0, 1, 1, 2, 2], np.int32)


def _unit(x):
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _emb(seed=0, b=B, d=D):
  return _unit(np.random.default_rng(seed).normal(size=(b, d)))


def _pairs(labels, ref_labels=None):
  """(i, j, is_positive) over valid pairs, written out."""
  if ref_labels is None:
    return [(i, j, labels[i] == labels[j]) for i in range(len(labels))
            for j in range(len(labels)) if i != j]
  return [(i, j, labels[i] == ref_labels[j]) for i in range(len(labels))
          for j in range(len(ref_labels))]


def _naive_base(x, i, j, pos, base, refs=None, m=0.2, lam=0.5, alpha=2.0, beta=50.0,
                form="plain"):
  """One pair's base loss, from the paper's formula (float64); ``form="scaled"`` multiplies the
  binomial sides by 2/alpha and 2/beta (the authors' runs)."""
  r = x if refs is None else refs
  s = float(np.dot(np.asarray(x[i], np.float64), np.asarray(r[j], np.float64)))
  if base == "margin":
    y = 1.0 if pos else -1.0
    return max(m + y * (lam - s), 0.0)
  scale = alpha if pos else beta
  v = math.log1p(math.exp((-alpha if pos else beta) * (s - lam)))
  return 2.0 / scale * v if form == "scaled" else v


def _naive_losses(x, labels, base, **kw):
  return [(i, j, pos, _naive_base(x, i, j, pos, base, **kw)) for i, j, pos in _pairs(labels)]


def _num_grad(f, x, eps=1e-6):
  """Central differences of a float64 oracle: a gradient that owes nothing to autodiff."""
  x = np.asarray(x, np.float64)
  g = np.zeros_like(x)
  for idx in np.ndindex(*x.shape):
    xp, xm = x.copy(), x.copy()
    xp[idx] += eps
    xm[idx] -= eps
    g[idx] = (f(xp) - f(xm)) / (2 * eps)
  return g


# ----------------------------------------------------------------------------- base losses


@pytest.mark.parametrize("base,form", [("margin", "plain"), ("binomial", "plain"),
                                       ("binomial", "scaled")])
def test_base_losses_match_formula(base, form):
  x = _emb(1)
  pairs = core.check_inputs(x, LABELS)
  got, active = dro.base_pair_losses(pairs, base, binomial_form=form)
  want = np.zeros((B, B), np.float32)
  for i, j, _, l in _naive_losses(x, LABELS, base, form=form):
    want[i, j] = float(l)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(active, (want > 0) & ~np.eye(B, dtype=bool))


def test_scaled_binomial_in_a_weighting_matches_per_pair_loop():
  # Guards binomial_form="scaled" end to end (value and gradient of a DRO loss built on it).
  x = _emb(41)
  kw = dict(alpha=3.0, beta=40.0, threshold=0.4)
  f = lambda e: dro.dro_topk(e, LABELS, k=7, base="binomial", binomial_form="scaled", **kw)
  naive_kw = dict(alpha=3.0, beta=40.0, lam=0.4, form="scaled")
  g = lambda e: _naive_topk(e, 7, "binomial", **naive_kw)
  np.testing.assert_allclose(f(x), g(x), rtol=1e-5)
  np.testing.assert_allclose(jax.grad(f)(x), _num_grad(g, x), rtol=1e-4, atol=1e-5)
  # The default is unchanged: the plain form, which differs from the scaled one here.
  plain = dro.dro_topk(x, LABELS, k=7, base="binomial", **kw)
  np.testing.assert_allclose(plain, _naive_topk(x, 7, "binomial", alpha=3.0, beta=40.0, lam=0.4),
                             rtol=1e-5)
  assert abs(float(plain) - float(f(x))) > 1e-3


# ----------------------------------------------------------------------------- top-K


def _naive_topk(x, k, base="margin", pn=False, normalize="k", **base_kw):
  """Top-K (or top-K-PN: K//2 positive and K - K//2 negative pairs) from sorted per-pair losses:
  the paper's 1/K for ``normalize="k"``, the mean over the selected nonzero losses for
  ``"nonzero"``."""
  terms = [(l, pos) for _, _, pos, l in _naive_losses(x, LABELS, base, **base_kw) if l > 0]
  if pn:
    kp, kn = k // 2, k - k // 2
    ps = sorted([t[0] for t in terms if t[1]], reverse=True)[:kp]
    ns = sorted([t[0] for t in terms if not t[1]], reverse=True)[:kn]
    chosen = ps + ns
    if normalize == "k":
      return sum(chosen) / k
  else:
    chosen = sorted([t[0] for t in terms], reverse=True)[:k]
    if normalize == "k":
      return sum(chosen) / k
  return sum(chosen) / max(len(chosen), 1)


# k = 1000 and k = 29 exceed the number of nonzero-loss pairs (< 30 here): there "k" and
# "nonzero" differ (guards the paper's 1/K normalisation, which used to be 1/#nonzero).
@pytest.mark.parametrize("base,k", [("margin", 5), ("binomial", 7), ("margin", 29),
                                    ("margin", 1000)])
@pytest.mark.parametrize("normalize", ["k", "nonzero"])
def test_topk_matches_naive(base, k, normalize):
  x = _emb(2)
  f = lambda e: dro.dro_topk(e, LABELS, k=k, base=base, normalize=normalize)
  g = lambda e: _naive_topk(e, k, base, normalize=normalize)
  np.testing.assert_allclose(f(x), g(x), rtol=1e-5)
  np.testing.assert_allclose(jax.grad(f)(x), _num_grad(g, x), rtol=1e-4, atol=1e-5)


def test_topk_default_normalisation_is_one_over_k():
  # Guards the default: with fewer nonzero losses than K the sum is still divided by K (paper).
  x = _emb(2)
  pairs = core.check_inputs(x, LABELS)
  losses, active = dro.base_pair_losses(pairs, "margin")
  n = int(np.asarray(active).sum())
  assert n < 29
  total = float(np.asarray(losses)[np.asarray(active)].sum())
  np.testing.assert_allclose(dro.dro_topk(x, LABELS, k=29), total / 29, rtol=1e-5)
  np.testing.assert_allclose(dro.dro_topk(x, LABELS, k=29, normalize="nonzero"), total / n,
                             rtol=1e-5)


def test_topk_default_k_is_twice_batch():
  x = _emb(3)
  np.testing.assert_allclose(dro.dro_topk(x, LABELS), dro.dro_topk(x, LABELS, k=2 * B))


# k = 20: K+ = 10 exceeds the 6 positive pairs, so "k" and "nonzero" differ (guards the 1/K).
@pytest.mark.parametrize("base,k", [("margin", 6), ("binomial", 5), ("margin", 20)])
@pytest.mark.parametrize("normalize", ["k", "nonzero"])
def test_topk_pn_matches_naive(base, k, normalize):
  x = _emb(4)
  f = lambda e: dro.dro_topk_pn(e, LABELS, k=k, base=base, normalize=normalize)
  g = lambda e: _naive_topk(e, k, base, pn=True, normalize=normalize)
  np.testing.assert_allclose(f(x), g(x), rtol=1e-5)
  np.testing.assert_allclose(jax.grad(f)(x), _num_grad(g, x), rtol=1e-4, atol=1e-5)


def test_topk_pn_balances_sides():
  # 6 positive pairs and 24 negative pairs; with K = 4 two of each are chosen even when every
  # negative loss exceeds every positive one.
  x = _emb(5)
  pairs = core.check_inputs(x, LABELS)
  losses, active = dro.base_pair_losses(pairs, "binomial")
  pos_sorted = np.sort(np.asarray(losses)[np.asarray(pairs.pos)])[::-1]
  neg_sorted = np.sort(np.asarray(losses)[np.asarray(pairs.neg)])[::-1]
  want = (pos_sorted[:2].sum() + neg_sorted[:2].sum()) / 4
  np.testing.assert_allclose(dro.dro_topk_pn(x, LABELS, k=4, base="binomial", normalize="nonzero"),
                             want, rtol=1e-5)
  # Default: the paper's average over the K = 4 selected pairs (1/K, whatever is nonzero).
  np.testing.assert_allclose(dro.dro_topk_pn(x, LABELS, k=4, base="binomial"),
                             (pos_sorted[:2].sum() + neg_sorted[:2].sum()) / 4, rtol=1e-5)
  xs = _emb(4)          # K = 20: 10 positive slots but 6 positive pairs; still divided by 20
  pairs = core.check_inputs(xs, LABELS)
  losses, active = dro.base_pair_losses(pairs, "margin")
  lp = np.sort(np.asarray(losses)[np.asarray(pairs.pos & active)])[::-1][:10]
  ln = np.sort(np.asarray(losses)[np.asarray(pairs.neg & active)])[::-1][:10]
  np.testing.assert_allclose(dro.dro_topk_pn(xs, LABELS, k=20), (lp.sum() + ln.sum()) / 20,
                             rtol=1e-5)


# ----------------------------------------------------------------------------- KL


def _naive_kl_weights(ls, gamma):
  z = sum(math.exp(float(l) / gamma) for l in ls)
  return [math.exp(float(l) / gamma) / z for l in ls]


@pytest.mark.parametrize("base,gamma", [("margin", 0.1), ("binomial", 0.7)])
def test_kl_matches_closed_form_and_is_the_max(base, gamma):
  x = _emb(6)
  f = lambda e: dro.dro_kl(e, LABELS, gamma=gamma, base=base)
  terms = [l for _, _, _, l in _naive_losses(x, LABELS, base) if l > 0]
  n = len(terms)
  p = np.array(_naive_kl_weights(terms, gamma))
  lv = np.array([float(l) for l in terms])

  def objective(q):  # sum q l - gamma KL(q || 1/n)
    q = np.clip(q, 1e-30, None)
    return float(q @ lv - gamma * np.sum(q * np.log(q * n)))

  value = float(f(x))
  np.testing.assert_allclose(value, objective(p), rtol=1e-5)
  # p* is the maximiser: random points of the simplex do no better.
  rng = np.random.default_rng(0)
  for _ in range(20):
    q = rng.dirichlet(np.ones(n))
    assert objective(q) <= value + 1e-6
    q = 0.9 * p + 0.1 * q
    assert objective(q) <= value + 1e-6

  # Lemma 1: grad F = sum_ij p*_ij grad l_ij (weights held fixed).
  terms_idx = [(i, j, pos) for i, j, pos, l in _naive_losses(x, LABELS, base) if l > 0]
  weighted = lambda e: sum(w * _naive_base(e, i, j, pos, base)
                           for w, (i, j, pos) in zip(p, terms_idx))
  np.testing.assert_allclose(jax.grad(f)(x), _num_grad(weighted, x), rtol=1e-4, atol=1e-5)


def test_kl_limits():
  x = _emb(7)
  pairs = core.check_inputs(x, LABELS)
  losses, active = dro.base_pair_losses(pairs, "margin")
  l = np.asarray(losses)[np.asarray(active)]
  # Small gamma -> max loss, large gamma -> mean loss.
  np.testing.assert_allclose(dro.dro_kl(x, LABELS, gamma=1e-4), l.max(), rtol=1e-3)
  np.testing.assert_allclose(dro.dro_kl(x, LABELS, gamma=1e4), l.mean(), rtol=1e-3)


def test_kl_sampled_draws_from_p_star_and_estimates_its_gradient():
  x = _emb(8)
  gamma = 0.3
  pairs = core.check_inputs(x, LABELS)
  losses, active = dro.base_pair_losses(pairs, "margin")
  l = np.where(active, losses, -np.inf) / gamma
  p = np.exp(l - l.max())
  p /= p.sum()
  n = 20000
  key = jax.random.PRNGKey(0)
  value = dro.dro_kl_sampled(x, LABELS, rng=key, num_samples=n, gamma=gamma)
  expected_weighted = float(np.sum(p * np.asarray(losses)))
  np.testing.assert_allclose(value, expected_weighted, rtol=0.03)
  g_sampled = jax.grad(lambda e: dro.dro_kl_sampled(e, LABELS, rng=key, num_samples=n,
                                                    gamma=gamma))(x)
  g_exact = jax.grad(lambda e: dro.dro_kl(e, LABELS, gamma=gamma))(x)
  np.testing.assert_allclose(g_sampled, g_exact, atol=0.03 * np.abs(g_exact).max())
  # Deterministic in the key, different across keys, never draws a zero-loss pair.
  f = jax.jit(lambda e, k: dro.dro_kl_sampled(e, LABELS, rng=k, num_samples=3, gamma=gamma))
  a, b = f(x, key), f(x, key)
  assert a == b
  vals = {float(f(x, jax.random.PRNGKey(s))) for s in range(8)}
  assert len(vals) > 1
  assert all(v > 0 for v in vals)


def test_kl_sampled_counts_match_probabilities():
  # The sampled loss sum_ij (c_ij / n) l_ij with c ~ Multinomial(n, p*) lies within a few
  # standard deviations of sum p* l (a 5-sd bound: flaky with probability < 1e-6).
  x = _emb(9)
  gamma = 0.5
  pairs = core.check_inputs(x, LABELS)
  losses, active = dro.base_pair_losses(pairs, "margin")
  l = np.where(active, losses, -np.inf) / gamma
  p = np.exp(l - l.max())
  p /= p.sum()
  n = 40000
  value = float(dro.dro_kl_sampled(x, LABELS, rng=jax.random.PRNGKey(3), num_samples=n,
                                   gamma=gamma, base="margin"))
  mean = float(np.sum(p * np.asarray(losses)))
  sd = math.sqrt(float(np.sum(p * np.asarray(losses) ** 2)) - mean ** 2) / math.sqrt(n)
  assert abs(value - mean) < 5 * sd


# ----------------------------------------------------------------------------- grouped KL


def _naive_grouped(x, gp, gn, add_one, base="margin"):
  """Eq. 7 per anchor, zero-loss pairs left out (float64)."""
  total = 0.0
  losses = _naive_losses(x, LABELS, base)
  for i in range(B):
    for is_pos, g in ((True, gp), (False, gn)):
      ls = [l for a, _, pos, l in losses if a == i and pos == is_pos and l > 0]
      if add_one:
        total += g * math.log((1 + sum(math.exp(l / g) for l in ls)) / (len(ls) + 1))
      elif ls:
        total += g * math.log(sum(math.exp(l / g) for l in ls) / len(ls))
  return total


@pytest.mark.parametrize("add_one", [False, True])
def test_grouped_kl_matches_naive(add_one):
  x = _emb(10)
  f = lambda e: dro.dro_grouped_kl(e, LABELS, gamma_pos=0.3, gamma_neg=0.05, add_one=add_one,
                                   reduction="sum")
  g = lambda e: _naive_grouped(e, 0.3, 0.05, add_one)
  np.testing.assert_allclose(f(x), g(x), rtol=1e-5)
  np.testing.assert_allclose(jax.grad(f)(x), _num_grad(g, x), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dro.dro_grouped_kl(x, LABELS, gamma_pos=0.3, gamma_neg=0.05,
                                                add_one=add_one), g(x) / B, rtol=1e-5)
  per = dro.dro_grouped_kl(x, LABELS, gamma_pos=0.3, gamma_neg=0.05, add_one=add_one,
                           reduction="none")
  assert per.shape == (B,)
  np.testing.assert_allclose(per.sum(), g(x), rtol=1e-5)


def _naive_lifted_structure(x, lam=0.5):
  """Eq. 3 of the paper: sum_i [log sum_P e^(lam - S) + log sum_N e^(S - lam)]_+ (float64)."""
  s = np.asarray(x, np.float64) @ np.asarray(x, np.float64).T
  total = 0.0
  for i in range(B):
    p = [j for j in range(B) if j != i and LABELS[j] == LABELS[i]]
    n = [j for j in range(B) if LABELS[j] != LABELS[i]]
    t = (math.log(sum(math.exp(lam - s[i, j]) for j in p))
         + math.log(sum(math.exp(s[i, j] - lam) for j in n)))
    total += max(t, 0.0)
  return total


@pytest.mark.parametrize("seed,threshold", [(11, 0.5), (12, -0.3)])
def test_grouped_kl_gamma_one_has_the_lifted_structure_gradient(seed, threshold):
  """Paper's claim (sec. 3.3): grouped KL with gamma = 1 has exactly the gradient of LS (eq. 3).

  Precisely: with the margin base loss and m large enough that no pair loss is hinged,
  F = L_LS + sum_i (2m - log|P_i| - log|N_i|), so the gradients are equal, not just parallel.
  """
  x = _emb(seed)
  m = 3.0  # |S| <= 1, so m + y (lambda - S) > 0 for every pair
  f = lambda e: dro.dro_grouped_kl(e, LABELS, gamma=1.0, margin=m, threshold=threshold,
                                   reduction="sum")
  s = x @ x.T
  for i in range(B):  # the outer hinge of LS is active at this point
    p = [j for j in range(B) if j != i and LABELS[j] == LABELS[i]]
    n = [j for j in range(B) if LABELS[j] != LABELS[i]]
    assert np.log(np.exp(0.5 - s[i, p]).sum()) + np.log(np.exp(s[i, n] - 0.5).sum()) > 0
  const = B * (2 * m - math.log(1) - math.log(4))
  np.testing.assert_allclose(f(x), _naive_lifted_structure(x) + const, rtol=1e-5)
  np.testing.assert_allclose(jax.grad(f)(x), _num_grad(_naive_lifted_structure, x),
                             rtol=1e-4, atol=1e-5)
  gls = getattr(L, "generalized_lifted_structure", None)
  if gls is not None:  # the library's eq. 3: generalised LS on similarities, summed
    ls = lambda e: gls(e, LABELS, distance="dot", pos_margin=0.5, neg_margin=0.5,
                       reduction="sum")
    np.testing.assert_allclose(ls(x), _naive_lifted_structure(x), rtol=1e-5)
    np.testing.assert_allclose(jax.grad(f)(x), jax.grad(ls)(x), rtol=1e-4, atol=1e-6)


def _naive_ms(x, alpha, beta, lam_pos, lam_neg, labels=LABELS):
  """Eq. 2 (MS), with separate thresholds for the positive and negative terms (float64)."""
  s = np.asarray(x, np.float64) @ np.asarray(x, np.float64).T
  b = len(labels)
  total = 0.0
  for i in range(b):
    p = [j for j in range(b) if j != i and labels[j] == labels[i]]
    n = [j for j in range(b) if labels[j] != labels[i]]
    total += 1 / alpha * math.log(1 + sum(math.exp(-alpha * (s[i, j] - lam_pos)) for j in p))
    total += 1 / beta * math.log(1 + sum(math.exp(beta * (s[i, j] - lam_neg)) for j in n))
  return total / b


def _ms_const(alpha, beta, labels=LABELS):
  b = len(labels)
  npos = [(labels == labels[i]).sum() - 1 for i in range(b)]
  nneg = [(labels != labels[i]).sum() for i in range(b)]
  return -sum(math.log(p + 1) / alpha + math.log(n + 1) / beta for p, n in zip(npos, nneg)) / b


def test_grouped_kl_recovers_multi_similarity_with_split_thresholds():
  """Paper's claim (supp. 6.1.2): with the zero-loss pair added (add_one), gamma+ = 1/alpha,
  gamma- = 1/beta, the gradient is MS's with c+ = lambda + m, c- = lambda - m (exact when no
  pair loss is hinged; the value differs by a constant)."""
  x = _emb(13)
  # m > 1 + |lambda| keeps every pair loss positive (|S| <= 1).
  alpha, beta, lam, m = 2.0, 50.0, 0.5, 1.6
  f = lambda e: dro.dro_grouped_kl(e, LABELS, gamma_pos=1 / alpha, gamma_neg=1 / beta,
                                   add_one=True, margin=m, threshold=lam)
  g = lambda e: _naive_ms(e, alpha, beta, lam + m, lam - m)
  np.testing.assert_allclose(f(x), g(x) + _ms_const(alpha, beta), rtol=1e-5)
  np.testing.assert_allclose(jax.grad(f)(x), _num_grad(g, x), rtol=1e-4, atol=1e-5)


def _all_violating_batch(seed=14):
  """Every positive similarity ~1/3 and every negative ~2/3, so with lambda = 0.5 and m = 0 no
  margin loss is hinged: x = (sqrt2 c +- e_class) / sqrt3."""
  c = np.zeros(4)
  c[3] = math.sqrt(2)
  x = np.stack([c + sgn * np.eye(4)[k] for k in range(3) for sgn in (1, -1)])
  x = x + 0.03 * np.random.default_rng(seed).normal(size=x.shape)
  return _unit(x)


def test_grouped_kl_recovers_standard_multi_similarity():
  """Standard MS (one threshold lambda) is the case m = 0 of the recovery."""
  x = _all_violating_batch()
  s = x @ x.T
  pos = (LABELS[:, None] == LABELS[None, :]) & ~np.eye(B, dtype=bool)
  assert s[pos].max() < 0.5 < s[LABELS[:, None] != LABELS[None, :]].min()
  alpha, beta, lam = 2.0, 50.0, 0.5
  f = lambda e: dro.dro_grouped_kl(e, LABELS, gamma_pos=1 / alpha, gamma_neg=1 / beta,
                                   add_one=True, margin=0.0, threshold=lam)
  g = lambda e: _naive_ms(e, alpha, beta, lam, lam)
  np.testing.assert_allclose(f(x), g(x) + _ms_const(alpha, beta), rtol=1e-5)
  np.testing.assert_allclose(jax.grad(f)(x), _num_grad(g, x), rtol=1e-4, atol=1e-5)
  ms = getattr(L, "multi_similarity", None)
  if ms is not None:  # the library's MS loss (PML defaults alpha=2, beta=50, base=0.5)
    gl = lambda e: ms(e, LABELS, alpha=alpha, beta=beta, base=lam)
    np.testing.assert_allclose(gl(x), g(x), rtol=1e-5)
    np.testing.assert_allclose(jax.grad(f)(x), jax.grad(gl)(x), rtol=1e-4, atol=1e-6)


def test_grouped_kl_zero_loss_pairs_drop_out():
  # With the default margin (m = 0.2) some pairs are hinged; they must not enter the means.
  x = _emb(15)
  pairs = core.check_inputs(x, LABELS)
  losses, active = dro.base_pair_losses(pairs, "margin")
  assert 0 < np.asarray(active).sum() < B * (B - 1)
  np.testing.assert_allclose(dro.dro_grouped_kl(x, LABELS, gamma=0.1, reduction="sum"),
                             _naive_grouped(x, 0.1, 0.1, False), rtol=1e-5)


# ----------------------------------------------------------------------------- numerics
# Float64 references of the paper's formulas (vectorised: the batches here are the paper's), and
# the settings of its tables: gamma in {0.1, 0.01, 0.001} (Tables 2 and 4) and below, B = 80
# (16 classes x 5) and B = 640 (In-Shop).

PAPER_GAMMAS = (0.1, 0.01, 0.001, 1e-4)


def _ref64(x, labels, base="margin", m=0.2, lam=0.5, alpha=2.0, beta=50.0):
  """Per-pair losses ``l``, their derivatives ``dl/dS``, the positive mask and the active mask."""
  x = np.asarray(x, np.float64)
  s = x @ x.T
  valid = ~np.eye(len(labels), dtype=bool)
  pos = (labels[:, None] == labels[None, :]) & valid
  if base == "margin":
    y = np.where(pos, 1.0, -1.0)
    t = m + y * (lam - s)
    l, dl = np.maximum(t, 0.0), np.where(t > 0, -y, 0.0)
  else:
    a = np.where(pos, -alpha, beta)
    u = a * (s - lam)
    l, dl = np.logaddexp(0.0, u), a / (1.0 + np.exp(-u))
  l, dl = np.where(valid, l, 0.0), np.where(valid, dl, 0.0)
  return l, dl, pos, valid & (l > 0)


def _ref_kl(l, act, gamma, add_one=False):
  """gamma log mean exp(l / gamma) over ``act`` (+ one zero loss) and the softmax weights."""
  n = act.sum() + add_one
  if n == 0:
    return 0.0, np.zeros_like(l)
  top = max(l[act].max() if act.any() else 0.0, 0.0 if add_one else -np.inf)
  e = np.where(act, np.exp(np.where(act, l - top, 0.0) / gamma), 0.0)
  total = e.sum() + (math.exp(-top / gamma) if add_one else 0.0)
  return top + gamma * math.log(total / n), e / total


def _ref_topk(l, act, k):
  """Sum of the k largest active losses and the 0/1 selection."""
  order = np.argsort(-np.where(act, l, -1.0), axis=None)[:k]
  sel = np.zeros(l.size, bool)
  sel[order] = act.reshape(-1)[order]
  sel = sel.reshape(l.shape)
  return float(l[sel].sum()), sel.astype(np.float64)


def _ref_value_and_weights(name, l, pos, act, gamma, add_one=False, k=None):
  """Value of each weighting and the per-pair weights p_ij of its gradient (float64)."""
  if name == "dro_kl":
    return _ref_kl(l, act, gamma)
  if name == "dro_grouped_kl":
    total, w = 0.0, np.zeros_like(l)
    for i in range(l.shape[0]):
      for side in (pos[i], ~pos[i]):
        v, wi = _ref_kl(l[i], act[i] & side, gamma, add_one)
        total, w[i] = total + v, w[i] + wi
    return total / l.shape[0], w
  if name == "dro_topk":
    v, sel = _ref_topk(l, act, k)
    return v / k, sel / k
  if name == "dro_topk_pn":
    vp, sp = _ref_topk(l, act & pos, k // 2)
    vn, sn = _ref_topk(l, act & ~pos, k - k // 2)
    return (vp + vn) / k, (sp + sn) / k
  raise ValueError(name)


def _ref_grad(x, w, dl):
  """d/dx of sum_ij w_ij l_ij(S_ij) with S = x x^T and the weights held fixed."""
  g = w * dl
  x = np.asarray(x, np.float64)
  return g @ x + g.T @ x


@pytest.mark.parametrize("gamma", PAPER_GAMMAS)
def test_grouped_kl_gradient_finite_and_exact_at_paper_setting(gamma):
  # Guards the NaN gradients of grouped KL at gamma <= 0.01 (B = 80, D = 128): a masked-out pair
  # loss used to overflow in the exponential before being masked.
  labels = np.repeat(np.arange(16), 5).astype(np.int32)
  x = _emb(50, b=80, d=128)
  v, g = jax.value_and_grad(lambda e: dro.dro_grouped_kl(e, labels, gamma=gamma))(x)
  assert np.isfinite(v) and np.all(np.isfinite(g))
  l, dl, pos, act = _ref64(x, labels)
  want, w = _ref_value_and_weights("dro_grouped_kl", l, pos, act, gamma)
  want_g = _ref_grad(x, w, dl) / 80
  np.testing.assert_allclose(v, want, rtol=2e-6)
  np.testing.assert_allclose(g, want_g, atol=1e-4 * np.abs(want_g).max())


@pytest.mark.parametrize("gamma", PAPER_GAMMAS)
def test_kl_normaliser_exact_over_400k_pairs(gamma):
  # Guards the KL normaliser at B = 640: the log1p form cancelled and the weights summed to
  # 1 +- 6e-4 here; the max-shifted log-sum-exp makes them sum to 1 to float32 precision.
  labels = np.repeat(np.arange(128), 5).astype(np.int32)
  x = _emb(51, b=640, d=8)
  pairs = core.check_inputs(x, labels)
  losses, active = dro.base_pair_losses(pairs, "binomial")  # every pair has a loss > 0
  assert int(np.asarray(active).sum()) == 640 * 639
  w = jax.grad(lambda l: dro._kl_robust(l, active, gamma))(losses)
  l, _, _, act = _ref64(x, labels, "binomial")
  want, w_want = _ref_kl(l, act, gamma)
  assert abs(np.asarray(w, np.float64).sum() - 1.0) < 1e-6
  np.testing.assert_allclose(w, w_want, atol=1e-6 * w_want.max())
  np.testing.assert_allclose(dro.dro_kl(x, labels, gamma=gamma, base="binomial"), want,
                             rtol=1e-6)


SPREAD = {
    "dro_topk": dict(k=9),
    "dro_topk_pn": dict(k=9),
    "dro_kl": {},
    "dro_kl_sampled": dict(num_samples=32, rng=jax.random.PRNGKey(2)),
    "dro_grouped_kl": dict(add_one=True),
}


@pytest.mark.parametrize("gamma", PAPER_GAMMAS)
@pytest.mark.parametrize("name", sorted(SPREAD))
def test_every_weighting_finite_and_exact_with_losses_up_to_50(name, gamma):
  # Guards finite values and gradients of every weighting for gamma down to 1e-4 when the pair
  # losses span 0..~50 (embeddings of norm up to 9.5), against the float64 formulas.
  labels = np.repeat(np.arange(4), 3).astype(np.int32)
  x = _emb(52, b=12) * np.linspace(1.0, 9.5, 12, dtype=np.float32)[:, None]
  kw = dict(SPREAD[name])
  if name != "dro_topk" and name != "dro_topk_pn":
    kw["gamma"] = gamma
  fn = lambda e: getattr(dro, name)(e, labels, **kw)
  v, g = jax.value_and_grad(fn)(x)
  assert np.isfinite(v) and np.all(np.isfinite(g)), (name, gamma)
  l, dl, pos, act = _ref64(x, labels)
  assert 45 < l.max() < 55 and (l[~np.eye(12, dtype=bool)] == 0).any()
  if name == "dro_kl_sampled":  # a mean of drawn losses
    assert 0 < float(v) <= l.max() * (1 + 1e-6)
    return
  want, w = _ref_value_and_weights(name, l, pos, act, gamma, add_one=kw.get("add_one", False),
                                   k=kw.get("k"))
  scale = 12 if name == "dro_grouped_kl" else 1
  want_g = _ref_grad(x, w, dl) / scale
  np.testing.assert_allclose(v, want, rtol=2e-6)
  np.testing.assert_allclose(g, want_g, atol=1e-4 * np.abs(want_g).max())


# ----------------------------------------------------------------------------- shared behaviour


ALL = {
    "dro_topk": dict(k=5),
    "dro_topk_pn": dict(k=6),
    "dro_kl": dict(gamma=0.2),
    "dro_kl_sampled": dict(gamma=0.2, num_samples=16, rng=jax.random.PRNGKey(1)),
    "dro_grouped_kl": dict(gamma=0.2),
}


def test_registry_has_every_dro_loss():
  assert set(L.DRO_LOSSES) == set(ALL) == set(dro.__all__)
  for name in ALL:
    assert L.get_loss(name) is getattr(dro, name)


@pytest.mark.parametrize("name", sorted(ALL))
def test_references_and_ref_mask(name):
  fn = getattr(dro, name)
  kw = ALL[name]
  x = _emb(16)
  # Same [6, 6] pair grid as the in-batch tests (fewer compiles).
  refs = _emb(17, b=B)
  rl = np.array([0, 1, 2, 0, 1, 3], np.int32)
  mask = np.array([True, True, False, True, False, True])
  # Masked slots are ignored: same as passing only the filled slots (padded slots get garbage).
  garbage = refs.copy()
  garbage[~mask] = _emb(18, b=2)
  a = fn(x, LABELS, ref_embeddings=garbage, ref_labels=rl, ref_mask=mask, **kw)
  if name == "dro_kl_sampled":  # draws index the flat [B, R] grid: compare with the full grid
    b = fn(x, LABELS, ref_embeddings=refs, ref_labels=rl, ref_mask=mask, **kw)
  else:
    b = fn(x, LABELS, ref_embeddings=refs[mask], ref_labels=rl[mask], **kw)
  np.testing.assert_allclose(a, b, rtol=1e-5)
  # With references no self-exclusion: the naive all-pairs top-K over B x R.
  if name == "dro_topk":
    ls = [float(_naive_base(x, i, j, LABELS[i] == rl[j], "margin", refs=refs))
          for i in range(B) for j in range(B) if mask[j]]
    ls = sorted([v for v in ls if v > 0], reverse=True)[:5]
    np.testing.assert_allclose(a, sum(ls) / len(ls), rtol=1e-5)


@pytest.mark.parametrize("name", sorted(ALL))
def test_jit_vmap_and_bfloat16(name):
  fn = getattr(dro, name)
  kw = ALL[name]
  xs = np.stack([_emb(20 + s) for s in range(3)])
  loss = lambda e: fn(e, LABELS, **kw)
  want = np.array([loss(x) for x in xs])
  np.testing.assert_allclose(jax.vmap(loss)(xs), want, rtol=1e-5)
  traces = []
  jitted = jax.jit(lambda e: traces.append(1) or loss(e))
  np.testing.assert_allclose(jitted(xs[0]), want[0], rtol=1e-5)
  np.testing.assert_allclose(jitted(xs[1]), want[1], rtol=1e-5)
  assert len(traces) == 1  # one compile per input shape
  got = fn(jnp.asarray(xs[0], jnp.bfloat16), LABELS, **kw)
  assert got.dtype == jnp.float32 and np.isfinite(got)


DEGENERATE = {
    "single_class": (_emb(30), np.zeros(B, np.int32), {}),
    "singletons": (_emb(31), np.arange(B, dtype=np.int32), {}),
    "empty_ref_mask": (_emb(32), LABELS, dict(ref_embeddings=_emb(33), ref_labels=LABELS,
                                              ref_mask=np.zeros(B, bool))),
    # Perfectly separated unit vectors: every margin loss is zero.
    "all_zero_loss": (np.repeat(np.eye(3, D, dtype=np.float32), 2, axis=0), LABELS, {}),
}


@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_degenerate_batches_are_finite(case):
  x, y, extra = DEGENERATE[case]
  for name, kw in ALL.items():
    fn = getattr(dro, name)
    f = lambda e: fn(e, y, **extra, **kw)
    v, g = jax.value_and_grad(f)(x)
    assert np.isfinite(v) and np.all(np.isfinite(g)), (name, case)
    if case in ("empty_ref_mask", "all_zero_loss"):
      assert v == 0 and np.all(g == 0), (name, case)


def test_bad_inputs_raise():
  x = _emb(40)
  with pytest.raises(ValueError, match="k must be >= 1"):
    dro.dro_topk(x, LABELS, k=0)
  with pytest.raises(ValueError, match="k must be >= 2"):
    dro.dro_topk_pn(x, LABELS, k=1)
  with pytest.raises(ValueError, match="Python int"):
    dro.dro_topk(x, LABELS, k=2.5)
  for g in (0.0, -1.0):
    with pytest.raises(ValueError, match="gamma"):
      dro.dro_kl(x, LABELS, gamma=g)
    with pytest.raises(ValueError, match="gamma"):
      dro.dro_kl_sampled(x, LABELS, rng=jax.random.PRNGKey(0), gamma=g)
    with pytest.raises(ValueError, match="gamma_neg"):
      dro.dro_grouped_kl(x, LABELS, gamma_neg=g)
  with pytest.raises(ValueError, match="num_samples"):
    dro.dro_kl_sampled(x, LABELS, rng=jax.random.PRNGKey(0), num_samples=0)
  with pytest.raises(ValueError, match="base"):
    dro.dro_topk(x, LABELS, base="contrastive")
  with pytest.raises(ValueError, match="normalize"):
    dro.dro_topk(x, LABELS, normalize="mean")
  with pytest.raises(ValueError, match="normalize"):
    dro.dro_topk_pn(x, LABELS, normalize="nonzero_pairs")
  with pytest.raises(ValueError, match="binomial_form"):
    dro.dro_kl(x, LABELS, base="binomial", binomial_form="ms")
  with pytest.raises(ValueError, match="margin"):
    dro.dro_kl(x, LABELS, margin=-0.1)
  with pytest.raises(ValueError, match="reduction"):
    dro.dro_grouped_kl(x, LABELS, reduction="mean_nonzero")
  with pytest.raises(ValueError, match="labels"):
    dro.dro_topk(x, LABELS[:3])
  with pytest.raises(ValueError, match="integer"):
    dro.dro_kl(x, LABELS.astype(np.float32))
