"""XLA CPU paths for the backbones' convolutions: each flag set against PyTorch eager, one run.

  python benchmarks/backbone_flags.py --out /tmp/flags.json
  python benchmarks/backbone_flags.py --archs bn_inception --configs default,ynn_off --batch 16

For every backbone and every XLA flag set (``CONFIGS``), a fresh child process (``XLA_FLAGS`` is
read when JAX starts) builds the PyTorch model, converts its random init into the Flax port
(``models.convert_state_dict``) and measures, interleaved so that a shared machine's load hits
both alike:

* train step: ``get_backbone(name)`` in training mode (batch statistics), loss = mean of the
  squared pooled features, SGD, one ``jax.jit`` with the parameters and statistics donated;
  PyTorch: ``model.train()``, ``backward()``, ``SGD.step()`` in eager mode on all cores;
* inference: eval-mode pooled features (jitted / eager under ``no_grad``).

Median of ``--iters`` (5) timed repetitions after ``--warmup`` (2), JAX and PyTorch alternating.
Each child also saves the eval features, the first step's loss and gradients (from the same
initial variables) and PyTorch's gradients of the same loss (dropout p = 0); the parent compares
every flag set's to the reference flag set's (``--reference``, by default ``default``, XLA's
own defaults): features relative to the largest feature,
gradients as the relative L2 distance over all leaves, the largest difference per leaf relative
to that leaf's largest value (leaves below ``SMALL_LEAF`` of the largest left out: zero but for
rounding), and the same distances of both to PyTorch's gradients. dmljax's own CPU defaults
(``dmljax.xla_flags``) are switched off in the children (``DMLJAX_XLA_DEFAULTS=0``), so that each
flag set is exactly what is measured. docs/backbones.md records the figures.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_ALL_KINDS = "dot,eltwise,reduce,individual_dot,individual_convolution"
#: name -> XLA_FLAGS. The fusion kinds this jaxlib accepts (an unknown one is an error):
#: dot, eltwise, reduce, individual_dot, individual_convolution.
CONFIGS = {
    "default": "",
    "ynn_off": "--xla_cpu_experimental_ynn_fusion_type=",
    "ynn_all": f"--xla_cpu_experimental_ynn_fusion_type={_ALL_KINDS}",
    "onednn": ("--xla_cpu_use_onednn=true "
               f"--xla_cpu_experimental_onednn_fusion_type={_ALL_KINDS}"),
    "onednn_custom_call": ("--xla_cpu_use_onednn=true "
                           "--xla_cpu_experimental_onednn_custom_call=true"),
    "xnn": f"--xla_cpu_use_xnnpack=true --xla_cpu_experimental_xnn_fusion_type={_ALL_KINDS}",
    "xnn_ynn_off": ("--xla_cpu_use_xnnpack=true --xla_cpu_experimental_ynn_fusion_type= "
                    f"--xla_cpu_experimental_xnn_fusion_type={_ALL_KINDS}"),
    "onednn_ynn_off": ("--xla_cpu_use_onednn=true --xla_cpu_experimental_ynn_fusion_type= "
                       f"--xla_cpu_experimental_onednn_fusion_type={_ALL_KINDS}"),
    "ynn_conv": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution",
    # YNNPACK's default list less its convolutions (the '-' form removes a kind from the default).
    "ynn_noconv": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
    "xnn_graph": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    # Beyond the issue's list, each on top of the default dmljax sets: YNNPACK for every fusion
    # kind but the convolutions; XLA's fast math (NaN / Inf / division / functions still
    # honoured: only reassociation and the like); the concurrency-optimised scheduler off.
    "ynn_all_noconv": "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce,individual_dot",
    "noconv_fast_math": ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution "
                         "--xla_cpu_enable_fast_math=true"),
    "noconv_sched_off": ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution "
                         "--xla_cpu_enable_concurrency_optimized_scheduler=false"),
}


def child(arch, batch, size, warmup, iters, out):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks.backbones import torch_model  # pylint: disable=g-import-not-at-top
  from dmljax import models  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  channels = 1 if arch == "resnet_v2_20" else 3
  size = 28 if arch == "resnet_v2_20" else size
  tm = torch_model(torch, arch)
  sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
  variables, _ = models.convert_state_dict(arch, sd)
  variables = jax.tree.map(jnp.asarray, variables)
  bb = models.get_backbone(arch)
  x_nchw = np.random.RandomState(0).randn(batch, channels, size, size).astype(np.float32)
  x = jnp.asarray(x_nchw.transpose(0, 2, 3, 1))
  xt = torch.from_numpy(x_nchw)

  def loss_fn(params, bs, x):
    feats, mut = bb.apply({"params": params, "batch_stats": bs}, x, train=True,
                          mutable=["batch_stats"])
    return jnp.mean(feats ** 2), mut["batch_stats"]

  grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))

  def step(params, bs, x):
    (loss, bs), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, bs, x)
    return jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads), bs, loss

  step = jax.jit(step, donate_argnums=(0, 1))
  infer = jax.jit(lambda v, x: bb.apply(v, x, train=False))
  # Outputs to compare across flag sets (same initial variables, same input).
  feats = np.asarray(infer(variables, x))
  (loss0, _), grads = grad_fn(variables["params"], variables["batch_stats"], x)
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(g)
          for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
  # PyTorch's gradients of the same loss from the same weights and input (an independent float32
  # implementation): how far the default path itself is from another float32 result, per leaf.
  # (torchvision's GoogLeNet drops out its pooled features in training mode; the Flax trunk has
  # no dropout, so the reference is taken with p = 0.)
  tm.train()
  drop = getattr(tm, "dropout", None)
  p_drop = getattr(drop, "p", None)
  if p_drop is not None:
    drop.p = 0.0
  tm.zero_grad(set_to_none=True)
  tm(xt).pow(2).mean().backward()
  if p_drop is not None:
    drop.p = p_drop
  gsd = dict(sd)
  gsd.update({k: p.grad.detach().numpy() for k, p in tm.named_parameters() if p.grad is not None})
  tgrads = models.convert_state_dict(arch, gsd)[0]["params"]
  tflat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(g)
           for path, g in jax.tree_util.tree_flatten_with_path(tgrads)[0]}
  np.savez(out + ".npz", feats=feats, loss=np.asarray(loss0),
           **{"g:" + k: v for k, v in flat.items()}, **{"t:" + k: v for k, v in tflat.items()})
  del grads, flat
  infer_vars = jax.tree.map(jnp.array, variables)
  state = {"p": variables["params"], "bs": variables["batch_stats"]}
  t = time.perf_counter()
  state["p"], state["bs"], loss = step(state["p"], state["bs"], x)
  loss.block_until_ready()
  compile_s = time.perf_counter() - t
  opt = torch.optim.SGD(tm.parameters(), lr=1e-3)

  def jax_train():
    state["p"], state["bs"], loss = step(state["p"], state["bs"], x)
    loss.block_until_ready()

  def torch_train():
    tm.train()
    opt.zero_grad(set_to_none=True)
    tm(xt).pow(2).mean().backward()
    opt.step()

  def jax_infer():
    infer(infer_vars, x).block_until_ready()

  def torch_infer():
    tm.eval()
    with torch.no_grad():
      tm(xt)

  def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t

  res = {"compile_train_s": compile_s}
  for name, a, b in (("train", jax_train, torch_train), ("infer", jax_infer, torch_infer)):
    for _ in range(warmup):
      a()
      b()
    ta, tb = [], []
    for _ in range(iters):  # alternating, so that load spikes hit both
      ta.append(timed(a))
      tb.append(timed(b))
    res[f"jax_{name}"] = float(np.median(ta))
    res[f"torch_{name}"] = float(np.median(tb))
    res[f"jax_{name}_all"] = ta
    res[f"torch_{name}_all"] = tb
  res["load"] = os.getloadavg()[0]
  with open(out + ".json", "w") as f:
    json.dump(res, f)


#: Gradient leaves whose largest |value| is below this fraction of the largest over all leaves
#: are left out of the per-leaf comparison: they are zero but for rounding (a convolution's bias
#: followed by train-mode BatchNorm), so a relative difference there means nothing. Their
#: difference still counts in ``grad_global`` (relative to the largest gradient of all leaves).
SMALL_LEAF = 1e-3


def grad_errors(ref, other, prefix_ref="g:", prefix_other="g:"):
  """Per-leaf max |ref - other| / max |ref| over leaves above SMALL_LEAF, and over all leaves
  relative to the largest |ref| of any leaf: (worst per-leaf, its leaf, worst global)."""
  keys = [k[2:] for k in ref.files if k.startswith(prefix_ref)]
  top = max(float(np.abs(ref[prefix_ref + k]).max()) for k in keys)
  worst, worst_key, glob = 0.0, "", 0.0
  for k in keys:
    a, b = ref[prefix_ref + k], other[prefix_other + k]
    d = float(np.abs(a - b).max())
    glob = max(glob, d / top)
    scale = float(np.abs(a).max())
    if scale >= SMALL_LEAF * top and d / scale > worst:
      worst, worst_key = d / scale, k
  return worst, worst_key, glob


def _rel_l2(ref, other, prefix_ref, prefix_other):
  """||ref - other|| / ||ref|| over all gradient leaves together (float64)."""
  keys = [k[2:] for k in ref.files if k.startswith(prefix_ref)]
  num = sum(float(((ref[prefix_ref + k].astype(np.float64)
                    - other[prefix_other + k].astype(np.float64)) ** 2).sum()) for k in keys)
  den = sum(float((ref[prefix_ref + k].astype(np.float64) ** 2).sum()) for k in keys)
  return (num / max(den, 1e-300)) ** 0.5


def compare(ref_npz, npz):
  """Largest |difference| / largest |reference| over the features and over each gradient leaf;
  with PyTorch's gradients in ``npz``, also the default's and this flag set's distance to them."""
  a, b = np.load(ref_npz), np.load(npz)
  out = {}
  if any(k.startswith("t:") for k in b.files):
    out["default_vs_torch"], out["default_vs_torch_leaf"], out["default_vs_torch_global"] = (
        grad_errors(b, a, "t:", "g:"))
    out["this_vs_torch"], out["this_vs_torch_leaf"], out["this_vs_torch_global"] = (
        grad_errors(b, b, "t:", "g:"))
  out["grad_rel_big"], out["grad_rel_big_leaf"], out["grad_global"] = grad_errors(a, b)
  out["grad_l2"] = _rel_l2(a, b, "g:", "g:")  # ||this - default|| / ||default||, all leaves
  if "this_vs_torch" in out:
    out["default_vs_torch_l2"] = _rel_l2(b, a, "t:", "g:")
    out["this_vs_torch_l2"] = _rel_l2(b, b, "t:", "g:")
  feats = float(np.abs(a["feats"] - b["feats"]).max() / max(np.abs(a["feats"]).max(), 1e-30))
  worst, worst_key = 0.0, ""
  for k in a.files:
    if not k.startswith("g:"):
      continue
    scale = max(float(np.abs(a[k]).max()), 1e-30)
    d = float(np.abs(a[k] - b[k]).max()) / scale
    if d > worst:
      worst, worst_key = d, k[2:]
  loss = float(abs(a["loss"] - b["loss"]) / max(abs(float(a["loss"])), 1e-30))
  out.update(feats_rel=feats, grad_rel=worst, grad_worst_leaf=worst_key, loss_rel=loss)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--archs", default="bn_inception,googlenet,resnet50,resnet_v2_20")
  parser.add_argument("--configs", default=",".join(CONFIGS))
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--size", type=int, default=227)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=1, help="repeat every child this often")
  parser.add_argument("--out", default="")
  parser.add_argument("--reference", default="default",
                      help="the flag set whose outputs the others are compared with (run it first)")
  parser.add_argument("--child", nargs=2, metavar=("ARCH", "PATH"))
  args = parser.parse_args()
  if args.child:
    child(args.child[0], args.batch, args.size, args.warmup, args.iters, args.child[1])
    return
  tmp = tempfile.mkdtemp(prefix="backbone_flags-")
  rows = []
  for rnd in range(args.rounds):
    for arch in args.archs.split(","):
      for name in args.configs.split(","):
        path = os.path.join(tmp, f"{arch}-{name}-{rnd}")
        env = dict(os.environ, XLA_FLAGS=CONFIGS[name], DMLJAX_XLA_DEFAULTS="0",
                   TF_CPP_MIN_LOG_LEVEL="3")
        t = time.time()
        load_before = os.getloadavg()
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", arch, path,
                               "--batch", str(args.batch), "--size", str(args.size),
                               "--warmup", str(args.warmup), "--iters", str(args.iters)],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
          print(f"{arch} {name}: FAILED\n{proc.stderr[-2000:]}", flush=True)
          continue
        with open(path + ".json") as f:
          r = json.load(f)
        r.update(arch=arch, config=name, round=rnd, wall=time.time() - t, batch=args.batch,
                 loadavg_before=load_before, loadavg_after=os.getloadavg())
        ref = os.path.join(tmp, f"{arch}-{args.reference}-{rnd}.npz")
        if name != args.reference and os.path.exists(ref):
          r.update(compare(ref, path + ".npz"))
        rows.append(r)
        print(f"{arch:13s} {name:18s} train {r['jax_train'] * 1e3:7.0f} ms vs torch "
              f"{r['torch_train'] * 1e3:7.0f} ms ({r['jax_train'] / r['torch_train']:.2f}x)  "
              f"infer {r['jax_infer'] * 1e3:6.0f} vs {r['torch_infer'] * 1e3:6.0f} ms "
              f"({r['jax_infer'] / r['torch_infer']:.2f}x)  load "
              f"{'/'.join(f'{v:.1f}' for v in r['loadavg_before'])} -> "
              f"{'/'.join(f'{v:.1f}' for v in r['loadavg_after'])}  "
              f"compile {r['compile_train_s']:.0f} s  wall {r['wall']:.0f} s  "
              + (f"feats {r['feats_rel']:.1e} grads {r['grad_rel_big']:.1e} "
                 f"({r['grad_rel_big_leaf']}; all leaves {r['grad_global']:.1e} of the largest)"
                 if "feats_rel" in r else "")
              + (f" vs torch: reference {r['default_vs_torch']:.1e} ({r['default_vs_torch_leaf']})"
                 f" this {r['this_vs_torch']:.1e} ({r['this_vs_torch_leaf']})"
                 if "this_vs_torch" in r else ""), flush=True)
        if args.out:
          with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
