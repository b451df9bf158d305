"""Tests of the proxy losses (dmljax.losses.proxy) and the MPA family (dmljax.losses.mpa).

Every loss is checked against a naive float64 loop written from its paper's formula, in value
and in gradient (w.r.t. embeddings and proxies, by central finite differences of the naive
loop), on random cases and on 2-D cases whose values are written out by hand.
"""
import functools
import importlib
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dmljax.losses as L

proxy = importlib.import_module("dmljax.losses.proxy")
mpa_mod = importlib.import_module("dmljax.losses.mpa")


# ----------------------------------------------------------------------------- naive oracles
# Written from the papers' formulas with explicit loops over samples and proxies, in float64.


def _valid(mask, r):
  return [True] * r if mask is None else [bool(m) for m in mask]


def naive_proxy_nca(x, y, p, py, mask=None, softmax_scale=1.0):
  ok = _valid(mask, len(p))
  losses = []
  for i in range(len(x)):
    num = den = 0.0
    for r in range(len(p)):
      if not ok[r]:
        continue
      e = math.exp(-softmax_scale * float(np.sum((x[i] - p[r]) ** 2)))
      den += e
      if py[r] == y[i]:
        num += e
    if num > 0:
      losses.append(-math.log(num / den))
  return sum(losses) / len(losses) if losses else 0.0


def naive_proxy_nca_pp(x, y, p, py, mask=None, temperature=1 / 9):
  xn = x / np.linalg.norm(x, axis=1, keepdims=True)
  pn = p / np.linalg.norm(p, axis=1, keepdims=True)
  return naive_proxy_nca(xn, y, pn, py, mask, softmax_scale=1.0 / temperature)


def naive_proxy_anchor(x, y, p, py, mask=None, margin=0.1, alpha=32.0):
  ok = _valid(mask, len(p))
  pos_sum = neg_sum = 0.0
  n_with_pos = n_proxies = 0
  for r in range(len(p)):
    if not ok[r]:
      continue
    n_proxies += 1
    sp = sn = 0.0
    has_pos = False
    for i in range(len(x)):
      s = float(np.dot(x[i], p[r]))
      if y[i] == py[r]:
        has_pos = True
        sp += math.exp(-alpha * (s - margin))
      else:
        sn += math.exp(alpha * (s + margin))
    if has_pos:
      n_with_pos += 1
      pos_sum += math.log(1 + sp)
    neg_sum += math.log(1 + sn)
  return pos_sum / max(n_with_pos, 1) + neg_sum / max(n_proxies, 1)


