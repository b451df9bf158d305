r"""CCP (contrastive, Euclidean, margins 0 / 1; 4 proxies per class) on the embedded digits, class-disjoint. README default.

  python -m dmljax.main --config=configs/digits_ccp.py --workdir=/tmp/dmljax/digits_ccp

Measured (seed 0, 48 s wall on 2 CPU cores shared with the test suite; re-measured after issues
17-23): test MAP@R 0.408 against 0.440 for the untrained network and 0.617 for the raw pixels (the
final table's rows): five training digits teach nothing that transfers to the three unseen ones,
so this config is for fast checks, not for claims.
Small variant for tests: ``--config=configs/digits_ccp.py:small``.
"""
from dmljax.configs import base_config, shrink


def get_config(arg: str = ""):
  c = base_config()
  c.dataset.name = "digits"
  c.model.widths = (32, 64)
  c.model.embedding_dim = 32
  # The class-disjoint digits train split has 5 classes (0-4): a batch is all 5 classes x 8.
  c.batch_size = 40
  c.sampler.m = 8
  c.total_steps = 1000
  c.eval_every_steps = 25
  c.patience_evals = 10
  c.ccp.proxies_per_class = 4
  c.ccp.pool_size = 8
  c.ccp.patience = 3
  c.checkpoint.every_steps = 200
  if arg == "small":
    shrink(c)
  elif arg:
    raise ValueError(f"Unknown variant {arg!r} of digits_ccp.py; valid: 'small'.")
  return c
