"""PROFS (Can, Gurbuz, Alatan, "Deep Metric Learning with Alternating Projections onto Feasible
Sets"): Table 1, 20 rows on each of SOP, Cars196 and CUB, 60 in all.

Every row is a conventional run (section 5.1: the first half of the classes trains, the second half
tests): GoogLeNet with ImageNet weights, a 512-D linear embedding at 10x the learning rate, batch
128, Adam (betas .9 / .99; lr 1e-4 on SOP, 1e-5 on CUB and Cars196), 100 epochs, the best epoch
reported (section 5.2). The paper retrained every baseline in this set-up (section 5.3), so all
20 rows are runs. NMI, F1 and R@1/10/100/1000 (SOP) or R@1/2/4/8 (Cars196, CUB).
"""
from __future__ import annotations

from dmljax import configs
from dmljax.paper import Row, Spec, tables

PAPER = "profs"
DATASETS = ("sop", "cars", "cub")

SEC51 = "PROFS section 5.1, Benchmark datasets and evaluation metrics"
SEC52 = "PROFS section 5.2, Training setup"
SEC53 = "PROFS section 5.3, Baseline methods and PROFS framework adaptation"
SEC54 = "PROFS section 5.4, Ablation study"
SEC4 = "PROFS section 4 / Algorithm 1"

LR = {"sop": 1e-4, "cars": 1e-5, "cub": 1e-5}
RECALL = {"sop": (1, 10, 100, 1000), "cars": (1, 2, 4, 8), "cub": (1, 2, 4, 8)}
BATCH = 128
EPOCHS = 100

#: The losses and their settings ("the default hyper-parameters used in the original works",
#: section 5.3): loss name, kwargs, the source of the kwargs.
LOSSES = {
    "contrastive": ("contrastive", {"pos_margin": 0.0, "neg_margin": 1.0},
                    "chosen: Hadsell et al.'s contrastive loss with margin 1 on L2-normalised "
                    "embeddings (the paper gives no margin)"),
    "triplet": ("triplet_margin", {"margin": 0.2},
                "chosen: FaceNet's margin 0.2 (the original work's default, section 5.3)"),
    "lifted": ("lifted_structure", {"neg_margin": 1.0},
               "chosen: Oh Song et al.'s margin 1 (the original work's default, section 5.3)"),
    "npair": ("npairs", {}, "N-pair loss (Sohn): no hyperparameters"),
    "angular": ("angular", {"alpha": 45.0},
                "chosen: alpha 45 degrees, within the range Wang et al. recommend (36-55)"),
    "margin": ("margin", {"margin": 0.2, "nu": 0.0, "beta": 1.2},
               "chosen: Wu et al.'s defaults (margin 0.2, beta_0 1.2, nu 0), section 5.3"),
}


def start(row: Row) -> Spec:
  ds = row.dataset
  c = configs.benchmark_config(ds, "googlenet", 512)
  spec = Spec(c)
  spec.cite(SEC52 + " (GoogLeNet / Inception v1, ImageNet weights, 512-D linear embedding)",
            ["model.name", "model.pretrained", "model.embedding_dim"])
  spec.set("chosen: L2-normalised embeddings, the losses' own setting (the paper does not say)",
           {"model.normalization": "l2"})
  spec.set("chosen: BatchNorm trains as usual (the paper says nothing about freezing it)",
           {"model.freeze_bn": "none"})
  spec.set(SEC52 + " (256 x 256, random 224 x 224 crop, horizontal mirroring). Chosen: the "
           "shorter side goes to 256 (aspect kept) and the crop is a fixed-size 224 crop: area "
           "(224/256)^2, aspect 1",
           {"input.resize": 256, "input.size": 224, "input.scale": (0.765625, 0.765625),
            "input.ratio": (1.0, 1.0), "input.flip": True})
  spec.set(SEC52 + " (Adam, betas .9 / .99; lr 1e-4 on SOP, 1e-5 on CUB and Cars196; the "
           "embedding layer at 10x)",
           {"optim.name": "adam", "optim.learning_rate": LR[ds], "optim.b1": 0.9,
            "optim.b2": 0.99, "optim.lr_multipliers.head": 10.0})
  spec.set("chosen: no weight decay and no clipping (the paper names neither; the proximal "
           "term is its regulariser)", {"optim.weight_decay": 0.0, "optim.grad_clip_norm": 0.0})
  spec.set(SEC52 + " (mini-batch 128)", {"batch_size": BATCH})
  spec.set("chosen: 2 images per class, I = 2 as in the ablation (" + SEC54 + "); Table 1 does "
           "not restate I", {"sampler.m": 2})
  steps_per_epoch = configs.epochs(ds, 1, BATCH)
  spec.set(SEC52 + " (100 epochs, the best epoch reported): evaluated once per epoch on the test "
           "split (conventional mode); no early stop",
           {"total_steps": configs.epochs(ds, EPOCHS, BATCH),
            "eval_every_steps": steps_per_epoch, "patience_evals": EPOCHS + 1})
  spec.cite("chosen: the best epoch is the trainer's, by test MAP@R (the paper does not say by "
            "which metric)", ["checkpoint.save_best"])
  spec.set(SEC51 + " (NMI and F1 of k-means; Recall@K)",
           {"clustering": True, "recall_ks": RECALL[ds]})
  spec.set(SEC52 + " (lambda = 1e-3) and " + SEC54 + " (M = ceil(rho / p(y)), rho = 6)",
           {"profs.lam": 1e-3, "profs.rho": 6.0})
  return spec


