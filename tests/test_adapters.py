"""Fine-tuned adapters (mlx-lm's files) in ``load``, every front-end and ``fastvlm_mlx.fuse``.

The adapters are made here as a training run saves them: mlx-lm's own LoRA or DoRA layers on the fixture model
(``linear_to_lora_layers`` after freezing the base), every adapter parameter random and non-zero (B too, so they
change the output), saved as ``tree_flatten(model.trainable_parameters())``.  That in-memory model, on the plain
path (FASTVLM_MLX_CPU=0), is the reference: what loads from the files must give its logits and its answers.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import FIXTURES, PHOTO, ROOT, assert_clean_error, rel_err, run_cli
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers
from precision import DECODER_LAYERS, PROJECTOR_LAYERS, VISION_LAYERS, requires_cpu_layer, tolerance

from fastvlm_mlx import generate, load
from fastvlm_mlx.adapters import adapter_layers
from fastvlm_mlx.errors import FastVLMError

BASE = FIXTURES / "format_c"
BASE_4BIT = FIXTURES / "format_c_4bit"
LORA = {"rank": 4, "scale": 2.0, "dropout": 0.0}
LAYERS = VISION_LAYERS + PROJECTOR_LAYERS + DECODER_LAYERS
# The same model computing the same sums in another order: LoRA fused into the weights, the CPU layer's kernels
FUSED_TOL = tolerance(1e-5, LAYERS)
QUESTION = "What is in the image?"


def load_plain(path, **options):
    """``load`` without the CPU layer: mlx-lm's and MLX's own modules, as on a GPU."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTVLM_MLX_CPU", "0")
        return load(str(path), **options)


