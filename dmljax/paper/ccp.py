"""CCP (Gurbuz, Can, Alatan, "Deep Metric Learning with Chance Constraints"): 76 rows.

* Table II (with V and VI, the same runs with P@R added): 13 methods on SOP, In-shop, CUB and
  Cars196 under the 4-fold protocol; each row's result is the four fold models' mean (128-D) and
  their concatenation (512-D). 52 rows.
* Table III (conventional evaluation, BN-Inception 512-D, batch 128) and Table IV (ResNet-50
  512-D, batch 96): C1-, C2- and MS-CCP-L on the four data sets, R@1. 24 rows. The other rows of
  Tables III and IV are quoted from other work (:data:`QUOTED`).

Every row starts from :func:`dmljax.configs.ccp_paper_config` (C2-CCP as the authors ran it) and
changes the framework and loss; the supplement's "Hyperparameters" section gives each loss's
settings per data set.
"""
from __future__ import annotations

from dmljax import configs
from dmljax.paper import Quoted, Row, Spec, tables

PAPER = "ccp"
DATASETS = ("sop", "inshop", "cub", "cars")

# ------------------------------------------------------------------------------------ sources
SEC_IMPL = "CCP section IV-D, Implementation details"
SEC_SETUP = "CCP section V-A, Experimental setup"
SUP_TRAIN = "CCP supplement, Training procedure"
SUP_AUG = "CCP supplement, Data augmentation (Musgrave et al.'s)"
SUP_EMB = "CCP supplement, Embedding vectors"
SUP_HP = "CCP supplement, Hyperparameters"
SUP_SPLITS = "CCP supplement, Training splits"
SEC_CONV = "CCP section V-C, Conventional evaluation"
CODE = "authors' code (yetigurbuz/ccp-dml; ../shared/papers/README.md)"

# ------------------------------------------------------------------------------------ settings
#: Supplement, "Hyperparameters".
TRIPLET_MARGIN = {"cub": 0.0961, "cars": 0.1190, "inshop": 0.0451, "sop": 0.0451}
MS = {"cub": (2.0, 40.0, 0.5), "cars": (14.35, 75.83, 0.66), "inshop": (8.49, 57.38, 0.41),
      "sop": (2.0, 40.0, 0.5)}                          # (alpha, beta, lambda)
SOFT_TRIPLE = {"cub": (20.0, 0.1, 0.2, 0.01), "cars": (17.69, 19.18, 0.0669, 0.3588),
               "inshop": (20.0, 0.1, 0.2, 0.01), "sop": (100.0, 47.9, 0.2, 0.3145)}
#: SoftTriple-S/L: 1 centre per class on SOP and In-shop (S), 10 on CUB and Cars196 (L).
SOFT_TRIPLE_CENTRES = {"sop": 1, "inshop": 1, "cub": 10, "cars": 10}
#: XBM memory sizes in batches (S, L).
XBM_MEMORY = {"cub": (3, 25), "cars": (3, 25), "inshop": (100, 400), "sop": (400, 1400)}
C1_MARGIN = 0.5