def _loss(spec, family):
  name, kwargs, source = LOSSES[family]
  spec.set(SEC53 + " (the row's loss)", {"loss.name": name})
  spec.set(source, {"loss.kwargs": kwargs})


def _baseline(family, miner=None, miner_source="", miner_kwargs=None):
  def build(spec: Spec) -> None:
    _loss(spec, family)
    spec.set(SEC53 + ": the baseline retrained in the same set-up", {"framework": "standard"})
    if miner:
      spec.set(miner_source, {"standard.miner": miner,
                              "standard.miner_kwargs": dict(miner_kwargs or {})})
    if family == "margin":
      spec.set("chosen: the baseline's beta stays at beta_0 (the standard framework learns no "
               "beta; PROFS rows learn one per class)", {"loss.kwargs.beta": 1.2})
  return build


def _profs(family, hncm: bool):
  def build(spec: Spec) -> None:
    _loss(spec, family)
    spec.set(SEC4 + " (PROFS batches of class representatives, proximal term)",
             {"framework": "profs"})
    spec.set(SEC53 + ": the loss's adaptation (representative pairs for lifted; one hard "
             "negative per positive for contrastive, triplet and margin; none for N-pair and "
             "angular)", {"profs.adaptation": "auto"})
    spec.set(SEC4 + (" with hard negative class mining" if hncm else ", no HNCM"),
             {"profs.hncm": hncm})
    if hncm:
      spec.set("chosen: the paper gives no HNCM rule; each hold's batches are groups of a seed "
               "class and its 3 nearest classes by stored representative embedding (dmljax's "
               "rule, docs of dmljax.frameworks.profs)", {"profs.hncm_neighbors": 3})
    if family == "margin":
      spec.set("Wu et al.'s margin loss learns beta per class (the original work's setting)",
               {"profs.beta_per_class": True, "optim.lr_multipliers.beta": 1.0})
  return build


HARD = "one hard negative per positive pair (" + SEC53 + ", after [11])"
METHODS = [
    ("proxy_nca", "Proxy-NCA", None),
    ("contrastive_hard", "Contrastive-Hard", _baseline("contrastive", "hard_negative", HARD)),
    ("c_profs", "C-PROFS", _profs("contrastive", False)),
    ("c_profs_hncm", "C-PROFS-HNCM", _profs("contrastive", True)),
    ("triplet_semi", "Triplet-Semi", _baseline(
        "triplet", "semi_hard", "semi-hard triplets (FaceNet), the margin of the loss",
        {"margin": 0.2})),
    ("triplet_hard", "Triplet-Hard", _baseline("triplet", "hard_negative", HARD)),
    ("t_profs", "T-PROFS", _profs("triplet", False)),
    ("t_profs_hncm", "T-PROFS-HNCM", _profs("triplet", True)),
    ("lifted", "Lifted", _baseline("lifted")),
    ("l_profs", "L-PROFS", _profs("lifted", False)),
    ("l_profs_hncm", "L-PROFS-HNCM", _profs("lifted", True)),
    ("npair", "N-pair", _baseline("npair")),
    ("n_profs", "N-PROFS", _profs("npair", False)),
    ("n_profs_hncm", "N-PROFS-HNCM", _profs("npair", True)),
    ("angular", "Angular", _baseline("angular")),
    ("a_profs", "A-PROFS", _profs("angular", False)),
    ("a_profs_hncm", "A-PROFS-HNCM", _profs("angular", True)),
    ("margin_hard", "Margin-Hard", _baseline("margin", "hard_negative", HARD)),
    ("m_profs", "M-PROFS", _profs("margin", False)),
    ("m_profs_hncm", "M-PROFS-HNCM", _profs("margin", True)),
]


def _proxy_nca(spec: Spec) -> None:
  spec.set(SEC53 + " (Proxy-NCA retrained in the same set-up)",
           {"framework": "standard", "loss.name": "proxy_nca"})
  spec.set("chosen: Proxy-NCA's softmax scale 1 on L2-normalised embeddings and proxies (PML's "
           "default)", {"loss.kwargs": {"softmax_scale": 1.0}})
  spec.set("chosen: one proxy per class, proxies at the network's learning rate (the paper "
           "gives no proxy settings)",
           {"standard.proxies_per_class": 1, "optim.lr_multipliers.proxies": 1.0})


_COLS = ([f"sop/{m}" for m in ("NMI", "F1", "R@1", "R@10", "R@100", "R@1000")]
         + [f"{ds}/{m}" for ds in ("cars", "cub")
            for m in ("NMI", "F1", "R@1", "R@2", "R@4", "R@8")])