def make_adapters(folder, base=BASE, kind="lora", num_layers=2, train_projector=False, train_vision=False, seed=0):
    """Adapters as a training run saves them, in ``folder``; returns the adapted in-memory model and processor
    (on the plain path)."""
    model, processor = load_plain(base)
    mx.random.seed(seed)
    model.freeze()
    if kind == "full":
        layer = model.language_model.model.layers[-1]
        layer.unfreeze()
        layer.update(_jittered(layer.parameters()))
    else:
        linear_to_lora_layers(model.language_model, num_layers, dict(LORA), use_dora=kind == "dora")
        for _, layer in adapter_layers(model):
            layer.lora_b = 0.2 * mx.random.normal(layer.lora_b.shape)
            if kind == "dora":
                layer.m = layer.m * (1 + 0.1 * mx.random.normal(layer.m.shape))
    if train_projector:
        model.projector.unfreeze()
        model.projector.update(_jittered(model.projector.parameters()))
    if train_vision:
        model.vision_tower.unfreeze()
        model.vision_tower.update(_jittered(model.vision_tower.parameters()))
    weights = dict(tree_flatten(model.trainable_parameters()))
    mx.eval(model.parameters())
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "adapters.safetensors"), weights)
    config = {
        "fine_tune_type": kind,
        "num_layers": num_layers,
        "lora_parameters": LORA,
        "train_projector": train_projector,
        "train_vision": train_vision,
        "model": str(base),
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return model, processor


def _jittered(params):
    from mlx.utils import tree_map

    return tree_map(lambda w: (w * (1 + 0.2 * mx.random.normal(w.shape))).astype(w.dtype), params)


def first_logits(model, processor, reference):
    """The logits of the first generated position for the reference prompt with the reference image."""
    arrays, meta = reference
    embeddings = model.embed_prompt(processor.encode(meta["prompt_text"]), model.encode_image(arrays["pixels"]))
    logits = model(mx.array([[0] * embeddings.shape[0]]), input_embeddings=embeddings[None])[0, -1]
    mx.eval(logits)
    return logits


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """(adapter folder, the in-memory LoRA model, its processor)."""
    folder = tmp_path_factory.mktemp("lora") / "adapters"
    return (folder, *make_adapters(folder))


@pytest.fixture(scope="module")
def loaded_lora(lora):
    """The base with the LoRA adapters, loaded as the commands load it (the CPU layer where it exists)."""
    return load(str(BASE), adapter_path=str(lora[0]))


# ------------------------------------------------------------------------------------------- load()
def test_lora_adapters_load_as_the_model_that_made_them(lora, reference):
    folder, made, processor = lora
    expected = first_logits(made, processor, reference)
    base = first_logits(*load_plain(BASE), reference)
    assert rel_err(base, expected) > 1e-2  # the adapters change the output
    model, processor = load_plain(BASE, adapter_path=str(folder))
    assert len(adapter_layers(model)) == 2 * 7  # every linear layer of both decoder layers
    assert rel_err(first_logits(model, processor, reference), expected) <= 1e-6


@pytest.mark.parametrize("kind", ["dora", "full"])
def test_dora_and_full_fine_tuning_load(kind, tmp_path, reference):
    made, processor = make_adapters(tmp_path / kind, kind=kind, num_layers=1, seed=1)
    expected = first_logits(made, processor, reference)
    assert rel_err(first_logits(*load_plain(BASE), reference), expected) > 1e-2
    model, processor = load_plain(BASE, adapter_path=str(tmp_path / kind))
    assert len(adapter_layers(model)) == (7 if kind == "dora" else 0)
    assert rel_err(first_logits(model, processor, reference), expected) <= 1e-6


@pytest.mark.parametrize("part", ["projector", "vision_tower"])
def test_a_projector_or_tower_trained_with_the_adapters_loads(part, tmp_path, reference):
    flags = {"train_projector": part == "projector", "train_vision": part == "vision_tower"}
    made, processor = make_adapters(tmp_path / "a", seed=2, **flags)
    weights = mx.load(str(tmp_path / "a" / "adapters.safetensors"))
    own = {k: v for k, v in weights.items() if k.startswith(part + ".")}
    assert own and len(own) == len(tree_flatten(getattr(made, part).parameters()))
    model, processor = load_plain(BASE, adapter_path=str(tmp_path / "a"))
    params = dict(tree_flatten(model.parameters()))
    assert all(mx.array_equal(params[k], v) for k, v in own.items())
    assert rel_err(first_logits(model, processor, reference), first_logits(made, processor, reference)) <= 1e-6


@requires_cpu_layer
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_the_cpu_layer_fuses_the_adapters_with_the_same_logits(kind, tmp_path, reference):
    """On the CPU layer the adapters are fused into the weights at load: no LoRA layer is left, the decoder's
    linear layers are the CPU variants, and the logits are the unfused LoRA model's on the plain path."""
    from fastvlm_mlx.cpu.decoder import CpuLinear

    made, processor = make_adapters(tmp_path / kind, kind=kind, seed=3)
    model, _ = load(str(BASE), adapter_path=str(tmp_path / kind))
    assert adapter_layers(model) == []
    assert type(model.language_model.model.layers[0].self_attn.q_proj) is CpuLinear
    expected = first_logits(made, processor, reference)
    assert rel_err(first_logits(model, processor, reference), expected) <= FUSED_TOL
    assert rel_err(first_logits(*load(str(BASE)), reference), expected) > 1e-2


def test_qlora_adapters_on_the_4bit_fixture_load_and_generate(tmp_path, reference):
    made, processor = make_adapters(tmp_path / "q", base=BASE_4BIT, seed=4)
    q_proj = made.language_model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LoRALinear) and isinstance(q_proj.linear, nn.QuantizedLinear)
    expected = first_logits(made, processor, reference)
    model, processor = load(str(BASE_4BIT), adapter_path=str(tmp_path / "q"))
    q_proj = model.language_model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LoRALinear) and isinstance(q_proj.linear, nn.QuantizedLinear)  # kept unfused
    assert rel_err(first_logits(model, processor, reference), expected) <= FUSED_TOL
    answer = generate(model, processor, QUESTION, image=PHOTO, max_tokens=8)
    proc = run_cli(
        "fastvlm_mlx.generate", "-m", str(BASE_4BIT), "--adapter-path", str(tmp_path / "q"),
        "-i", str(PHOTO), "-p", QUESTION, "--max-tokens", "8",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == answer + "\n"
    assert answer != generate(*load(str(BASE_4BIT)), QUESTION, image=PHOTO, max_tokens=8)


# -------------------------------------------------------------------------------------- front-ends
def test_generate_chat_and_batch_take_adapter_path(lora, loaded_lora, tmp_path):
    folder = str(lora[0])
    answer = generate(*loaded_lora, QUESTION, image=PHOTO, max_tokens=8)
    assert answer != generate(*load(str(BASE)), QUESTION, image=PHOTO, max_tokens=8)
    common = ["-m", str(BASE), "--adapter-path", folder, "--max-tokens", "8"]
    proc = run_cli("fastvlm_mlx.generate", *common, "-i", str(PHOTO), "-p", QUESTION)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == answer + "\n"
    proc = run_cli("fastvlm_mlx.chat", *common, "-i", str(PHOTO), input=QUESTION + "\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[0] == answer
    out = tmp_path / "out.jsonl"
    proc = run_cli("fastvlm_mlx.batch", *common, "-i", str(PHOTO), "-o", str(out), "-p", QUESTION)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["text"] for line in out.read_text().splitlines()] == [answer]


def test_the_server_takes_adapter_path(lora, loaded_lora):
    httpx = pytest.importorskip("httpx", reason="the server test needs httpx (pip install -e '.[test]')")
    openai = pytest.importorskip("openai", reason="the server test needs the openai client (pip install -e '.[test]')")
    from test_server import free_port

    port = free_port()
    command = [sys.executable, "-m", "fastvlm_mlx.server", "-m", str(BASE), "--adapter-path", str(lora[0])]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    server = subprocess.Popen(
        [*command, "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "the server did not start within 120 s"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model="fastvlm", messages=[{"role": "user", "content": "Hello there."}], max_tokens=8, temperature=0
        )
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=20)
    assert reply.choices[0].message.content == generate(*loaded_lora, "Hello there.", max_tokens=8)


def test_ranked_runs_take_adapter_path(lora, loaded_lora, tmp_path):
    """Tensor parallel splits the fused weights; pipeline parallel on the plain path keeps the LoRA layers."""
    from test_distributed import Ranks

    folder = str(lora[0])
    for mode, plain in (("tensor", False), ("pipeline", True)):
        model, processor = load_plain(BASE, adapter_path=folder) if plain else loaded_lora
        expected = generate(model, processor, QUESTION, image=PHOTO, max_tokens=8)
        cmd = ["-m", "fastvlm_mlx.generate", "-m", str(BASE), "--adapter-path", folder, "-i", str(PHOTO)]
        cmd += ["-p", QUESTION, "--max-tokens", "8", "--parallel", mode]
        with pytest.MonkeyPatch.context() as mp:
            if plain:
                mp.setenv("FASTVLM_MLX_CPU", "0")
            with Ranks(tmp_path, cmd) as ranks:
                (code0, out0, err0), (code1, out1, err1) = ranks.wait()
        assert code0 == 0 and code1 == 0, err0 + err1
        assert out0 == expected + "\n" and out1 == "", mode


def test_tensor_parallel_refuses_lora_over_a_quantized_base(tmp_path):
    """mlx-lm cannot split a LoRA layer over ranks, and fusing into 4-bit weights would round the update."""
    from test_distributed import Ranks

    make_adapters(tmp_path / "q", base=BASE_4BIT, seed=7)
    cmd = ["-m", "fastvlm_mlx.generate", "-m", str(BASE_4BIT), "--adapter-path", str(tmp_path / "q")]
    with Ranks(tmp_path, [*cmd, "-p", QUESTION, "--parallel", "tensor"]) as ranks:
        results = ranks.wait()
    for code, _, err in results:
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 1 and len(lines) == 1 and "cannot split LoRA layers over a quantized model" in lines[0], err


# ------------------------------------------------------------------------------------------- fuse
def test_fuse_writes_a_model_with_the_same_logits(lora, tmp_path, reference):
    folder, made, processor = lora
    out = tmp_path / "fused"
    proc = run_cli("fastvlm_mlx", "fuse", "--model", str(BASE), "--adapter-path", str(folder), "--save-path", str(out))
    assert proc.returncode == 0, proc.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    fused, processor = load_plain(out)
    assert adapter_layers(fused) == []
    assert rel_err(first_logits(fused, processor, reference), first_logits(made, processor, reference)) <= FUSED_TOL
    assert_clean_error(
        run_cli("fastvlm_mlx.fuse", "--model", str(BASE), "--adapter-path", str(folder), "--save-path", str(out)),
        "not empty",
    )


@pytest.mark.parametrize("base, kind", [(BASE, "dora"), (BASE_4BIT, "lora")])
def test_fuse_dora_and_de_quantized_qlora(base, kind, tmp_path, reference):
    from fastvlm_convert.fuse import fuse_model, write_model

    made, processor = make_adapters(tmp_path / "a", base=base, kind=kind, train_projector=kind == "dora", seed=5)
    model, src = fuse_model(str(base), str(tmp_path / "a"), dequantize=True)
    write_model(model, src, tmp_path / "fused")
    config = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert "quantization" not in config
    fused, processor = load_plain(tmp_path / "fused")
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in fused.named_modules())
    # de-quantized weights times the input equal the quantized matmul up to float32 rounding
    assert rel_err(first_logits(fused, processor, reference), first_logits(made, processor, reference)) <= FUSED_TOL


