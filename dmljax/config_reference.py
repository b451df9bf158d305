"""The reference of every config key (``docs/config.md``), generated from the defaults.

``python -m dmljax.config_reference > docs/config.md`` writes it; ``tests/test_run_checks.py``
checks that the file equals what this module renders now and that every key of
:func:`dmljax.configs.base_config` has a meaning here, so the reference cannot go stale: a new key
without a line in :data:`MEANINGS` fails the test.
"""
from __future__ import annotations

from dmljax import config_check

#: One line per key (dotted name): what it means and its accepted values.
MEANINGS = {
    "seed": "Training seed: initial parameters, per-step keys, sampler order (not the data split).",
    "dataset.name": "Data set: digits, digits_closed, glyphs (embedded), cub, cars, sop, inshop "
                    "(prepared records, docs/data.md).",
    "dataset.seed": "Seed of the class split (the same for every training seed).",
    "dataset.cache_dir": "Where generated data are cached (glyphs); \"\" = $DMLJAX_CACHE/glyphs, else "
                         "~/.cache/dmljax/glyphs.",
    "dataset.data_dir": "TFDS folder of the prepared benchmark data sets (a gs:// path works); "
                        "\"\" = $TFDS_DATA_DIR, else ~/tensorflow_datasets.",
    "dataset.image_copy": "auto (the copy dataset.data_dir holds, recorded resolved), full, or "
                          "short_side_N (prepare --short_side=N); a run never resumes on "
                          "another copy.",
    "dataset.options": "Free-form: keyword options of the data set's loader (val_fraction, "
                       "protocol_fold, ...); unknown ones are refused by the loader.",
    "dataset.train_split": "Split trained on.",
    "dataset.val_split": "Split of the validation metrics and early stopping.",
    "dataset.test_split": "Split of the final test metrics.",
    "input.size": "Crop size (pixels) of the record transforms (227 BN-Inception, 224 ResNet).",
    "input.resize": "Evaluation: shorter side resized to this before the centre crop.",
    "input.scale": "Training random resized crop: area range (fraction of the image).",
    "input.ratio": "Training random resized crop: aspect ratio range.",
    "input.flip": "Training: random horizontal flips.",
    "input.crop_to_bbox": "CUB / Cars: crop to the bounding box before the transforms.",
    "input.augment": "Records: False trains on the evaluation transform.",
    "input.num_workers": "Decode processes; -1 = one per available core (affinity mask, cgroup "
                         "quota) for records, 0 for arrays.",
    "input.prefetch": "Batches decoded ahead of the step.",
    "model.name": "Backbone: small_cnn, resnet_v2_20, bn_inception, googlenet, resnet50 "
                  "(docs/backbones.md).",
    "model.widths": "small_cnn / resnet_v2_20: channels of each stage.",
    "model.convs_per_block": "small_cnn: convolutions per stage.",
    "model.embedding_dim": "Size of the embedding (>= 1).",
    "model.normalization": "Embedding normalisation: bounded (x / max(1, |x|), CCP), l2, none.",
    "model.pretrained": "PyTorch .pth file of ImageNet weights for the trunk (\"\" = random "
                        "initialisation); checked before anything compiles.",
    "model.pooling": "Global pooling: avg, max, avg+max, gem.",
    "model.gem_p": "GeM pooling exponent p.",
    "model.freeze_bn": "BatchNorm of the trunk: none, stats (running statistics fixed), "
                       "stats_and_affine.",
    "model.embedding_bn": "BatchNorm on the embedding layer's output.",
    "model.head_bias": "The embedding layer's bias (the CCP authors' has none).",
    "model.dtype": "Compute dtype: float32, bfloat16, or auto (bfloat16 on GPU/TPU, float32 on "
                   "CPU; the resolved value is recorded); parameters, statistics, losses f32.",
    "model.remat": "Rematerialise the trunk per block (less memory, more compute).",
    "framework": "Training method: standard, ccp, profs, xbm, dro.",
    "loss.name": "Loss (dmljax.losses): contrastive, triplet_margin, multi_similarity, "
                 "proxy_anchor, ...",
    "loss.kwargs": "Free-form: the loss's keyword hyperparameters, checked against its "
                   "signature before anything compiles.",
    "sampler.name": "Batch sampler: m_per_class or random (frameworks may bring their own).",
    "sampler.m": "Images per class in a batch (batch_size must be a multiple).",
    "sampler.small_classes": "Classes with fewer than m images: error, or repeat (cycle their "
                             "images).",
    "sampler.fit_batch": "m_per_class only: shrink batch_size to as many classes as the training "
                         "split has (printed; config.json records the batch used).",
    "batch_size": "Global training batch (all devices, all processes).",
    "optim.name": "Optimizer: adam, adamw, sgd.",
    "optim.learning_rate": "Peak learning rate.",
    "optim.weight_decay": "Weight decay (on the parameters optim.weight_decay_scope names).",
    "optim.grad_clip_norm": "Global gradient norm clip (0 = off).",
    "optim.b1": "Adam beta1.",
    "optim.b2": "Adam beta2.",
    "optim.eps": "Adam epsilon.",
    "optim.momentum": "SGD momentum.",
    "optim.schedule": "Learning-rate schedule: constant, cosine, step.",
    "optim.decay_every_epochs": "step schedule: multiply by decay_factor every this many epochs.",
    "optim.decay_factor": "step schedule: the factor.",
    "optim.warmup_steps": "Linear warm-up steps.",
    "optim.weight_decay_scope": "Parameters decayed: kernels, or all_but_batchnorm (the CCP "
                                "authors').",
    "optim.clip_value": "Per-value gradient clip (0 = off).",
    "optim.decay_before_clip": "Add the L2 term before clipping (the CCP authors' order).",
    "optim.freeze_trunk_epochs": "Epochs training only the embedding layer (proxy baselines).",
    "optim.lr_multipliers": "Free-form: learning-rate multiplier per parameter group "
                            "(proxies, ...).",
    "ccp.proxies_per_class": "CCP: proxies per class.",
    "ccp.pool_size": "CCP: k-center pool, samples per class.",
    "ccp.lam": "CCP: proximal weight lambda.",
    "ccp.patience": "CCP: a projection ends after this many evaluations without improvement.",
    "ccp.max_projection_steps": "CCP: a projection ends after this many steps (0 = by patience "
                                "only).",
    "ccp.proxy_weight": "CCP: weight of the sample-to-proxy loss.",
    "ccp.in_batch_weight": "CCP: weight of the in-batch loss.",
    "ccp.in_batch_loss": "CCP: the in-batch pair loss; \"\" = loss.name with loss.kwargs (the "
                         "authors').",
    "ccp.in_batch_kwargs": "Free-form: keyword hyperparameters of ccp.in_batch_loss (when set).",
    "ccp.min_improvement": "CCP: an evaluation improves a projection by more than this.",
    "ccp.pool_embeddings": "CCP: k-center pool from raw (before the model's normalisation) or "
                           "normalized embeddings.",
    "ccp.lagged_metric": "CCP: a projection end decides on the previous evaluation (the "
                         "authors' callback order).",
    "ccp.alternate": "CCP: False = one proxy problem, never re-initialised (ablation).",
    "ccp.start_from": "CCP: where the next projection trains from: current (the authors'), "
                      "projection_best, converged, run_best.",
    "ccp.reset_proxy_opt_state": "CCP: zero the proxies' optimizer moments at "
                                 "re-initialisation.",
    "ccp.proxy_normalization": "CCP: what the loss sees of the proxies: model (the "
                               "embeddings' normalisation), none, l2, bounded.",
    "standard.use_proxies": "standard: pair losses against learnable proxies.",
    "standard.proxies_per_class": "standard: proxies per class.",
    "standard.miner": "standard, in-batch pair losses: mined pairs or triplets only: none, "
                      "batch_hard, semi_hard, hard_negative, multi_similarity.",
    "standard.miner_kwargs": "Free-form: the miner's settings (distance; margin of semi_hard; "
                             "epsilon of multi_similarity).",
    "standard.normalize_proxies": "standard: the loss sees L2-normalised proxies.",
    "profs.rho": "PROFS: uses of a representative per hold, M = ceil(rho * I * L / B).",
    "profs.hold_steps": "PROFS: M itself (0 = from rho).",
    "profs.lam": "PROFS: proximal weight lambda.",
    "profs.hncm": "PROFS: hard negative class mining.",
    "profs.hncm_neighbors": "PROFS: nearest classes each seed class brings (HNCM).",
    "profs.adaptation": "PROFS: loss adaptation: auto, none, representative_pairs, "
                        "hard_negatives, objective.",
    "profs.distinct_negatives": "PROFS hard_negatives: r-th positive with r-th hardest "
                                "negative.",
    "profs.beta_per_class": "PROFS margin loss: one learnable beta per class.",
    "xbm.memory_batches": "XBM: batches held in the cross-batch memory.",
    "xbm.warmup_steps": "XBM: in-batch loss only before this step.",
    "xbm.memory_weight": "XBM: weight of the memory term.",
    "xbm.fill_during_warmup": "XBM: enqueue during the warm-up too.",
    "dro.weighting": "DRO: pair weighting (dro_topk, dro_kl, ...).",
    "dro.kwargs": "Free-form: the weighting's hyperparameters (checked by the DRO framework).",
    "total_steps": "Training steps (an upper bound when early stopping ends the run); raise it "
                   "with --allow_config_change to extend a finished run.",
    "eval_every_steps": "Validation every this many steps.",
    "patience_evals": "Early stopping: evaluations without improvement of val MAP@R.",
    "log_every_steps": "Progress line and metrics.jsonl record every this many steps.",
    "steps_per_dispatch": "Train steps per dispatch to the devices (a scan over prefetched "
                          "batches, equal to single steps); evaluations, checkpoints and "
                          "preemption saves stay at their steps. 0 = auto: 8 on GPU/TPU, 1 on "
                          "CPU and for PROFS with HNCM.",
    "eval_batch_size": "Embedding batch of evaluations (divisible by the device count).",
    "recall_ks": "Recall@k cut-offs reported.",
    "precision_ks": "Precision@k cut-offs reported.",
    "map_ks": "MAP@k cut-offs reported.",
    "ndcg_ks": "nDCG@k cut-offs reported.",
    "clustering": "Also k-means NMI and pairwise F1.",
    "compilation_cache": "JAX's persistent compilation cache: auto (~/.cache/dmljax/jax; "
                         "$DMLJAX_CACHE_DIR or $XDG_CACHE_HOME move it), a folder, or \"\" for "
                         "none; a cache the user set wins.",
    "eval_cache.device_mb": "Evaluation images decoded once and kept on the devices within this "
                            "many MB (-1: a quarter of the accelerator's memory; none on CPU).",
    "eval_cache.host_mb": "Evaluation images that do not fit on the devices: kept in host "
                          "memory within this many MB, else decoded at every evaluation.",
    "eval_cache.train": "Also keep the training split under the evaluation transform (CCP's "
                        "k-center pools) when it fits what the splits left of host_mb.",
    "eval_knn.sizing": "How the evaluation's kNN cuts its work: auto (the CPU's blocks on CPU; "
                       "a single pass, or blocks sized from device memory, on GPU/TPU), cpu or "
                       "accelerator. The metrics do not depend on it.",
    "eval_knn.memory_mb": "Memory per device the accelerator sizing of the kNN may use (-1: a "
                          "quarter of the device memory, 2 GB where the backend does not "
                          "report it).",
    "eval_knn.placement": "Where the evaluation's kNN runs: auto (from the device arrays on "
                          "GPU/TPU with one process; via the host on CPU), device or host.",
    "eval_knn.approx_recall": "TPU only: the kNN's group filter by lax.approx_max_k at this "
                              "recall target in (0, 1), making the metrics approximate; 0 = "
                              "exact (the default; refused on other backends).",
    "checkpoint.enabled": "Write checkpoints (and resume from them).",
    "paper_row": "Set by configs/paper.py (not a default): the catalogue row the run "
                 "reproduces (python -m dmljax.paper list).",
    "checkpoint.async_save": "Write checkpoints in a background thread while training goes on "
                             "(a failed write is reported at the next save or at the end); "
                             "False: the loop waits for each.",
    "checkpoint.every_steps": "Periodic checkpoint interval.",
    "checkpoint.max_to_keep": "Periodic checkpoints kept.",
    "checkpoint.save_best": "Also write the best parameters to WORKDIR/best.",
    "max_consecutive_nonfinite": "Stop after this many skipped non-finite steps in a row.",
    "baselines": "Rows beside the trained model: untrained, pixels.",
    "num_devices": "Devices of the data mesh; 0 = all.",
    "plot_projections": "PNG of the embeddings per CCP projection (2-D embeddings).",
    "progress": "Progress and evaluation lines on the console.",
}

