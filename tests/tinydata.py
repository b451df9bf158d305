"""The tiny benchmark writers moved into the package (``dmljax.data.tiny``, used by
``python -m dmljax.paper smoke``); this module keeps the tests' ``import tinydata``."""
from dmljax.data.tiny import *  # noqa: F401,F403
from dmljax.data.tiny import __all__  # noqa: F401