def test_fuse_keeps_a_quantized_base_quantized(tmp_path, reference):
    from fastvlm_convert.fuse import fuse_model, write_model

    make_adapters(tmp_path / "a", base=BASE_4BIT, seed=6)
    model, src = fuse_model(str(BASE_4BIT), str(tmp_path / "a"))
    write_model(model, src, tmp_path / "fused")
    assert json.loads((tmp_path / "fused" / "config.json").read_text())["quantization"]["bits"] == 4
    fused, _ = load_plain(tmp_path / "fused")
    assert isinstance(fused.language_model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert adapter_layers(fused) == []


def test_fuse_into_the_app_bundle(ct, lora, tmp_path):
    """--app-bundle writes Apple's app folder through the converter's writer, with the fused weights."""
    from fastvlm_convert.fuse import fuse_model, main

    folder = str(lora[0])
    args = ["--model", str(BASE), "--adapter-path", folder, "--save-path", str(tmp_path / "app")]
    with pytest.raises(SystemExit) as done:  # typer's standalone mode
        main([*args, "--app-bundle", "--coreml-precision", "float32"])
    assert not done.value.code
    bundle = mx.load(str(tmp_path / "app" / "model.safetensors"))
    fused, _ = fuse_model(str(BASE), folder)
    for name, value in tree_flatten(fused.language_model.parameters()):
        assert mx.array_equal(bundle[f"language_model.{name}"], value), name
    assert (tmp_path / "app" / "fastvithd.mlpackage").is_dir()


# ------------------------------------------------------------------------------------------ errors
def _edit_config(folder, **changes):
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))


