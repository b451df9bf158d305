r"""CCP's "Loss-Proxy" ablation on glyphs: one proxy problem, proxies never re-initialised.

  python -m dmljax.main --config=configs/glyphs_proxy.py --workdir=/tmp/dmljax/glyphs_proxy

Same loss (1.0 x sample-to-proxy C1 + 0.1 x in-batch C1), same 4 proxies per class initialised
by k-center from the pool, but a single projection: no re-initialisation and no proximal term.

Reaches (seed 0, measured): test MAP@R 0.640, P@1 0.960 (val MAP@R 0.745); same schedule as
glyphs_ccp.py (10.9 min measured on a loaded shared machine).
"""
from configs.common import shrink
from configs.glyphs_ccp import glyphs_base


def get_config(arg: str = ""):
  c = glyphs_base()
  c.framework = "ccp"
  c.ccp.alternate = False
  if arg == "small":
    shrink(c)
  return c
