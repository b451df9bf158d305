"""Config files: each ``configs/NAME.py`` defines ``get_config(arg)``; shared defaults in dmljax/configs.py."""
