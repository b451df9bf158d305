r"""The catalogue of the papers' result rows: every row of a result table is one command.

  python -m dmljax.paper list ccp --table 2 --dataset cars
  python -m dmljax.paper show ccp/table2/cars/ms_ccp_l
  python -m dmljax.paper check                 # every row's config builds and validates
  python -m dmljax.paper smoke ccp/table2/cars/ms_ccp_l profs/table1/cub/c_profs
  python -m dmljax.paper run ccp/table2/cars/ms_ccp_l --dry-run

A row (:class:`Row`) is data: the paper, table, data set and method, and a builder that sets its
config on top of the shared config functions of :mod:`dmljax.configs`, recording for every
setting where it comes from (:class:`Spec`). The tables live in ``dmljax/paper/{ccp,profs,dro,
mpa}.py`` beside the published numbers (shipped as data, with their table reference) that
``python -m dmljax.report --paper P --table T`` prints beside a run's.

Every row runs through one config file, ``configs/paper.py``, whose argument is the row id
(``--config=configs/paper.py:ccp/table2/cars/ms_ccp_l``, ``...:small`` for the smoke variant),
and through the protocol command: the 4-fold protocol of Musgrave et al. (CCP Tables II, V, VI) or
its conventional mode (``--mode=conventional``: the whole train split trains, the test split is
monitored and reported; every other table). The config records the row id (``paper_row``), so a
finished run names its row.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Optional, Sequence

import ml_collections

__all__ = ["Row", "Spec", "Quoted", "PAPERS", "rows", "get_row", "build", "command",
           "settings", "published_tables", "quoted_rows", "RUNTIME_KEYS"]

#: The papers, in the order of ../shared/papers (module name -> title).
PAPERS = {
    "ccp": "Gurbuz, Can, Alatan: Deep Metric Learning with Chance Constraints",
    "profs": "Can, Gurbuz, Alatan: Deep Metric Learning with Alternating Projections onto "
             "Feasible Sets (PROFS)",
    "dro": "Qi, Yan, Wang, Yang: A Simple and Effective Framework for Pairwise Deep Metric "
           "Learning (DRO)",
    "mpa": "Saeki, Kawahara, Aman: Multi Proxy Anchor Family Loss for Several Types of Gradients",
}

PROTOCOLS = ("4fold", "conventional")
DATA_COPIES = ("full", "short_side_256")  # dataset.image_copy values (docs/data.md)
CONFIG_FILE = "configs/paper.py"

#: Settings that change how a run is executed or logged, not what it computes.
RUNTIME_KEYS = ("checkpoint.", "progress", "log_every_steps", "plot_projections", "num_devices",
                "input.num_workers", "input.prefetch", "eval_batch_size", "dataset.cache_dir",
                "dataset.data_dir", "max_consecutive_nonfinite", "baselines", "paper_row",
                "model.remat")

CHOSEN = "not given by the paper; chosen: "

#: Sources of settings every row shares (a row's own source wins).
_COMMON_SOURCES = {
    "seed": "chosen: seed 0 (run more with --config.seed; the report pools runs of a row)",
    "dataset.seed": "chosen: 0 (unused: the rows' class splits are fixed, the protocol's folds "
                    "or the data set's own train / test split)",
    "sampler.small_classes": "chosen: a class with fewer images than a batch takes (SOP, "
                             "In-shop) fills its rows by cycling through its images, as PML's "
                             "sampler does",
    "input.crop_to_bbox": "chosen: whole images, no bounding-box crop (none of the papers crops "
                          "to the boxes)",
    "input.augment": "the papers' training augmentation (random crop and flip)",
    "recall_ks": "the table's columns",
    "ndcg_ks": "the table's columns",
    "precision_ks": "the table's columns",
    "map_ks": "the table's columns",
    "clustering": "the table's columns (NMI, F1 only where the table has them)",
}


class Spec:
  """A config being built for a row, with the source of each setting it sets.

  ``spec.set(source, {"optim.learning_rate": 1e-5, ...})`` sets dotted keys and records
  ``source`` for them (and for every leaf below them); ``spec.cite(source, keys)`` records a source
  for settings a shared config function already set. A source starting with ``"chosen: "`` marks a
  setting the paper does not give (it says why this value)."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.sources: dict[str, str] = {}

  def set(self, source: str, values: dict[str, Any]) -> "Spec":
    for key, value in values.items():
      *path, leaf = key.split(".")
      node = self.config
      for part in path:
        node = node[part]
      if isinstance(value, dict):
        value = ml_collections.ConfigDict(value)
      with node.unlocked():
        node[leaf] = value
      self.sources[key] = source
    return self

  def cite(self, source: str, keys: Sequence[str]) -> "Spec":
    for key in keys:
      self.get(key)  # KeyError for a key the config lacks
      self.sources[key] = source
    return self

  def get(self, key: str):
    node = self.config
    for part in key.split("."):
      node = node[part]
    return node


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of a paper's result table (a run, or a protocol of four runs)."""
  paper: str
  table: str                 # "2", "3", ...: the table the row is defined in
  dataset: str               # cub | cars | sop | inshop
  key: str                   # method slug, unique within (paper, table, dataset)
  method: str                # the paper's name for the row
  protocol: str              # 4fold | conventional
  builder: Callable[[Spec], None] = dataclasses.field(repr=False, compare=False)
  published: dict = dataclasses.field(default_factory=dict, compare=False)  # metric -> %
  published_ref: str = ""    # where the published numbers are (table, columns)
  quoted_from: str = ""      # the published numbers are another paper's (not this paper's run)
  aliases: tuple = ()        # other tables showing the same runs (CCP V, VI)
  dtype: str = "float32"     # compute precision the row is defined for (the papers': float32)
  data_copy: str = "full"    # prepared copy the row expects (dataset.image_copy): full or short_side_256
  notes: tuple = ()

  @property
  def id(self) -> str:
    return f"{self.paper}/table{self.table}/{self.dataset}/{self.key}"

  @property
  def tables(self) -> tuple:
    return (self.table,) + tuple(self.aliases)