def _rewrite_weights(folder, change):
    path = folder / "adapters.safetensors"
    mx.save_safetensors(str(path), change(mx.load(str(path))))


def _not_a_folder(folder):
    (folder / "adapters.safetensors").rename(folder.with_name("adapters.safetensors"))
    return folder.with_name("adapters.safetensors")


BAD_ADAPTERS = {
    "no such adapter folder": lambda f: f.rename(f.with_name("gone")) and f,
    "not a folder": _not_a_folder,
    "no adapter_config.json": lambda f: (f / "adapter_config.json").unlink(),
    "no adapters.safetensors": lambda f: (f / "adapters.safetensors").unlink(),
    "not a readable json": lambda f: (f / "adapter_config.json").write_text("{nope"),
    "not a readable safetensors": lambda f: (f / "adapters.safetensors").write_bytes(b"nope"),
    "fine_tune_type must be": lambda f: _edit_config(f, fine_tune_type="qlora"),
    "rank and scale": lambda f: _edit_config(f, lora_parameters={"rank": 4}),
    "of another shape": lambda f: _edit_config(f, lora_parameters={**LORA, "rank": 8}),
    # adapters of a deeper model of the same width: layers the fixture does not have
    "no place in this model": lambda f: _rewrite_weights(
        f, lambda w: {k.replace("layers.0.", "layers.5."): v for k, v in w.items()}
    ),
    "missing from the file": lambda f: _rewrite_weights(
        f, lambda w: {k: v for k, v in w.items() if "up_proj" not in k}
    ),
    "projector": lambda f: _edit_config(f, train_projector=True),
}


@pytest.mark.parametrize("problem", list(BAD_ADAPTERS))
def test_bad_adapters_are_one_line_errors(problem, lora, tmp_path):
    import shutil

    folder = tmp_path / "adapters"
    shutil.copytree(lora[0], folder)
    changed = BAD_ADAPTERS[problem](folder)
    folder = changed if isinstance(changed, Path) else folder  # a case may name another path
    with pytest.raises(FastVLMError) as e:
        load(str(BASE), adapter_path=str(folder))
    assert problem.lower() in str(e.value).lower() and str(folder) in str(e.value)
    assert "\n" not in str(e.value)


def test_a_bad_adapter_path_fails_the_command_in_one_line(tmp_path):
    missing = tmp_path / "nope"
    proc = run_cli("fastvlm_mlx.generate", "-m", str(BASE), "--adapter-path", str(missing), "-p", "hi")
    assert_clean_error(proc, str(missing), "no such adapter folder")
