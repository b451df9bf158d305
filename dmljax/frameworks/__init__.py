"""Training frameworks, chosen by ``config.framework`` (see :mod:`dmljax.frameworks.base`)."""
from dmljax.frameworks.base import Framework, HostContext, class_major_labels
from dmljax.frameworks.ccp import CCPFramework
from dmljax.frameworks.standard import StandardFramework
from dmljax.frameworks.xbm import XBMFramework
from dmljax.frameworks.dro import DROFramework
from dmljax.frameworks.profs import PROFSFramework

#: name -> Framework class. PROFS / XBM / DRO plug in by adding an entry.
FRAMEWORKS = {
    "standard": StandardFramework,
    "ccp": CCPFramework,
    "xbm": XBMFramework,
    "dro": DROFramework,
    "profs": PROFSFramework,
}


def get_framework(config, *, num_classes: int, embedding_dim: int) -> Framework:
  """Builds and validates ``config.framework``; ValueError lists the valid names."""
  if config.framework not in FRAMEWORKS:
    raise ValueError(f"Unknown framework {config.framework!r}; valid frameworks: "
                     f"{sorted(FRAMEWORKS)} (set --config.framework).")
  fw = FRAMEWORKS[config.framework](config, num_classes=num_classes, embedding_dim=embedding_dim)
  fw.validate()
  return fw


__all__ = ["FRAMEWORKS", "Framework", "HostContext", "get_framework", "class_major_labels",
           "CCPFramework", "StandardFramework"]
