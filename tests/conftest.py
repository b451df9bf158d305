"""Test set-up: 8 fake CPU devices (for sharding tests), float32 matmuls at full precision, and
one persistent compilation cache for the whole run."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session", autouse=True)
def session_cache_dir(tmp_path_factory):
  """A persistent compilation cache shared by every test of this run, in-process and in the
  subprocesses they start (``JAX_COMPILATION_CACHE_DIR``), and by the xdist workers (one folder
  beside their base temporary folders): a model, train step or evaluation that several modules
  compile with the same shapes compiles once, and resumed runs, later folds and repeated configs
  load their executables. It is a fresh folder, so the suite neither reads nor fills the user's
  cache (``~/.cache/dmljax/jax``, which ``train_and_evaluate`` turns on otherwise) and its time is
  that of a fresh machine."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent
  path = str(base / "jax_cache")
  os.makedirs(path, exist_ok=True)
  settings = {"jax_compilation_cache_dir": path,
              "jax_persistent_cache_min_compile_time_secs": 0.0,
              "jax_persistent_cache_min_entry_size_bytes": 0}
  old = {k: getattr(jax.config, k) for k in settings}
  old_env = {k.upper(): os.environ.get(k.upper()) for k in settings}
  for k, v in settings.items():
    jax.config.update(k, v)
    os.environ[k.upper()] = str(v)
  yield path
  for k, v in old.items():
    jax.config.update(k, v)
  for k, v in old_env.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


@pytest.fixture(scope="module")
def cache_dir(session_cache_dir):
  """The persistent compilation cache (named by the modules whose runs rely on it)."""
  return session_cache_dir
