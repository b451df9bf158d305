"""Backbone speed: dmljax's Flax ports against the same PyTorch models, on this CPU, in one run.

  python benchmarks/backbones.py                       # all four, batch 32, 227 x 227
  python benchmarks/backbones.py --archs resnet50 --iters 5 --batch 16

For each backbone, with identical weights (the PyTorch model's random init, converted with
``dmljax.models.convert_state_dict``):

* train step: forward in training mode (batch statistics, running averages updated), loss =
  mean of the squared pooled features, backward, plain SGD update. JAX: one jitted function
  (buffers donated); PyTorch: eager ``model.train()``, ``loss.backward()``, ``SGD.step()``.
* inference: pooled features in eval mode (JAX jitted; PyTorch eager under ``no_grad``),
  reported as images / s.

PyTorch gets as many threads as XLA's CPU client uses (all cores, ``--threads`` to change).
ResNet-v2-20 runs at 28 x 28 x 1 (the MNIST net it is) against a PyTorch module of the same
layout written here. Medians over ``--iters`` timed repetitions after one warm-up; the JAX
compile time is reported separately. JAX runs with dmljax's CPU defaults for XLA
(``dmljax.xla_flags``, applied by ``import dmljax``; ``DMLJAX_XLA_DEFAULTS=0`` measures XLA's
own defaults). Needs torch and torchvision (and pretrainedmodels for
BN-Inception; the ``torch_ref`` extra); docs/backbones.md records the figures.
"""
import argparse
import importlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dmljax import models  # noqa: E402


def _torch_resnet_v2_20(torch):
  """Pre-activation ResNet-20 in PyTorch with dmljax's ``resnet_v2_20`` names."""
  nn = torch.nn

  class Block(nn.Module):

    def __init__(self, cin, cout, stride):
      super().__init__()
      self.bn1 = nn.BatchNorm2d(cin)
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.shortcut = (nn.Conv2d(cin, cout, 1, stride, bias=False)
                       if stride != 1 or cin != cout else None)

    def forward(self, x):
      pre = torch.relu(self.bn1(x))
      short = x if self.shortcut is None else self.shortcut(pre)
      out = self.conv1(pre)
      return self.conv2(torch.relu(self.bn2(out))) + short

  class Net(nn.Module):

    def __init__(self, in_channels=1):
      super().__init__()
      self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
      cin = 16
      for si, width in enumerate((16, 32, 64), start=1):
        blocks = []
        for bi in range(3):
          blocks.append(Block(cin, width, 2 if si > 1 and bi == 0 else 1))
          cin = width
        setattr(self, f"layer{si}", nn.Sequential(*blocks))
      self.bn = nn.BatchNorm2d(64)

    def forward(self, x):
      x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
      return torch.relu(self.bn(x)).mean(dim=(2, 3))

  return Net()


_TV_OPS = ("nms", "qnms", "roi_align", "_roi_align_backward", "ps_roi_align",
           "_ps_roi_align_backward", "roi_pool", "_roi_pool_backward", "ps_roi_pool",
           "_ps_roi_pool_backward", "qroi_align", "deform_conv2d", "_deform_conv2d_backward")


def _import_torchvision(torch):
  """torchvision; with a CPU-only torch and a CUDA build of torchvision (PyPI's), its compiled
  detection ops cannot load and the import fails on registering them: the models used here
  are pure Python, so those ops are then declared without kernels (never called) and the
  import is retried."""
  try:
    return importlib.import_module("torchvision")
  except RuntimeError as e:
    if "torchvision::" not in str(e):
      raise
  for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
    del sys.modules[name]
  lib = torch.library.Library("torchvision", "DEF")  # pylint: disable=unused-variable
  for op in _TV_OPS:
    lib.define(op + "(Tensor x) -> Tensor")
  _import_torchvision.lib = lib  # keep the definitions alive
  return importlib.import_module("torchvision")


def torch_model(torch, arch):
  """The PyTorch model of ``arch`` with its classifier replaced by the identity."""
  if arch == "resnet_v2_20":
    return _torch_resnet_v2_20(torch)
  if arch == "bn_inception":
    _import_torchvision(torch)  # pretrainedmodels imports it
    m = importlib.import_module("pretrainedmodels.models.bninception").BNInception()
    m.last_linear = torch.nn.Identity()
    m.global_pool = torch.nn.AdaptiveAvgPool2d(1)  # its AvgPool2d(7) is this at 224 / 227
    return m
  tv = _import_torchvision(torch)
  if arch == "googlenet":
    m = tv.models.googlenet(weights=None, aux_logits=False, init_weights=True)
  else:
    m = tv.models.resnet50(weights=None)
  m.fc = torch.nn.Identity()
  return m


