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
