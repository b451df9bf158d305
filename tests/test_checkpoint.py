"""Checkpoints: round trip, keep-N, SIGTERM flag, fallback past a corrupt latest step."""
import json
import logging
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmljax import checkpoint, optim, parallel
from dmljax import state as state_lib
from dmljax.configs import base_config


def _state(seed, num_proxies=4):
  rng = np.random.default_rng(seed)
  tx = optim.make_optimizer(base_config().optim, 10)
  st = state_lib.create_train_state(
      rng=jax.random.PRNGKey(seed),
      model_params={"dense": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}},
      batch_stats={"bn": {"mean": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}},
      extra_params={"proxies": jnp.asarray(rng.normal(size=(num_proxies, 2)), jnp.float32)},
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


# ----------------------------------------------------------------------------- corrupt steps


def _truncate_host_json(step_dir):
  path = os.path.join(step_dir, "host", "metadata")  # where JsonSave writes the host dict
  assert os.path.getsize(path) > 4
  with open(path, "r+") as f:
    f.truncate(os.path.getsize(path) // 2)


def _empty_manifest(step_dir):
  path = os.path.join(step_dir, "state", "manifest.ocdbt")  # the OCDBT root of the arrays
  assert os.path.getsize(path) > 0
  open(path, "w").close()


def _remove_state_dir(step_dir):
  assert os.path.isdir(os.path.join(step_dir, "state"))
  shutil.rmtree(os.path.join(step_dir, "state"))


# A failed tensorstore read is reported again from a closing event loop (an "unraisable"
# RuntimeError, harmless): the tests that make reads fail ignore that warning.
CORRUPTIONS = {"host_json": (_truncate_host_json, "JSONDecodeError"),
               "manifest": (_empty_manifest, "DATA_LOSS"),
               "state_dir": (_remove_state_dir, "KeyError")}


def _stepped(step):
  return _state(step).replace(step=jnp.asarray(step, jnp.int32))


def _assert_state_equal(got, want):
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got,
               want)


def _save_steps(workdir, steps):
  ck = checkpoint.Checkpointer(str(workdir), max_to_keep=3, save_best=False)
  for step in steps:
    ck.save(step, _stepped(step), {"step": step})
  ck.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_latest_falls_back_to_intact_step(tmp_path, kind, caplog, capsys):
  # guards: a damaged newest step no longer ends the run; step 1 restores, step 2 is set aside
  corrupt, reason = CORRUPTIONS[kind]
  _save_steps(tmp_path, (1, 2))
  corrupt(str(tmp_path / "checkpoints" / "2"))
  ck = checkpoint.Checkpointer(str(tmp_path), max_to_keep=3, save_best=False)  # the requeued job
  with caplog.at_level(logging.WARNING):
    restored, host = ck.restore(_state(0))
  assert host == {"step": 1}
  _assert_state_equal(restored, _stepped(1))
  warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any("step 2" in m and reason in m and "restored step 1" in m for m in warned), warned
  err = capsys.readouterr().err
  assert "step 2" in err and reason in err and "restored step 1" in err
  # Step 2 is out of Orbax's directory, kept whole beside it with the reason.
  assert ck.manager.all_steps() == [1] and ck.latest_step() == 1
  assert not os.path.exists(tmp_path / "checkpoints" / "2")
  aside = os.listdir(tmp_path / "checkpoints_corrupt")
  assert len(aside) == 1 and aside[0].startswith("2-")
  with open(tmp_path / "checkpoints_corrupt" / aside[0] / "REASON.txt") as f:
    assert reason in f.read()
  # The run goes on and saves step 2 again; a later restart restores it.
  ck.save(2, _stepped(2), {"step": 2})
  assert ck.manager.all_steps() == [1, 2]
  ck.close()
  again = checkpoint.Checkpointer(str(tmp_path), max_to_keep=3, save_best=False)
  restored, host = again.restore(_state(0))
  assert host == {"step": 2}
  _assert_state_equal(restored, _stepped(2))
  again.close()