def naive_groups(p, py, mask, k):
  """[(class id, [valid centre vectors])] of the class-major layout; empty groups dropped."""
  ok = _valid(mask, len(p))
  groups = []
  for c in range(len(p) // k):
    rows = [c * k + j for j in range(k) if ok[c * k + j]]
    if rows:
      groups.append((py[c * k], [p[r] for r in rows]))
  return groups


def naive_class_sim(xi, centres, gamma):
  """SoftTriple eq. 7 / MPA eq. 1."""
  sims = [float(np.dot(xi, w)) for w in centres]
  weights = [math.exp(s / gamma) for s in sims]
  return sum(w * s for w, s in zip(weights, sims)) / sum(weights)


def naive_regularizer(p, mask, k):
  """MPA eq. 3: sum over same-class centre pairs t < s of sqrt(2 - 2 w_s.w_t) / (C K (K-1))."""
  ok = _valid(mask, len(p))
  total, pairs = 0.0, 0
  for c in range(len(p) // k):
    for t in range(k):
      for s in range(t + 1, k):
        a, b = c * k + t, c * k + s
        if ok[a] and ok[b]:
          total += math.sqrt(max(2 - 2 * float(np.dot(p[a], p[b])), 0.0))
          pairs += 1
  return total / (2 * pairs) if pairs else 0.0  # 2 * pairs == C K (K - 1) without masks


def naive_soft_triple(x, y, p, py, mask=None, centers_per_class=10, la=20.0, gamma=0.1,
                      margin=0.01, reg_weight=0.2):
  groups = naive_groups(p, py, mask, centers_per_class)
  losses = []
  for i in range(len(x)):
    pos = neg = 0.0
    for cls, centres in groups:
      s = naive_class_sim(x[i], centres, gamma)
      if cls == y[i]:
        pos += math.exp(la * (s - margin))
      else:
        neg += math.exp(la * s)
    if pos > 0:
      losses.append(-math.log(pos / (pos + neg)))
  sim = sum(losses) / len(losses) if losses else 0.0
  return sim + reg_weight * naive_regularizer(p, mask, centers_per_class)


def naive_mpa(x, y, p, py, mask=None, centers_per_class=10, alpha=32.0, margin=0.1, gamma=0.1,
              reg_weight=0.2):
  """Eqs. 6-7: class-wise; positive part over classes present in the batch, negative over all."""
  groups = naive_groups(p, py, mask, centers_per_class)
  pos_sum = neg_sum = 0.0
  n_pos = 0
  for cls, centres in groups:
    sp = sn = 0.0
    present = False
    for i in range(len(x)):
      s = naive_class_sim(x[i], centres, gamma)
      if y[i] == cls:
        present = True
        sp += math.exp(-alpha * (s - margin))
      else:
        sn += math.exp(alpha * (s + margin))
    if present:
      n_pos += 1
      pos_sum += math.log(1 + sp)
    neg_sum += math.log(1 + sn)
  sim = pos_sum / max(n_pos, 1) + neg_sum / max(len(groups), 1)
  return sim + reg_weight * naive_regularizer(p, mask, centers_per_class)


def naive_mpa_dw(x, y, p, py, mask=None, centers_per_class=10, alpha=32.0, margin=0.1,
                 gamma=0.1, reg_weight=0.2):
  """Eqs. 12-13: per sample, a soft-plus of the positive class plus one over negative classes."""
  groups = naive_groups(p, py, mask, centers_per_class)
  total = 0.0
  for i in range(len(x)):
    sp = sn = 0.0
    for cls, centres in groups:
      s = naive_class_sim(x[i], centres, gamma)
      if cls == y[i]:
        sp += math.exp(-alpha * (s - margin))
      else:
        sn += math.exp(alpha * (s + margin))
    total += math.log(1 + sp) + math.log(1 + sn)
  return total / len(x) + reg_weight * naive_regularizer(p, mask, centers_per_class)


def naive_mpa_ap(x, y, p, py, mask=None, centers_per_class=10, alpha=32.0, margin=0.1,
                 gamma=0.1, reg_weight=0.2):
  """Eqs. 15-17: per sample, one soft-plus over S' of every class."""
  groups = naive_groups(p, py, mask, centers_per_class)
  total = 0.0
  for i in range(len(x)):
    acc = 0.0
    for cls, centres in groups:
      s = naive_class_sim(x[i], centres, gamma)
      s_prime = margin - s if cls == y[i] else s + margin
      acc += math.exp(alpha * s_prime)
    total += math.log(1 + acc)
  return total / len(x) + reg_weight * naive_regularizer(p, mask, centers_per_class)


NAIVE = {
    "proxy_nca": naive_proxy_nca, "proxy_nca_pp": naive_proxy_nca_pp,
    "proxy_anchor": naive_proxy_anchor, "soft_triple": naive_soft_triple, "mpa": naive_mpa,
    "mpa_dw": naive_mpa_dw, "mpa_ap": naive_mpa_ap,
}
CLASS_MAJOR = ("soft_triple", "mpa", "mpa_dw", "mpa_ap")


def numeric_grad(f, x, p, eps=1e-6):
  """Central finite differences of the float64 oracle w.r.t. x and p."""
  grads = []
  for which in range(2):
    arr = (x, p)[which]
    g = np.zeros_like(arr)
    for idx in np.ndindex(arr.shape):
      hi, lo = arr.copy(), arr.copy()
      hi[idx] += eps
      lo[idx] -= eps
      args_hi = (hi, p) if which == 0 else (x, hi)
      args_lo = (lo, p) if which == 0 else (x, lo)
      g[idx] = (f(*args_hi) - f(*args_lo)) / (2 * eps)
    grads.append(g)
  return grads


@functools.lru_cache(maxsize=None)
def _value_and_grad(name, hp_items):
  fn = functools.partial(L.LOSSES[name], **dict(hp_items))

  def f(x, y, p, py, mask):
    return fn(x, y, ref_embeddings=p, ref_labels=py, ref_mask=mask)

  vg = jax.value_and_grad(f, argnums=(0, 2))
  return vg, jax.jit(vg)


def _args(x, y, p, py, mask=None, dtype=jnp.float32):
  mask = np.ones(len(p), bool) if mask is None else mask
  return (jnp.asarray(x, dtype), jnp.asarray(y), jnp.asarray(p, dtype), jnp.asarray(py),
          jnp.asarray(mask))


def run(name, x, y, p, py, mask=None, **hp):
  """Jitted value and gradients (w.r.t. embeddings and proxies); one compile per config+shape."""
  v, (gx, gp) = _value_and_grad(name, tuple(sorted(hp.items())))[1](*_args(x, y, p, py, mask))
  return float(v), np.asarray(gx), np.asarray(gp)


def unit(a):
  return a / np.linalg.norm(a, axis=1, keepdims=True)


def random_case(seed, b=6, d=3, c=3, k=2, class_major=True):
  rng = np.random.default_rng(seed)
  x = unit(rng.normal(size=(b, d)))
  y = rng.integers(0, c, size=b)
  p = unit(rng.normal(size=(c * k, d)))
  py = np.repeat(np.arange(c), k) if class_major else rng.permutation(np.repeat(np.arange(c), k))
  return x, y, p, py


def check_against_naive(name, x, y, p, py, mask=None, rtol=2e-4, **hp):
  naive = NAIVE[name]
  v, gx, gp = run(name, x, y, p, py, mask, **hp)
  f = lambda xx, pp: naive(xx, y, pp, py, mask, **hp)  # noqa: E731
  want = f(x, p)
  ngx, ngp = numeric_grad(f, x, p)
  scale = max(1.0, abs(want))
  np.testing.assert_allclose(v, want, rtol=rtol, atol=rtol * scale)
  gscale = max(1.0, np.abs(ngx).max(), np.abs(ngp).max())
  np.testing.assert_allclose(gx, ngx, atol=5e-4 * gscale)
  np.testing.assert_allclose(gp, ngp, atol=5e-4 * gscale)
  return v


# ----------------------------------------------------------------------------- oracle agreement

# Each loss with hyperparameters small enough for float32 finite values to carry information.
CONFIGS = [
    ("proxy_nca", {}),
    ("proxy_nca", {"softmax_scale": 3.0}),
    ("proxy_nca_pp", {}),
    ("proxy_anchor", {}),
    ("proxy_anchor", {"alpha": 8.0, "margin": 0.2}),
    ("soft_triple", {"centers_per_class": 2}),
    ("soft_triple", {"centers_per_class": 2, "la": 5.0, "gamma": 0.5, "margin": 0.3,
                     "reg_weight": 1.0}),
    ("mpa", {"centers_per_class": 2}),
    ("mpa", {"centers_per_class": 2, "alpha": 4.0, "gamma": 0.5, "margin": 0.3}),
    ("mpa_dw", {"centers_per_class": 2}),
    ("mpa_dw", {"centers_per_class": 2, "alpha": 4.0, "gamma": 0.5, "margin": 0.3}),
    ("mpa_ap", {"centers_per_class": 2}),
    ("mpa_ap", {"centers_per_class": 2, "alpha": 4.0, "gamma": 0.5, "margin": 0.3}),
]


@pytest.mark.parametrize("name,hp", CONFIGS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CONFIGS)])
def test_matches_naive_random(name, hp):
  for seed in (0, 1):
    x, y, p, py = random_case(seed, class_major=name in CLASS_MAJOR)
    check_against_naive(name, x, y, p, py, **hp)


