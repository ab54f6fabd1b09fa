"""``python -m fastvlm_mlx.convert``: the converter's command line under the package users run.

The converters live in the repository's ``convert/`` folder, installed as the package ``fastvlm_convert``
(a name of its own, so that no ``convert.py`` or ``convert/`` in the working directory can shadow it);
this entry point is the only module of ``fastvlm_mlx`` that reaches into it, and no runtime module
imports this one.
"""

import sys

from fastvlm_convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
