r"""PROFS with hard negative class mining (C-PROFS-HNCM) on glyphs.

  python -m dmljax.main --config=configs/glyphs_profs_hncm.py --workdir=/tmp/dmljax/glyphs_profs_hncm

In the papers' regime by default (:func:`dmljax.configs.glyphs_regime`: the trunk pretrained
on disjoint glyph classes, fine-tuned with frozen BatchNorm at Adam 1e-4 for 200 steps);
``:scratch`` gives the earlier from-scratch settings, which the figures below marked "from
scratch" were measured with. Measured in the papers' regime: docs/results_glyphs.md.

As configs/glyphs_profs.py, plus HNCM: each class's representative embedding is stored as it is
embedded in the training step; at the last step of every hold the device computes each class's 3
nearest other classes from the stored embeddings, and the next hold's batches are groups of a
random seed class and its nearest classes (2 groups of 4 classes per batch of 8 classes). Hold 0
samples its classes uniformly.

Measured from scratch (seed 0, ``:scratch --config.total_steps=300``, ~1.5 min on 2 shared CPU cores): val MAP@R 0.475
(untrained 0.026, pixels 0.091), test MAP@R 0.361, R@1 0.856, NMI 0.647, F1 0.447; a 300-step run
is 5 holds, the first without mining: too short to rank it against configs/glyphs_profs.py.

Variants: ``:small`` (tests: tiny model, few steps).
"""
from dmljax.configs import glyphs_base, glyphs_regime, variant_parts


def get_config(arg: str = ""):
  parts = variant_parts(arg, ("scratch", "small"), "glyphs_profs_hncm.py")
  c = glyphs_base()  # the settings of configs/glyphs_profs.py, plus profs.hncm
  c.framework = "profs"
  c.profs.hncm = True
  c.profs.hncm_neighbors = 3
  c.clustering = True
  c.recall_ks = (1, 2, 4, 8)
  c.optim.lr_multipliers["beta"] = 1.0  # the margin loss's learnable beta, if chosen
  return glyphs_regime(c, parts)
