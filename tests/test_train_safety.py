"""Training safety (issue 12): non-finite updates are never applied, divergence stops with a clear
error and leaves the last good checkpoint intact, resume says so, tolerates a partial log line and
refuses a config change that breaks exact resumption, and the command-line tools report errors as
one message from any directory."""
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmljax import checkpoint as ckpt_lib
from dmljax import cli, frameworks, optim, train
from dmljax.configs import set_keys
from dmljax import state as state_lib
from dmljax.configs import base_config, shrink
from dmljax.frameworks.standard import StandardFramework

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _digits(**over):
  c = shrink(base_config())
  c.model.widths = (8,)
  c.batch_size, c.sampler.m = 20, 4
  c.total_steps, c.eval_every_steps, c.log_every_steps = 20, 10, 5
  c.checkpoint.every_steps = 10
  c.progress, c.num_devices = False, 1
  c.baselines = ("untrained",)
  set_keys(c, over)
  return c


class _NanAfter(StandardFramework):
  """The contrastive loss, made NaN from step 15 on (a run that diverges mid-way)."""
  name = "nan_after"

  def loss(self, params, embeddings, labels, state, rng, extras=None):
    value, aux = super().loss(params, embeddings, labels, state, rng, extras)
    return jnp.where(state.step >= 15, jnp.nan, value), aux


def test_nonfinite_step_is_skipped_and_counted():
  # Guards issue 12: a NaN loss was applied (params, moments and step all moved on NaN).
  class Dense(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(4)(x.reshape(len(x), -1))

  class Fw(frameworks.Framework):
    def loss(self, params, emb, labels, state, rng, extras=None):
      value = jnp.sum(emb ** 2) * jnp.where(labels[0] < 0, jnp.nan, 1.0)
      return value, ({}, state.framework)

  model = Dense()
  x = jnp.ones((4, 3), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  tx = optim.make_optimizer(base_config().optim, 10)
  st = state_lib.create_train_state(rng=jax.random.PRNGKey(1), model_params=params,
                                    batch_stats={}, extra_params={}, framework_state={}, tx=tx)
  step_fn, _ = train.make_train_step(model, Fw(base_config(), num_classes=1, embedding_dim=4),
                                     tx)
  step_fn = jax.jit(step_fn)
  good, bad = jnp.zeros(4, jnp.int32), jnp.full(4, -1, jnp.int32)
  st1, m1 = step_fn(st, x, good, {})
  assert int(m1["nonfinite_steps"]) == 0
  st2, m2 = step_fn(st1, x, bad, {})                    # NaN loss: nothing applied
  assert int(st2.step) == 2 and int(m2["nonfinite_steps"]) == 1
  assert int(m2["nonfinite_streak"]) == 1
  for a, b in zip(jax.tree.leaves((st1.params, st1.opt_state)),
                  jax.tree.leaves((st2.params, st2.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  st3, m3 = step_fn(st2, x, good, {})                    # a good step resets the streak
  assert int(m3["nonfinite_streak"]) == 0 and int(m3["nonfinite_steps"]) == 1
  assert not np.array_equal(np.asarray(st3.params["model"]["Dense_0"]["kernel"]),
                            np.asarray(st2.params["model"]["Dense_0"]["kernel"]))


def test_divergence_stops_with_clear_error_and_keeps_last_good_checkpoint(tmp_path,
                                                                          monkeypatch):
  # Guards issue 12: a diverging run trained on NaN to the end and printed a results table.
  monkeypatch.setitem(frameworks.FRAMEWORKS, "nan_after", _NanAfter)
  workdir = str(tmp_path / "run")
  c = _digits(framework="nan_after", total_steps=40, max_consecutive_nonfinite=3)
  with pytest.raises(cli.TrainingDiverged) as err:
    train.train_and_evaluate(c, workdir)
  msg = str(err.value)
  assert "steps 16-18 (3 in a row)" in msg and "last good checkpoint is step 10" in msg
  assert "optim.learning_rate" in msg
  assert not os.path.exists(os.path.join(workdir, "final_metrics.json"))
  ck = ckpt_lib.Checkpointer(workdir, max_to_keep=2, save_best=False)
  assert ck.manager.all_steps() == [10]              # nothing saved after the last good step
  ck.close()
  logged = train.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["nonfinite_steps"] for r in logged if r["kind"] == "train"] == [0, 0, 0]


def test_resume_message_partial_log_line_and_config_change(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  first = train.train_and_evaluate(_digits(), workdir)
  assert "untrained/test/map_at_r" in first and "untrained" in first["table"]
  log = os.path.join(workdir, "metrics.jsonl")
  with open(log, "a") as f:
    f.write('{"step": 3, "kind": "tr')               # a run killed mid-write
  # A run killed after its final checkpoint, before final_metrics.json (a finished run is not
  # resumed: it says it is already finished, tests/test_run_checks.py).
  os.remove(os.path.join(workdir, "final_metrics.json"))
  capsys.readouterr()
  # Guards issue 12: a partial last line blocked resume (JSONDecodeError).
  again = train.train_and_evaluate(_digits(progress=True), workdir)   # a safe key may change
  # Guards issue 12: the resume message was at a log level that is never shown.
  assert f"Resumed from step 20 of {workdir}" in capsys.readouterr().out
  for line in open(log):
    json.loads(line)                                # every line whole again
  assert again["test/map_at_r"] == first["test/map_at_r"]
  # Guards issue 12: a changed config resumed silently (and config.json was rewritten).
  with pytest.raises(cli.ConfigChanged, match=r"optim\.learning_rate: 0\.001 -> 0\.5.*"
                     r"sampler\.m: 4 -> 5.*--allow_config_change"):
    train.train_and_evaluate(_digits(**{"optim.learning_rate": 0.5, "sampler.m": 5}), workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["optim"]["learning_rate"] == 0.001
  # (a finished run continues with a changed config only when it trains more steps)
  train.train_and_evaluate(_digits(**{"optim.learning_rate": 0.5, "total_steps": 24}), workdir,
                           allow_config_change=True)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["optim"]["learning_rate"] == 0.5


def _cli(args, cwd):
  env = dict(os.environ)
  env.pop("DMLJAX_VERBOSE", None)
  return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=300)


def test_cli_errors_are_one_message_from_any_directory(tmp_path):
  # Guards issue 12: a config copied outside the repository failed with ModuleNotFoundError
  # ('configs'), and configuration errors ended in tracebacks.
  cfg = tmp_path / "my_config.py"
  shutil.copy(os.path.join(ROOT, "configs", "digits_ccp.py"), cfg)
  run = tmp_path / "run"
  p = _cli(["dmljax.main", f"--config={cfg}:small", f"--workdir={run}",
            "--config.loss.name=contrastve"], tmp_path)
  assert p.returncode == 2, p.stderr
  assert "Traceback" not in p.stderr
  assert "error: Unknown loss 'contrastve'; valid losses:" in p.stderr
  p = _cli(["dmljax.main", f"--config={cfg}:small", f"--workdir={run}",
            "--config.batchsize=3"], tmp_path)
  assert p.returncode == 2 and "Traceback" not in p.stderr and "batchsize" in p.stderr
  p = _cli(["dmljax.main", f"--config={cfg}:small", f"--workdir={run}", "--verbose",
            "--config.loss.name=contrastve"], tmp_path)
  assert p.returncode == 2 and "Traceback" in p.stderr
  p = _cli(["dmljax.evaluate", str(tmp_path / "missing.npz")], tmp_path)
  assert p.returncode == 2 and "Traceback" not in p.stderr and "missing.npz" in p.stderr
