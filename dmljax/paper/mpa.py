"""MPA (Saeki, Kawahara, Aman, "Multi Proxy Anchor Family Loss for Several Types of Gradients"):
25 rows.

* Tables 4-6 (CUB, Cars196: R@1/2/4/8, nDCG@2/4/8, MAP@R; SOP: R@1/10/100, nDCG@10/100,
  MAP@R): SoftTriple and ProxyAnchor rerun in the same set-up, MPA, MPA-DW, MPA-AP. 15 rows.
* Tables 7-8 (CUB, Cars196: R@1, nDCG@2/4/8): MPA with K = 1, 4, 8, 12, 16 proxies per class.
  10 rows.

Section 4.2: InceptionBN (ImageNet weights) with cubic GeM pooling, 512-D, 224 crops, AdamW (lr
1e-4, proxies 1e-2), batch 180 / 64 / 32 (CUB / Cars196 / SOP), 60 / 60 / 100 epochs, the
learning rates halved every 20 epochs, random batches, tau = 0.2, gamma = 0.1, delta = 0.1,
K = 10 (CUB, Cars196) or 2 (SOP). A fixed number of epochs: conventional runs evaluated once, at
the end. The other rows of Tables 4-6 are quoted from other work (:data:`QUOTED`).
"""
from __future__ import annotations

from dmljax import configs
from dmljax.paper import Quoted, Row, Spec, tables

PAPER = "mpa"
SEC41 = "MPA section 4.1, Datasets"
SEC42 = "MPA section 4.2, Implementation details"
SEC44 = "MPA section 4.4, The impacts of proxies"

BATCH = {"cub": 180, "cars": 64, "sop": 32}
EPOCHS = {"cub": 60, "cars": 60, "sop": 100}
CENTRES = {"cub": 10, "cars": 10, "sop": 2}
RECALL = {"cub": (1, 2, 4, 8), "cars": (1, 2, 4, 8), "sop": (1, 10, 100)}
NDCG = {"cub": (2, 4, 8), "cars": (2, 4, 8), "sop": (10, 100)}
ALPHA = ("chosen: alpha = 32, ProxyAnchor's scale (MPA extends ProxyAnchor; the paper gives no "
         "alpha)")


def start(row: Row) -> Spec:
  ds = row.dataset
  spec = Spec(configs.benchmark_config(ds, "bn_inception", 512))
  spec.cite(SEC42 + " (InceptionBN, ImageNet weights; 512-D)",
            ["model.name", "model.pretrained", "model.embedding_dim"])
  spec.set(SEC42 + " (cubic GeM as the global descriptor)",
           {"model.pooling": "gem", "model.gem_p": 3.0})
  spec.set("chosen: L2-normalised embeddings and proxies (cosine similarities, section 3)",
           {"model.normalization": "l2"})
  spec.set("chosen: BatchNorm statistics frozen, as the ProxyAnchor code MPA builds on (not "
           "stated)", {"model.freeze_bn": "stats"})
  spec.set(SEC42 + " (train: random resized crop 224 + flip; test: resize 256, centre crop 224)",
           {"input.size": 224, "input.resize": 256, "input.flip": True})
  spec.set("chosen: torchvision's RandomResizedCrop ranges (area 0.08-1, aspect 3/4-4/3), as the "
           "ProxyAnchor code MPA follows (the paper gives none)",
           {"input.scale": (0.08, 1.0), "input.ratio": (3.0 / 4.0, 4.0 / 3.0)})
  spec.set("chosen: AdamW's default moments (the paper gives none)",
           {"optim.b1": 0.9, "optim.b2": 0.999, "optim.eps": 1e-8})
  spec.set("chosen: no warm-up of the embedding layer (the paper names none)",
           {"optim.freeze_trunk_epochs": 0.0, "optim.warmup_steps": 0})
  spec.set("the proxy losses compare L2-normalised proxies (section 3)",
           {"standard.normalize_proxies": True})
  spec.set(SEC42 + " (AdamW; lr 1e-4 for the backbone, 1e-2 for the proxies)",
           {"optim.name": "adamw", "optim.learning_rate": 1e-4,
            "optim.lr_multipliers.proxies": 100.0})
  spec.set(SEC42 + " (learning rates x 0.5 every 20 epochs)",
           {"optim.schedule": "step", "optim.decay_every_epochs": 20.0,
            "optim.decay_factor": 0.5})
  spec.set("chosen: weight decay 1e-4 (ProxyAnchor's code; the paper gives none), no clipping",
           {"optim.weight_decay": 1e-4, "optim.grad_clip_norm": 0.0})
  spec.set(SEC42 + " (batch 180 / 64 / 32 for CUB / Cars196 / SOP; random sampling as "
           "SoftTriple)", {"batch_size": BATCH[ds], "sampler.name": "random", "sampler.m": 1})
  steps = configs.epochs(ds, EPOCHS[ds], BATCH[ds])
  spec.set(SEC42 + f" ({EPOCHS[ds]} epochs): a fixed schedule, evaluated once at the end "
           "(conventional mode, test split)",
           {"total_steps": steps, "eval_every_steps": steps, "patience_evals": 2})
  spec.set(SEC42 + " and Tables 4-8 (R@k, nDCG@k, MAP@R)",
           {"recall_ks": RECALL[ds], "ndcg_ks": NDCG[ds]})
  return spec


