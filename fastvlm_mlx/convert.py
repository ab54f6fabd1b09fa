"""``python -m fastvlm_mlx.convert``: the converter's command line under the package users run.

The converters live in ``convert/`` (``convert/cli.py`` for this command), which builds on the runtime;
this entry point is the only module of ``fastvlm_mlx`` that reaches into it, and no runtime module
imports this one.
"""

import sys

from convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