def start(row: Row) -> Spec:
  """C2-CCP as authored on the row's data set, with the sources of its settings."""
  spec = Spec(configs.ccp_paper_config(row.dataset))
  spec.cite(SEC_IMPL + " (ImageNet-pretrained BN-Inception)", ["model.name", "model.pretrained"])
  spec.cite(SUP_EMB + " (embedding 128; v / max(1, |v|))",
            ["model.embedding_dim", "model.normalization"])
  spec.cite(CODE + ": BatchNorm frozen entirely (statistics and affine); the embedding layer "
            "has no bias", ["model.freeze_bn", "model.head_bias"])
  spec.cite(CODE + ": coupled L2 1e-4 on every trainable variable but BatchNorm's, added before "
            "clipping to global norm 10 and each value to +-10; Keras Adam's epsilon 1e-7",
            ["optim.weight_decay_scope", "optim.decay_before_clip", "optim.clip_value",
             "optim.eps"])
  spec.cite(CODE + ": a projection ends after 3 evaluations without an improvement above the "
            "callback's margin; the model continues from its current weights, the proximal "
            "anchor and k-center seeds are the ended projection's best; the pool is embedded "
            "before the normalisation",
            ["ccp.min_improvement", "ccp.start_from", "ccp.pool_embeddings"])
  spec.cite("chosen: the projection end decides on the evaluation just made (the authors' "
            "callback order, one evaluation late, is a reading of their code, not run)",
            ["ccp.lagged_metric"])
  spec.cite(SEC_IMPL + " (alternating proxy problems)", ["ccp.alternate"])
  spec.cite(SUP_HP + ", CCP: no warm-up and no learning-rate multiplier for the proxies; a "
            "constant learning rate (" + SUP_TRAIN + ")",
            ["optim.lr_multipliers.proxies", "optim.freeze_trunk_epochs", "optim.warmup_steps",
             "optim.schedule"])
  spec.cite(SUP_TRAIN + " (Adam, lr 1e-5, weight decay 1e-4, betas .9/.99, batch 32 = 8 x 4)",
            ["optim.name", "optim.learning_rate", "optim.weight_decay", "optim.b1", "optim.b2",
             "batch_size", "sampler.m", "sampler.name"])
  spec.cite(CODE + ": gradient clipped to global norm 10", ["optim.grad_clip_norm"])
  spec.cite(SUP_TRAIN + " (validation MAP@R every 25 steps on CUB / Cars, 250 on SOP / "
            "In-shop; stop after 60 without improvement)", ["eval_every_steps", "patience_evals"])
  spec.cite(SEC_IMPL + ", Solving projections (patience 3)", ["ccp.patience"])
  spec.cite(SUP_HP + ", CCP (lambda 2e-4; 8 proxies, pool 12 on CUB / Cars; 4 and 7 on SOP / "
            "In-shop)", ["ccp.lam", "ccp.proxies_per_class", "ccp.pool_size"])
  spec.cite(CODE + ": 1.0 x sample-to-proxy loss + 0.1 x in-batch loss",
            ["ccp.proxy_weight", "ccp.in_batch_weight"])
  spec.cite(SUP_AUG + " (resize 256, random resized crop 227, scale 0.16-1, ratio 3/4-4/3, "
            "flip; eval: centre crop 227)",
            ["input.size", "input.resize", "input.scale", "input.ratio", "input.flip"])
  spec.cite("chosen: classes of fewer than 4 images (SOP, In-shop) fill their rows by cycling "
            "through their images, as PML's sampler does", ["sampler.small_classes"])
  spec.cite("chosen: an upper bound; the run ends by patience", ["total_steps"])
  spec.cite(SUP_SPLITS + ": a single run validates on 1/4 of the training classes (fold 0); the "
            "protocol command sets each fold (4-fold tables) or drops the fold (conventional "
            "tables)", ["dataset.options"])
  return spec


def _loss(spec: Spec, name: str, kwargs: dict, source: str) -> None:
  spec.set(source, {"loss.name": name, "loss.kwargs": kwargs})


def _c1(spec, ds):
  _loss(spec, "contrastive_xbm", {"margin": C1_MARGIN},
        SUP_HP + ", C1 (XBM's official contrastive loss, margin 0.5)")
  spec.set(SUP_HP + ", C1: XBM's implementation L2-normalises the embeddings",
           {"model.normalization": "l2"})


def _c2(spec, ds):
  m = configs.CCP_PAPER[ds]["margins"]
  _loss(spec, "contrastive", {"pos_margin": m[0], "neg_margin": m[1]},
        SUP_HP + ", C2 ((m+, m-) per data set)")


def _ms(spec, ds):
  a, b, lam = MS[ds]
  _loss(spec, "multi_similarity", {"alpha": a, "beta": b, "base": lam},
        SUP_HP + ", MS ((alpha, beta, lambda) per data set)")


def _triplet(spec, ds):
  _loss(spec, "triplet_margin", {"margin": TRIPLET_MARGIN[ds]},
        SUP_HP + ", Triplet (margin per data set)")


def _standard(spec):
  spec.set("the baseline: the loss alone in the same framework (" + SEC_SETUP + ")",
           {"framework": "standard"})


def _ccp(spec, ds):
  spec.set(SEC_SETUP + ", Losses with CCP", {"framework": "ccp"})
  spec.cite(CODE + ": the in-batch term is the configured pair loss itself, with its own "
            "settings (\"\" = config.loss)", ["ccp.in_batch_loss"])
  spec.cite(CODE + ": proxies are stored raw and pass through the embeddings' normalisation",
            ["ccp.proxy_normalization"])