def _median_time(fn, iters):
  fn()  # warm-up
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def bench(torch, arch, batch, size, iters):
  """Returns a dict of timings (seconds per step, images per second) for one backbone."""
  channels = 1 if arch == "resnet_v2_20" else 3
  if arch == "resnet_v2_20":
    size = 28
  tm = torch_model(torch, arch)
  sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
  variables, _ = models.convert_state_dict(arch, sd)
  variables = jax.tree.map(jnp.asarray, variables)
  bb = models.get_backbone(arch)
  rng = np.random.RandomState(0)
  x_nchw = rng.randn(batch, channels, size, size).astype(np.float32)
  x = jnp.asarray(x_nchw.transpose(0, 2, 3, 1))
  xt = torch.from_numpy(x_nchw)

  def loss_fn(params, bs, x):
    feats, mut = bb.apply({"params": params, "batch_stats": bs}, x, train=True,
                          mutable=["batch_stats"])
    return jnp.mean(feats ** 2), mut["batch_stats"]

  def step(params, bs, x):
    (loss, bs), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, bs, x)
    return jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads), bs, loss

  step = jax.jit(step, donate_argnums=(0, 1))
  infer = jax.jit(lambda v, x: bb.apply(v, x, train=False))
  infer_vars = jax.tree.map(jnp.array, variables)  # a copy: the train step donates its input
  state = {"p": variables["params"], "bs": variables["batch_stats"]}

  t = time.perf_counter()
  state["p"], state["bs"], loss = step(state["p"], state["bs"], x)
  loss.block_until_ready()
  compile_train = time.perf_counter() - t
  t = time.perf_counter()
  infer(infer_vars, x).block_until_ready()
  compile_infer = time.perf_counter() - t

  def jax_train():
    state["p"], state["bs"], loss = step(state["p"], state["bs"], x)
    loss.block_until_ready()

  jax_step = _median_time(jax_train, iters)
  jax_infer = _median_time(lambda: infer(infer_vars, x).block_until_ready(), iters)

  opt = torch.optim.SGD(tm.parameters(), lr=1e-3)

  def torch_train():
    tm.train()
    opt.zero_grad(set_to_none=True)
    loss = tm(xt).pow(2).mean()
    loss.backward()
    opt.step()

  def torch_infer():
    tm.eval()
    with torch.no_grad():
      tm(xt)

  torch_step = _median_time(torch_train, iters)
  torch_inf = _median_time(torch_infer, iters)
  return dict(arch=arch, size=size, channels=channels, compile_train=compile_train,
              compile_infer=compile_infer, jax_step=jax_step, torch_step=torch_step,
              jax_ips=batch / jax_infer, torch_ips=batch / torch_inf)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--archs", default="bn_inception,googlenet,resnet50,resnet_v2_20")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--size", type=int, default=227)
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--threads", type=int, default=0, help="PyTorch threads (0: all cores)")
  args = parser.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  threads = args.threads or os.cpu_count()
  torch.set_num_threads(threads)
  print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
        f"({threads} threads), batch {args.batch}, {args.iters} timed iterations")
  rows = []
  for arch in args.archs.split(","):
    r = bench(torch, arch, args.batch, args.size, args.iters)
    rows.append(r)
    print(f"  {arch}: done", flush=True)
  head = ("| backbone | input | train step JAX | train step PyTorch | JAX / PyTorch | "
          "inference JAX | inference PyTorch | JAX compile (train / infer) |")
  print()
  print(head)
  print("|" + "---|" * 8)
  for r in rows:
    print(f"| {r['arch']} | {args.batch} x {r['size']}^2 x {r['channels']} | "
          f"{r['jax_step'] * 1e3:.0f} ms | {r['torch_step'] * 1e3:.0f} ms | "
          f"{r['jax_step'] / r['torch_step']:.2f} | {r['jax_ips']:.1f} img/s | "
          f"{r['torch_ips']:.1f} img/s | {r['compile_train']:.1f} s / {r['compile_infer']:.1f} s |")


if __name__ == "__main__":
  main()
