r"""C2-XBM on glyphs: contrastive (Euclidean, margins 0 / 1) in-batch plus against a cross-batch memory.

  python -m dmljax.main --config=configs/glyphs_xbm.py --workdir=/tmp/dmljax/glyphs_xbm

In the papers' regime by default (:func:`dmljax.configs.glyphs_regime`: the trunk pretrained
on disjoint glyph classes, fine-tuned with frozen BatchNorm at Adam 1e-4 for 200 steps);
``:scratch`` gives the earlier from-scratch settings, which the figures below marked "from
scratch" were measured with. Measured in the papers' regime: docs/results_glyphs.md.

CCP's C2-XBM baseline (see dmljax/frameworks/xbm.py): the loss of configs/glyphs_contrastive.py on
the in-batch pairs plus, after a warm-up, the same loss of the batch against a memory of the most
recent 10 batches (S = 10 x 32 = 320 embeddings). The memory size follows the CCP supplement's
rule of matching XBM's memory to CCP's number of proxies: 4 per class x 80 training classes, as in
configs/glyphs_ccp.py. The warm-up (in-batch loss only) is the supplement's 1,000 steps as the
same fraction of the run: 1,000 of the 81K-93K steps its C2-XBM runs take on SOP / In-shop
(Table I), 1.15 %, i.e. 2 of the 200 steps here (``dmljax.configs.XBM_WARMUP_FRACTION``); from
scratch it is 250 of 1,500 steps. Same model, data, batches (8
classes x 4) and schedule as the other glyphs configs; bounded embeddings as glyphs_contrastive.py.

Variant ``:small`` (tests): the tiny model of ``shrink``, a 3-batch memory, a 10-step warm-up.
"""
from dmljax.configs import glyphs_base, glyphs_regime, variant_parts


def get_config(arg: str = ""):
  parts = variant_parts(arg, ("scratch", "small"), "glyphs_xbm.py")
  c = glyphs_base()
  c.framework = "xbm"
  c.loss.name = "contrastive"
  c.loss.kwargs.pos_margin = 0.0
  c.loss.kwargs.neg_margin = 1.0
  c.xbm.memory_batches = 10
  c.xbm.warmup_steps = 250
  c.xbm.memory_weight = 1.0
  return glyphs_regime(c, parts)