def _xbm(spec, ds):
  spec.set(SEC_SETUP + " (XBM with C1 / C2)", {"framework": "xbm"})
  spec.set(SUP_HP + ", XBM (memory L in batches: 25 CUB / Cars, 400 In-shop, 1400 SOP; 1K "
           "steps of the baseline loss first)",
           {"xbm.memory_batches": XBM_MEMORY[ds][1], "xbm.warmup_steps": 1000})
  spec.set("chosen: XBM's weight 1 for the memory term (XBM's paper)", {"xbm.memory_weight": 1.0})


def _proxy_baseline(spec, name, kwargs, source, centres=1):
  spec.set("the proxy baseline in the same framework (" + SEC_SETUP + ")",
           {"framework": "standard"})
  _loss(spec, name, kwargs, source)
  spec.set(SUP_HP + " (1 sample per class: 32 classes x 1; 1 epoch warm-up of the embedding "
           "layer; x100 learning rate on the proxies)",
           {"sampler.m": 1, "optim.freeze_trunk_epochs": 1.0,
            "optim.lr_multipliers.proxies": 100.0})
  spec.set(SUP_HP + " (SoftTriple-S/L: centres per class)" if centres > 1 else
           "one proxy per class (the baseline's definition)",
           {"standard.proxies_per_class": centres})
  spec.set("chosen: the proxy losses compare L2-normalised embeddings and proxies (their papers)",
           {"model.normalization": "l2"})


def _builder(method: str, ds: str):
  def build(spec: Spec) -> None:
    if method in ("c1", "c1_xbm_l", "c1_ccp_l"):
      _c1(spec, ds)
    elif method in ("c2", "c2_xbm_l", "c2_ccp_l"):
      _c2(spec, ds)
    elif method in ("ms", "ms_ccp_l"):
      _ms(spec, ds)
    elif method in ("triplet", "triplet_ccp_l"):
      _triplet(spec, ds)
    if method in ("c1", "c2", "ms", "triplet"):
      _standard(spec)
    elif method.endswith("_xbm_l"):
      _xbm(spec, ds)
    elif method.endswith("_ccp_l"):
      _ccp(spec, ds)
    elif method == "proxy_anchor":
      _proxy_baseline(spec, "proxy_anchor", {"margin": 0.1, "alpha": 32.0},
                      SUP_HP + ", ProxyAnchor ((delta, alpha) = (0.1, 32))")
    elif method == "proxy_nca_pp":
      _proxy_baseline(spec, "proxy_nca_pp", {"temperature": 0.1},
                      SUP_HP + ", ProxyNCA++ (temperature 0.1)")
    elif method == "soft_triple":
      la, gamma, tau, delta = SOFT_TRIPLE[ds]
      _proxy_baseline(spec, "soft_triple",
                      {"la": la, "gamma": gamma, "reg_weight": tau, "margin": delta},
                      SUP_HP + ", SoftTriple ((lambda, gamma, tau, delta) per data set)",
                      centres=SOFT_TRIPLE_CENTRES[ds])
  return build


def _conventional(builder, ds: str, table: str):
  def build(spec: Spec) -> None:
    builder(spec)
    spec.set(SEC_CONV + " (512-D)", {"model.embedding_dim": 512})
    if table == "3":
      spec.set(SEC_CONV + " (batch 128 for BN-Inception; 4 samples per class)",
               {"batch_size": 128, "sampler.m": 4})
    else:
      configs.set_backbone(spec.config, "resnet50", 512)
      spec.cite(SEC_CONV + " (ResNet-50, ImageNet weights)", ["model.name", "model.pretrained"])
      spec.set(SEC_CONV + " (batch 96 for ResNet-50; 4 samples per class). The authors' code "
               "differs for this table: 28 x 4 = 112, avg+max pooling, learning rate reduced on "
               "plateau, early stopping on R@1, weight decay 4e-4; the paper's values are used",
               {"batch_size": 96, "sampler.m": 4})
      spec.cite(SEC_CONV + " (the same optimisation procedure as section V-A); the authors' "
                "code uses weight decay 4e-4 here", ["optim.weight_decay"])
      spec.cite(SEC_IMPL + " (global average pooling); the authors' code uses avg+max for "
                "ResNet-50", ["model.pooling"])
      spec.cite(CODE + ": BatchNorm frozen (as for BN-Inception)", ["model.freeze_bn"])
    spec.set(SEC_CONV + " (R@1)", {"recall_ks": (1,)})
    spec.cite(SEC_CONV + " (the same data augmentation as section V-A: 227 crops)",
              ["input.size"])
    spec.cite(SEC_CONV + ": the test split monitors training (validation MAP@R every 25 / 250 "
              "steps, patience 60) as in section V-A", ["eval_every_steps", "patience_evals"])
  return build


