"""The papers' catalogue (``python -m dmljax.paper``): the counts per table, every row's config
builds and validates, the row commands load the same config, one smoke run per paper on tiny data
in the real file layout, reports beside the published numbers, launcher commands."""
import collections
import dataclasses
import importlib.util
import json
import os

import numpy as np
import pytest

from dmljax import paper
from dmljax import report
from dmljax.paper import __main__ as paper_cli
from dmljax.paper import check as check_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Counted from the papers' tables (../shared/papers): CCP II (13 methods x 4 data sets), III and
# IV (3 CCP rows x 4; the other rows quote other work); PROFS 1 (20 x 3); DRO 1 (5 x 2), 2 (6 x 2),
# 3 (5), 4 (6); MPA 4-6 (5 each), 7-8 (K = 1, 4, 8, 12, 16).
COUNTS = {("ccp", "2"): 52, ("ccp", "3"): 12, ("ccp", "4"): 12, ("profs", "1"): 60,
          ("dro", "1"): 10, ("dro", "2"): 12, ("dro", "3"): 5, ("dro", "4"): 6,
          ("mpa", "4"): 5, ("mpa", "5"): 5, ("mpa", "6"): 5, ("mpa", "7"): 5, ("mpa", "8"): 5}


def test_counts_per_table():
  rows = paper.rows()
  assert collections.Counter((r.paper, r.table) for r in rows) == COUNTS
  assert collections.Counter(r.paper for r in rows) == {"ccp": 76, "profs": 60, "dro": 33,
                                                        "mpa": 25}
  assert len({r.id for r in rows}) == len(rows) == 194
  # Tables V and VI are Table II's runs (aliases, not rows).
  assert len(paper.rows("ccp", "5")) == 26 and len(paper.rows("ccp", "6")) == 26
  assert {r.id for r in paper.rows("ccp", "5")} <= {r.id for r in paper.rows("ccp", "2")}
  # SoftTriple-S/L: one row per data set, S on SOP / In-shop, L on CUB / Cars196.
  st = {r.dataset: r.method for r in paper.rows("ccp", "2") if r.key == "soft_triple"}
  assert st == {"sop": "SoftTriple-S", "inshop": "SoftTriple-S", "cub": "SoftTriple-L",
                "cars": "SoftTriple-L"}
  assert paper.get_row("ccp/table2/cars/ms_ccp_l").protocol == "4fold"
  assert {r.protocol for r in rows if r.paper != "ccp" or r.table != "2"} == {"conventional"}
  assert all(r.dtype == "float32" and r.data_copy in paper.DATA_COPIES for r in rows)


def test_published_numbers_cover_every_column():
  for name in paper.PAPERS:
    for table, layout in paper.published_tables(name).items():
      for row in paper.rows(name, table):
        cols = (layout["columns"][row.dataset] if isinstance(layout["columns"], dict)
                else layout["columns"])
        missing = [c for c in cols if c not in row.published]
        # The DRO Cars196 MS / LS rows (quoted from Wang et al.) lack R@16 and R@32.
        assert not missing or row.quoted_from, (row.id, missing)
  r = paper.get_row("ccp/table2/cars/ms_ccp_l")
  assert r.published == {"512/P@1": 86.26, "512/MAP@R": 29.14, "128/P@1": 74.97,
                         "128/MAP@R": 19.85, "512/P@R": 38.97, "128/P@R": 30.44}
  assert paper.get_row("profs/table1/sop/m_profs_hncm").published["R@1"] == 76.3
  assert paper.get_row("mpa/table8/cars/mpa_k8").published == {
      "R@1": 86.6, "nDCG@2": 84.9, "nDCG@4": 82.1, "nDCG@8": 78.1}
  quoted = {(r.dataset, r.key) for r in paper.rows("dro", "2") if r.quoted_from}
  assert quoted == {("cars", "ms"), ("cars", "ls")}
  # Work the papers quote is shown, never run.
  names = {q.method for q in paper.quoted_rows("ccp", "4")}
  assert "LIBC 512 [35]" in names and not any("CCP" in n for n in names)
  assert len(paper.quoted_rows("dro", "1")) == 18 and len(paper.quoted_rows("mpa", "6")) == 5


