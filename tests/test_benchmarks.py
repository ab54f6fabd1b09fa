"""CI smoke test of the benchmark suite: ``python -m benchmarks.run --smoke`` runs and reports sane JSON."""

import importlib.util
import json

from conftest import run_cli

FIGURES = ("vision_ms", "ttft_ms", "prefill_tps", "decode_tps", "peak_gb", "rss_gb", "load_ms")


def test_smoke_run_reports_every_figure(tmp_path):
    out = tmp_path / "bench.jsonl"
    proc = run_cli("benchmarks.run", "--smoke", "--profile", "--prefix-cache", "--output", str(out), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines == [json.loads(line) for line in out.read_text().splitlines()]

    header, ours = lines[0], lines[1]
    assert header["benchmark"] == "fastvlm" and "--smoke" in header["command"]
    assert header["machine"]["cores"] >= 1 and header["versions"]["mlx"]

    assert ours["system"] == "ours" and "error" not in ours
    # smoke shapes: 128 px -> (128/64)^2 = 4 image positions between 10 and 30 text tokens
    assert ours["positions"] == 10 + 4 + 30
    for fig in FIGURES:
        stats = ours[fig]
        assert stats is not None, fig
        assert 0 < stats["min"] <= stats["median"] <= stats["max"], (fig, stats)
    assert ours["vision_ms"]["n"] == ours["reps"] == 2
    assert ours["vision_ms"]["min"] < ours["ttft_ms"]["max"]  # TTFT includes the vision encode
    assert ours["peak_gb"]["max"] < 4 and ours["rss_gb"]["max"] < 8
    info = ours["info"]
    assert info["depthwise"] in ("compiled", "toeplitz", "native", "shift")
    assert set(info["vision_profile_ms"]) >= {"stem", "stage0", "stage4", "final_conv", "projector"}
    assert info["ttft_prefix_cached_ms"]["min"] > 0
    assert "table" not in proc.stdout and "vision_ms" in proc.stderr  # the table goes to stderr


def test_bad_option_is_rejected():
    proc = run_cli("benchmarks.run", "--smoke", "--peers", "nope", timeout=120)
    assert proc.returncode == 2
    assert "unknown peer" in proc.stderr


def test_chat_smoke_run_reports_each_turn():
    proc = run_cli("benchmarks.chat", "--smoke", timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    header, ours = lines[0], lines[1]
    assert header["benchmark"] == "fastvlm-chat" and ours["system"] == "ours"
    assert ours["cold"]["cached"] == 0
    # the follow-up reuses the whole first turn; the new conversation about the same image starts cold
    assert 0 < ours["follow_up"]["cached"] < ours["follow_up"]["positions"]
    assert ours["follow_up"]["cached"] > ours["cold"]["positions"] - 1
    assert ours["seen_image"]["cached"] == 0
    for turn in ("cold", "follow_up", "seen_image"):
        assert ours[turn]["ttft_ms"]["min"] > 0
    assert "ours TTFT / cold" in proc.stderr


def test_batch_smoke_run_reports_images_per_second():
    proc = run_cli("benchmarks.batch", "--smoke", timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines[0]["benchmark"] == "fastvlm-batch"
    ours = [line for line in lines[1:] if line["system"] == "ours"]
    assert [line["batch"] for line in ours] == [1, 2]
    assert all(line["images"] == 4 and line["images_per_s"] > 0 and line["generated_tokens"] > 0 for line in ours)


def test_decode_matmul_smoke_run_reports_each_system():
    proc = run_cli("benchmarks.decode_matmul", "--model-size", "smoke", "--rows", "1,3", "--reps", "1", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines[0]["benchmark"] == "decode-matmul" and lines[0]["weights_gb"] > 0
    assert [line["rows"] for line in lines[1:]] == [1, 3]
    assert all(line["ours"]["ms"] > 0 and line["mlx"]["gb_per_s"] > 0 and line["ours_vs_mlx"] > 0 for line in lines[1:])
    if importlib.util.find_spec("torch") is not None:  # PyTorch's figure comes from a process of its own
        assert all(line["torch"]["ms"] > 0 and line["ours_vs_torch"] > 0 for line in lines[1:])


def test_timm_init_gives_the_random_weights_timm_starts_from():
    """Layer scales 1e-5 (timm's layer_scale_init_value) and conv/linear biases uniform in +-1/sqrt(fan_in)
    (PyTorch's default), where MLX starts them at 1 and 0; weights and norms are left alone."""
    import math

    import mlx.core as mx
    from mlx.utils import tree_flatten

    from benchmarks.shapes import SMOKE_VISION, timm_init
    from fastvlm_mlx.vision import FastViTHD, VisionConfig

    mx.random.seed(0)
    tower = FastViTHD(
        VisionConfig(layers=list(SMOKE_VISION["layers"]), embed_dims=list(SMOKE_VISION["embed_dims"]), image_size=128)
    )
    before = dict(tree_flatten(tower.parameters()))
    timm_init(tower)
    after = dict(tree_flatten(tower.parameters()))
    assert after.keys() == before.keys()
    scales = [k for k in after if k.rsplit(".", 1)[-1].startswith("layer_scale")]
    biases = [k for k in after if k.endswith(".bias") and before[k[:-4] + "weight"].ndim >= 2]
    assert len(scales) >= 5 and len(biases) >= 10
    for k in scales:
        assert (after[k] == 1e-5).all().item(), k
    for k in biases:
        bound = 1 / math.sqrt(math.prod(before[k[:-4] + "weight"].shape[1:]))
        assert (mx.abs(after[k]) <= bound).all().item() and mx.abs(after[k]).max().item() > 0.3 * bound, k
    for k in set(after) - set(scales) - set(biases):
        assert mx.array_equal(after[k], before[k]).item(), k


def test_server_memory_smoke_run_stays_flat_after_warm_up():
    """Our server, caches off, 20 requests with new images: MLX's memory and the resident set stop growing."""
    proc = run_cli(
        "benchmarks.server",
        "--smoke",
        "--memory",
        "20",
        "--warmup",
        "5",
        "--max-tokens",
        "6",
        "--cache-mb",
        "0,0",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["request"] for r in rows if "request" in r] == list(range(1, 21))
    summary = rows[-1]["memory_summary"]
    assert set(summary) == {
        "resident_memory_bytes",
        "mlx_active_memory_bytes",
        "mlx_peak_memory_bytes",
        "mlx_cache_memory_bytes",
    }
    assert all(v["flat"] for v in summary.values()), summary


def test_structured_smoke_run_reports_constrained_and_free_rates():
    proc = run_cli("benchmarks.structured", "--smoke", timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    header, rows = lines[0], [line for line in lines[1:] if "mode" in line]
    assert header["benchmark"] == "fastvlm-structured" and header["vocabulary"] > 0
    assert [(r["batch"], r["mode"], r["path"]) for r in rows] == [
        (1, "free", "Engine.stream"),
        (1, "constrained", "Engine.stream"),
        (2, "free", "BatchDecoder"),
        (2, "constrained", "BatchDecoder"),
    ]
    assert all(sum(r["tokens"]) > 1 and r["decode_tps"]["min"] > 0 for r in rows), rows
    ratios = {line["batch"]: line["constrained_over_free"] for line in lines if "constrained_over_free" in line}
    assert set(ratios) == {1, 2} and all(x > 0 for x in ratios.values())
    assert "schema/free" in proc.stderr


def test_train_smoke_run_reports_examples_per_second():
    proc = run_cli("benchmarks.train", "--smoke", timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    header, ours = lines[0], lines[1]
    assert header["benchmark"] == "fastvlm-train" and header["machine"]["cores"] >= 1
    assert (header["examples"], header["epochs"], header["batch_size"], header["iters"]) == (8, 1, 2, 4)
    assert ours["system"] == "ours" and "error" not in ours, ours
    assert "fastvlm_mlx.lora" in ours["command"] and "--num-layers -1" in ours["command"]
    assert ours["examples_trained"] == 8
    assert 0 < ours["load_s"] < ours["wall_s"] and 0 < ours["train_wall_s"] < ours["wall_s"]
    assert ours["examples_per_s"] == round(8 / ours["train_wall_s"], 4)
    assert 0 < ours["rss_peak_gb"] < 8
    assert "examples/s" in proc.stderr


def test_train_rejects_an_unknown_peer():
    proc = run_cli("benchmarks.train", "--smoke", "--peers", "nope", timeout=120)
    assert proc.returncode == 2 and "unknown peer" in proc.stderr


def test_live_smoke_run_reports_capture_to_first_token():
    """The page's live mode in Chromium with its fake camera, on the fixture model: every answer timed from frame
    capture to the first token on screen, and the part outside the model a fraction of it."""
    from browser import chromium_path

    chromium_path()  # Chromium from the distribution, or a skip that says so
    proc = run_cli("benchmarks.live", "--smoke", "--answers", "4", "--warmup", "1", timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    header, ours = lines[0], lines[1]
    assert header["benchmark"] == "fastvlm-live" and header["camera"]["width"] == 320
    assert ours["answers"] == ours["answers_with_text"] == 4
    assert 0 < ours["ttft_ms"]["median"] <= ours["ttft_ms"]["p90"]
    assert ours["answers_per_s"] > 0 and 0 < ours["model_ms"] < ours["server_ttft_ms"] < ours["ttft_ms"]["p90"]
    assert 0 < ours["outside_receipt_fraction"] < ours["outside_fraction"] < 1
    assert 0 < ours["image_cache_bytes"] <= ours["image_cache_bound_bytes"]
    assert "outside the model" in proc.stderr
