r"""Any row of the papers' result tables, by its catalogue id (``python -m dmljax.paper list``).

  python -m dmljax.protocol --config=configs/paper.py:ccp/table2/cars/ms_ccp_l --workdir=DIR

The argument is the row id, optionally followed by ``:small`` (the smoke variant: tiny backbone,
a few steps, for tiny prepared data). ``python -m dmljax.paper show ID`` prints the row's full
config with the source of every setting; ``python -m dmljax.paper list`` gives each row's exact
command (the 4-fold protocol, or ``--mode=conventional``). The rows are data in
``dmljax/paper/{ccp,profs,dro,mpa}.py``, built from the shared functions of
``dmljax/configs.py``; ``configs/{cub,cars,sop,inshop}_ccp.py`` stay the readable entry points of
C2-CCP.
"""
from dmljax import paper


def get_config(arg: str = ""):
  row_id, _, variant = arg.partition(":")
  if not row_id:
    raise ValueError("configs/paper.py needs a row id, e.g. "
                     "--config=configs/paper.py:ccp/table2/cars/ms_ccp_l (list them with "
                     "python -m dmljax.paper list).")
  config, _ = paper.build(paper.get_row(row_id), variant)
  return config