@pytest.mark.parametrize("name", sorted(NAIVE))
def test_matches_naive_with_ref_mask(name):
  # Seed 3 leaves class 2 without samples in the batch; the mask removes one centre of class 0
  # and both centres of class 1 (a whole class group for the class-major losses).
  x, y, p, py = random_case(3, class_major=name in CLASS_MAJOR)
  mask = np.array([True, False, True, True, True, True])
  if name in CLASS_MAJOR:
    mask = np.array([True, False, False, False, True, True])
  hp = {"centers_per_class": 2} if name in CLASS_MAJOR else {}
  check_against_naive(name, x, y, p, py, mask, **hp)


@pytest.mark.parametrize("name", ["proxy_nca", "proxy_anchor"])
def test_non_normalised_inputs_used_as_given(name):
  rng = np.random.default_rng(5)
  x = 0.7 * rng.normal(size=(6, 3))
  p = 0.7 * rng.normal(size=(6, 3))
  y = rng.integers(0, 3, size=6)
  py = np.array([2, 0, 1, 0, 2, 1])  # two proxies per class, any order
  hp = {"alpha": 8.0, "margin": 0.2} if name == "proxy_anchor" else {}
  check_against_naive(name, x, y, p, py, **hp)


# ----------------------------------------------------------------------------- hand-checked 2-D

