"""``python -m dmljax.kernels.native``: builds the compiled CPU kernels now, prints the library."""
from dmljax.kernels.native import build_library

if __name__ == "__main__":
  print(build_library())