@dataclasses.dataclass(frozen=True)
class Quoted:
  """A published row the paper quotes from other work: shown in reports, never run."""
  paper: str
  table: str
  dataset: str
  method: str
  published: dict
  source: str


def _modules():
  return [importlib.import_module(f"dmljax.paper.{name}") for name in PAPERS]


_CACHE: dict[str, Any] = {}


def rows(paper: Optional[str] = None, table: Optional[str] = None,
         dataset: Optional[str] = None) -> list[Row]:
  """The catalogue's rows, optionally of one paper / table (aliases count) / data set."""
  if "rows" not in _CACHE:
    out = []
    for module in _modules():
      out.extend(module.ROWS)
    ids = [r.id for r in out]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
      raise RuntimeError(f"duplicate row ids in the catalogue: {dup}")
    _CACHE["rows"] = out
  found = _CACHE["rows"]
  if paper is not None:
    if paper not in PAPERS:
      raise ValueError(f"Unknown paper {paper!r}; valid: {list(PAPERS)}.")
    found = [r for r in found if r.paper == paper]
  if table is not None:
    table = str(table).lower().removeprefix("table")
    found = [r for r in found if table in r.tables]
  if dataset is not None:
    found = [r for r in found if r.dataset == dataset]
  return found


def quoted_rows(paper: str, table: str) -> list[Quoted]:
  module = importlib.import_module(f"dmljax.paper.{paper}")
  table = str(table).lower().removeprefix("table")
  return [q for q in getattr(module, "QUOTED", []) if q.table == table]


def published_tables(paper: str) -> dict:
  """``{table: {"title", "columns", "datasets"}}``: how the report lays out each table."""
  return importlib.import_module(f"dmljax.paper.{paper}").TABLES


def get_row(row_id: str) -> Row:
  """The row called ``row_id``; ValueError naming close ids otherwise."""
  for r in rows():
    if r.id == row_id:
      return r
  import difflib  # pylint: disable=g-import-not-at-top
  close = difflib.get_close_matches(row_id, [r.id for r in rows()], n=3, cutoff=0.5)
  hint = f" Did you mean {', '.join(close)}?" if close else ""
  raise ValueError(f"Unknown row {row_id!r}.{hint} List them with python -m dmljax.paper list.")