def test_every_step_corrupt_raises_and_moves_nothing(tmp_path):
  # guards: with no intact step, one clear CheckpointError (not a raw KeyError, not a fresh start)
  _save_steps(tmp_path, (1, 2))
  _remove_state_dir(str(tmp_path / "checkpoints" / "1"))
  _truncate_host_json(str(tmp_path / "checkpoints" / "2"))
  ck = checkpoint.Checkpointer(str(tmp_path), max_to_keep=3, save_best=False)
  with pytest.raises(checkpoint.CheckpointError, match="No checkpoint in .*checkpoints") as info:
    ck.restore(_state(0))
  assert "step 2: JSONDecodeError" in str(info.value) and "step 1: KeyError" in str(info.value)
  assert ck.manager.all_steps() == [1, 2]
  assert not os.path.exists(tmp_path / "checkpoints_corrupt")
  ck.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_wrong_target_moves_nothing(tmp_path):
  # guards: a target no step fits (changed model) is an error, never a reason to set steps aside
  _save_steps(tmp_path, (1, 2))
  ck = checkpoint.Checkpointer(str(tmp_path), max_to_keep=3, save_best=False)
  with pytest.raises(checkpoint.CheckpointError, match="step 2: .*step 1: "):
    ck.restore(_state(0, num_proxies=5))  # proxies [5, 2] where the steps hold [4, 2]
  assert ck.manager.all_steps() == [1, 2]
  assert not os.path.exists(tmp_path / "checkpoints_corrupt")
  ck.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_explicit_corrupt_step_raises_without_fallback(tmp_path):
  # guards: restore(step=N) of a damaged step raises CheckpointError instead of a raw orbax error
  _save_steps(tmp_path, (1, 2))
  _empty_manifest(str(tmp_path / "checkpoints" / "2"))
  ck = checkpoint.Checkpointer(str(tmp_path), max_to_keep=3, save_best=False)
  with pytest.raises(checkpoint.CheckpointError, match="step 2 in .*checkpoints.*DATA_LOSS"):
    ck.restore(_state(0), step=2)
  assert ck.manager.all_steps() == [1, 2]  # nothing moved
  assert ck.restore(_state(0), step=1)[1] == {"step": 1}
  ck.close()


def test_host_dict_round_trips_arbitrary_json(tmp_path):
  # guards: host may carry any JSON (config fingerprints, sampler state) and comes back equal
  host = {"step": 7, "done": False, "best": None, "config_hash": "sha256:ab12", "name": "é ✓",
          "lr": 1e-5, "big": 2 ** 40, "sampler": {"perm": [3, 1, 2], "pos": {"a": [], "b": {}}},
          "history": [[1, 0.5], {"x": [True, None]}]}
  ck = checkpoint.Checkpointer(str(tmp_path), save_best=False)
  ck.save(7, _stepped(7), host)
  _, got = ck.restore(_state(0))
  assert got == json.loads(json.dumps(host))
  ck.close()


def test_async_save_returns_before_commit_and_keeps_the_saved_values(tmp_path):
  # Issue 17: the loop waits only for the device-to-host copy. The state passed to save() is
  # donated to (and overwritten by) the next step right after save() returns; the checkpoint
  # still holds the values of the step saved, and close() commits it before returning.
  ck = checkpoint.Checkpointer(str(tmp_path), max_to_keep=3, save_best=True)
  assert ck.async_save
  st = _stepped(1)
  bump = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=(0,))
  ck.save(1, st, {"step": 1})
  ck.save_best(1, st.params, st.batch_stats)
  st = bump(st)  # the saved buffers are donated here
  ck.save(1, st, {"step": 99})  # the same step again (final after periodic): kept as it was
  ck.close()
  again = checkpoint.Checkpointer(str(tmp_path), max_to_keep=3, save_best=False)
  restored, host = again.restore(_state(0))
  assert host == {"step": 1} and again.manager.all_steps() == [1]
  _assert_state_equal(restored, _stepped(1))
  again.close()