def test_every_row_config_builds_and_validates():
  errors = check_lib.check(paper.rows())  # the rows and their smoke variants
  assert errors == []


def test_check_catches_a_bad_setting():
  good = paper.get_row("ccp/table2/cub/ms")

  def broken(spec):
    good.builder(spec)
    spec.set("test", {"loss.kwargs": {"alpha": 2.0, "betta": 40.0}})

  row = dataclasses.replace(good, builder=broken)
  errors = check_lib.check([row], variants=("",))
  assert len(errors) == 1 and "betta" in errors[0] and row.id in errors[0]


def _load_paper_config(arg):
  spec = importlib.util.spec_from_file_location("cfg_paper", os.path.join(ROOT, "configs",
                                                                            "paper.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_row_command_and_sources():
  row = paper.get_row("dro/table1/cub/kl_m")
  cmd = paper.command(row)
  assert cmd == ("python -m dmljax.protocol --mode=conventional "
                 "--config=configs/paper.py:dro/table1/cub/kl_m --workdir=runs/dro/table1/cub/kl_m")
  arg = cmd.split("--config=configs/paper.py:")[1].split()[0]
  assert _load_paper_config(arg).to_dict() == paper.build(row)[0].to_dict()
  small = _load_paper_config(arg + ":small")
  assert small.model.name == "small_cnn" and small.paper_row == row.id
  settings = {k: (v, s) for k, v, s in paper.settings(row)}
  assert settings["dro.kwargs.gamma"][0] == 0.1
  assert settings["dro.kwargs.gamma"][1].startswith("not given by the paper; chosen: gamma = 0.1")
  assert settings["dro.kwargs.num_samples"][0] == 160
  assert settings["model.embedding_dim"] == (1024, settings["model.embedding_dim"][1])
  assert "DRO section 4.1" in settings["model.embedding_dim"][1]
  assert settings["dataset.val_split"][0] == "test"  # conventional: the test split monitored
  assert settings["ccp.lam"][1].startswith("unused")
  ccp = {k: (v, s) for k, v, s in paper.settings(paper.get_row("ccp/table4/sop/c1_ccp_l"))}
  assert ccp["batch_size"][0] == 96 and "28 x 4 = 112" in ccp["batch_size"][1]
  assert ccp["model.name"][0] == "resnet50" and ccp["model.embedding_dim"][0] == 512
  profs = {k: (v, s) for k, v, s in paper.settings(paper.get_row("profs/table1/sop/c_profs_hncm"))}
  assert profs["profs.hncm_neighbors"][1].startswith("not given by the paper; chosen:")
  assert profs["optim.learning_rate"][0] == 1e-4 and profs["recall_ks"][0] == (1, 10, 100, 1000)
  mpa = {k: (v, s) for k, v, s in paper.settings(paper.get_row("mpa/table6/sop/mpa"))}
  assert mpa["loss.kwargs.alpha"][1].startswith("not given by the paper; chosen: alpha = 32")
  assert mpa["standard.proxies_per_class"][0] == 2 and mpa["batch_size"][0] == 32


def test_cli_list_show_errors(capsys):
  text = paper_cli.main(["list", "ccp", "--table", "2", "--dataset", "cars", "--json"])
  rows = [json.loads(line) for line in text.splitlines()]
  assert len(rows) == 13 and rows[7]["id"] == "ccp/table2/cars/ms_ccp_l"
  assert rows[7]["command"].startswith("python -m dmljax.protocol --config=configs/paper.py:")
  assert set(rows[0]) >= {"paper", "table", "dataset", "method", "id", "command", "dtype",
                          "data_copy"}
  shown = paper_cli.main(["show", "profs/table1/cub/l_profs"])
  assert "PROFS section 5.2" in shown and "not given by the paper; chosen:" in shown
  assert paper_cli.run(["show", "ccp/table2/cars/ms_ccp"]) == 2
  err = capsys.readouterr().err
  assert "Unknown row 'ccp/table2/cars/ms_ccp'" in err and "ms_ccp_l" in err


def test_run_dry_run_and_launchers():
  text = paper_cli.main(["run", "mpa/table7", "--dry-run"])
  assert len(text.splitlines()) == 5 and "--mode=conventional" in text
  slurm = paper_cli.main(["run", "ccp/table2/cub/c2", "profs/table1/cub/lifted",
                          "--launcher", "slurm", "--root", "/shared/runs"])
  assert slurm.splitlines() == [
      "bash launch/slurm.sbatch --array=folds --config=configs/paper.py:ccp/table2/cub/c2 "
      "--workdir=/shared/runs/ccp/table2/cub/c2",
      "bash launch/slurm.sbatch --config=configs/paper.py:profs/table1/cub/lifted "
      "--workdir=/shared/runs/profs/table1/cub/lifted"]
  tpu = paper_cli.main(["run", "dro/table3", "--launcher", "tpu"])
  assert len(tpu.splitlines()) == 5 and "launch/tpu_pod.sh" in tpu
  with pytest.raises(ValueError, match="4-fold"):
    paper_cli.main(["run", "ccp/table2/cub/c2", "--launcher", "tpu"])


def _write(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(data, f)


def test_report_beside_the_paper(tmp_path):
  # A finished 4-fold row and a conventional row, as the protocol command writes them.
  proto = tmp_path / "a" / "ms"
  folds = [{"test": {"precision_at_1": p, "r_precision": 0.3, "map_at_r": 0.2}}
           for p in (0.70, 0.72, 0.74, 0.76)]
  _write(str(proto / "protocol_results.json"),
         {"folds": folds, "concatenated": {"precision_at_1": 0.8626, "r_precision": 0.40,
                                           "map_at_r": 0.30}, "embedding_dim": 128,
          "concatenated_dim": 512})
  _write(str(proto / "fold_0" / "config.json"), {"paper_row": "ccp/table2/cars/ms_ccp_l"})
  conv = tmp_path / "b" / "run"
  _write(str(conv / "final_metrics.json"), {"test/recall_at_1": 0.9, "test/map_at_r": 0.5})
  _write(str(conv / "config.json"), {"paper_row": "ccp/table3/cars/ms_ccp_l"})
  text = report.main(["--paper", "ccp", "--table", "2", str(tmp_path)])
  line = next(l for l in text.splitlines() if l.startswith("| MS-CCP-L |") and "86.26" in l)
  cells = [c.strip() for c in line.strip("|").split("|")]
  # 512/P@1: paper 86.26, ours 86.26, 0; 128/P@1: mean of the folds 73.00 vs 74.97.
  assert cells[1:4] == ["86.26", "86.26", "+0.00"]
  assert cells[10:13] == ["74.97", f"73.00 ± {np.std([70, 72, 74, 76], ddof=1):.2f}", "-1.97"]
  assert "| C1 | 77.75 | not run |" in text
  conv_text = report.main(["--paper", "ccp", "--table", "3", str(tmp_path)])
  assert "| MS-CCP-L | 86.01 | 90.00 | +3.99 |" in conv_text
  assert "| ProxyAnchor [42] (quoted) | 86.10 |  |  |" in conv_text
  dro = report.main(["--paper", "dro", "--table", "2", str(tmp_path)])
  assert "| MS † |" in dro and "quoted from Wang et al." in dro
  with pytest.raises(ValueError, match="no table '9'"):
    report.main(["--paper", "ccp", "--table", "9", str(tmp_path)])


def test_smoke_one_row_per_paper(tmp_path, cache_dir):
  """Tiny data in each row's real file layout, two steps of the small variant through the
  protocol command's path: the 4-fold protocol (fold 0) and the conventional mode."""
  # One data set (one tiny preparation), a compilation cache shared by the four runs (the same
  # tiny model embeds the same splits), checkpoints and the untrained baseline off (tested
  # elsewhere): the runs are compile-bound.
  ids = ["ccp/table2/cub/ms_ccp_l", "profs/table1/cub/c_profs_hncm", "dro/table1/cub/topk_pn_b",
         "mpa/table4/cub/mpa_ap"]
  finals = paper_cli.smoke(ids, str(tmp_path), say=lambda _: None,
                           overrides={"checkpoint.enabled": False, "baselines": ()})
  for rid, final in zip(ids, finals):
    assert final["step"] == 2 and final["nonfinite_steps"] == 0, rid
    assert 0.0 <= final["test/map_at_r"] <= 1.0
  assert os.path.isfile(tmp_path / "runs" / ids[0] / "fold_0" / "test_embeddings.npz")
  for rid, final in zip(ids[1:], finals[1:]):  # conventional: the monitored split is the test
    assert final["val/map_at_r"] == final["test/map_at_r"], rid
    record = json.loads((tmp_path / "runs" / rid / "conventional.json").read_text())
    assert record["finished"] and record["config"]["paper_row"] == rid
  assert "test/nmi" in finals[1] and "test/recall_at_8" in finals[1]
  assert "test/ndcg_at_8" in finals[3] and "test/recall_at_32" not in finals[2]  # cut to 8


def test_standard_framework_miners():
  """The baselines' mining (Contrastive-Hard, Triplet-Semi, MS): the loss sees exactly the
  miner's masks."""
  import jax
  import jax.numpy as jnp
  from dmljax import configs, losses
  from dmljax.frameworks import get_framework
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 4))
  x = x / jnp.linalg.norm(x, axis=1, keepdims=True)
  y = jnp.asarray([0, 0, 1, 1, 2, 2, 3, 3])

  def framework(loss, kwargs, miner, miner_kwargs=None):
    c = configs.glyphs_base()
    c.framework, c.loss.name, c.loss.kwargs = "standard", loss, kwargs
    c.standard.miner, c.standard.miner_kwargs = miner, miner_kwargs or {}
    return get_framework(c, num_classes=4, embedding_dim=4)

  fw = framework("contrastive", {"pos_margin": 0.0, "neg_margin": 1.0}, "hard_negative")
  choice = losses.miners.hardest_negative_per_positive(x, y, distinct=True)
  assert np.array_equal(fw._mined(x, y)["pair_mask"], choice.pair_mask())
  want = losses.contrastive(x, y, pos_margin=0.0, neg_margin=1.0, pair_mask=choice.pair_mask())
  assert np.isclose(fw.loss_fn(x, y, **fw.kwargs, **fw._mined(x, y)), want)
  fw = framework("triplet_margin", {"margin": 0.2}, "semi_hard", {"margin": 0.2})
  t = losses.miners.semi_hard(x, y, margin=0.2)
  assert np.array_equal(fw._mined(x, y)["triplet_mask"], t) and t.any()
  fw = framework("multi_similarity", {"alpha": 2.0, "beta": 50.0, "base": 0.5},
                 "multi_similarity", {"epsilon": 0.1})
  pos, neg = losses.miners.multi_similarity_miner(x, y, epsilon=0.1)
  assert np.array_equal(fw._mined(x, y)["pair_mask"], pos | neg)
  with pytest.raises(ValueError, match="in-batch pair loss"):
    framework("proxy_anchor", {}, "batch_hard")
  with pytest.raises(ValueError, match="not settings of miner"):
    framework("contrastive", {}, "hard_negative", {"margin": 0.1})


def test_conventional_mode_flags(capsys):
  from dmljax import protocol
  status = protocol.main(["prog", "--mode=conventional", "--folds=0",
                          "--config=configs/glyphs_ccp.py:small", "--workdir=/tmp/unused"])
  assert status == 2 and "--folds belongs to the 4-fold protocol" in capsys.readouterr().err
  c = _load_paper_config("ccp/table3/cub/c2_ccp_l")  # built on a config that validates on fold 0
  assert "protocol_fold" not in c.dataset.options and c.dataset.options.val_fraction == 0.0
  assert c.dataset.val_split == "test" and c.batch_size == 128 and c.model.embedding_dim == 512
  assert protocol.conventional_config(c).to_dict() == c.to_dict()  # idempotent