def build(row: Row, variant: str = "") -> tuple[ml_collections.ConfigDict, dict[str, str]]:
  """The row's config (``variant="small"``: the smoke variant) and the sources of its settings."""
  from dmljax import configs  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(f"dmljax.paper.{row.paper}")
  spec = module.start(row)
  row.builder(spec)
  c = spec.config
  with c.unlocked():
    c.paper_row = row.id
  spec.sources.setdefault("dataset.name", f"the table's data set ({row.published_ref or row.table})")
  for key, text in _COMMON_SOURCES.items():
    spec.sources.setdefault(key, text)
  spec.sources.setdefault("model.dtype", f"the row's dtype ({row.dtype}: the papers' precision)")
  with c.unlocked():
    c.dataset.image_copy = row.data_copy
  spec.sources.setdefault("dataset.image_copy", f"the row's data copy ({row.data_copy}: the papers "
                          "resize the full images; prepare --short_side=256 makes the other copy)")
  for key in ("dataset.train_split", "dataset.val_split", "dataset.test_split"):
    spec.sources.setdefault(key, "the protocol: 4-fold, the fold's training and validation "
                            "classes, the test half reported; conventional, the whole train "
                            "split trains and the test split is monitored and reported")
  if row.protocol == "conventional":
    # The config itself is conventional, so dmljax.main (SLURM, TPU launchers) runs it the same.
    from dmljax import protocol  # pylint: disable=g-import-not-at-top
    c = protocol.conventional_config(c)
    spec.config = c
    spec.sources["dataset.options.val_fraction"] = (
        "the conventional split: the whole train split trains (val_fraction 0)")
    spec.sources["dataset.val_split"] = "the conventional split: the test split is monitored"
  spec.sources["paper_row"] = "the catalogue: the row this run reproduces"
  if variant == "small":
    configs.benchmark_small(c)
  elif variant:
    raise ValueError(f"Unknown variant {variant!r} of {row.id}; valid: 'small'.")
  c.lock()
  return c, spec.sources


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict) and v:
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def _unused(key: str, config) -> str:
  """Why ``key`` does not act in ``config`` ("" when it does)."""
  from dmljax.frameworks import FRAMEWORKS  # pylint: disable=g-import-not-at-top
  top = key.split(".")[0]
  blocks = {cls.config_key for cls in FRAMEWORKS.values() if cls.config_key}
  if top in blocks and top != config.framework:
    return f"unused: the row's framework is {config.framework!r}, not {top!r}"
  if key in ("model.widths", "model.convs_per_block") and config.model.name != "small_cnn":
    return f"unused by the {config.model.name} backbone"
  if key == "model.gem_p" and config.model.pooling != "gem":
    return f"unused: pooling is {config.model.pooling!r}"
  if key == "optim.momentum" and config.optim.name != "sgd":
    return f"unused by {config.optim.name}"
  if key.startswith("optim.decay_") and config.optim.schedule != "step":
    return f"unused: the {config.optim.schedule} schedule"
  if (key.startswith("ccp.in_batch_kwargs") and config.framework == "ccp"
      and not config.ccp.in_batch_loss):
    return "unused: the in-batch term is config.loss with config.loss.kwargs"
  if key.startswith("loss.") and config.framework == "dro":
    return "unused: the dro framework takes its base loss from dro.kwargs"
  return ""


def source_of(key: str, sources: dict[str, str], config=None) -> str:
  """Where the setting ``key`` comes from (the longest recorded prefix), or why it has its value."""
  parts = key.split(".")
  for n in range(len(parts), 0, -1):
    prefix = ".".join(parts[:n])
    if prefix in sources:
      text = sources[prefix]
      return CHOSEN + text[len("chosen: "):] if text.startswith("chosen: ") else text
  if any(key == k or (k.endswith(".") and key.startswith(k)) for k in RUNTIME_KEYS):
    return "runtime setting (does not change what is computed)"
  why = _unused(key, config) if config is not None else ""
  return why or CHOSEN + "dmljax's default"


def settings(row: Row, variant: str = "") -> list[tuple[str, Any, str]]:
  """``(key, value, source)`` for every leaf setting of the row's config."""
  c, sources = build(row, variant)
  flat = _flatten(c.to_dict())
  return [(k, flat[k], source_of(k, sources, c)) for k in sorted(flat)]


def workdir(row: Row, root: str = "runs") -> str:
  return f"{root.rstrip('/')}/{row.id}"


def command(row: Row, root: str = "runs", variant: str = "") -> str:
  """The command line that produces the row."""
  arg = row.id + (f":{variant}" if variant else "")
  mode = " --mode=conventional" if row.protocol == "conventional" else ""
  return (f"python -m dmljax.protocol{mode} --config={CONFIG_FILE}:{arg} "
          f"--workdir={workdir(row, root)}")


def as_dict(row: Row, root: str = "runs") -> dict[str, Any]:
  return {"id": row.id, "paper": row.paper, "table": row.table, "tables": list(row.tables),
          "dataset": row.dataset, "method": row.method, "protocol": row.protocol,
          "dtype": row.dtype, "data_copy": row.data_copy, "command": command(row, root),
          "published": dict(row.published), "published_ref": row.published_ref,
          "quoted_from": row.quoted_from, "notes": list(row.notes)}
