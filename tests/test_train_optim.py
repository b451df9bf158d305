"""The optax chain: weight-decay mask, group learning-rate multipliers, clipping, state reset."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dmljax.configs import base_config
from dmljax import optim


def _params():
  return {"model": {"Conv_0": {"kernel": jnp.ones((2, 2))},
                    "BatchNorm_0": {"scale": jnp.ones(2), "bias": jnp.ones(2)},
                    "head": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}},
          "proxies": jnp.ones((3, 2))}


def test_weight_decay_only_on_model_kernels():
  mask = optim.weight_decay_mask(_params())
  assert mask["model"]["Conv_0"]["kernel"] and mask["model"]["head"]["kernel"]
  assert not mask["model"]["BatchNorm_0"]["scale"] and not mask["model"]["head"]["bias"]
  assert not mask["proxies"]


def test_sgd_update_by_hand_with_decay_multiplier_and_clipping():
  oc = base_config().optim
  oc.name, oc.momentum, oc.learning_rate, oc.weight_decay = "sgd", 0.0, 0.1, 0.5
  oc.grad_clip_norm = 1.0
  oc.lr_multipliers = {"proxies": 100.0}
  tx = optim.make_optimizer(oc, 10)
  p = _params()
  g = jax.tree.map(lambda x: jnp.full_like(x, 2.0), p)   # global norm > 1: clipped
  norm = float(optax.tree.norm(g))
  upd, _ = tx.update(g, tx.init(p), p)
  gc = 2.0 / norm                                         # clipped gradient entries
  np.testing.assert_allclose(upd["model"]["Conv_0"]["kernel"], -0.1 * (gc + 0.5 * 1.0), rtol=1e-6)
  np.testing.assert_allclose(upd["model"]["head"]["bias"], -0.1 * gc, rtol=1e-6)
  np.testing.assert_allclose(upd["proxies"], -0.1 * 100.0 * gc, rtol=1e-6)


def _adam_states(st):
  return [s for s in st if isinstance(s, dict) and "proxies" in s][0]


def test_reset_group_state_resets_only_that_group():
  oc = base_config().optim
  tx = optim.make_optimizer(oc, 10)
  p = _params()
  st = tx.init(p)
  _, st = tx.update(jax.tree.map(jnp.ones_like, p), st, p)
  new = _adam_states(optim.reset_group_state(st, tx.init(p), "proxies"))
  assert float(jnp.abs(new["proxies"].mu).max()) == 0.0
  assert int(new["proxies"].count) == 0                  # the group's own count restarts
  assert float(new["model"].mu["head"]["bias"][0]) > 0.0
  assert int(new["model"].count) == 1


def test_reset_proxy_moments_never_exceed_a_fresh_adam_step():
  # Guards issue 12: zeroed moments with a running step count gave proxy steps of 2x, 4x and
  # 2.2x a normal Adam step 0, 10 and 100 steps after a reset (bias correction mismatch).
  oc = base_config().optim
  oc.learning_rate, oc.weight_decay, oc.grad_clip_norm = 0.01, 0.0, 0.0
  tx = optim.make_optimizer(oc, 1000)
  p = _params()
  g = jax.tree.map(jnp.ones_like, p)                      # constant gradient
  st = tx.init(p)
  update = jax.jit(tx.update)
  for _ in range(50):
    _, st = update(g, st, p)
  st = optim.reset_group_state(st, tx.init(p), "proxies")
  for _ in range(101):
    u, st = update(g, st, p)
    # A freshly started Adam under a constant gradient steps by exactly lr (m_hat / sqrt(v_hat) = 1).
    assert float(jnp.abs(u["proxies"]).max()) <= 0.01 * (1 + 1e-5)
    np.testing.assert_allclose(u["model"]["head"]["bias"], -0.01, rtol=1e-5)


def test_default_config_keeps_proxy_moments():
  # Guards issue 12: the paper and the authors' code do not reset the proxies' optimizer state.
  assert base_config().ccp.reset_proxy_opt_state is False


def test_authors_decay_scope_excludes_only_batchnorm():
  p = dict(_params(), model=dict(_params()["model"], head_bn={"scale": jnp.ones(2),
                                                              "bias": jnp.ones(2)}))
  mask = optim.weight_decay_mask(p, "all_but_batchnorm")
  assert mask["model"]["Conv_0"]["kernel"] and mask["model"]["head"]["bias"] and mask["proxies"]
  assert not any(jax.tree.leaves(mask["model"]["BatchNorm_0"]))
  assert not any(jax.tree.leaves(mask["model"]["head_bn"]))


def _authors_adam_by_hand(params, grads_seq, oc):
  """The CCP authors' update as a loop: gradient (proximal term included) + L2 on every
  non-BatchNorm leaf -> clip to global norm -> clip each value -> Adam (optax's epsilon)."""
  flat, tree = jax.tree_util.tree_flatten_with_path(params)
  theta = [np.asarray(x, np.float64) for _, x in flat]
  is_bn = ["BatchNorm_0" in optim._path_keys(path) for path, _ in flat]
  m = [np.zeros_like(x) for x in theta]
  v = [np.zeros_like(x) for x in theta]
  out = []
  for t, grads in enumerate(grads_seq, start=1):
    g = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
    g = [gi if bn else gi + oc.weight_decay * th for gi, th, bn in zip(g, theta, is_bn)]
    norm = np.sqrt(sum(float(np.sum(gi * gi)) for gi in g))
    g = [gi * min(1.0, oc.grad_clip_norm / norm) for gi in g]
    g = [np.clip(gi, -oc.clip_value, oc.clip_value) for gi in g]
    upd = []
    for i, gi in enumerate(g):
      m[i] = oc.b1 * m[i] + (1 - oc.b1) * gi
      v[i] = oc.b2 * v[i] + (1 - oc.b2) * gi * gi
      mh, vh = m[i] / (1 - oc.b1 ** t), v[i] / (1 - oc.b2 ** t)
      upd.append(-oc.learning_rate * mh / (np.sqrt(vh) + oc.eps))
    theta = [th + u for th, u in zip(theta, upd)]
    out.append(jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), upd))
  del tree
  return out


