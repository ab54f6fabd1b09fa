"""Model shapes and the benchmark prompt, shared by our worker and the peers' (FORMATS.md section 7)."""

QWEN2 = {
    "0.5B": dict(
        hidden_size=896,
        num_hidden_layers=24,
        intermediate_size=4864,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "1.5B": dict(
        hidden_size=1536,
        num_hidden_layers=28,
        intermediate_size=8960,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "7B": dict(
        hidden_size=3584,
        num_hidden_layers=28,
        intermediate_size=18944,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
    # --smoke: a few layers of everything, so CI runs the whole path in seconds
    "smoke": dict(
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        tie_word_embeddings=True,
    ),
}
COMMON_TEXT = dict(rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768)

FASTVITHD = dict(layers=[2, 12, 24, 4, 2], embed_dims=[96, 192, 384, 768, 1536])
SMOKE_VISION = dict(layers=[1, 1, 1, 1, 1], embed_dims=[8, 16, 32, 64, 128])

# The prompt: PRE text tokens, the image, POST text tokens (10 + 256 + 30 = 296 positions at 1024 px).
PRE, POST = 10, 30


def text_config(size: str) -> dict:
    return dict(QWEN2[size], **COMMON_TEXT)


def vision_shape(size: str) -> dict:
    return SMOKE_VISION if size == "smoke" else FASTVITHD


def timm_init(tower) -> None:
    """Give an MLX FastViTHD (ours or mlx-vlm's) the random weights timm's construction gives, in place.

    MLX initialises biases to 0 where PyTorch draws them uniform in +-1/sqrt(fan_in), and ours and mlx-vlm's
    layer scales start at 1 where timm's start at 1e-5. With MLX's defaults the tower's activations shrink to
    1e-12 by stage 2, through subnormal floats, which x86 CPUs compute many times slower (benchmarks/RESULTS.md):
    a cost no trained checkpoint has. The weights keep MLX's init, the same distribution as PyTorch's.
    """
    import math

    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    params = dict(tree_flatten(tower.parameters()))
    new = {}
    for key, value in params.items():
        if key.rsplit(".", 1)[-1].startswith("layer_scale"):
            new[key] = mx.full(value.shape, 1e-5, value.dtype)
        elif key.endswith(".bias"):
            weight = params.get(key[: -len("bias")] + "weight")
            if weight is not None and weight.ndim >= 2:  # a convolution or linear layer, not a norm
                bound = math.prod(weight.shape[1:]) ** -0.5
                new[key] = mx.random.uniform(-bound, bound, value.shape).astype(value.dtype)
    tower.update(tree_unflatten(list(new.items())))


def prompt_ids(vocab_size: int, seed: int = 0):
    """Random text ids for the PRE and POST parts (the same for every system)."""
    import random

    rng = random.Random(seed)
    hi = min(vocab_size, 150000) - 2  # never the last id (the smoke image token)
    return [rng.randint(0, hi) for _ in range(PRE)], [rng.randint(0, hi) for _ in range(POST)]


def summarize(values):
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    n = len(vals)
    med = vals[n // 2] if n % 2 else 0.5 * (vals[n // 2 - 1] + vals[n // 2])
    return {"min": round(vals[0], 3), "median": round(med, 3), "max": round(vals[-1], 3), "n": n}


def rss_peak_gb() -> float:
    """Peak resident set size of this process (Linux reports KiB): one yardstick for every framework."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
