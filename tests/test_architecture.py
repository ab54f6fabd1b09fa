"""The layering docs/architecture.md describes: the plain model never touches the CPU layer, the CPU
layer is chosen once at load, the runtime never imports the converters (``convert/``, installed as
``fastvlm_convert``), and every switch is listed once.

Device and dtype: float32 (pinned, so that the answers are the transformers reference's exactly), on the default
device; the tests of the CPU layer need it (Linux's CPU) and say so when they skip."""

import json
import re
import subprocess
import sys

import mlx.core as mx
from conftest import FIXTURES, PHOTO, ROOT, rel_err
from precision import requires_cpu_layer

from fastvlm_mlx import load

CPU_KERNEL_MODULES = [
    "fastvlm_mlx.cpu.formulas",
    "fastvlm_mlx.cpu.depthwise",
    "fastvlm_mlx.cpu.vision",
    "fastvlm_mlx.cpu.decoder",
    "fastvlm_mlx.cpu.skinny",
]

# Loads a model, generates, and reports which modules were imported and which CPU kernels were entered.
PROBE = r"""
import json, sys
import fastvlm_mlx
from fastvlm_mlx import generate, load

model, processor = load(sys.argv[1])
text = generate(model, processor, "Describe the image.", image=sys.argv[2], max_tokens=16)
print(json.dumps({
    "modules": sorted(m for m in sys.modules if m.startswith(("fastvlm_mlx", "fastvlm_convert", "convert"))),
    "tower": type(model.vision_tower).__name__,
    "mlp": type(model.language_model.layers[0].mlp).__name__,
    "text": text,
}))
"""


def run_probe(**env):
    import os

    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(FIXTURES / "format_a"), str(PHOTO)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=dict(os.environ, HF_HUB_OFFLINE="1", FASTVLM_MLX_DTYPE="float32", **env),
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_plain_path_never_imports_the_cpu_kernels_and_gives_the_reference(reference):
    arrays, _ = reference
    plain = run_probe(FASTVLM_MLX_CPU="0")
    assert plain["tower"] == "FastViTHD" and plain["mlp"] == "MLP"
    assert not set(CPU_KERNEL_MODULES) & set(plain["modules"]), plain["modules"]
    _, processor = load(str(FIXTURES / "format_a"))
    assert plain["text"] == processor.tokenizer.decode(arrays["greedy_tokens"].tolist())


@requires_cpu_layer
def test_cpu_path_imports_the_cpu_kernels_and_gives_the_reference(reference):
    arrays, _ = reference
    accelerated = run_probe()
    assert accelerated["tower"] == "CpuFastViTHD" and accelerated["mlp"] == "CpuMLP"
    assert set(CPU_KERNEL_MODULES) <= set(accelerated["modules"])
    # the transformers reference's greedy answer, as the plain path's
    _, processor = load(str(FIXTURES / "format_a"))
    assert accelerated["text"] == processor.tokenizer.decode(arrays["greedy_tokens"].tolist())


def test_runtime_never_imports_convert():
    for probe in (run_probe(), run_probe(FASTVLM_MLX_CPU="0")):  # the first has the CPU layer where it exists
        converters = [m for m in probe["modules"] if m.split(".")[0] in ("fastvlm_convert", "convert")]
        assert not converters, probe["modules"]
    for path in (ROOT / "fastvlm_mlx").rglob("*.py"):
        if path.name in ("convert.py", "fuse.py") and path.parent.name == "fastvlm_mlx":
            continue  # the CLI entry points `python -m fastvlm_mlx.convert|fuse`, which no runtime module imports
        source = path.read_text()
        assert not re.search(r"^\s*(from|import) (fastvlm_)?convert\b", source, re.M), path


def plain_and_cpu_models(monkeypatch):
    """The fixture checkpoint loaded without the CPU variants (FASTVLM_MLX_CPU=0), then with them."""
    monkeypatch.setenv("FASTVLM_MLX_CPU", "0")
    plain = load(str(FIXTURES / "format_a"))
    monkeypatch.delenv("FASTVLM_MLX_CPU")
    return plain, load(str(FIXTURES / "format_a"))


@requires_cpu_layer
def test_plain_and_cpu_paths_agree_in_process(reference, monkeypatch):
    """The same checkpoint loaded both ways: vision features and prefill logits agree, and the plain
    model's forward enters no CPU kernel (every kernel the CPU variants call is counted)."""
    from fastvlm_mlx.cpu import decoder, vision

    calls = []
    for module, names in ((vision, ("gelu", "attention", "depthwise_conv2d")), (decoder, ("attention", "swiglu"))):
        for name in names:
            original = getattr(module, name)
            monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))

    arrays, meta = reference
    (plain, processor), (fast, _) = plain_and_cpu_models(monkeypatch)

    def outputs(model):
        ids = processor.encode(meta["prompt_text"])
        embeds = model.embed_prompt(ids, model.encode_image(arrays["pixels"]))
        logits = model(mx.array([[0] * embeds.shape[0]]), input_embeddings=embeds[None])[0, -1]
        features = model.vision_tower(arrays["pixels"])
        mx.eval(logits, features)
        return features, logits

    plain_out = outputs(plain)
    assert calls == []
    fast_out = outputs(fast)
    assert {"gelu", "attention", "swiglu", "depthwise_conv2d"} <= set(calls)
    for a, b in zip(plain_out, fast_out):
        assert rel_err(a, b) <= 1e-5


