"""dmljax: deep metric learning in JAX."""

from dmljax import xla_flags as _xla_flags

__version__ = "0.1.0"

# CPU defaults for XLA (docs/backbones.md): before JAX starts, never over a flag the user set.
_xla_flags.apply()


def load_model(path):
  """An exported model (``python -m dmljax.export RUN_DIR``); see :func:`dmljax.export.load_model`."""
  from dmljax.export import load_model as _load  # pylint: disable=g-import-not-at-top
  return _load(path)