HEADER = """# Config reference

Every key of a dmljax config, its default (`dmljax.configs.base_config`) and its meaning.
Generated by `python -m dmljax.config_reference > docs/config.md`; a test checks that this file
matches the defaults. A config file may only set these keys (a new key is an error naming the
closest valid one), except inside the free-form blocks {free}. Print a config with
`python -m dmljax.main --config=FILE --print_config`; check it, without training or creating
anything, with `--check`.

| key | default | meaning |
|---|---|---|
"""


def _block(key: str) -> str:
  for f in config_check.FREE_FORM:
    if key == f or key.startswith(f + "."):
      return f
  return key


def render() -> str:
  from dmljax import configs  # pylint: disable=g-import-not-at-top
  defaults = config_check.flatten(configs.base_config())
  rows, seen = [], set()
  for key in sorted(defaults):
    block = _block(key)
    if block in seen:
      continue
    seen.add(block)
    if block != key:
      value = {k[len(block) + 1:]: v for k, v in defaults.items()
               if k.startswith(block + ".")}
    else:
      value = defaults[key]
    text = MEANINGS.get(block, "")
    rows.append(f"| `{block}` | `{value!r}` | {text} |")
  for key in config_check.RECORD_KEYS:
    rows.append(f"| `{key}` | (not set) | {MEANINGS.get(key, '')} |")
  free = ", ".join(f"`{f}`" for f in config_check.FREE_FORM)
  return HEADER.format(free=free) + "\n".join(rows) + "\n"


def undocumented() -> list[str]:
  from dmljax import configs  # pylint: disable=g-import-not-at-top
  keys = {_block(k) for k in config_check.flatten(configs.base_config())}
  return sorted(k for k in keys | set(config_check.RECORD_KEYS) if k not in MEANINGS)


if __name__ == "__main__":
  print(render(), end="")