# ------------------------------------------------------------------------------------ published
_T2_COLS = [f"{ds}/{dim}/{m}" for ds in DATASETS for dim in ("512", "128")
            for m in ("P@1", "MAP@R")]
TABLE2 = tables.parse("""
C1	68.84	40.25	64.96	36.54	80.12	50.15	76.08	46.51	63.67	23.08	56.21	19.06	77.75	23.50	64.17	16.13
C1-XBM-L	78.68	51.82	75.37	47.39	88.39	58.64	85.75	55.37	65.40	24.87	57.57	19.84	83.68	27.93	72.13	18.83
C1-CCP-L	79.53	52.73	76.24	48.07	88.52	59.67	85.50	55.56	68.11	27.11	59.56	21.27	83.76	28.32	72.05	18.96
C2	74.87	46.94	71.15	42.66	86.32	59.42	83.04	55.13	67.49	26.47	59.73	21.01	81.04	24.73	69.17	17.22
C2-XBM-L	76.66	49.04	73.47	45.15	87.66	60.64	84.58	56.75	68.62	26.83	60.18	21.41	82.40	25.99	70.01	18.01
C2-CCP-L	78.95	52.19	75.92	48.18	88.52	61.07	86.11	57.24	69.73	28.02	62.39	22.67	82.89	26.27	72.16	18.52
MS	72.74	44.10	68.96	40.18	88.37	60.65	85.39	56.61	64.65	24.15	57.24	19.64	80.88	26.23	69.27	18.25
MS-CCP-L	78.96	51.85	75.80	47.97	90.24	63.59	87.10	59.15	68.84	27.44	61.10	22.40	86.26	29.14	74.97	19.85
Triplet	75.40	47.03	70.41	41.03	86.71	60.60	82.58	55.25	64.01	23.43	55.51	18.51	78.44	23.11	64.57	15.68
Triplet-CCP-L	77.09	49.33	72.21	43.11	89.44	64.28	86.00	59.04	65.36	24.53	56.65	19.31	81.84	25.21	68.75	17.43
ProxyAnchor	77.10	49.01	73.86	44.89	88.08	58.09	85.87	54.95	68.43	26.53	60.61	21.48	85.29	27.73	75.79	19.56
ProxyNCA++	76.07	48.20	72.89	44.44	87.33	57.48	84.79	54.42	65.48	24.85	58.49	20.96	82.87	26.34	72.45	19.32
SoftTriple-S/L	78.48	50.77	74.66	45.75	88.37	59.56	85.71	55.68	66.12	26.02	57.94	19.86	84.90	27.80	73.16	19.18
""", _T2_COLS)

# Tables V (SOP, In-shop) and VI (CUB, Cars196): P@1, P@R, MAP@R; the P@R column is taken from
# them. (Table VI's SoftTriple-L CUB 512-D P@1 reads 68.12 where Table II has 66.12.)
_T56_COLS = lambda a, b: [f"{ds}/{dim}/{m}" for ds in (a, b) for dim in ("512", "128")  # noqa: E731
                          for m in ("P@1", "P@R", "MAP@R")]
