"""Reading checkpoints of every supported format into this project's module tree.

The role mlx-lm gives a model's ``sanitize``: Apple's, transformers' and mlx-vlm's tensor names and
layouts become ours (``keymap``, ``fold``), the architecture is read off the tensors and config.json
(``reader``), and the files themselves are checked as they are read (``files``).  ``load()`` uses it
for every directory it is given; the converters in ``convert/`` write what it returns.
"""

from .files import FORMAT_NAMES, read_weights
from .reader import read_checkpoint

__all__ = ["read_checkpoint", "read_weights", "FORMAT_NAMES"]
