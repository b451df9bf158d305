"""End to end: train_and_evaluate on tiny digits, exact resume after SIGKILL / SIGTERM, bad input."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from configs import digits_ccp
from dmljax import train
from dmljax.configs import set_keys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The same run in-process and as a subprocess: tiny digits CCP with a projection forced at 20 steps.
# One device keeps compiles small; 1 vs 8 devices is tests/test_parallel.py's job.
OVERRIDES = {"total_steps": 30, "eval_every_steps": 10, "checkpoint.every_steps": 10,
             "ccp.max_projection_steps": 20, "progress": False, "num_devices": 1}


def _config(**extra):
  c = digits_ccp.get_config("small")
  set_keys(c, {**OVERRIDES, **extra})
  return c






@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
  del cache_dir
  workdir = str(tmp_path_factory.mktemp("ref"))
  return workdir, train.train_and_evaluate(_config(), workdir)


def _final(result):
  return {k: v for k, v in result.items() if k != "table"}


def test_end_to_end(reference):
  workdir, result = reference
  for k in ("val/map_at_r", "val/precision_at_1", "test/map_at_r", "test/precision_at_1"):
    assert np.isfinite(result[k]) and 0.0 <= result[k] <= 1.0, k
  assert result["step"] == 30
  assert result["train_step_traces"] == 1                      # compiled once, no recompiles
  # Guards issue 12: the final table shows the trivial baselines measured in the same run.
  for k in ("untrained/val/map_at_r", "untrained/test/map_at_r", "pixels/test/map_at_r"):
    assert 0.0 <= result[k] <= 1.0, k
  rows = [l.split()[:2] for l in result["table"].splitlines() if l.strip()][1:]
  assert rows == [["trained", "val"], ["trained", "test"], ["untrained", "val"],
                  ["untrained", "test"], ["pixels", "val"], ["pixels", "test"]]
  for f in ("metrics.jsonl", "config.json", "final_metrics.json"):
    assert os.path.isfile(os.path.join(workdir, f)), f
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "30"))
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  evals = [l for l in lines if l["kind"] == "eval"]
  assert [l["step"] for l in evals] == [10, 20, 30]
  assert any(l.get("ccp/projection") == 1 for l in evals)     # a projection ended at 20 steps
  assert all(np.isfinite(l["loss"]) for l in lines if l["kind"] == "train")
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["framework"] == "ccp"
  # The final metrics are those of the best (restored) parameters: val MAP@R == the best seen.
  best = max(l["val/map_at_r"] for l in evals)
  np.testing.assert_allclose(result["val/map_at_r"], best, rtol=1e-6)


def _cli_args(workdir):
  args = [sys.executable, "-m", "dmljax.main", "--config=configs/digits_ccp.py:small",
          f"--workdir={workdir}"]
  return args + [f"--config.{k}={v}" for k, v in OVERRIDES.items()]


def test_sigkill_then_resume_is_exact(reference, tmp_path):
  _, ref = reference
  workdir = str(tmp_path / "run")
  env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest",  # as conftest sets in-process
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  proc = subprocess.Popen(_cli_args(workdir), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
  ckpt = os.path.join(workdir, "checkpoints", "10")
  deadline = time.time() + 240
  while not os.path.isdir(ckpt) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  _, err = proc.communicate()
  assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
  assert not os.path.exists(os.path.join(workdir, "final_metrics.json"))  # killed mid-run
  resumed = train.train_and_evaluate(_config(), workdir)
  assert _final(resumed) == _final(ref)


def test_sigterm_saves_and_resume_is_exact(reference, tmp_path):
  # With 4 steps per dispatch (a scan over stacked batches; up to each evaluation and checkpoint
  # the steps run singly): the SIGTERM save lands at a dispatch boundary, and the resumed run
  # ends as the reference's single steps, to float rounding (XLA compiles the convolutions and
  # BatchNorm of a scan's body apart from a single step's: the metrics agree to ~1e-6).
  # Exact resumption with a fixed steps_per_dispatch rests on the dispatch pattern being a
  # function of the step (tests/test_lean_step.py); with one step per dispatch it is bitwise
  # (the SIGKILL test above).
  _, ref = reference
  workdir = str(tmp_path / "run")
  ckpt = os.path.join(workdir, "checkpoints", "10")

  def send_when_checkpointed():
    while not os.path.isdir(ckpt):
      time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGTERM)

  threading.Thread(target=send_when_checkpointed, daemon=True).start()
  out = train.train_and_evaluate(_config(steps_per_dispatch=4), workdir)
  assert out["preempted"] and 10 <= out["step"] < 30
  assert out["step"] in (14, 18, 19, 20, 24, 28, 29)              # a dispatch boundary
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(out["step"])))  # saved on SIGTERM
  resumed = train.train_and_evaluate(_config(steps_per_dispatch=4), workdir)
  assert 1 <= resumed.pop("train_step_traces") <= 2                 # one step and the scan
  expected = {k: v for k, v in _final(ref).items() if k != "train_step_traces"}
  assert sorted(_final(resumed)) == sorted(expected)
  for k, v in expected.items():
    if isinstance(v, float):
      np.testing.assert_allclose(resumed[k], v, rtol=1e-5, err_msg=k)
    else:
      assert resumed[k] == v, k
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert sorted({l["step"] for l in lines if l["kind"] == "train"}) == [10, 20, 30]


@pytest.mark.parametrize("overrides,match", [
    ({"loss.name": "contrastve"}, r"Unknown loss 'contrastve'; valid losses: \[.*'contrastive'"),
    ({"framework": "xbmm"}, r"Unknown framework 'xbmm'; valid frameworks: \[.*'ccp'.*'standard'"),
    ({"batch_size": 20, "sampler.m": 4, "num_devices": 0},
     r"batch_size=20 is not divisible by the 8 devices"),
    ({"sampler.m": 200, "batch_size": 1000}, r"200"),
    ({"dataset.name": "mnist"}, r"Unknown data set 'mnist'; valid data sets"),
])
def test_bad_input_fails_before_training(overrides, match, tmp_path, monkeypatch):
  monkeypatch.setattr(train, "make_train_step", lambda *a: pytest.fail("reached compile"))
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(_config(**overrides), str(tmp_path))


def test_locked_config_rejects_unknown_key():
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
  with pytest.raises(flags.Error, match="config.batchsize"):
    fv(["prog", f"--config={ROOT}/configs/digits_ccp.py", "--config.batchsize=8"])
  # Valid overrides (--config.total_steps=...) are exercised by the SIGKILL test's command line.


def test_parts_can_be_called_alone():
  # Issue 11: input, state, step and evaluation are separate parts of the trainer.
  from dmljax import frameworks, models, optim, parallel  # pylint: disable=g-import-not-at-top
  c = _config()
  data = train.create_input(c)
  assert data.num_classes == 5 and len(data.train_labels) == len(data.train_images)
  model = models.get_model(c.model)
  fw = frameworks.get_framework(c, num_classes=data.num_classes,
                                embedding_dim=c.model.embedding_dim)
  tx = optim.make_optimizer(c.optim, c.total_steps)
  mesh = parallel.make_mesh(jax.devices()[:1])
  state = parallel.replicate(train.create_state(c, model, fw, tx, data), mesh)
  evaluator = train.Evaluator(c, model, mesh, data)
  before = evaluator.evaluate(state.params["model"], state.batch_stats, "val")
  assert 0.0 <= before["map_at_r"] <= 1.0 and before["num_queries"] == len(data.val.labels)
  sampler = train.make_sampler(c, fw, data.train_labels)
  idx, extras = fw.sample(sampler, state, 0)
  step_fn, traces = train.make_train_step(model, fw, tx)
  step = train.jit_train_step(step_fn, mesh)
  images, labels, extras = parallel.global_batch(
      (data.train_images[idx], data.train_labels[idx].astype(np.int32), extras), mesh)
  new_state, metrics = step(state, images, labels, extras)
  assert int(new_state.step) == 1 and np.isfinite(float(metrics["loss"])) and traces[0] == 1
