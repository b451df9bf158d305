r"""DRO-KL with p-sampling and the margin base loss (Qi et al.'s DRO-KL_M) on glyphs, L2-normalised.

  python -m dmljax.main --config=configs/glyphs_dro_kl.py --workdir=/tmp/dmljax/glyphs_dro_kl

In the papers' regime by default (:func:`dmljax.configs.glyphs_regime`: the trunk pretrained
on disjoint glyph classes, fine-tuned with frozen BatchNorm at Adam 1e-4 for 200 steps);
``:scratch`` gives the earlier from-scratch settings, which the figures below marked "from
scratch" were measured with. Measured in the papers' regime: docs/results_glyphs.md.

The ``dro`` framework (dmljax/frameworks/dro.py) with ``dro_kl_sampled``: every pair of the global
batch gets the margin base loss ``[m + y (lambda - S)]_+`` (y = +1 positive, -1 negative; the
paper's m = 0.2, lambda = 0.5) on cosine similarities S; the KL-regularised optimal pair
weights ``p* ~ exp(l / gamma)`` are computed over the pairs with a nonzero loss, and the loss is
the mean loss of ``num_samples`` pairs drawn from ``p*`` with the step's random key (the paper's
p-sampling; it uses the margin loss here because, as the paper says, its binomial variant does not
directly apply to p-sampling). No binomial form is involved.

Batches are classes x 5 as in the paper (M = 5): 8 classes x 5 = 40. Scaled to this batch:
``num_samples`` = 2 B = 80 draws (the paper's K = 2 B). gamma = 0.1, the low end of the paper's
range 0.1-0.9 (and its timing setting); gamma weighs the KL term against the pair losses, whose
scale is set by m and lambda, not by the batch size, so it is not rescaled.

Variants (combine with ``:``): ``exact`` (``dro_kl``: the closed-form weighted loss over all
pairs, no sampling, same gamma), ``grouped`` (``dro_grouped_kl``, DRO-KL-G: KL weights per anchor
and side, the paper's "generalised LS", with its gamma = 0.01, same margin base loss) and
``plain`` (the margin base loss alone, every pair with a loss weighted alike: DRO-KL's plain
loss), ``scratch`` (trained from scratch, see :func:`dmljax.configs.glyphs_regime`) and ``small``
(tests: the tiny model and short schedule of ``shrink``).
"""
from dmljax.configs import glyphs_base, glyphs_regime

VARIANTS = ("exact", "grouped", "plain", "scratch", "small")


def get_config(arg: str = ""):
  parts = [p for p in arg.split(":") if p]
  unknown = [p for p in parts if p not in VARIANTS]
  if unknown or len({"exact", "grouped", "plain"} & set(parts)) > 1:
    raise ValueError(f"Unknown variant {arg!r} of glyphs_dro_kl.py; valid: {list(VARIANTS)} "
                     "(at most one of 'exact' / 'grouped' / 'plain'; combine with ':', e.g. "
                     "'exact:small').")
  c = glyphs_base()
  c.framework = "dro"
  c.model.normalization = "l2"
  c.sampler.m = 5
  c.batch_size = 40
  base = {"base": "margin", "margin": 0.2, "threshold": 0.5}
  if "exact" in parts:
    c.dro.weighting = "dro_kl"
    c.dro.kwargs = dict(base, gamma=0.1)
  elif "plain" in parts:
    # The base loss alone: every pair with a nonzero loss weighted alike (the top-K of all
    # B (B - 1) pairs, averaged over those with a loss).
    c.dro.weighting = "dro_topk"
    c.dro.kwargs = dict(base, k=c.batch_size * (c.batch_size - 1), normalize="nonzero")
  elif "grouped" in parts:
    c.dro.weighting = "dro_grouped_kl"
    c.dro.kwargs = dict(base, gamma=0.01)
  else:
    c.dro.weighting = "dro_kl_sampled"
    c.dro.kwargs = dict(base, gamma=0.1, num_samples=2 * c.batch_size)
  return glyphs_regime(c, parts)
