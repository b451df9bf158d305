"""Shared defaults of every dmljax config, shipped with the package.

Not a runnable config by itself: ``get_config`` of the files in ``configs/`` (or of a copy of one
anywhere on disk) call :func:`base_config` and change what differs, so a config file only needs
``dmljax`` to be installed, not the repository. :func:`shrink` makes the ``small`` variant
(``--config=configs/NAME.py:small``) for tests and smoke runs (tiny model, few steps).
:func:`glyphs_base` is the model, data and schedule of the glyphs configs trained from scratch,
:func:`glyphs_regime` puts them in the papers' regime (a pretrained trunk, fine-tuned).
"""
import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Defaults: CCP with the contrastive loss (Euclidean, margins 0 / 1) on digits, paper hyperparameters where they apply."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "digits"
  c.dataset.seed = 0                # fixed across training seeds: same split for every run
  c.dataset.cache_dir = ""          # "" = the data module's default cache
  c.dataset.options = ml_collections.ConfigDict()  # extra keyword arguments of load_dataset
  c.dataset.train_split = "train"
  c.dataset.val_split = "val"
  c.dataset.test_split = "test"
  # Prepared benchmark data sets (cub, cars, sop, inshop): the TFDS folder they were prepared
  # into ("" = $TFDS_DATA_DIR, else ~/tensorflow_datasets); a gs:// path works too.
  c.dataset.data_dir = ""
  # Which copy of the images the run reads: "auto" = whatever dataset.data_dir holds, recorded
  # resolved in config.json and the checkpoints ("full" or "short_side_256", prepared with
  # `prepare --short_side=256`); "full" / "short_side_N" refuse the other copy. A run never
  # resumes on another copy than it trained on.
  c.dataset.image_copy = "auto"

  # The host input pipeline (dmljax.data.pipeline). Images are uint8 on the host; the backbone
  # normalises them on device. Records (the benchmark data sets) are decoded and augmented as in
  # the protocol: train = random resized crop to `size` (area `scale`, aspect `ratio`) + flip,
  # eval = shorter side to `resize`, centre crop `size`. The embedded arrays (digits, glyphs) go
  # through the same pipeline unchanged (no augmentation).
  c.input = ml_collections.ConfigDict()
  c.input.size = 227                 # 224 for the ResNet tables
  c.input.resize = 256
  c.input.scale = (0.16, 1.0)
  c.input.ratio = (3.0 / 4.0, 4.0 / 3.0)
  c.input.flip = True
  c.input.crop_to_bbox = False       # CUB / Cars: crop to the bounding box first
  c.input.augment = True             # records only: False trains on the eval transform
  c.input.num_workers = -1           # decode processes; -1 = one per available core for records
  c.input.prefetch = 4               # batches decoded ahead of the step

  c.model = ml_collections.ConfigDict()
  c.model.name = "small_cnn"
  c.model.widths = (32, 64, 64)
  c.model.convs_per_block = 1
  c.model.embedding_dim = 64
  c.model.normalization = "bounded"  # CCP's x / max(1, ||x||)
  # small_cnn | resnet_v2_20 (from scratch) | bn_inception | googlenet | resnet50 (ImageNet
  # weights imported from the PyTorch file in `pretrained`; see docs/backbones.md).
  c.model.pretrained = ""            # path of the .pth file ("" = random initialisation)
  c.model.pooling = "avg"            # avg | max | avg+max | gem (MPA: gem, p = 3)
  c.model.gem_p = 3.0
  c.model.freeze_bn = "none"         # none | stats (running statistics fixed) | stats_and_affine
  c.model.embedding_bn = False       # BatchNorm on the embedding layer's output
  c.model.head_bias = True           # the embedding layer's bias (the CCP authors' has none)
  c.model.dtype = "float32"          # float32 | bfloat16 | auto (bf16 on GPU/TPU, f32 on CPU);
                                     # compute only: params, BN stats, losses, metrics f32
  c.model.remat = False              # rematerialise the trunk per block (large batches)

  c.framework = "ccp"
  c.loss = ml_collections.ConfigDict()
  c.loss.name = "contrastive"
  # Contrastive loss on Euclidean distance, margins (0, 1), on bounded embeddings: the form of
  # CCP's C2 (its supplement tunes the margins per data set, e.g. (0, 0.3841) on CUB; C1 is XBM's
  # cosine version, see the docstring of dmljax.losses.contrastive). (0, 1) is what worked for the
  # tiny from-scratch models here.
  c.loss.kwargs = ml_collections.ConfigDict({"pos_margin": 0.0, "neg_margin": 1.0})

  c.sampler = ml_collections.ConfigDict()
  c.sampler.name = "m_per_class"
  c.sampler.m = 4                    # samples per class in a batch (CCP: 8 classes x 4)
  # Classes with fewer than m images (SOP: 2-12, In-shop: 1-2 per class): "error" refuses them,
  # "repeat" fills their m rows by cycling through their images (as PML's sampler does).
  c.sampler.small_classes = "error"
  # True: a training split with fewer than batch_size // m classes gets batches of all its classes
  # (x m, a multiple of the device count) instead of an error; the run says what it chose and
  # config.json records the batch size used (configs/own_data.py).
  c.sampler.fit_batch = False
  c.batch_size = 32

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adam"
  c.optim.learning_rate = 1e-3
  c.optim.weight_decay = 1e-4
  c.optim.weight_decay_scope = "kernels"  # kernels | all_but_batchnorm (the CCP authors')
  c.optim.grad_clip_norm = 10.0
  c.optim.clip_value = 0.0           # per-value gradient clip (0 = off; the CCP authors: 10)
  c.optim.decay_before_clip = False  # True: L2 added before the clipping (the CCP authors' order)
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.momentum = 0.9             # sgd only
  c.optim.schedule = "constant"     # constant | cosine | step
  c.optim.decay_every_epochs = 0.0   # step schedule: x decay_factor every this many epochs
  c.optim.decay_factor = 0.5
  c.optim.warmup_steps = 0
  c.optim.freeze_trunk_epochs = 0.0  # proxy baselines: epochs training only the embedding layer
  c.optim.lr_multipliers = ml_collections.ConfigDict({"proxies": 1.0})

  # One block per framework (config.ccp, config.standard, ...), defined beside its code.
  from dmljax.frameworks import FRAMEWORKS  # pylint: disable=g-import-not-at-top
  for cls in FRAMEWORKS.values():
    if cls.config_key:
      c[cls.config_key] = cls.default_config()

  c.total_steps = 2000
  c.eval_every_steps = 50
  c.patience_evals = 12             # overall early stopping (paper: 60 evaluations)
  c.log_every_steps = 25
  c.eval_batch_size = 256           # must be divisible by the device count
  # Train steps run per dispatch (a scan over that many prefetched batches; results equal those
  # of single steps). 0 = auto: 8 on GPU/TPU, 1 on CPU (where a step takes seconds) and for
  # frameworks that choose a batch from the train state (PROFS with HNCM).
  c.steps_per_dispatch = 0
  # Evaluation metrics (validation during training and the final table): MAP@R, R-precision and
  # P@1 always, plus these cut-offs; clustering adds k-means NMI and pairwise F1.
  c.recall_ks = (1,)
  c.precision_ks = ()
  c.map_ks = ()
  c.ndcg_ks = ()
  c.clustering = False
  # Evaluation images are decoded once per run and kept (dmljax.evaluation.ImageCache): on the
  # devices within device_mb (-1: a quarter of the accelerator's memory; none on CPU), else in host
  # memory within host_mb, else streamed at every evaluation. train: also keep the training split
  # under the eval transform (CCP's k-center pools) when it fits what the splits left of host_mb.
  # JAX's persistent compilation cache: "auto" = ~/.cache/dmljax/jax (per user; $DMLJAX_CACHE_DIR
  # or $XDG_CACHE_HOME move it), a folder, or "" for none. A cache set by the user wins.
  c.compilation_cache = "auto"
  c.eval_cache = ml_collections.ConfigDict()
  c.eval_cache.device_mb = -1.0
  c.eval_cache.host_mb = 4096.0
  c.eval_cache.train = True
  # The evaluation's kNN (dmljax.kernels.knn): how it cuts its work (auto = the CPU's blocks on
  # CPU, a single pass or blocks sized from device memory on GPU/TPU; the metrics do not change),
  # the accelerator sizing's memory per device (-1: a quarter of the device memory), where it
  # runs (auto: from the device arrays on GPU/TPU, via the host on CPU) and, TPU only, an
  # approximate group filter (lax.approx_max_k's recall target; 0 = exact, the default).
  c.eval_knn = ml_collections.ConfigDict()
  c.eval_knn.sizing = "auto"         # auto | cpu | accelerator
  c.eval_knn.memory_mb = -1.0
  c.eval_knn.placement = "auto"      # auto | device | host
  c.eval_knn.approx_recall = 0.0

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.enabled = True
  c.checkpoint.async_save = True    # written by a background thread; False: the loop waits
  c.checkpoint.every_steps = 500
  c.checkpoint.max_to_keep = 2
  c.checkpoint.save_best = False

  # Non-finite loss or gradient: the update is skipped (and counted); after this many consecutive
  # skipped steps the run stops with an error naming the last good checkpoint.
  c.max_consecutive_nonfinite = 20
  # Rows printed beside the trained model in the final table, measured in the same run:
  # "untrained" (the initial network, evaluated before step 1; with model.pretrained that is the
  # pretrained trunk without fine-tuning, and the randomly initialised network is measured too,
  # keys random_init/...) and "pixels" (raw pixels, flattened and L2-normalised; only sensible
  # for small images).
  c.baselines = ("untrained", "pixels")

  c.num_devices = 0                  # devices of the data mesh; 0 = all (of all processes)
  c.plot_projections = False         # PNG per projection (2-D embeddings only)
  c.progress = True
  return c


