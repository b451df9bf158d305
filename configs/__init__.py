"""Config files: each ``configs/NAME.py`` defines ``get_config(arg)``; see configs/common.py."""
