r"""The CCP baseline: the same contrastive loss on in-batch pairs only (no proxies), on glyphs.

  python -m dmljax.main --config=configs/glyphs_contrastive.py --workdir=/tmp/dmljax/glyphs_contrastive

Measured (seeds 0-2, 3-7 min a run on a shared 2-core CPU): test MAP@R 0.597 ± 0.034, P@1
0.945 ± 0.009 (val MAP@R 0.727); untrained network 0.021, raw pixels 0.073. Same schedule as
glyphs_ccp.py.
"""
from dmljax.configs import glyphs_base, glyphs_regime, variant_parts


def get_config(arg: str = ""):
  parts = variant_parts(arg, ("scratch", "small"), "glyphs_contrastive.py")
  c = glyphs_base()
  c.framework = "standard"
  return glyphs_regime(c, parts)
