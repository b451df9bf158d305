r"""The CCP baseline: the same contrastive C1 loss on in-batch pairs only (no proxies), on glyphs.

  python -m dmljax.main --config=configs/glyphs_contrastive.py --workdir=/tmp/dmljax/glyphs_contrastive

Reaches (seed 0, measured): test MAP@R 0.560, P@1 0.926 (val MAP@R 0.711); same schedule as
glyphs_ccp.py (12.8 min measured on a loaded shared machine).
"""
from configs.common import shrink
from configs.glyphs_ccp import glyphs_base


def get_config(arg: str = ""):
  c = glyphs_base()
  c.framework = "standard"
  if arg == "small":
    shrink(c)
  return c
