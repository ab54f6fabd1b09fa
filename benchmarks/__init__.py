"""Benchmarks for fastvlm-mlx and its peers (mlx-vlm, transformers): ``python -m benchmarks.run --help``."""
