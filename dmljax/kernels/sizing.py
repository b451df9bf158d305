"""Block sizes by backend: what the blocked kernels (kNN, long-reference losses) are sized for.

The blocked paths of :mod:`dmljax.kernels.knn` and :mod:`dmljax.losses.pair` were tuned on a
2-core CPU, where keeping a block's intermediates in cache is what makes them fast. On a GPU or
TPU the same blocks turn one large kernel into many small sequential ones, each paying a launch
and a pass over its inputs, so there the kernels take the largest blocks (a single pass where it
fits) that a share of the device's memory allows.

The sizing is chosen explicitly or by the backend:

* ``"cpu"``: the blocks tuned on the CPU (the kNN's 64 MB group-max buffer and 2,048-reference
  scan blocks, the loss's 1,024-reference blocks above 2,048 references);
* ``"accelerator"``: single passes, or blocks sized from :func:`memory_budget` (a quarter of the
  device's memory, ``bytes_limit`` in ``memory_stats()``, :data:`FALLBACK_BUDGET` where the
  backend does not say; the total, not what is free at the time, so that a block size, and with
  it a loss's summation order, does not depend on what else happens to be allocated when a
  function is traced: a resumed run recompiles the same blocks);
* ``"auto"`` (default): ``"cpu"`` on CPU devices, ``"accelerator"`` on any other.

Either sizing gives the same neighbours and the same loss (up to float summation order for the
loss): only how the work is cut changes. Tests force the accelerator sizing on CPU by argument.
"""
from __future__ import annotations

from typing import Iterable, Optional

import jax
import numpy as np

__all__ = ["SIZINGS", "resolve", "memory_budget", "FALLBACK_BUDGET", "MEMORY_FRACTION"]

SIZINGS = ("auto", "cpu", "accelerator")

#: Share of a device's memory the accelerator sizing lets one kernel's intermediates use.
MEMORY_FRACTION = 0.25
#: Budget when the backend reports no memory figures (bytes).
FALLBACK_BUDGET = 2 << 30


def check(sizing: str) -> str:
  if sizing not in SIZINGS:
    raise ValueError(f"sizing must be one of {', '.join(SIZINGS)}, got {sizing!r}.")
  return sizing


def platforms(devices: Optional[Iterable] = None) -> set:
  """The platforms (``"cpu"``, ``"gpu"``, ``"tpu"``) of ``devices`` (default: JAX's default backend)."""
  if devices is None:
    return {jax.default_backend()}
  return {d.platform for d in np.asarray(list(devices)).reshape(-1)}


def resolve(sizing: str = "auto", devices: Optional[Iterable] = None) -> str:
  """``"cpu"`` or ``"accelerator"``: ``sizing`` itself, or for ``"auto"`` what ``devices`` are
  (CPU only: ``"cpu"``)."""
  if check(sizing) != "auto":
    return sizing
  return "cpu" if platforms(devices) == {"cpu"} else "accelerator"


def memory_budget(devices: Optional[Iterable] = None, budget: Optional[int] = None,
                  fraction: float = MEMORY_FRACTION) -> int:
  """Bytes one kernel's intermediates may use per device under the accelerator sizing.

  ``budget`` (bytes, > 0) wins; else ``fraction`` of the smallest ``bytes_limit`` of
  ``memory_stats()`` over ``devices`` (default: the local devices), else
  :data:`FALLBACK_BUDGET` where a device does not report it (CPU, some backends).
  """
  if budget is not None and budget > 0:
    return int(budget)
  devs = jax.local_devices() if devices is None else list(np.asarray(list(devices)).reshape(-1))
  limits = []
  for d in devs[:8]:
    try:
      stats = d.memory_stats() or {}
    except Exception:  # pylint: disable=broad-except  (not every backend reports it)
      stats = {}
    limit = int(stats.get("bytes_limit", 0) or 0)
    if limit <= 0:
      return FALLBACK_BUDGET
    limits.append(limit)
  if not limits:
    return FALLBACK_BUDGET
  return max(1 << 20, int(min(limits) * fraction))
