r"""The CCP baseline: the same contrastive loss on in-batch pairs only (no proxies), on glyphs.

  python -m dmljax.main --config=configs/glyphs_contrastive.py --workdir=/tmp/dmljax/glyphs_contrastive

In the papers' regime by default (:func:`dmljax.configs.glyphs_regime`: the trunk pretrained
on disjoint glyph classes, fine-tuned with frozen BatchNorm at Adam 1e-4 for 200 steps);
``:scratch`` gives the earlier from-scratch settings, which the figures below marked "from
scratch" were measured with. Measured in the papers' regime: docs/results_glyphs.md.

Measured from scratch (seeds 0-2, 3-7 min a run on a shared 2-core CPU): test MAP@R 0.597 ± 0.034, P@1
0.945 ± 0.009 (val MAP@R 0.727); untrained network 0.021, raw pixels 0.073. Same schedule as
glyphs_ccp.py.
"""
from dmljax.configs import glyphs_base, glyphs_regime, variant_parts


def get_config(arg: str = ""):
  parts = variant_parts(arg, ("scratch", "small"), "glyphs_contrastive.py")
  c = glyphs_base()
  c.framework = "standard"
  return glyphs_regime(c, parts)