def test_authors_update_order_matches_a_hand_written_loop():
  # Issue 18: proximal -> L2 1e-4 on every non-BatchNorm variable (biases, proxies) -> clip to
  # global norm -> clip values -> Adam. Settings here make every stage bind (large decay, a
  # value clip below the norm clip), so a stage out of order changes the updates.
  from dmljax.configs import ccp_authors_optim
  oc = ccp_authors_optim(base_config()).optim
  assert (oc.b2, oc.eps, oc.clip_value, oc.grad_clip_norm) == (0.99, 1e-7, 10.0, 10.0)
  oc.weight_decay, oc.grad_clip_norm, oc.clip_value, oc.learning_rate = 0.5, 3.0, 0.4, 0.1
  p = jax.tree.map(lambda x: x * 2.0, _params())
  rng = np.random.default_rng(0)
  grads_seq = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 2, jnp.float32), p)
               for _ in range(3)]
  want = _authors_adam_by_hand(p, grads_seq, oc)
  tx = optim.make_optimizer(oc, 10)
  st, params = tx.init(p), p
  for g, w in zip(grads_seq, want):
    u, st = tx.update(g, st, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), u, w)
    params = optax.apply_updates(params, u)
  # The default order (clip, then decay kernels only) gives other updates on the same input.
  oc.decay_before_clip, oc.weight_decay_scope = False, "kernels"
  tx = optim.make_optimizer(oc, 10)
  u, _ = tx.update(grads_seq[0], tx.init(p), p)
  assert not np.allclose(u["proxies"], want[0]["proxies"], rtol=1e-3)
