"""Pure-functional metric-learning losses, miners and training objectives.

Every loss takes ``(embeddings, labels, *, ref_embeddings=None, ref_labels=None, ref_mask=None,
**hyperparameters)`` and returns a scalar (see :mod:`dmljax.losses.core`). ``LOSSES`` maps each
public loss name to its function, so configs can name a loss and an unknown name fails with the
list of valid ones (:func:`get_loss`).

Note: the loss ``mpa`` shares its name with the module ``dmljax.losses.mpa``; after this package
is imported ``dmljax.losses.mpa`` is the loss function (use ``importlib.import_module`` for the
module). The registries below are therefore built before the star imports rebind the name.
"""
from dmljax.losses import core
from dmljax.losses import dro as _dro
from dmljax.losses import miners as _miners
from dmljax.losses import mpa as _mpa
from dmljax.losses import objectives as _objectives
from dmljax.losses import pair as _pair
from dmljax.losses import proxy as _proxy

#: Pair-based losses: usable with or without references (proxies, memory, representatives).
PAIR_LOSSES = {name: getattr(_pair, name) for name in _pair.__all__}
#: Proxy-based losses: references are the (learnable) proxies.
PROXY_LOSSES = {name: getattr(m, name) for m in (_proxy, _mpa) for name in m.__all__}
#: DRO pair weightings (Qi et al.).
DRO_LOSSES = {name: getattr(_dro, name) for name in _dro.__all__}
LOSSES = {**PAIR_LOSSES, **PROXY_LOSSES, **DRO_LOSSES}

from dmljax.losses.core import bounded_normalize, l2_normalize  # noqa: E402
from dmljax.losses.dro import *  # noqa: E402,F401,F403
from dmljax.losses.miners import *  # noqa: E402,F401,F403
from dmljax.losses.mpa import *  # noqa: E402,F401,F403
from dmljax.losses.objectives import *  # noqa: E402,F401,F403
from dmljax.losses.pair import *  # noqa: E402,F401,F403
from dmljax.losses.proxy import *  # noqa: E402,F401,F403


def get_loss(name: str):
  """Returns the loss called ``name``; raises ValueError listing the valid names otherwise."""
  if name not in LOSSES:
    raise ValueError(f"Unknown loss {name!r}; valid losses: {sorted(LOSSES)}.")
  return LOSSES[name]
