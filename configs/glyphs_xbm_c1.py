r"""C1-XBM on glyphs: XBM's own contrastive loss (cosine, margin 0.5) on L2-normalised embeddings.

  python -m dmljax.main --config=configs/glyphs_xbm_c1.py --workdir=/tmp/dmljax/glyphs_xbm_c1

In the papers' regime by default (:func:`dmljax.configs.glyphs_regime`: the trunk pretrained
on disjoint glyph classes, fine-tuned with frozen BatchNorm at Adam 1e-4 for 200 steps);
``:scratch`` gives the earlier from-scratch settings, which the figures below marked "from
scratch" were measured with. Measured in the papers' regime: docs/results_glyphs.md.

CCP's C1-XBM baseline: ``contrastive_xbm`` (dmljax/losses/pair.py; the supplement's C1, margin 0.5
on every data set: per anchor, the sum of ``1 - s`` over its positives and of ``s`` over its
negatives above 0.5, divided by the batch size) in-batch plus against a memory of the 10 most
recent batches (S = 320, CCP's 4 proxies x 80 classes), after a warm-up of 1.15 % of the run
(2 steps; 250 from scratch; see configs/glyphs_xbm.py for why these sizes). Embeddings are L2-normalised
(``model.normalization = "l2"``): C1 is a loss on cosine similarities.

Variant ``:small`` (tests): the tiny model of ``shrink``, a 3-batch memory, a 10-step warm-up.
"""
from dmljax.configs import glyphs_base, glyphs_regime, variant_parts


def get_config(arg: str = ""):
  parts = variant_parts(arg, ("scratch", "small"), "glyphs_xbm_c1.py")
  c = glyphs_base()
  c.framework = "xbm"
  c.model.normalization = "l2"
  c.loss.name = "contrastive_xbm"
  c.loss.kwargs = {"margin": 0.5}
  c.xbm.memory_batches = 10
  c.xbm.warmup_steps = 250
  c.xbm.memory_weight = 1.0
  return glyphs_regime(c, parts)
