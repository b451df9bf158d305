"""Data parallelism: 1 device == 8 fake devices; 2 processes (jax.distributed, gloo) == 1 process.

Run as a script (``python tests/test_parallel.py PROCESS_ID PORT OUT``) it is the worker of the
two-process test.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np

BATCH, STEPS = 16, 2


def _setup():
  """A tiny model + standard proxy-contrastive framework; returns (state_fn, step_fn, data)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from dmljax.configs import base_config, shrink  # pylint: disable=g-import-not-at-top
  from dmljax import frameworks, models, optim, state as state_lib, train  # pylint: disable=g-import-not-at-top
  c = shrink(base_config())
  c.framework = "standard"
  c.standard.use_proxies = True
  c.standard.proxies_per_class = 2
  c.optim.lr_multipliers.proxies = 10.0
  c.model.widths = (4, 8)
  c.model.embedding_dim = 8
  num_classes = 4
  model = models.get_model(c.model)
  fw = frameworks.get_framework(c, num_classes=num_classes, embedding_dim=c.model.embedding_dim)
  tx = optim.make_optimizer(c.optim, 100)
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(STEPS, BATCH, 8, 8, 1)).astype(np.float32)
  labels = np.tile(np.repeat(np.arange(num_classes), BATCH // num_classes), (STEPS, 1))
  labels = labels.astype(np.int32)

  def init_state():
    v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), train=False)
    extra, fs = fw.init(jax.random.PRNGKey(1), v["params"], v["batch_stats"])
    return state_lib.create_train_state(rng=jax.random.PRNGKey(2), model_params=v["params"],
                                        batch_stats=v["batch_stats"], extra_params=extra,
                                        framework_state=fs, tx=tx)

  step_fn, traces = train.make_train_step(model, fw, tx)
  return init_state, step_fn, traces, images, labels


def run_steps(mesh):
  """STEPS train steps on ``mesh``; each process feeds its slice. Returns losses and a param digest."""
  import jax  # pylint: disable=g-import-not-at-top
  from dmljax import parallel  # pylint: disable=g-import-not-at-top
  init_state, step_fn, traces, images, labels = _setup()
  step = jax.jit(step_fn) if mesh is None else None
  if mesh is not None:
    from dmljax import train  # pylint: disable=g-import-not-at-top
    step = train.jit_train_step(step_fn, mesh)
    state = parallel.replicate(init_state(), mesh)
  else:
    state = init_state()
  pc, pi = jax.process_count(), jax.process_index()
  per = BATCH // pc
  losses = []
  for s in range(STEPS):
    x, y = images[s][pi * per:(pi + 1) * per], labels[s][pi * per:(pi + 1) * per]
    if mesh is not None:
      x, y = parallel.global_batch((x, y), mesh)
    state, metrics = step(state, x, y, {})
    losses.append(float(parallel.to_host(metrics["loss"])))
  params = parallel.to_host(state.params)
  flat = np.concatenate([np.ravel(p) for p in jax.tree.leaves(params)])
  return {"losses": losses, "params": flat.tolist(), "traces": traces[0]}


def test_one_vs_eight_devices():
  import jax  # pylint: disable=g-import-not-at-top
  from dmljax import parallel  # pylint: disable=g-import-not-at-top
  assert len(jax.devices()) == 8
  one = run_steps(parallel.make_mesh(jax.devices()[:1]))
  eight = run_steps(parallel.make_mesh(jax.devices()))
  np.testing.assert_allclose(one["losses"], eight["losses"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(one["params"], eight["params"], rtol=1e-5, atol=1e-5)
  assert one["losses"][0] != one["losses"][-1]  # it trained
  assert eight["traces"] == 1  # no recompilation after the first step


def test_batch_not_divisible_raises():
  import jax  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  from dmljax import parallel  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    parallel.check_batch_size(12, parallel.make_mesh(jax.devices()))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from dmljax import parallel  # pylint: disable=g-import-not-at-top
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(i), str(port),
                             str(tmp_path / f"out{i}.json")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  for p in procs:
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, out.decode()[-3000:]
  ref = run_steps(parallel.make_mesh(jax.devices()[:4]))
  for i in range(2):
    got = json.loads((tmp_path / f"out{i}.json").read_text())
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["params"], ref["params"], rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
  pid, port, out_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_default_matmul_precision", "highest")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=pid)
  from dmljax import parallel as _parallel  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 4 and jax.local_device_count() == 2
  result = run_steps(_parallel.make_mesh())
  with open(out_path, "w") as f:
    json.dump(result, f)
  jax.distributed.shutdown()
