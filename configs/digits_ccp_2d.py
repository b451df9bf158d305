r"""CCP with 2-D embeddings on digits (closed set, as the paper's MNIST Fig. 2): a PNG per projection.

  python -m dmljax.main --config=configs/digits_ccp_2d.py --workdir=/tmp/dmljax/digits_ccp_2d

Writes ``plots/projection_NNN.png`` (training embeddings, converged proxies as squares, the next
proxies picked by k-center as circles). 4 proxies per class, pool 16 (the paper's MNIST setting).
Measured (seed 0, 15 s on 2 CPU cores): test MAP@R 0.814, P@1 0.936 against 0.055 / 0.158 for
the untrained network and 0.559 / 0.974 for the raw pixels (closed set: the test digits are
classes seen in training).
"""
from dmljax.configs import base_config, shrink


def get_config(arg: str = ""):
  c = base_config()
  c.dataset.name = "digits_closed"
  c.model.widths = (32, 64)
  c.model.embedding_dim = 2
  c.batch_size = 40
  c.sampler.m = 4
  c.total_steps = 1400
  c.eval_every_steps = 25
  c.patience_evals = 10
  c.ccp.proxies_per_class = 4
  c.ccp.pool_size = 16
  c.plot_projections = True
  c.checkpoint.every_steps = 200
  if arg == "small":
    shrink(c)
    c.model.embedding_dim = 2
  elif arg:
    raise ValueError(f"Unknown variant {arg!r} of digits_ccp_2d.py; valid: 'small'.")
  return c