def _proxy_loss(name: str, kwargs: dict, source: str, centres_source: str, centres=None,
                chosen: tuple = ()):
  """``chosen``: ``(source, keys)`` pairs for loss settings the paper does not give."""
  def build(spec: Spec) -> None:
    ds = spec.get("dataset.name")
    spec.set(source, {"framework": "standard", "loss.name": name, "loss.kwargs": kwargs})
    for why, keys in chosen:
      spec.cite(why, [f"loss.kwargs.{k}" for k in keys])
    spec.set(centres_source, {"standard.proxies_per_class":
                              CENTRES[ds] if centres is None else centres})
  return build


MPA_KW = {"alpha": 32.0, "margin": 0.1, "gamma": 0.1, "reg_weight": 0.2}
MPA_SRC = SEC42 + " (tau = 0.2, gamma = 0.1, delta = 0.1)"
MPA_CHOSEN = ((ALPHA, ("alpha",)),)
K_SRC = SEC42 + " (K = 10 on CUB / Cars196, 2 on SOP)"

METHODS = [
    ("soft_triple", "SoftTriple (our)", _proxy_loss(
        "soft_triple", {"la": 20.0, "gamma": 0.1, "reg_weight": 0.2, "margin": 0.01},
        SEC42 + " (SoftTriple rerun in the same set-up)",
        "chosen: the same centres per class as MPA (" + K_SRC + ")",
        chosen=(("chosen: SoftTriple's published defaults (lambda 20, gamma 0.1, tau 0.2, "
                 "delta 0.01); the paper gives none", ("la", "gamma", "reg_weight", "margin")),))),
    ("proxy_anchor", "ProxyAnchor (our)", _proxy_loss(
        "proxy_anchor", {"margin": 0.1, "alpha": 32.0},
        SEC42 + " (ProxyAnchor rerun in the same set-up)",
        "one proxy per class (ProxyAnchor's definition)", centres=1,
        chosen=(("chosen: ProxyAnchor's published defaults (delta 0.1, alpha 32); the paper "
                 "gives none", ("margin", "alpha")),))),
    ("mpa", "MPA", _proxy_loss("mpa", MPA_KW, MPA_SRC, K_SRC, chosen=MPA_CHOSEN)),
    ("mpa_dw", "MPA-DW", _proxy_loss("mpa_dw", MPA_KW, MPA_SRC, K_SRC, chosen=MPA_CHOSEN)),
    ("mpa_ap", "MPA-AP", _proxy_loss("mpa_ap", MPA_KW, MPA_SRC, K_SRC, chosen=MPA_CHOSEN)),
]