X2 = np.array([[1.0, 0.0], [0.0, 1.0]])
Y2 = np.array([0, 1])
P2 = np.array([[1.0, 0.0], [0.0, 1.0]])  # proxy 0 on sample 0, proxy 1 on sample 1
PY2 = np.array([0, 1])


def test_hand_proxy_nca():
  # Each sample sits on its proxy (d = 0) at d = 2 from the other: loss = log(1 + exp(-2 s)).
  v, _, _ = run("proxy_nca", X2, Y2, P2, PY2, softmax_scale=1.5)
  assert v == pytest.approx(math.log1p(math.exp(-3.0)), rel=1e-6)
  # ProxyNCA++ normalises: scaling inputs changes nothing; T = 1/9 gives log(1 + exp(-18)).
  v, _, _ = run("proxy_nca_pp", 3 * X2, Y2, 0.5 * P2, PY2)
  assert v == pytest.approx(math.log1p(math.exp(-18.0)), rel=1e-4)


def test_hand_proxy_anchor():
  # Each proxy: one positive at s = 1, one negative at s = 0.
  v, _, _ = run("proxy_anchor", X2, Y2, P2, PY2, alpha=2.0, margin=0.1)
  want = math.log1p(math.exp(-2.0 * 0.9)) + math.log1p(math.exp(2.0 * 0.1))
  assert v == pytest.approx(want, rel=1e-6)
  # Only class 0 present: the positive part averages over 1 proxy, the negative over 2.
  v, _, _ = run("proxy_anchor", X2, np.array([0, 0]), P2, PY2, alpha=2.0, margin=0.1)
  want = (math.log1p(math.exp(-1.8) + math.exp(-2.0 * (0.0 - 0.1)))
          + (0.0 + math.log1p(math.exp(2.0 * 0.1) + math.exp(2.0 * 1.1))) / 2)
  assert v == pytest.approx(want, rel=1e-6)


def test_hand_soft_triple_and_regularizer():
  # Class 0 centres at 0 and 90 degrees, class 1 centres at 180 and 270 degrees; x at 0 deg.
  p = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
  py = np.array([0, 0, 1, 1])
  x = np.array([[1.0, 0.0]])
  g, la, m = 0.5, 2.0, 0.1
  s0 = (math.exp(1 / g) * 1 + 1 * 0) / (math.exp(1 / g) + 1)     # sims 1, 0
  s1 = (math.exp(-1 / g) * -1 + 1 * 0) / (math.exp(-1 / g) + 1)  # sims -1, 0
  want_sim = -math.log(math.exp(la * (s0 - m)) / (math.exp(la * (s0 - m)) + math.exp(la * s1)))
  reg = (math.sqrt(2) + math.sqrt(2)) / (2 * 2 * 1)  # orthogonal centres: sqrt(2 - 0) each
  v, _, _ = run("soft_triple", x, np.array([0]), p, py, centers_per_class=2, la=la, gamma=g,
                margin=m, reg_weight=0.5)
  assert v == pytest.approx(want_sim + 0.5 * reg, rel=1e-6)