TABLE5 = tables.parse("""
C1	68.84	43.28	40.25	64.96	39.68	36.54	80.12	53.11	50.15	76.08	49.61	46.51
C1-XBM-L	78.68	54.66	51.82	75.37	49.95	47.39	88.39	61.33	58.64	85.75	58.13	55.37
C1-CCP-L	79.53	55.11	52.73	76.24	50.07	48.07	88.52	62.54	59.67	85.50	58.51	55.56
C2	74.87	49.88	46.94	71.15	45.77	42.66	86.32	62.36	59.42	83.04	58.27	55.13
C2-XBM-L	76.66	51.91	49.04	73.47	48.18	45.15	87.66	63.50	60.64	84.58	59.78	56.75
C2-CCP-L	78.95	55.01	52.19	75.92	51.14	48.18	88.52	63.94	61.07	86.11	60.16	57.24
MS	72.74	47.07	44.10	68.96	43.25	40.18	88.37	63.53	60.65	85.39	59.65	56.61
MS-CCP-L	78.96	54.71	51.85	75.80	50.48	47.97	90.24	66.31	63.59	87.10	61.74	59.15
Triplet	75.40	50.13	47.03	70.41	44.32	41.03	86.71	63.81	60.60	82.58	58.74	55.25
Triplet-CCP-L	77.09	52.42	49.33	72.21	46.38	43.11	89.44	67.23	64.28	86.00	62.24	59.04
ProxyAnchor	77.10	51.95	49.01	73.86	47.94	44.89	88.08	60.91	58.09	85.87	57.80	54.95
ProxyNCA++	76.07	51.17	48.20	72.89	47.47	44.44	87.33	60.33	57.48	84.79	57.33	54.42
SoftTriple-S/L	78.48	53.68	50.77	74.66	48.79	45.75	88.37	62.56	59.56	85.71	58.74	55.68
""", _T56_COLS("sop", "inshop"))
TABLE6 = tables.parse("""
C1	63.67	33.77	23.08	56.21	29.65	19.06	77.75	33.69	23.50	64.17	26.50	16.13
C1-XBM-L	65.40	35.57	24.87	57.57	30.42	19.84	83.68	37.74	27.93	72.13	28.55	18.83
C1-CCP-L	68.11	37.85	27.11	59.56	32.06	21.27	83.76	37.78	28.32	72.05	28.74	18.96
C2	67.49	37.18	26.47	59.73	31.86	21.01	81.04	34.97	24.73	69.17	27.70	17.22
C2-XBM-L	68.62	37.53	26.83	60.18	32.25	21.41	82.40	36.07	25.99	70.01	28.49	18.01
C2-CCP-L	69.73	38.69	28.02	62.39	33.49	22.67	82.89	36.27	26.27	72.16	28.98	18.52
MS	64.65	34.84	24.15	57.24	30.29	19.64	80.88	36.45	26.23	69.27	28.93	18.25
MS-CCP-L	68.84	38.19	27.44	61.10	33.23	22.40	86.26	38.97	29.14	74.97	30.44	19.85
Triplet	64.01	34.55	23.43	55.51	29.38	18.51	78.44	33.83	23.11	64.57	26.52	15.68
Triplet-CCP-L	65.36	35.42	24.53	56.65	30.17	19.31	81.84	35.61	25.21	68.75	28.21	17.43
ProxyAnchor	68.43	37.36	26.53	60.61	32.36	21.48	85.29	37.53	27.73	75.79	29.91	19.56
ProxyNCA++	65.48	35.60	24.85	58.49	31.73	20.96	82.87	36.56	26.34	72.45	29.91	19.32
SoftTriple-S/L	68.12	36.98	26.02	57.94	30.63	19.86	84.90	37.69	27.80	73.16	29.60	19.18
""", _T56_COLS("cub", "cars"))

_T34_COLS = [f"{ds}/R@1" for ds in ("cub", "cars", "sop", "inshop")]
TABLE3 = tables.parse("""
SoftTriple-L [5]	65.40	84.50	78.60	-
C1-XBM-L [4]	65.80	82.00	79.50	89.90
ProxyAnchor [42]	68.40	86.10	79.10	91.50
DiVA [32]	66.80	84.10	78.10	-
ProxyFewer [6]	66.60	85.50	78.00	-
Margin-S2SD [34]	68.50	87.30	79.30	-
C1-CCP-L	67.74	83.74	79.86	90.98
C2-CCP-L	69.87	83.90	80.01	91.72
MS-CCP-L	69.09	86.01	79.75	91.84
""", _T34_COLS)
TABLE4 = tables.parse("""
C1-XBM 128 [4]	-	-	80.60	91.30
ProxyAnchor 512 [42]	69.70	87.70	80.00	92.10
DiVA 512 [32]	69.20	87.60	79.60	-
ProxyNCA++ 512 [45]	66.30	85.40	80.20	88.60
Margin-S2SD 512 [34]	69.00	89.50	81.20	-
LIBC 512 [35]	70.30	88.10	81.40	92.80
ProxyAnchor-DIML 128 [33]	66.46	86.13	79.22	-
C1-CCP-L	69.87	87.12	82.77	92.07
C2-CCP-L	71.04	85.93	82.34	92.46
MS-CCP-L	70.37	89.02	82.27	92.71
""", _T34_COLS)