TABLE1 = tables.parse("""
Proxy-NCA	87.6	24.8	61.2	77.4	88.8	96.0	66.3	35.4	76.4	85.1	91.1	95.1	64.2	33.4	54.9	66.9	77.2	86.0
Contrastive-Hard	89.7	34.5	67.9	83.8	93.2	97.9	66.0	36.6	75.8	84.5	90.1	94.1	63.4	31.8	56.7	68.4	78.8	86.3
C-PROFS	90.3	36.4	70.1	85.4	94.1	98.2	67.8	39.0	76.0	84.8	90.1	94.6	64.1	32.0	57.7	69.0	78.9	86.9
C-PROFS-HNCM	91.0	41.2	74.5	87.9	94.9	98.3	66.9	38.1	77.0	85.3	90.9	94.4	64.6	33.1	57.9	69.0	79.4	87.0
Triplet-Semi	87.1	23.4	57.0	75.0	88.2	96.4	62.4	30.0	71.2	80.7	87.6	92.5	60.9	27.8	55.5	67.8	78.2	86.5
Triplet-Hard	88.1	30.6	65.4	81.4	91.7	97.4	62.5	30.6	71.4	81.1	87.5	92.7	63.1	30.7	56.8	68.7	78.6	86.5
T-PROFS	90.7	37.7	72.4	86.3	94.1	98.1	64.7	33.4	74.5	82.8	89.1	93.5	63.5	31.3	57.9	68.9	78.7	86.7
T-PROFS-HNCM	91.3	42.3	74.9	87.5	94.4	98.1	64.9	33.7	74.5	83.5	89.4	93.7	64.5	32.3	58.1	69.0	78.9	86.8
Lifted	88.9	31.4	66.7	83.2	91.7	97.4	60.1	27.7	67.5	77.3	84.9	90.7	60.6	26.9	53.5	65.3	75.4	84.8
L-PROFS	89.5	33.8	68.1	84.0	92.2	97.6	61.2	27.9	68.4	78.1	85.6	91.1	61.4	28.1	54.5	66.1	76.2	85.1
L-PROFS-HNCM	89.9	35.1	69.3	85.1	93.6	98.1	61.5	30.0	70.7	79.6	86.2	91.5	62.0	29.5	54.6	66.1	76.7	85.5
N-pair	89.9	35.7	70.8	86.0	94.0	98.1	67.4	38.2	76.7	84.8	91.0	95.0	64.6	33.0	56.0	68.9	79.3	87.4
N-PROFS	90.3	37.3	71.7	86.6	94.0	98.2	68.1	38.3	77.8	85.9	91.6	95.2	64.9	33.6	56.5	69.0	79.3	87.7
N-PROFS-HNCM	90.5	37.5	71.9	86.6	94.1	98.2	68.6	39.9	77.6	86.2	91.7	95.2	65.2	33.7	56.7	68.8	79.7	87.5
Angular	90.0	36.1	72.5	86.6	93.6	97.6	66.0	35.9	77.4	85.3	91.0	94.7	61.9	29.4	54.5	66.4	76.8	84.9
A-PROFS	90.1	37.2	73.0	86.8	93.7	97.7	66.3	36.8	77.5	85.6	91.2	94.7	63.0	31.7	54.6	66.7	76.9	85.8
A-PROFS-HNCM	90.4	38.4	73.7	86.9	93.8	97.7	66.3	37.9	77.9	85.6	91.4	94.8	64.6	33.4	55.8	68.1	78.8	87.3
Margin-Hard	90.6	38.1	73.9	87.7	94.8	98.2	64.2	34.6	75.1	83.7	89.5	93.8	64.0	30.9	55.3	67.2	77.9	87.5
M-PROFS	91.3	42.7	74.5	88.0	95.0	98.2	64.6	35.1	76.0	84.3	89.5	93.8	64.3	32.7	57.7	69.5	79.5	87.5
M-PROFS-HNCM	91.4	43.2	76.3	88.8	95.0	98.3	66.8	37.3	77.0	85.1	90.8	94.6	64.8	32.4	58.5	69.6	79.7	87.6
""", _COLS)

TABLES = {"1": {"title": "PROFS Table 1: conventional split, GoogLeNet 512-D, batch 128",
                "datasets": list(DATASETS),
                "columns": {"sop": ["NMI", "F1", "R@1", "R@10", "R@100", "R@1000"],
                            "cars": ["NMI", "F1", "R@1", "R@2", "R@4", "R@8"],
                            "cub": ["NMI", "F1", "R@1", "R@2", "R@4", "R@8"]}}}

ROWS = [Row(PAPER, "1", ds, key, method, "conventional",
            builder if builder is not None else _proxy_nca,
            published=tables.pick(TABLE1, method, f"{ds}/"), published_ref="PROFS Table 1")
        for ds in DATASETS for key, method, builder in METHODS]

QUOTED: list = []  # the paper retrained every row of Table 1