def set_keys(c: ml_collections.ConfigDict, values: dict) -> ml_collections.ConfigDict:
  """Sets dotted keys (``{"checkpoint.every_steps": 10, ...}``) on ``c``, as ``--config.KEY=V``
  would; returns ``c``."""
  for key, value in values.items():
    *path, leaf = key.split(".")
    node = c
    for part in path:
      node = node[part]
    node[leaf] = value
  return c


def shrink(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The ``small`` variant: a tiny, fast configuration for tests and smoke runs."""
  c.model.widths = (8, 16)
  c.model.embedding_dim = 16
  c.total_steps = 40
  c.eval_every_steps = 10
  c.log_every_steps = 10
  c.patience_evals = 100
  c.ccp.pool_size = 4
  c.ccp.proxies_per_class = 2
  c.checkpoint.every_steps = 20
  c.eval_batch_size = 128
  c.model.pretrained = ""  # the tiny model has no pretrained weights
  return c


def glyphs_base() -> ml_collections.ConfigDict:
  """Model, data and schedule shared by the glyphs configs (class-disjoint 80 / 26 / 26)."""
  c = base_config()
  c.dataset.name = "glyphs"
  c.model.widths = (32, 64, 128)
  c.model.embedding_dim = 64
  c.batch_size = 32
  c.sampler.m = 4
  c.total_steps = 1500
  c.eval_every_steps = 50
  c.patience_evals = 8
  c.ccp.proxies_per_class = 4
  c.ccp.pool_size = 8
  c.checkpoint.every_steps = 250
  return c


#: XBM's warm-up as a fraction of a run: the CCP paper trains 1,000 steps with the plain loss
#: before the memory joins (supplement, "XBM"), of the 81K (SOP) and 93K (In-shop) steps its C2-XBM
#: runs take (paper, Table I): 1,000 / 87,000 ~ 1.15 %.
XBM_WARMUP_FRACTION = 1000 / 87_000

#: The glyphs runs in the papers' regime: steps and evaluation interval (a fine-tuned pretrained
#: trunk gets most of its gain early; one glyphs epoch is 6,400 images / 32 = 200 steps).
GLYPHS_PAPERS_STEPS = 200
GLYPHS_PAPERS_EVAL_EVERY = 40
GLYPHS_STEPS_PER_EPOCH = 200
#: Adam's learning rate in the papers' regime: the papers fine-tune at 1e-5 (CCP, DRO) to 1e-4
#: (ProxyAnchor, MPA, XBM), 10-100x below the 1e-3 of training from scratch; the tiny glyphs trunk
#: is fine-tuned at the top of that range, 10x below its from-scratch rate.
GLYPHS_PAPERS_LR = 1e-4
#: When CCP's projections end in the papers' regime on glyphs (the CCP framework's configs:
#: glyphs_ccp.py, glyphs_proxy.py, glyphs_ccp_c1.py). Fine-tuned at 1e-4 for 200 steps, validation
#: MAP@R rises at every evaluation (seed 0 of glyphs_ccp.py evaluated every 10 steps: 20 rises of
#: 20), so the authors' rule -- 3 evaluations without beating the projection's best by 1e-5 -- never
#: ends a projection and CCP is its single-proxy ablation. Patience on validation MAP@R still
#: decides, at a scale this run reaches: evaluations every 20 steps (1/10 epoch; the paper's CUB
#: runs evaluate every 25 steps, about 1/6 epoch), a projection ends after 2 evaluations (40 steps)
#: without beating its best by more than 0.015 MAP@R. The margin is this project's choice (the
#: authors' is 1e-5), read off that seed-0 curve (the rule would end its projections at steps 100,
#: 140 and 180), never from test figures.
GLYPHS_CCP_EVAL_EVERY = 20
GLYPHS_CCP_PATIENCE = 2
GLYPHS_CCP_MIN_IMPROVEMENT = 0.015


def variant_parts(arg: str, valid, name: str) -> set:
  """``"a:b"`` -> ``{"a", "b"}``; ValueError naming the valid variants of config ``name``."""
  parts = {p for p in (arg or "").split(":") if p}
  unknown = sorted(parts - set(valid))
  if unknown:
    raise ValueError(f"Unknown variant {arg!r} of {name}; valid: {sorted(valid)} (combine with "
                     "':', e.g. 'scratch:small').")
  return parts


def glyphs_regime(c: ml_collections.ConfigDict, parts=()) -> ml_collections.ConfigDict:
  """Finishes a glyphs config in the papers' regime, or as before with the ``scratch`` variant.

  The papers' regime (default): the trunk pretrained on glyph classes disjoint from every glyphs
  class (``dmljax/weights/small_cnn_glyphs.pth``, made by ``python -m dmljax.pretrain``) loaded
  through ``model.pretrained``, BatchNorm frozen entirely (statistics and affine: the CCP
  authors' code; the ProxyAnchor / MPA code does the same; the XBM, DRO and PROFS papers do not
  say, and the trunk is treated alike for every method), Adam at :data:`GLYPHS_PAPERS_LR`,
  :data:`GLYPHS_PAPERS_STEPS` steps evaluated every :data:`GLYPHS_PAPERS_EVAL_EVERY`, XBM's warm-up
  :data:`XBM_WARMUP_FRACTION` of the run (2 steps), the proxy baselines' head-only warm-up 5 % of
  the run (10 steps; the papers' one epoch is 2-3 % of theirs), MPA's step decay every third of
  the run. CCP's first pool is embedded by the initial network,
  i.e. the pretrained trunk. The CCP framework's configs evaluate every
  :data:`GLYPHS_CCP_EVAL_EVERY` steps and end a projection after :data:`GLYPHS_CCP_PATIENCE`
  evaluations without beating its best by :data:`GLYPHS_CCP_MIN_IMPROVEMENT` (the authors: 3
  evaluations, 1e-5, which no projection reaches in 200 steps here).

  ``scratch``: the from-scratch settings the glyphs configs had before (random initialisation,
  BatchNorm training, Adam 1e-3, 1,500 steps every 50, XBM warm-up 250 steps). ``small``: the
  tiny test model of :func:`shrink` (no pretrained weights).
  """
  parts = set(parts)
  if "scratch" not in parts:
    from dmljax import pretrain  # pylint: disable=g-import-not-at-top
    c.model.pretrained = pretrain.shipped_weights()
    c.model.freeze_bn = "stats_and_affine"
    c.optim.learning_rate = GLYPHS_PAPERS_LR
    c.total_steps = GLYPHS_PAPERS_STEPS
    c.eval_every_steps = GLYPHS_PAPERS_EVAL_EVERY
    c.patience_evals = 8
    c.checkpoint.every_steps = 100
    if c.framework == "xbm":
      c.xbm.warmup_steps = max(1, round(c.total_steps * XBM_WARMUP_FRACTION))
    if c.framework == "ccp":  # projections that end within the run (see GLYPHS_CCP_PATIENCE)
      c.eval_every_steps = GLYPHS_CCP_EVAL_EVERY
      c.ccp.patience = GLYPHS_CCP_PATIENCE
      c.ccp.min_improvement = GLYPHS_CCP_MIN_IMPROVEMENT
    if c.optim.freeze_trunk_epochs:
      # The proxy baselines' one epoch of head-only warm-up is 2-3 % of their SOP runs (one SOP
      # epoch ~ 1,400 steps of 48K-88K, CCP's Table I); one glyphs epoch would be the whole run.
      c.optim.freeze_trunk_epochs = 0.05 * c.total_steps / GLYPHS_STEPS_PER_EPOCH
    if c.optim.schedule == "step":
      # MPA halves the rate every third of its run (every 20 of 60 epochs).
      c.optim.decay_every_epochs = c.total_steps / 3 / GLYPHS_STEPS_PER_EPOCH
  if "small" in parts:
    shrink(c)
    if c.framework == "xbm":
      c.xbm.memory_batches, c.xbm.warmup_steps = 3, 10
  return c


#: Per data set settings of the CCP paper (supplement, "Hyperparameters" and "CCP"): C2 margins
#: (m+, m-), proxies per class, k-center pool size, evaluation interval (steps).
CCP_PAPER = {
    "cub": dict(margins=(0.0, 0.3841), proxies=8, pool=12, eval_every=25),
    "cars": dict(margins=(0.2652, 0.5409), proxies=8, pool=12, eval_every=25),
    "sop": dict(margins=(0.2858, 0.5130), proxies=4, pool=7, eval_every=250),
    "inshop": dict(margins=(0.2858, 0.5130), proxies=4, pool=7, eval_every=250),
}

#: The weight file of the ImageNet BN-Inception port the papers fine-tune (pretrainedmodels).
BN_INCEPTION_WEIGHTS = "bn_inception-52deb4733.pth"


def ccp_authors_optim(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Sets the CCP authors' optimiser on ``c.optim`` (returns ``c``).

  The update as their code builds it: the proximal term (part of dmljax's CCP loss) -> coupled L2
  1e-4 on every trainable variable but BatchNorm's (biases and proxies included) -> clip to
  global norm 10 -> clip each value to +-10 -> Adam lr 1e-5. Adam's betas: (0.9, 0.99) as the
  paper gives them (the code's Keras Adam runs beta2 = 0.999); epsilon 1e-7 as the code's Keras
  Adam (the paper is silent). Keras adds epsilon to sqrt(v) before the bias correction, optax
  after it: the same update up to epsilon's scale early in training (1e-7 either way).
  """
  c.optim.name = "adam"
  c.optim.learning_rate = 1e-5
  c.optim.b1, c.optim.b2 = 0.9, 0.99   # the paper (the code: 0.999)
  c.optim.eps = 1e-7                   # the code (Keras's Adam; the paper is silent)
  c.optim.weight_decay = 1e-4
  c.optim.weight_decay_scope = "all_but_batchnorm"
  c.optim.decay_before_clip = True
  c.optim.grad_clip_norm = 10.0
  c.optim.clip_value = 10.0
  c.optim.schedule = "constant"
  return c


#: Variants of :func:`ccp_paper_config`.
CCP_PAPER_VARIANTS = ("small", "ablation")


def ccp_paper_config(name: str, variant: str = "") -> ml_collections.ConfigDict:
  """C2-CCP on a benchmark data set, as the CCP paper and its authors' code run it
  (``configs/{name}_ccp.py``).

  BN-Inception (ImageNet weights from ``$DMLJAX_WEIGHTS/bn_inception-52deb4733.pth``) with
  BatchNorm frozen entirely (statistics and affine), an embedding layer of 128 without bias, the
  bounded normalisation; the optimiser of :func:`ccp_authors_optim` (Adam lr 1e-5, betas (0.9,
  0.99) from the paper, epsilon 1e-7 from the code; proximal -> L2 1e-4 on all but BatchNorm ->
  clip global norm 10 -> clip values 10); batch 32 = 8 classes x 4; CCP as authored (the
  framework's defaults: the model continues at a projection end, the in-batch term is C2 itself,
  proxies normalised as the embeddings, the pool from raw embeddings), lambda 2e-4, projections
  ending after 3 evaluations without improvement, the run after 60; protocol transforms at
  227 x 227.

  Validation classes: a single run validates on 1/4 of the training classes, the protocol's fold
  0 (train on the first 3/4 of the training classes sorted by id, validate on the last quarter:
  the quarter the authors' first model holds out, cut as their code cuts:
  ``dataset.options.fold_cuts = "authors"``, see :func:`dmljax.data.splits.protocol_folds`);
  ``python -m dmljax.protocol`` runs all four folds with the same config.

  Variants: ``"ablation"``: validation on 1/3 of the training classes (the paper's single-model
  ablations train on 2/3), fold 0 of a 3-fold cut; ``"small"``: the same pipeline and framework
  on a tiny from-scratch backbone, two classes x 2 per batch, 32 x 32 crops, a few steps (tests,
  on tiny prepared data).
  """
  import os  # pylint: disable=g-import-not-at-top
  if variant and variant not in CCP_PAPER_VARIANTS:
    raise ValueError(f"Unknown variant {variant!r} of {name}_ccp.py; valid: "
                     f"{', '.join(repr(v) for v in CCP_PAPER_VARIANTS)}.")
  p = CCP_PAPER[name]
  c = base_config()
  c.dataset.name = name
  # Validation = fold 0 of the protocol's class folds (4 folds: 1/4; the ablation: 3 folds, 1/3).
  c.dataset.options.protocol_fold = 0
  c.dataset.options.num_folds = 3 if variant == "ablation" else 4
  # Cut as the authors' code cuts (floor(j n / K)): fold 0 = the block their first model holds
  # out, also where K does not divide n (Cars 98, SOP 11,318, In-shop 3,997 training classes).
  c.dataset.options.fold_cuts = "authors"
  c.model.name = "bn_inception"
  c.model.pretrained = os.path.join(os.environ.get("DMLJAX_WEIGHTS", "weights"),
                                    BN_INCEPTION_WEIGHTS)
  c.model.freeze_bn = "stats_and_affine"
  c.model.head_bias = False
  c.model.embedding_dim = 128
  c.model.normalization = "bounded"
  c.framework = "ccp"
  c.loss.name = "contrastive"
  c.loss.kwargs = ml_collections.ConfigDict({"pos_margin": p["margins"][0],
                                             "neg_margin": p["margins"][1]})
  c.ccp.proxies_per_class = p["proxies"]
  c.ccp.pool_size = p["pool"]
  c.ccp.lam = 2e-4
  c.ccp.patience = 3
  ccp_authors_optim(c)
  c.batch_size = 32
  c.sampler.m = 4
  # SOP classes hold 2-12 images, In-shop items 1-2 (train): their 4 rows repeat images.
  c.sampler.small_classes = "repeat" if name in ("sop", "inshop") else "error"
  c.eval_every_steps = p["eval_every"]
  c.patience_evals = 60
  c.total_steps = 200_000              # an upper bound: the run ends by patience
  c.log_every_steps = 25
  c.checkpoint.every_steps = 1000
  c.checkpoint.save_best = True
  c.eval_batch_size = 128
  c.baselines = ("untrained",)         # raw pixels are not a baseline for 227 x 227 photos
  c.input.size, c.input.resize = 227, 256
  if variant == "small":
    c.model.name = "small_cnn"
    c.model.pretrained = ""
    c.model.widths = (4, 8)
    c.model.embedding_dim = 8
    c.input.size, c.input.resize = 32, 36
    c.input.num_workers = 0
    c.batch_size, c.sampler.m = 4, 2
    c.sampler.small_classes = "repeat"
    c.ccp.proxies_per_class, c.ccp.pool_size = 2, 2
    c.total_steps, c.eval_every_steps, c.log_every_steps = 4, 2, 2
    c.checkpoint.every_steps = 2
    c.eval_batch_size = 16
  return c


# ================================================================ the papers' rows (dmljax.paper)

#: The ImageNet weight files of the backbones the papers fine-tune (docs/backbones.md), looked up
#: in ``$DMLJAX_WEIGHTS`` (default ``./weights``).
BACKBONE_WEIGHTS = {"bn_inception": BN_INCEPTION_WEIGHTS, "googlenet": "googlenet-1378be20.pth",
                    "resnet50": "resnet50-0676ba61.pth"}

#: Training images of each benchmark's whole train split (epochs -> steps in the conventional
#: tables): CUB 1-100, Cars 1-98, SOP's Ebay_train, In-shop's train items.
TRAIN_IMAGES = {"cub": 5864, "cars": 8054, "sop": 59551, "inshop": 25882}


def set_backbone(c: ml_collections.ConfigDict, name: str, embedding_dim: int) -> None:
  """An ImageNet backbone from ``$DMLJAX_WEIGHTS`` with a linear embedding of ``embedding_dim``."""
  import os  # pylint: disable=g-import-not-at-top
  c.model.name = name
  c.model.pretrained = os.path.join(os.environ.get("DMLJAX_WEIGHTS", "weights"),
                                    BACKBONE_WEIGHTS[name])
  c.model.embedding_dim = int(embedding_dim)


def benchmark_config(name: str, backbone: str = "bn_inception",
                     embedding_dim: int = 128) -> ml_collections.ConfigDict:
  """The run settings every paper row shares on a benchmark data set (``cub``, ``cars``, ``sop``,
  ``inshop``): the backbone, protocol transforms at 227 (resize 256), the untrained network as
  the only baseline, best-weights checkpoints; the rows set the rest."""
  c = base_config()
  c.dataset.name = name
  set_backbone(c, backbone, embedding_dim)
  c.sampler.small_classes = "repeat" if name in ("sop", "inshop") else "error"
  c.input.size, c.input.resize = 227, 256
  c.baselines = ("untrained",)
  c.log_every_steps = 25
  c.checkpoint.every_steps = 1000
  c.checkpoint.save_best = True
  c.eval_batch_size = 128
  return c


def epochs(name: str, num: float, batch_size: int) -> int:
  """Steps of ``num`` epochs over the whole train split of ``name`` (conventional tables)."""
  import math  # pylint: disable=g-import-not-at-top
  return int(math.ceil(num * TRAIN_IMAGES[name] / batch_size))


def benchmark_small(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The ``small`` variant of a benchmark config (any framework): the same pipeline, framework
  and loss on a tiny from-scratch backbone, 32 x 32 crops, 4-image batches, a few steps; for
  smoke runs on tiny prepared data (``python -m dmljax.paper smoke``)."""
  c.model.name = "small_cnn"
  c.model.pretrained = ""
  c.model.widths = (4, 8)
  c.model.embedding_dim = 8
  c.model.pooling = "avg"
  c.model.remat = False
  c.input.size, c.input.resize = 32, 36
  c.input.num_workers = 0
  m = int(c.sampler.m)
  c.sampler.m = 1 if m == 1 else 2
  c.batch_size = 4
  c.sampler.small_classes = "repeat"
  c.ccp.proxies_per_class, c.ccp.pool_size = 2, 2
  c.xbm.memory_batches, c.xbm.warmup_steps = 2, 1
  c.profs.hncm_neighbors = 1                # 2 classes per batch: a seed and one neighbour
  # Tiny test splits hold about a dozen references per query: cut-offs up to 8.
  c.recall_ks = tuple(k for k in c.recall_ks if k <= 8) or (1,)
  c.ndcg_ks = tuple(k for k in c.ndcg_ks if k <= 8)
  c.standard.proxies_per_class = min(int(c.standard.proxies_per_class), 2)
  if c.framework == "dro":
    for key in ("k", "num_samples"):
      if key in c.dro.kwargs:
        c.dro.kwargs[key] = 2 * c.batch_size
  c.optim.freeze_trunk_epochs = 0.0
  c.optim.decay_every_epochs = min(float(c.optim.decay_every_epochs), 1.0)
  c.total_steps, c.eval_every_steps, c.log_every_steps = 4, 2, 2
  c.patience_evals = 100
  c.checkpoint.every_steps = 2
  c.eval_batch_size = 16
  return c
