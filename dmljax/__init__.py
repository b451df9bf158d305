"""dmljax: deep metric learning in JAX."""

__version__ = "0.1.0"


def load_model(path):
  """An exported model (``python -m dmljax.export RUN_DIR``); see :func:`dmljax.export.load_model`."""
  from dmljax.export import load_model as _load  # pylint: disable=g-import-not-at-top
  return _load(path)
