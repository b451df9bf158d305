r"""C-PROFS on glyphs (contrastive, one hardest negative per positive pair), without HNCM.

  python -m dmljax.main --config=configs/glyphs_profs.py --workdir=/tmp/dmljax/glyphs_profs

In the papers' regime by default (:func:`dmljax.configs.glyphs_regime`: the trunk pretrained
on disjoint glyph classes, fine-tuned with frozen BatchNorm at Adam 1e-4 for 200 steps);
``:scratch`` gives the earlier from-scratch settings, which the figures below marked "from
scratch" were measured with. Measured in the papers' regime: docs/results_glyphs.md.

Can et al.'s framework (dmljax/frameworks/profs.py): one representative per class held for
M = ceil(rho I L / B) steps (rho = 6, I = 4 samples per class, B = 32: M = 60 on the ~80 training
classes), batches of 8 classes built around the representatives, the representatives as the
anchors of the contrastive pairs, the proximal term lam / 2 ||theta - theta^(k)||^2 (lam = 1e-3)
to the weights each hold starts from. Same model, data and schedule as
configs/glyphs_contrastive.py (the baseline) and configs/glyphs_profs_hncm.py (with hard negative
class mining). Evaluations report NMI and F1 (k-means) and Recall@1/2/4/8 beside MAP@R, as the
paper's Table 1.

Measured from scratch (seed 0, ``:scratch --config.total_steps=300``, ~2 min on 2 shared CPU cores): val MAP@R 0.536
(untrained 0.026, pixels 0.091), test MAP@R 0.396, R@1 0.868, NMI 0.681, F1 0.493.

Variants: ``:small`` (tests: tiny model, few steps).
"""
from dmljax.configs import glyphs_base, glyphs_regime, variant_parts


def get_config(arg: str = ""):
  parts = variant_parts(arg, ("scratch", "small"), "glyphs_profs.py")
  c = glyphs_base()
  c.framework = "profs"
  c.profs.hncm = False
  c.clustering = True
  c.recall_ks = (1, 2, 4, 8)
  # The margin loss's learnable beta (--config.loss.name=margin) has its own lr multiplier.
  c.optim.lr_multipliers["beta"] = 1.0
  return glyphs_regime(c, parts)