_C48 = ["R@1", "R@2", "R@4", "R@8", "nDCG@2", "nDCG@4", "nDCG@8", "MAP@R"]
_CS = ["R@1", "R@10", "R@100", "nDCG@10", "nDCG@100", "MAP@R"]
TABLE4 = tables.parse("""
Clustering [27]	48.2	61.4	71.8	81.9	-	-	-	-
ProxyNCA [12]	49.2	61.9	67.9	72.4	-	-	-	-
HDC [28]	53.6	65.7	77.0	85.6	-	-	-	-
Margin [29]	63.6	74.4	83.1	90.0	-	-	-	-
HTL [17]	57.1	68.8	78.7	86.5	-	-	-	-
MS [6]	65.7	77.0	86.3	91.2	-	-	-	-
SoftTriple [8]	65.4	76.4	84.5	90.4	-	-	-	-
ProxyAnchor [13]	68.4	79.2	86.8	91.6	-	-	-	-
SoftTriple (our)	67.6	78.0	85.8	91.1	65.4	62.9	59.4	25.5
ProxyAnchor (our)	68.6	78.7	86.1	91.7	66.7	64.1	60.9	26.7
MPA	69.2	79.4	86.6	91.6	67.3	64.7	61.3	26.6
MPA-DW	68.9	79.0	86.5	91.9	66.9	64.3	61.1	26.3
MPA-AP	69.1	79.1	86.3	91.7	67.1	64.6	61.3	26.6
""", _C48)
TABLE5 = tables.parse("""
Clustering [27]	58.1	70.6	80.3	87.8	-	-	-	-
ProxyNCA [12]	73.2	82.4	86.4	88.7	-	-	-	-
HDC [28]	73.7	83.2	89.5	93.8	-	-	-	-
Margin [29]	79.6	86.5	91.9	95.1	-	-	-	-
HTL [17]	81.4	88.0	92.7	95.7	-	-	-	-
MS [6]	84.1	90.4	94.0	96.5	-	-	-	-
SoftTriple [8]	84.5	90.7	94.5	96.9	-	-	-	-
ProxyAnchor [13]	86.1	91.7	95.0	97.3	-	-	-	-
SoftTriple (our)	86.0	91.8	95.2	97.2	84.1	81.3	77.1	27.5
ProxyAnchor (our)	86.1	91.6	95.0	97.2	84.3	81.6	77.6	28.8
MPA	86.8	92.0	95.1	97.2	84.9	82.1	78.0	28.4
MPA-DW	86.6	91.8	95.2	97.2	84.8	82.1	78.0	28.1
MPA-AP	87.1	92.4	95.5	97.5	85.3	82.7	78.8	28.6
""", _C48)
TABLE6 = tables.parse("""
HDC [28]	69.5	84.4	92.8	-	-	-
HTL [17]	74.8	88.3	94.8	-	-	-
MS [6]	78.2	90.5	96.0	-	-	-
SoftTriple [8]	78.3	90.3	95.9	-	-	-
ProxyAnchor [13]	79.1	90.8	96.2	-	-	-
SoftTriple (our)	79.0	90.7	96.0	64.4	70.7	51.7
ProxyAnchor (our)	77.6	90.2	95.9	62.7	69.2	49.7
MPA	77.5	90.0	95.8	62.5	69.0	49.6
MPA-DW	78.4	90.1	95.5	63.2	69.2	50.5
MPA-AP	78.1	90.1	95.6	62.9	69.1	50.2
""", _CS)
_C78 = ["R@1", "nDCG@2", "nDCG@4", "nDCG@8"]
TABLE7 = tables.parse("""
K = 1	68.4	66.7	64.0	60.9
K = 4	69.0	67.2	64.5	61.2
K = 8	69.1	67.4	64.7	61.4
K = 12	69.3	67.3	64.8	61.5
K = 16	67.6	66.1	63.5	60.2
""", _C78)
TABLE8 = tables.parse("""
K = 1	86.0	84.3	81.4	77.3
K = 4	86.1	84.5	81.7	77.6
K = 8	86.6	84.9	82.1	78.1
K = 12	86.5	84.8	82.1	78.0
K = 16	86.4	84.7	82.1	78.0
""", _C78)

TABLES = {
    "4": {"title": "MPA Table 4: CUB-200-2011", "datasets": ["cub"], "columns": _C48},
    "5": {"title": "MPA Table 5: Cars196", "datasets": ["cars"], "columns": _C48},
    "6": {"title": "MPA Table 6: SOP", "datasets": ["sop"], "columns": _CS},
    "7": {"title": "MPA Table 7: number of proxies K, CUB-200-2011", "datasets": ["cub"],
          "columns": _C78},
    "8": {"title": "MPA Table 8: number of proxies K, Cars196", "datasets": ["cars"],
          "columns": _C78},
}


def _rows():
  out = []
  for table, ds, pub in (("4", "cub", TABLE4), ("5", "cars", TABLE5), ("6", "sop", TABLE6)):
    for key, method, builder in METHODS:
      out.append(Row(PAPER, table, ds, key, method, "conventional", builder,
                     published=tables.pick(pub, method), published_ref=f"MPA Table {table}"))
  for table, ds, pub in (("7", "cub", TABLE7), ("8", "cars", TABLE8)):
    for k in (1, 4, 8, 12, 16):
      out.append(Row(PAPER, table, ds, f"mpa_k{k}", f"K = {k}", "conventional",
                     _proxy_loss("mpa", MPA_KW, MPA_SRC, SEC44 + f" (K = {k})", centres=k,
                                 chosen=MPA_CHOSEN),
                     published=tables.pick(pub, f"K = {k}"), published_ref=f"MPA Table {table}"))
  return out


ROWS = _rows()

QUOTED = [Quoted(PAPER, table, ds, method, tables.pick(pub, method), f"quoted in MPA Table {table}")
          for table, ds, pub in (("4", "cub", TABLE4), ("5", "cars", TABLE5), ("6", "sop", TABLE6))
          for method in pub if "[" in method]
