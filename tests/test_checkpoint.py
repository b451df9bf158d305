"""Checkpoints: round trip of the full train state + host state, keep-N, SIGTERM flag."""
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np

from dmljax import checkpoint, optim, parallel
from dmljax import state as state_lib
from configs.common import base_config


def _state(seed):
  rng = np.random.default_rng(seed)
  tx = optim.make_optimizer(base_config().optim, 10)
  st = state_lib.create_train_state(
      rng=jax.random.PRNGKey(seed),
      model_params={"dense": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}},
      batch_stats={"bn": {"mean": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}},
      extra_params={"proxies": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)},
      framework_state={"projection": jnp.asarray(seed, jnp.int32)}, tx=tx)
  return parallel.replicate(st, parallel.make_mesh())


def test_round_trip_keep_n_and_best(tmp_path):
  ck = checkpoint.Checkpointer(str(tmp_path), max_to_keep=2, save_best=True)
  assert ck.restore(_state(0)) is None
  for step in (1, 2, 3):
    ck.save(step, _state(step).replace(step=jnp.asarray(step, jnp.int32)), {"step": step})
  ck.save_best(2, {"w": jnp.ones(2)}, {})
  assert ck.manager.all_steps() == [2, 3]              # keep-N
  restored, host = ck.restore(_state(0))               # target supplies structure only
  assert host == {"step": 3}
  expected = _state(3).replace(step=jnp.asarray(3, jnp.int32))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               restored, expected)
  assert os.path.isdir(tmp_path / "best" / "2")
  ck.close()


def test_sigterm_sets_flag():
  flag = checkpoint.PreemptionFlag().install()
  try:
    assert not flag.is_set
    os.kill(os.getpid(), signal.SIGTERM)
    assert flag.is_set and flag.received == signal.SIGTERM
  finally:
    flag.uninstall()
  assert signal.getsignal(signal.SIGTERM) is not flag._handle
