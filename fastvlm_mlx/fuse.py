"""``python -m fastvlm_mlx.fuse``: fine-tuned adapters folded into a model, saved as a model directory.

The code is the converters' (``convert/fuse.py``, installed as ``fastvlm_convert``); like ``fastvlm_mlx.convert``
this is only the command's entry point under the package users run, and no runtime module imports it.
"""

import sys

from fastvlm_convert.fuse import main

if __name__ == "__main__":
    sys.exit(main())
