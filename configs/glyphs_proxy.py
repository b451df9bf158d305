r"""CCP's "Loss-Proxy" ablation on glyphs: one proxy problem, proxies never re-initialised.

  python -m dmljax.main --config=configs/glyphs_proxy.py --workdir=/tmp/dmljax/glyphs_proxy

In the papers' regime by default (:func:`dmljax.configs.glyphs_regime`: the trunk pretrained
on disjoint glyph classes, fine-tuned with frozen BatchNorm at Adam 1e-4 for 200 steps);
``:scratch`` gives the earlier from-scratch settings, which the figures below marked "from
scratch" were measured with. Measured in the papers' regime: docs/results_glyphs.md.

Same loss (1.0 x sample-to-proxy contrastive + 0.1 x in-batch contrastive), same 4 proxies per class initialised
by k-center from the pool, but a single projection: no re-initialisation and no proximal term.

Measured from scratch (seeds 0-2, 2-5 min a run on a shared 2-core CPU): test MAP@R 0.642 ± 0.003, P@1
0.959 ± 0.003 (val MAP@R 0.759); untrained network 0.021, raw pixels 0.073. Same schedule as
glyphs_ccp.py (in the papers' regime: validation every 20 steps, as CCP's).
"""
from dmljax.configs import glyphs_base, glyphs_regime, variant_parts


def get_config(arg: str = ""):
  parts = variant_parts(arg, ("scratch", "small"), "glyphs_proxy.py")
  c = glyphs_base()
  c.framework = "ccp"
  c.ccp.alternate = False
  return glyphs_regime(c, parts)
