"""The peers, driven at the model level with random weights on the same shapes as ours.

mlxvlm: mlx-vlm's ``mlx_vlm.models.fastvlm`` (MLX), with the same optimized BLAS loaded first as ours.
hf:     transformers' ``FastVlmForConditionalGeneration`` (PyTorch).

Each runs in its own process (``benchmarks.run`` starts it), so imports, BLAS and peak memory are clean.
Both follow their library's own generation path: mlx-vlm computes the prefill logits for every position
and pipelines decode steps with async_eval (as its generate_step does); transformers keeps only the last
position's logits (``logits_to_keep=1``) and runs synchronously.
"""

import time

from .shapes import prompt_ids, text_config, timm_init, vision_shape


def bench_mlxvlm(spec: dict) -> dict:
    from fastvlm_mlx.cpu.blas import load_fast_blas  # loads OpenBLAS/MKL before mlx.core, exactly as for ours

    blas = load_fast_blas()
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_vlm.models.cache import KVCache
    from mlx_vlm.models.fastvlm.config import ModelConfig, TextConfig, VisionConfig
    from mlx_vlm.models.fastvlm.fastvlm import Model

    mx.set_default_device(mx.gpu if spec["device"] == "gpu" else mx.cpu)
    dtype = getattr(mx, spec["dtype"])
    size, res = spec["size"], spec["resolution"]
    vshape = vision_shape(size)

    t0 = time.perf_counter()
    vcfg = VisionConfig(image_size=res)
    vcfg.layers, vcfg.embed_dims = list(vshape["layers"]), list(vshape["embed_dims"])
    cfg = ModelConfig(
        text_config=TextConfig(model_type="qwen2", **text_config(size)),
        vision_config=vcfg,
        model_type="llava_qwen2",
        mm_hidden_size=2 * vshape["embed_dims"][-1],
    )
    model = Model(cfg)
    timm_init(model.vision_tower)
    model.set_dtype(dtype)
    if spec["q_bits"]:
        nn.quantize(model.language_model, group_size=64, bits=spec["q_bits"])
    model.eval()
    mx.eval(model.parameters())
    load_ms = (time.perf_counter() - t0) * 1e3

    pre, post = prompt_ids(cfg.text_config.vocab_size)
    ids = mx.array([pre + [cfg.image_token_index] + post])
    pixels = mx.random.uniform(shape=(1, 3, res, res)).astype(dtype)
    lm = model.language_model

    def one(decode_tokens):
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        embeds = model.get_input_embeddings(ids, pixels).inputs_embeds
        mx.eval(embeds)
        t1 = time.perf_counter()
        cache = [KVCache() for _ in lm.model.layers]
        logits = lm(ids, cache=cache, inputs_embeds=embeds).logits
        y = mx.argmax(logits[:, -1], axis=-1)
        y.item()
        t2 = time.perf_counter()
        for _ in range(decode_tokens - 1):
            nxt = mx.argmax(lm(y[:, None], cache=cache).logits[:, -1], axis=-1)
            mx.async_eval(nxt)
            y.item()
            y = nxt
        y.item()
        t3 = time.perf_counter()
        positions = int(embeds.shape[1])
        return dict(
            vision_ms=(t1 - t0) * 1e3,
            ttft_ms=(t2 - t0) * 1e3,
            prefill_tps=positions / (t2 - t1),
            decode_tps=(decode_tokens - 1) / (t3 - t2) if decode_tokens > 1 else None,
            peak_gb=mx.get_peak_memory() / 1e9,
            positions=positions,
        )

    one(spec["warmup_decode"])
    runs = [one(spec["decode_tokens"]) for _ in range(spec["reps"])]
    return dict(runs=runs, load_ms=load_ms, info=dict(blas=blas, load="build + materialize random weights"))


