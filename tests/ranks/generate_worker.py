"""One rank of a model-parallel generation, started by tests/test_distributed.py with MLX_RANK and
MLX_HOSTFILE set: rank 0 writes the tokens and the log-probabilities of every step to a JSON file.

    python tests/ranks/generate_worker.py MODEL MODE IMAGE MAX_TOKENS OUT.json
"""

import json
import sys

import mlx.core as mx

from fastvlm_mlx import distributed, load
from fastvlm_mlx.engine import engine_for, stream_generate


def main(model_path, mode, image, max_tokens, out):
    cluster = distributed.start(mode, connect_timeout=60)
    model, processor = load(model_path, cluster=cluster)
    if not distributed.follow_or_lead(cluster, engine_for(model, processor)):
        return
    with distributed.leading(cluster):
        steps = list(stream_generate(model, processor, "Describe the image.", image, max_tokens=int(max_tokens)))
    with open(out, "w") as f:
        json.dump(
            {
                "tokens": [r.token for r in steps],
                "text": "".join(r.text for r in steps),
                "logprobs": [r.logprobs.astype(mx.float32).tolist() for r in steps],
                "ranks": cluster.size,
            },
            f,
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