def test_hand_mpa_family():
  a, m = 2.0, 0.1
  # One centre per class: S(x, c) = x.w_c = 1 for the own class, 0 for the other.
  v_dw, _, _ = run("mpa_dw", X2, Y2, P2, PY2, centers_per_class=1, alpha=a, margin=m)
  assert v_dw == pytest.approx(math.log1p(math.exp(-a * (1 - m))) + math.log1p(math.exp(a * m)),
                               rel=1e-6)
  v_ap, _, _ = run("mpa_ap", X2, Y2, P2, PY2, centers_per_class=1, alpha=a, margin=m)
  assert v_ap == pytest.approx(math.log1p(math.exp(a * (m - 1)) + math.exp(a * m)), rel=1e-6)
  v_mpa, _, _ = run("mpa", X2, Y2, P2, PY2, centers_per_class=1, alpha=a, margin=m)
  assert v_mpa == pytest.approx(v_dw, rel=1e-6)  # symmetric case: class-wise == data-wise


# ----------------------------------------------------------------------------- identities


def test_mpa_with_one_centre_is_proxy_anchor():
  x, y, p, py = random_case(7, c=6, k=1)
  got = run("mpa", x, y, p, py, centers_per_class=1)
  want = run("proxy_anchor", x, y, p, py)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_proxy_nca_pp_unnormalised_is_proxy_nca():
  x, y, p, py = random_case(8, class_major=False)
  got = run("proxy_nca_pp", 2 * x, y, p, py, temperature=1 / 3, normalize=False)
  want = run("proxy_nca", 2 * x, y, p, py, softmax_scale=3.0)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["proxy_anchor", "mpa_ap"])
def test_masking_equals_dropping(name):
  hp = {"centers_per_class": 2} if name in CLASS_MAJOR else {}
  x, y, p, py = random_case(9, class_major=True)
  mask = np.array([True, True, False, False, True, True])
  v_mask, gx_mask, gp_mask = run(name, x, y, p, py, mask, **hp)
  keep = np.flatnonzero(mask)
  v_drop, gx_drop, gp_drop = run(name, x, y, p[keep], py[keep], **hp)
  assert v_mask == pytest.approx(v_drop, rel=1e-6)
  np.testing.assert_allclose(gx_mask, gx_drop, atol=1e-6)
  np.testing.assert_allclose(gp_mask[keep], gp_drop, atol=1e-6)
  np.testing.assert_array_equal(gp_mask[~mask], 0.0)


# ----------------------------------------------------------------------------- transforms


def _call(name, x, y, p, py, **kw):
  hp = {"centers_per_class": 2} if name in CLASS_MAJOR else {}
  return L.LOSSES[name](x, y, ref_embeddings=p, ref_labels=py, **hp, **kw)


