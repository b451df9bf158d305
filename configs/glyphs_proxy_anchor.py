r"""ProxyAnchor (margin 0.1, alpha 32) on glyphs with the CCP supplement's baseline settings.

  python -m dmljax.main --config=configs/glyphs_proxy_anchor.py --workdir=/tmp/dmljax/glyphs_proxy_anchor

In the papers' regime by default (:func:`dmljax.configs.glyphs_regime`: the trunk pretrained
on disjoint glyph classes, fine-tuned with frozen BatchNorm at Adam 1e-4 for 200 steps);
``:scratch`` gives the earlier from-scratch settings, which the figures below marked "from
scratch" were measured with. Measured in the papers' regime: docs/results_glyphs.md.

The CCP supplement's ProxyAnchor / ProxyNCA++ / SoftTriple protocol, on the glyphs schedule of
configs/glyphs_ccp.py: one sample per class in a batch (32 classes x 1), one epoch of warm-up in
which only the embedding layer and the proxies train (200 steps from scratch; in the papers'
regime 5 % of the run, 10 steps: one SOP epoch is 2-3 % of the paper's runs), a x100 learning-rate
multiplier for the proxies, one proxy per class, L2-normalised embeddings, and proxies
L2-normalised inside the loss on every step. ``--config.loss.name=proxy_nca_pp
--config.loss.kwargs.temperature=0.1`` (kwargs replaced, see below) gives the ProxyNCA++ row.

Measured from scratch (seed 0, 140 s on a shared 2-core CPU): test MAP@R 0.698, P@1 0.985 (val MAP@R 0.782);
untrained network 0.043, raw pixels 0.073.
"""
import ml_collections

from dmljax.configs import glyphs_base, glyphs_regime, variant_parts


def get_config(arg: str = ""):
  parts = variant_parts(arg, ("scratch", "small"), "glyphs_proxy_anchor.py")
  c = glyphs_base()
  c.framework = "standard"
  c.loss.name = "proxy_anchor"
  c.loss.kwargs = ml_collections.ConfigDict({"margin": 0.1, "alpha": 32.0})
  c.standard.proxies_per_class = 1
  c.model.normalization = "l2"
  c.sampler.m = 1                        # 32 classes x 1 sample
  c.optim.lr_multipliers.proxies = 100.0
  c.optim.freeze_trunk_epochs = 1.0
  return glyphs_regime(c, parts)
