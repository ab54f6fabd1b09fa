"""``python -m fastvlm_mlx.batch``: the captioner's command line (``fastvlm-batch``).

The code is ``fastvlm_mlx.captioner``; this module is only the command's entry point, kept under the name users
run (``python -m fastvlm_mlx.batch``, ``python -m fastvlm_mlx batch``, the ``fastvlm-batch`` script).
"""

import sys

from .captioner import main

if __name__ == "__main__":
    sys.exit(main())
