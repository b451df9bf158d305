"""dmljax's XLA flag defaults for CPU runs, applied when ``dmljax`` is first imported.

XLA reads ``XLA_FLAGS`` once, when JAX starts its first backend. Importing ``dmljax`` (or any of
its modules: ``dmljax.models``, ``dmljax.metrics``, the commands) before that adds
:data:`CPU_DEFAULTS` to ``XLA_FLAGS``, except a flag the user's ``XLA_FLAGS`` already sets (the
user's value is kept as it is). Nothing is changed when JAX's backends are already running (too
late to take effect in this process) or when ``DMLJAX_XLA_DEFAULTS=0``.

The flags change only XLA's CPU compiler (``xla_cpu_*``); GPU and TPU programs are unaffected.
Measured in docs/backbones.md (issue 22): on the CPUs measured, this jaxlib's YNNPACK
convolutions (the default) made the backbones' train steps up to ~2.3x slower than XLA's own
convolutions; with the convolutions left to XLA, YNNPACK still runs the matrix products (the
kNN's among them), so retrieval metrics are computed exactly as before.
"""
from __future__ import annotations

import os
import sys

#: Set to ``0`` to leave ``XLA_FLAGS`` untouched.
ENV_SWITCH = "DMLJAX_XLA_DEFAULTS"

#: Added to ``XLA_FLAGS`` (each unless the user's flags name it). YNNPACK's default fusion list
#: less its convolutions (the ``-`` form removes one kind from XLA's default list).
CPU_DEFAULTS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)


def _flag_name(flag: str) -> str:
  return flag.split("=", 1)[0].lstrip("-")


def with_defaults(user_flags: str, defaults=CPU_DEFAULTS) -> str:
  """``user_flags`` plus each of ``defaults`` whose flag name it does not already set."""
  named = {_flag_name(f) for f in user_flags.split()}
  extra = [f for f in defaults if _flag_name(f) not in named]
  return " ".join([user_flags.strip()] + extra if user_flags.strip() else extra)


def _backends_started() -> bool:
  """Whether JAX has created its backends (then XLA_FLAGS has been read already)."""
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return bool(getattr(xla_bridge, "_backends", None))


def apply() -> bool:
  """Adds :data:`CPU_DEFAULTS` to ``os.environ["XLA_FLAGS"]``; True if it changed anything."""
  if os.environ.get(ENV_SWITCH, "1") == "0" or _backends_started():
    return False
  old = os.environ.get("XLA_FLAGS", "")
  new = with_defaults(old)
  if new == old.strip():
    return False
  os.environ["XLA_FLAGS"] = new
  return True
