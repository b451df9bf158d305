r"""C2-XBM on glyphs: contrastive (Euclidean, margins 0 / 1) in-batch plus against a cross-batch memory.

  python -m dmljax.main --config=configs/glyphs_xbm.py --workdir=/tmp/dmljax/glyphs_xbm

CCP's C2-XBM baseline (see dmljax/frameworks/xbm.py): the loss of configs/glyphs_contrastive.py on
the in-batch pairs plus, after a warm-up, the same loss of the batch against a memory of the most
recent 10 batches (S = 10 x 32 = 320 embeddings). The memory size follows the CCP supplement's
rule of matching XBM's memory to CCP's number of proxies: 4 per class x 80 training classes, as in
configs/glyphs_ccp.py. The warm-up is 250 steps of in-batch loss only (the supplement's 1,000 steps
belong to runs several times longer than the 1,500 steps here). Same model, data, batches (8
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
