"""Pure-functional metric-learning losses, miners and training objectives.

Every loss takes ``(embeddings, labels, *, ref_embeddings=None, ref_labels=None, ref_mask=None,
**hyperparameters)`` and returns a scalar (see :mod:`dmljax.losses.core`). ``LOSSES`` maps each
public loss name to its function, so configs can name a loss and an unknown name fails with the
list of valid ones (:func:`get_loss`).
"""
import sys

from dmljax.losses import core, dro, miners, mpa, objectives, pair, proxy
from dmljax.losses.core import bounded_normalize, l2_normalize
from dmljax.losses.dro import *  # noqa: F401,F403
from dmljax.losses.miners import *  # noqa: F401,F403
from dmljax.losses.mpa import *  # noqa: F401,F403
from dmljax.losses.objectives import *  # noqa: F401,F403
from dmljax.losses.pair import *  # noqa: F401,F403
from dmljax.losses.proxy import *  # noqa: F401,F403

# The star imports above bind the loss ``mpa`` over the module ``mpa`` in this namespace, so the
# registries read the modules from sys.modules.
_module = lambda name: sys.modules[f"{__name__}.{name}"]  # noqa: E731
pair, proxy, mpa_module, dro = (_module(n) for n in ("pair", "proxy", "mpa", "dro"))

#: Pair-based losses: usable with or without references (proxies, memory, representatives).
PAIR_LOSSES = {name: getattr(pair, name) for name in pair.__all__}
#: Proxy-based losses: references are the (learnable) proxies.
PROXY_LOSSES = {name: getattr(m, name) for m in (proxy, mpa_module) for name in m.__all__}
#: DRO pair weightings (Qi et al.).
DRO_LOSSES = {name: getattr(dro, name) for name in dro.__all__}
LOSSES = {**PAIR_LOSSES, **PROXY_LOSSES, **DRO_LOSSES}


def get_loss(name: str):
  """Returns the loss called ``name``; raises ValueError listing the valid names otherwise."""
  if name not in LOSSES:
    raise ValueError(f"Unknown loss {name!r}; valid losses: {sorted(LOSSES)}.")
  return LOSSES[name]
