"""``python -m fastvlm_mlx.server``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