#: How the report lays out each table (columns per data set, in the paper's order).
TABLES = {
    "2": {"title": "CCP Table II (with P@R from Tables V / VI): 4-fold protocol, BN-Inception",
          "datasets": list(DATASETS),
          "columns": ["512/P@1", "512/P@R", "512/MAP@R", "128/P@1", "128/P@R", "128/MAP@R"]},
    "3": {"title": "CCP Table III: conventional evaluation, BN-Inception 512-D",
          "datasets": ["cub", "cars", "sop", "inshop"], "columns": ["R@1"]},
    "4": {"title": "CCP Table IV: conventional evaluation, ResNet-50 512-D",
          "datasets": ["cub", "cars", "sop", "inshop"], "columns": ["R@1"]},
}
TABLES["5"] = dict(TABLES["2"], datasets=["sop", "inshop"],
                   title="CCP Table V: SOP and In-shop, P@1 / P@R / MAP@R")
TABLES["6"] = dict(TABLES["2"], datasets=["cub", "cars"],
                   title="CCP Table VI: CUB and Cars196, P@1 / P@R / MAP@R")

# ------------------------------------------------------------------------------------ rows
METHODS = (("c1", "C1"), ("c1_xbm_l", "C1-XBM-L"), ("c1_ccp_l", "C1-CCP-L"), ("c2", "C2"),
           ("c2_xbm_l", "C2-XBM-L"), ("c2_ccp_l", "C2-CCP-L"), ("ms", "MS"),
           ("ms_ccp_l", "MS-CCP-L"), ("triplet", "Triplet"), ("triplet_ccp_l", "Triplet-CCP-L"),
           ("proxy_anchor", "ProxyAnchor"), ("proxy_nca_pp", "ProxyNCA++"),
           ("soft_triple", "SoftTriple-S/L"))


def _table2_published(method: str, ds: str) -> dict:
  out = tables.pick(TABLE2, method, f"{ds}/")
  both = TABLE5 if ds in ("sop", "inshop") else TABLE6
  for k, v in tables.pick(both, method, f"{ds}/").items():
    if k.endswith("P@R"):
      out[k] = v
  return out


def _rows():
  out = []
  for ds in DATASETS:
    for key, method in METHODS:
      name = method
      if key == "soft_triple":
        name = "SoftTriple-" + ("S" if SOFT_TRIPLE_CENTRES[ds] == 1 else "L")
      out.append(Row(PAPER, "2", ds, key, name, "4fold", _builder(key, ds),
                     published=_table2_published(method, ds),
                     published_ref="CCP Table II (P@1, MAP@R) and Table "
                                   f"{'V' if ds in ('sop', 'inshop') else 'VI'} (P@R)",
                     aliases=("5",) if ds in ("sop", "inshop") else ("6",)))
  for table, pub in (("3", TABLE3), ("4", TABLE4)):
    for ds in ("cub", "cars", "sop", "inshop"):
      for key, method in (("c1_ccp_l", "C1-CCP-L"), ("c2_ccp_l", "C2-CCP-L"),
                          ("ms_ccp_l", "MS-CCP-L")):
        out.append(Row(PAPER, table, ds, key, method, "conventional",
                       _conventional(_builder(key, ds), ds, table),
                       published=tables.pick(pub, method, f"{ds}/"),
                       published_ref=f"CCP Table {'III' if table == '3' else 'IV'}"))
  return out


ROWS = _rows()

QUOTED = [Quoted(PAPER, table, ds, method, {"R@1": v}, f"quoted in CCP Table {roman} ({method})")
          for table, roman, pub in (("3", "III", TABLE3), ("4", "IV", TABLE4))
          for method, vals in pub.items() if "[" in method
          for ds in ("cub", "cars", "sop", "inshop")
          for v in [vals[f"{ds}/R@1"]] if v is not None]