@pytest.mark.parametrize("name", sorted(NAIVE))
def test_jit_grad_vmap(name):
  hp = {"centers_per_class": 2} if name in CLASS_MAJOR else {}
  cases = [random_case(s, class_major=True) for s in (10, 11)]
  stacked = [jnp.stack(a) for a in zip(*(_args(*c) for c in cases))]
  vg = _value_and_grad(name, tuple(sorted(hp.items())))[0]
  batched = jax.jit(jax.vmap(vg))(*stacked)
  for i, case in enumerate(cases):
    v, gx, gp = run(name, *case, **hp)  # jit without vmap
    np.testing.assert_allclose(batched[0][i], v, rtol=1e-5)
    np.testing.assert_allclose(batched[1][0][i], gx, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(batched[1][1][i], gp, rtol=1e-4, atol=1e-6)


def test_one_compile_per_shape():
  traces = []

  @jax.jit
  def f(x, y, p, py):
    traces.append(1)
    return proxy.proxy_anchor(x, y, ref_embeddings=p, ref_labels=py)

  for seed in range(3):
    x, y, p, py = random_case(seed)
    f(jnp.asarray(x, jnp.float32), jnp.asarray(y), jnp.asarray(p, jnp.float32), jnp.asarray(py))
  assert len(traces) == 1


@pytest.mark.parametrize("name", ["proxy_nca", "proxy_anchor", "mpa", "mpa_ap"])
def test_no_batch_by_refs_by_dim_buffer(name):
  # Compiled forward + backward: no buffer as large as B x R x D (a difference tensor).
  b, c, k, d = 4, 4, 2, 16
  hp = {"centers_per_class": k} if name in CLASS_MAJOR else {}
  x, y, p, py = random_case(20, b=b, d=d, c=c, k=k)
  text = _value_and_grad(name, tuple(sorted(hp.items())))[1].lower(
      *_args(x, y, p, py)).compile().as_text()
  sizes = [int(np.prod([int(v) for v in m.split(",") if v]))
           for m in re.findall(r"f32\[([0-9,]*)\]", text)]
  assert sizes and max(sizes) < b * c * k * d


# ----------------------------------------------------------------------------- degenerate inputs


@pytest.mark.parametrize("name", sorted(NAIVE))
def test_no_positive_proxy_in_batch(name):
  # Every sample is of class 5, which has no proxy.
  x, _, p, py = random_case(12)
  y = np.full(len(x), 5)
  hp = {"centers_per_class": 2} if name in CLASS_MAJOR else {}
  v, gx, gp = run(name, x, y, p, py, **hp)
  assert np.isfinite(v) and np.all(np.isfinite(gx)) and np.all(np.isfinite(gp))
  assert v == pytest.approx(NAIVE[name](x, y, p, py, None, **hp), rel=1e-4, abs=1e-5)
  if name in ("proxy_nca", "proxy_nca_pp"):
    assert v == 0.0  # no sample has a defined loss


@pytest.mark.parametrize("name", sorted(NAIVE))
def test_empty_ref_mask(name):
  x, y, p, py = random_case(13)
  hp = {"centers_per_class": 2} if name in CLASS_MAJOR else {}
  v, gx, gp = run(name, x, y, p, py, np.zeros(len(p), bool), **hp)
  assert v == 0.0
  np.testing.assert_array_equal(gx, 0.0)
  np.testing.assert_array_equal(gp, 0.0)


def test_coincident_centres_finite():
  # Both centres of each class equal: the regulariser's sqrt is at 0.
  x, y, p, py = random_case(14)
  p[1], p[3], p[5] = p[0], p[2], p[4]
  for name in CLASS_MAJOR:
    v, gx, gp = run(name, x, y, p, py, centers_per_class=2)
    assert np.isfinite(v) and np.all(np.isfinite(gx)) and np.all(np.isfinite(gp))


@pytest.mark.parametrize("name", sorted(NAIVE))
def test_bfloat16(name):
  hp = {"centers_per_class": 2} if name in CLASS_MAJOR else {}
  case = random_case(15)
  want, _, _ = run(name, *case, **hp)
  vg = _value_and_grad(name, tuple(sorted(hp.items())))[1]
  got, (gx, gp) = vg(*_args(*case, dtype=jnp.bfloat16))
  assert got.dtype == jnp.float32 and gx.dtype == gp.dtype == jnp.bfloat16
  # bfloat16 keeps ~3 significant digits of the inputs; the scales (alpha = 32) amplify them.
  assert float(got) == pytest.approx(want, rel=0.05, abs=0.05)
  assert np.all(np.isfinite(np.asarray(gx, np.float32)))
  assert np.all(np.isfinite(np.asarray(gp, np.float32)))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", sorted(NAIVE))
def test_value_errors_common(name):
  x, y, p, py = random_case(16)
  with pytest.raises(ValueError, match="proxies"):
    _call(name, x, y, None, None)
  with pytest.raises(ValueError, match="ref_embeddings"):
    _call(name, x, y, p[:, :2], py)
  with pytest.raises(ValueError, match="integer"):
    _call(name, x, y.astype(np.float32), p, py)
  with pytest.raises(ValueError, match="ref_mask"):
    _call(name, x, y, p, py, ref_mask=np.ones(3, bool))
  with pytest.raises(ValueError, match="reduction"):
    _call(name, x, y, p, py, reduction="median")


@pytest.mark.parametrize("name,kw,match", [
    ("proxy_nca", {"softmax_scale": 0.0}, "softmax_scale"),
    ("proxy_nca_pp", {"temperature": -1.0}, "temperature"),
    ("proxy_anchor", {"margin": -0.1}, "margin"),
    ("proxy_anchor", {"alpha": 0.0}, "alpha"),
    ("soft_triple", {"gamma": 0.0}, "gamma"),
    ("soft_triple", {"reg_weight": -1.0}, "reg_weight"),
    ("mpa", {"margin": -0.5}, "margin"),
    ("mpa_dw", {"alpha": -1.0}, "alpha"),
    ("mpa_ap", {"gamma": -0.1}, "gamma"),
])
def test_value_errors_hyperparameters(name, kw, match):
  x, y, p, py = random_case(17)
  with pytest.raises(ValueError, match=match):
    _call(name, x, y, p, py, **kw)


@pytest.mark.parametrize("name", CLASS_MAJOR)
def test_value_errors_class_major(name):
  x, y, p, py = random_case(18)
  fn = L.LOSSES[name]
  with pytest.raises(ValueError, match="centers_per_class"):
    fn(x, y, ref_embeddings=p, ref_labels=py, centers_per_class=0)
  with pytest.raises(ValueError, match="multiple of centers_per_class"):
    fn(x, y, ref_embeddings=p, ref_labels=py, centers_per_class=4)
  with pytest.raises(ValueError, match="class-major"):
    fn(x, y, ref_embeddings=p, ref_labels=np.tile(np.arange(3), 2), centers_per_class=2)


def test_registry():
  for name in NAIVE:
    assert L.get_loss(name) is L.LOSSES[name] is L.PROXY_LOSSES[name]
  assert set(proxy.__all__) | set(mpa_mod.__all__) == set(NAIVE)


# ----------------------------------------------------------------------------- optional: PML


def _pml_case(name, seed=19, c=4, k=3, d=5, b=10):
  """PML agreement on unit-norm inputs, with PML's distances told not to re-normalise."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("pytorch_metric_learning")
  from pytorch_metric_learning import distances, losses, regularizers  # noqa: F401
  rng = np.random.default_rng(seed)
  x = unit(rng.normal(size=(b, d))).astype(np.float32)
  y = rng.integers(0, c, size=b)
  dot = distances.DotProductSimilarity(normalize_embeddings=False)
  if name == "proxy_nca":
    loss = losses.ProxyNCALoss(c, d, softmax_scale=2,
                               distance=distances.LpDistance(power=2, normalize_embeddings=False))
    ours, hp, kk = "proxy_nca", {"softmax_scale": 2.0}, 1
  elif name == "proxy_anchor":
    loss = losses.ProxyAnchorLoss(c, d, distance=dot)
    ours, hp, kk = "proxy_anchor", {}, 1
  else:
    reg = regularizers.SparseCentersRegularizer(c, k)
    loss = losses.SoftTripleLoss(c, d, centers_per_class=k, distance=dot, weight_regularizer=reg,
                                 weight_reg_weight=0.2)
    ours, hp, kk = "soft_triple", {"centers_per_class": k}, k
  p = unit(rng.normal(size=(c * kk, d))).astype(np.float32)
  param = next(loss.parameters())
  param.data = torch.tensor(p if param.shape[0] == c * kk else p.T.copy())
  xt = torch.tensor(x, requires_grad=True)
  lv = loss(xt, torch.tensor(y))
  lv.backward()
  gp = param.grad.numpy()
  gp = gp if gp.shape == p.shape else gp.T
  v, gx_ours, gp_ours = run(ours, x, y, p, np.repeat(np.arange(c), kk), **hp)
  assert v == pytest.approx(lv.item(), rel=1e-5)
  np.testing.assert_allclose(gx_ours, xt.grad.numpy(), atol=1e-5)
  if name == "soft_triple":
    # PML's regulariser re-normalises the centres (CosineSimilarity only), which removes the
    # radial part of its gradient: compare the tangential parts.
    tangential = lambda g: g - np.sum(g * p, 1, keepdims=True) * p  # noqa: E731
    gp, gp_ours = tangential(gp), tangential(gp_ours)
  np.testing.assert_allclose(gp_ours, gp, atol=1e-5)


@pytest.mark.parametrize("name", ["proxy_nca", "proxy_anchor", "soft_triple"])
def test_agrees_with_pml(name):
  _pml_case(name)