def build_hf(size: str, resolution: int):
    """transformers' ``FastVlmForConditionalGeneration`` with random weights on the real shapes, in eval mode.

    The vision tower gets PyTorch's default initialisation (what ``timm.create_model`` gives its convolutions)
    in place of transformers' normal(0, 0.02). With transformers' init the tower's activations shrink through
    subnormal floats to zero by stage 2, which PyTorch's CPU kernels compute many times slower on Intel CPUs
    (benchmarks/RESULTS.md), a cost that no trained checkpoint has.
    """
    import torch
    from transformers import FastVlmConfig, FastVlmForConditionalGeneration

    vshape = vision_shape(size)
    torch.manual_seed(0)
    vision = dict(
        model_type="timm_wrapper",
        architecture="fastvit_mci3",
        hidden_size=2 * vshape["embed_dims"][-1],
        do_pooling=True,
        global_pool="avg",
        model_args=dict(inference_mode=True, layers=tuple(vshape["layers"]), embed_dims=tuple(vshape["embed_dims"])),
    )
    cfg = FastVlmConfig(
        text_config=dict(model_type="qwen2", **text_config(size)),
        vision_config=vision,
        image_seq_length=(resolution // 64) ** 2,
    )
    if cfg.image_token_id >= cfg.text_config.vocab_size:  # the smoke vocabulary is tiny
        cfg.image_token_id = cfg.text_config.vocab_size - 1
    model = FastVlmForConditionalGeneration(cfg)
    with torch.no_grad():
        for module in model.model.vision_tower.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return model.eval()


def bench_hf(spec: dict) -> dict:
    import torch

    if spec["q_bits"]:
        raise RuntimeError("quantized transformers runs are not implemented")
    dev = "cuda" if spec["device"] == "gpu" else "cpu"
    dtype = getattr(torch, spec["dtype"])
    size, res = spec["size"], spec["resolution"]

    t0 = time.perf_counter()
    model = build_hf(size, res).to(dtype).to(dev)
    cfg = model.config
    load_ms = (time.perf_counter() - t0) * 1e3

    pre, post = prompt_ids(cfg.text_config.vocab_size)
    n_img = (res // 64) ** 2
    ids = torch.tensor([pre + [cfg.image_token_id] * n_img + post], device=dev)
    pixels = torch.rand(1, 3, res, res, dtype=dtype, device=dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def one(decode_tokens):
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            sync()
            t0 = time.perf_counter()
            model.model.get_image_features(pixel_values=pixels)
            sync()
            t1 = time.perf_counter()
            # TTFT: a full request (the forward encodes the image again) up to the first token
            out = model(input_ids=ids, pixel_values=pixels, use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            sync()
            t2 = time.perf_counter()
            pkv = out.past_key_values
            for _ in range(decode_tokens - 1):
                out = model(input_ids=tok, past_key_values=pkv, use_cache=True, logits_to_keep=1)
                pkv, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            sync()
            t3 = time.perf_counter()
        vision_ms, ttft_ms = (t1 - t0) * 1e3, (t2 - t1) * 1e3
        return dict(
            vision_ms=vision_ms,
            ttft_ms=ttft_ms,
            # the prefill alone is not separable from the vision encode inside one forward
            prefill_tps=ids.shape[1] / max(1e-9, (ttft_ms - vision_ms) / 1e3) if ttft_ms > vision_ms else None,
            decode_tps=(decode_tokens - 1) / (t3 - t2) if decode_tokens > 1 else None,
            peak_gb=torch.cuda.max_memory_allocated() / 1e9 if dev == "cuda" else None,
            positions=int(ids.shape[1]),
        )

    one(spec["warmup_decode"])
    runs = [one(spec["decode_tokens"]) for _ in range(spec["reps"])]
    return dict(
        runs=runs, load_ms=load_ms, info=dict(torch_threads=torch.get_num_threads(), load="build random-weight model")
    )


PEERS = {"mlxvlm": bench_mlxvlm, "hf": bench_hf}
