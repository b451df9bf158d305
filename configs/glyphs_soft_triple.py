r"""SoftTriple (lambda 20, gamma 0.1, tau 0.2, delta 0.01; 4 centres per class) on glyphs.

  python -m dmljax.main --config=configs/glyphs_soft_triple.py --workdir=/tmp/dmljax/glyphs_soft_triple

In the papers' regime by default (:func:`dmljax.configs.glyphs_regime`: the trunk pretrained
on disjoint glyph classes, fine-tuned with frozen BatchNorm at Adam 1e-4 for 200 steps);
``:scratch`` gives the earlier from-scratch settings, which the figures below marked "from
scratch" were measured with. Measured in the papers' regime: docs/results_glyphs.md.

The CCP supplement's SoftTriple setting for CUB (lambda, gamma, tau, delta) = (20, 0.1, 0.2,
0.01), with its baseline protocol (one sample per class, one epoch of embedding-layer warm-up,
x100 proxy learning rate) on the glyphs schedule of configs/glyphs_ccp.py; 4 centres per class,
the number of proxies CCP uses here. dmljax names: ``la`` = lambda, ``gamma``, ``reg_weight`` =
tau, ``margin`` = delta.

Measured from scratch (seed 0, 253 s on a shared 2-core CPU): test MAP@R 0.647, P@1 0.974 (val MAP@R 0.727);
untrained network 0.043, raw pixels 0.073.
"""
import ml_collections

from dmljax.configs import glyphs_base, glyphs_regime, variant_parts


def get_config(arg: str = ""):
  parts = variant_parts(arg, ("scratch", "small"), "glyphs_soft_triple.py")
  c = glyphs_base()
  c.framework = "standard"
  c.loss.name = "soft_triple"
  c.loss.kwargs = ml_collections.ConfigDict(
      {"la": 20.0, "gamma": 0.1, "reg_weight": 0.2, "margin": 0.01})
  c.standard.proxies_per_class = 4
  c.model.normalization = "l2"
  c.sampler.m = 1
  c.optim.lr_multipliers.proxies = 100.0
  c.optim.freeze_trunk_epochs = 1.0
  return glyphs_regime(c, parts)
