r"""The CCP baseline: the same contrastive loss on in-batch pairs only (no proxies), on glyphs.

  python -m dmljax.main --config=configs/glyphs_contrastive.py --workdir=/tmp/dmljax/glyphs_contrastive

Reaches (seeds 0-2, measured, 3-5 min a run on 2 CPU cores): test MAP@R 0.595 ± 0.025,
P@1 0.952 ± 0.003 (val MAP@R 0.717); same schedule as glyphs_ccp.py.
"""
from dmljax.configs import shrink
from dmljax.configs import glyphs_base


def get_config(arg: str = ""):
  c = glyphs_base()
  c.framework = "standard"
  if arg == "small":
    shrink(c)
  elif arg:
    raise ValueError(f"Unknown variant {arg!r} of glyphs_contrastive.py; valid: 'small'.")
  return c
