"""Every config file builds and trains two steps (its ``small`` variant), and each method's
glyphs config learns: validation MAP@R after a short run beats the untrained network's."""
import glob
import importlib.util
import os
import sys

import numpy as np
import pytest

from dmljax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# configs/own_data.py needs a data set of your own: tests/test_own_data.py prepares one and trains.
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not p.endswith(("__init__.py", "own_data.py", "paper.py")))  # paper.py: tests/test_paper.py


def load(name, variant="small"):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(ROOT, "configs",
                                                                             f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  doc = module.__doc__ or ""
  assert f"--config=configs/{name}.py" in doc.split("\n\n")[1], f"{name}: docstring command"
  return module.get_config(variant)


def test_configs_found():
  assert {"digits_ccp", "glyphs_ccp", "glyphs_contrastive", "glyphs_proxy",
          "glyphs_proxy_anchor", "glyphs_soft_triple", "glyphs_mpa"} <= set(CONFIGS)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
  """Prepared tiny data sets in each benchmark's exact file layout, one per name, on demand."""
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import tinydata  # pylint: disable=g-import-not-at-top
  made = {}

  def get(name):
    if name not in made:
      made[name] = tinydata.prepare_tiny(name, str(tmp_path_factory.mktemp(f"tiny_{name}")))
    return made[name]

  return get


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_and_runs_two_steps(name, tmp_path, tiny_data):
  c = load(name)
  from dmljax.data import real  # pylint: disable=g-import-not-at-top
  if c.dataset.name in real.REAL_DATASETS:  # the paper configs: tiny prepared data
    c.dataset.data_dir = tiny_data(c.dataset.name)
  c.total_steps, c.eval_every_steps, c.log_every_steps = 2, 2, 1
  c.baselines, c.progress, c.num_devices = (), False, 1
  c.checkpoint.enabled, c.plot_projections = False, False
  out = train.train_and_evaluate(c, str(tmp_path))
  assert out["step"] == 2 and out["nonfinite_steps"] == 0
  assert out["train_step_traces"] == 1  # no recompilation after the first step
  assert 0.0 <= out["test/map_at_r"] <= 1.0
  if c.get("clustering"):  # the PROFS configs report NMI beside the retrieval metrics
    assert np.isfinite(out["val/nmi"])


def test_glyphs_ccp_projections_end_by_the_stated_rule():
  """The CCP framework's glyphs configs share one projection rule (configs.GLYPHS_CCP_*); the
  README's ``:quick`` run and the from-scratch variants keep the authors' (3 evaluations, 1e-5)."""
  from dmljax import configs  # pylint: disable=g-import-not-at-top
  rule = (configs.GLYPHS_CCP_EVAL_EVERY, configs.GLYPHS_CCP_PATIENCE,
          configs.GLYPHS_CCP_MIN_IMPROVEMENT)
  for name, variant, want in (("glyphs_ccp", "", rule), ("glyphs_proxy", "", rule),
                              ("glyphs_ccp_c1", "", rule), ("glyphs_ccp", "quick", (40, 3, 1e-5)),
                              ("glyphs_ccp", "scratch", (50, 3, 1e-5))):
    c = load(name, variant)
    assert (c.eval_every_steps, c.ccp.patience, c.ccp.min_improvement) == want, (name, variant)
  assert load("glyphs_contrastive", "").eval_every_steps == configs.GLYPHS_PAPERS_EVAL_EVERY


def test_unknown_variant_is_refused():
  with pytest.raises(ValueError, match="Unknown variant 'large'"):
    load("glyphs_ccp", "large")


# A short run of each method on glyphs (small model): it must beat the untrained network. The
# untrained network scores about 0.03 validation MAP@R here; 120 steps reach 0.08-0.2.
@pytest.mark.parametrize("name", ["glyphs_ccp", "glyphs_contrastive", "glyphs_proxy_anchor"])
def test_method_learns_on_glyphs(name, tmp_path):
  c = load(name, "scratch:small")  # from scratch: the pretrained trunk has the full widths
  c.model.widths, c.model.embedding_dim = (16, 32), 32
  c.total_steps, c.eval_every_steps = 120, 60
  c.baselines, c.progress, c.num_devices = ("untrained",), False, 1
  c.checkpoint.enabled = False
  if c.optim.freeze_trunk_epochs:
    c.optim.freeze_trunk_epochs = 0.1    # a sixth of the short run, as one epoch of a long one
  out = train.train_and_evaluate(c, str(tmp_path))
  assert out["val/map_at_r"] > 1.5 * out["untrained/val/map_at_r"] + 0.01, out["table"]