def test_cpu_layer_only_for_float32():
    model, _ = load(str(FIXTURES / "format_a"), dtype=mx.float16)
    assert type(model.vision_tower).__name__ == "FastViTHD"
    assert type(model.language_model.layers[0].self_attn).__name__ == "Attention"


@requires_cpu_layer
def test_without_a_compiler_decoding_warns_once_and_keeps_mlx_matmul(reference, monkeypatch, tmp_path):
    """Where the C kernels cannot be built, loading says so once and the answer is still the transformers
    reference's (MLX's matmul and attention_cpu take over); FASTVLM_MLX_SKINNY=0 turns the kernel off without a word."""
    import warnings

    import pytest

    from fastvlm_mlx import generate
    from fastvlm_mlx.cpu import attention, native, skinny

    arrays, _ = reference
    for module, name in ((skinny, "_kernels"), (attention, "_kernel"), (native, "_library")):
        monkeypatch.setattr(module, name, None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.warns(UserWarning, match="could not build the C kernels"):
        model, processor = load(str(FIXTURES / "format_a"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(str(FIXTURES / "format_a"))
    assert skinny.matmul(mx.ones((1, 4)), mx.ones((3, 4))) is None
    assert attention.kernel() is None
    text = generate(model, processor, "Describe the image.", image=str(PHOTO), max_tokens=16)
    assert text == processor.tokenizer.decode(arrays["greedy_tokens"].tolist())
    assert not list(tmp_path.glob("fastvlm_mlx/*.so"))  # nothing half-built left behind

    monkeypatch.setattr(skinny, "_kernels", None)
    monkeypatch.setenv("FASTVLM_MLX_SKINNY", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert skinny.kernel() is None


def test_every_switch_is_listed_once():
    from fastvlm_mlx.cpu import SWITCHES

    used = set()
    for path in list((ROOT / "fastvlm_mlx").rglob("*.py")) + list((ROOT / "convert").rglob("*.py")):
        used |= set(re.findall(r"FASTVLM_MLX_[A-Z_]+", path.read_text()))
    assert used == set(SWITCHES), used ^ set(SWITCHES)
    documented = (ROOT / "docs" / "linux-cpu.md").read_text() + (ROOT / "README.md").read_text()
    assert all(name in documented for name in SWITCHES)


@requires_cpu_layer
def test_cpu_tower_takes_several_images_in_one_call(reference, monkeypatch):
    """The CPU tower runs a batch one image at a time; the plain tower's batched pass is the reference."""
    arrays, _ = reference
    pixels = mx.concatenate([arrays["pixels"], arrays["pixels"][:, ::-1], 1.0 - arrays["pixels"]])
    (plain, _), (fast, _) = plain_and_cpu_models(monkeypatch)
    expected, got = plain.vision_tower(pixels), fast.vision_tower(pixels)
    assert got.shape == expected.shape and got.shape[0] == 3
    assert rel_err(expected, got) <= 1e-5


def _imports(path) -> set:
    """Every module a file imports, at any depth (relative imports resolved within fastvlm_mlx)."""
    import ast

    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p) if node.level else node.module
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}
    return found


def test_the_engine_and_the_batched_decoder_know_nothing_of_ranks():
    for name in ("engine.py", "batching.py"):
        path = ROOT / "fastvlm_mlx" / name
        assert not [m for m in _imports(path) if "distributed" in m], name
        assert "cluster" not in path.read_text(), name


def test_the_server_routes_do_not_drive_the_model():
    """Routes reach the model only through the serving layer: no MLX, no mlx-lm, no engine or decoder."""
    imported = _imports(ROOT / "fastvlm_mlx" / "server" / "routes.py")
    core = ("fastvlm_mlx.engine", "fastvlm_mlx.batching", "fastvlm_mlx.mlx_thread", "fastvlm_mlx.distributed")
    assert not [m for m in imported if m.split(".")[0] in ("mlx", "mlx_lm") or m.startswith(core)], imported


def test_only_the_generation_core_calls_mlx_lms_generation():
    """mlx-lm's generation functions (stream_generate, generate_step, BatchGenerator, its prompt caches) are called
    from the engine and the batched decoder alone; lm_internals only names its stream and wired limit."""
    core = {"fastvlm_mlx/engine.py", "fastvlm_mlx/batching.py"}
    calls = ("stream_generate", "generate_step", "BatchGenerator", "LRUPromptCache", "make_prompt_cache")
    for path in (ROOT / "fastvlm_mlx").rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        lm = [m for m in _imports(path) if m.startswith("mlx_lm.generate") or m.startswith("mlx_lm.models.cache")]
        used = [m for m in lm if m.rsplit(".", 1)[-1] in calls]
        if rel not in core:
            assert not used, (rel, used)
