"""CoreML export of FastViTHD (convert/coreml.py), checked without a Mac.

The saved .mlpackage is read back (``skip_model_load=True``, so no CoreML runtime is needed), its ML
Program -- the one coremltools produced after all its optimisation passes -- is turned back into a pymil
program and evaluated by a small NumPy interpreter (tests/mil_interpreter.py) that rounds every
intermediate to the dtype the program declares, so fp16 packages really are computed in fp16.  The
results are compared with the MLX tower and with the PyTorch reference outputs.  On macOS the package is
also run by CoreML itself.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, assert_clean_error, run_cli

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mil_interpreter import SUPPORTED_OPS, UnsupportedOp, op_types, run_program  # noqa: E402

FP32_TOL = 1e-4
FP16_TOL = 1e-2


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def model():
    import mlx.core as mx

    from fastvlm_mlx import load

    m, _ = load(str(FIXTURES / "format_a"), dtype=mx.float32)
    return m


@pytest.fixture(scope="module")
def ref():
    import mlx.core as mx

    arrays = mx.load(str(FIXTURES / "reference.safetensors"))
    return {k: np.array(v) for k, v in arrays.items()}


@pytest.fixture(scope="module")
def mlx_features(model, ref):
    import mlx.core as mx

    out = np.array(model.vision_tower(mx.array(ref["pixels"])))
    b, h, w, c = out.shape
    return out.reshape(b, h * w, c)


@pytest.fixture(scope="module")
def packages(ct, model, tmp_path_factory):
    """The fixture model exported at both precisions (default contract: tensor in, image_features out)."""
    from fastvlm_convert.coreml import export_coreml

    root = tmp_path_factory.mktemp("coreml")
    return {p: export_coreml(model, root / f"{p}" / "fastvithd.mlpackage", precision=p) for p in ("float32", "float16")}


def _nchw(pixels_nhwc):
    return np.ascontiguousarray(np.asarray(pixels_nhwc, np.float32).transpose(0, 3, 1, 2))


# --------------------------------------------------------------------------------------------------
# numerics of the optimised program


@pytest.mark.parametrize("precision,tol", [("float32", FP32_TOL), ("float16", FP16_TOL)])
def test_program_matches_mlx_and_pytorch(packages, ref, mlx_features, precision, tol):
    from fastvlm_convert.coreml import load_program

    prog = load_program(packages[precision])
    ops = op_types(prog)
    assert set(ops) <= SUPPORTED_OPS
    out = run_program(prog, {"images": _nchw(ref["pixels"])})["image_features"]
    assert out.dtype == np.float32 and out.shape == (1, 16, 128)
    err_mlx, err_pt = _rel(out, mlx_features), _rel(out, ref["vision_features"])
    print(f"{precision}: rel max error vs MLX {err_mlx:.2e}, vs PyTorch {err_pt:.2e}")
    assert err_mlx <= tol and err_pt <= tol
    if precision == "float16":
        # the program really computes in fp16 (and the interpreter really rounds): casts in and out, fp16 inside
        assert ops.get("cast", 0) >= 2
        assert err_mlx > 1e-5, "fp16 program agrees to fp32 accuracy: fp16 rounding is not being simulated"
        main = prog.functions["main"]
        assert main.outputs[0].dtype.__name__ == "fp32"
        conv_dtypes = {op.outputs[0].dtype.__name__ for op in main.operations if op.op_type == "conv"}
        assert conv_dtypes == {"fp16"}


def test_interpreter_refuses_unknown_ops(ct):
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4), dtype=types.fp32)], opset_version=ct.target.iOS17)
    def prog(x):
        return mb.tanh(x=x)

    with pytest.raises(UnsupportedOp, match="tanh"):
        run_program(prog, {"x": np.zeros((1, 4), np.float32)})


def test_interpreter_catches_a_wrong_program(ct, model, ref, mlx_features, tmp_path):
    """Sanity check of the check: a package with two attention heads swapped must fail the comparison."""
    import mlx.core as mx

    from fastvlm_convert.coreml import export_coreml, load_program

    attn = model.vision_tower.stages[4].blocks[0].token_mixer
    saved = attn.proj.weight
    c = saved.shape[1]
    perm = mx.concatenate([mx.arange(c // 2, c), mx.arange(0, c // 2)])
    attn.proj.weight = saved[:, perm]
    try:
        path = export_coreml(model, tmp_path / "wrong.mlpackage", precision="float32")
    finally:
        attn.proj.weight = saved
    out = run_program(load_program(path), {"images": _nchw(ref["pixels"])})["image_features"]
    assert _rel(out, mlx_features) > 1e-2


# --------------------------------------------------------------------------------------------------
# the package: contract and weights


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_package_contract(ct, packages, precision):
    mlmodel = ct.models.MLModel(str(packages[precision]), skip_model_load=True)
    spec = mlmodel.get_spec()
    assert spec.WhichOneof("Type") == "mlProgram"
    assert spec.specificationVersion >= ct._SPECIFICATION_VERSION_IOS_17
    (inp,), (out,) = spec.description.input, spec.description.output
    assert inp.name == "images" and inp.type.WhichOneof("Type") == "multiArrayType"
    assert list(inp.type.multiArrayType.shape) == [1, 3, 256, 256]
    assert inp.type.multiArrayType.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32
    assert out.name == "image_features"
    assert list(out.type.multiArrayType.shape) == [1, 16, 128]
    assert out.type.multiArrayType.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32


def _expected_weights(tower):
    """Op name in the package -> (weight, bias) computed from the MLX tower: OIHW for convs, gamma/beta for norms.

    coremltools folds each layer scale into the conv before it (fuse_conv_scale), so those convs are
    named after the mul and carry weight * scale; everything else is the source weight, transposed.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    params = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(tower.parameters())}
    expected = {}
    for key, w in params.items():
        if not key.endswith(".weight"):
            continue
        path = key[: -len(".weight")]
        weight = {4: lambda v: v.transpose(0, 3, 1, 2), 2: lambda v: v[:, :, None, None], 1: lambda v: v}[w.ndim](w)
        expected["vision_tower." + path] = (weight, params.get(path + ".bias"))
    for key, scale in params.items():
        if ".layer_scale" not in key:
            continue
        block, which = key.rsplit(".", 1)
        source = block + (".token_mixer.proj" if which == "layer_scale_1" else ".mlp.fc2")
        w, b = expected.pop("vision_tower." + source)
        expected[f"vision_tower.{block}.{which}_mul"] = (w * scale[:, None, None, None], b * scale)
    return {k.replace(".", "_"): v for k, v in expected.items()}


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_package_weights_equal_source(ct, packages, model, precision):
    """Every conv and norm of the saved package holds exactly the MLX weights (fp16-rounded at float16)."""
    from fastvlm_convert.coreml import load_program

    prog = load_program(packages[precision])
    expected = _expected_weights(model.vision_tower)
    found = {}
    for op in prog.functions["main"].operations:
        name = op.name.replace("_cast_fp16", "")
        if op.op_type == "conv":
            found[name] = (op.weight.val, None if op.bias is None else op.bias.val)
        elif op.op_type == "layer_norm":
            found[name] = (op.gamma.val, op.beta.val)
    assert sorted(found) == sorted(expected)
    dtype = np.float32 if precision == "float32" else np.float16
    rtol = 1e-6 if precision == "float32" else 2e-3  # fp16: one rounding (two for a folded layer scale)
    for name, (weight, bias) in expected.items():
        got_w, got_b = found[name]
        assert got_w.dtype == dtype, name
        np.testing.assert_allclose(got_w.astype(np.float32), weight, rtol=rtol, atol=1e-7, err_msg=name)
        assert (got_b is None) == (bias is None), name
        if bias is not None:
            np.testing.assert_allclose(np.asarray(got_b, np.float32), bias, rtol=rtol, atol=1e-7, err_msg=name)


def test_projector_and_image_input(ct, model, ref, tmp_path):
    """The options: CVPixelBuffer-style image input (scale 1/255) and the projector inside the package."""
    import mlx.core as mx

    from fastvlm_convert.coreml import export_coreml, load_program

    path = export_coreml(
        model, tmp_path / "fastvithd.mlpackage", precision="float32", image_input=True, include_projector=True
    )
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    (inp,), (out,) = spec.description.input, spec.description.output
    assert inp.name == "images" and inp.type.WhichOneof("Type") == "imageType"
    assert (inp.type.imageType.width, inp.type.imageType.height) == (256, 256)
    assert inp.type.imageType.colorSpace == ct.proto.FeatureTypes_pb2.ImageFeatureType.RGB
    assert out.name == "image_embeddings" and list(out.type.multiArrayType.shape) == [1, 16, 64]

    bytes_ = np.rint(ref["pixels"] * 255.0)  # what CoreML hands the program for an 8-bit image
    pixels = (bytes_ / 255.0).astype(np.float32)
    result = run_program(load_program(path), {"images": _nchw(bytes_)})["image_embeddings"]
    expected = np.array(model.encode_image(mx.array(pixels)))
    assert _rel(result, expected) <= FP32_TOL
    if np.abs(pixels - ref["pixels"]).max() == 0:  # the fixture pixels are 8-bit values already
        assert _rel(result, ref["image_embeds"]) <= FP32_TOL


def _randomized_full_size(seed: int = 0):
    """The published FastViTHD shape with random weights scaled so activations stay O(1) through all 44 blocks."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    from fastvlm_mlx.vision import FastViTHD, VisionConfig

    mx.random.seed(seed)
    tower = FastViTHD(VisionConfig())
    rng = np.random.default_rng(seed)
    new = []
    for k, v in tree_flatten(tower.parameters()):
        shape = v.shape
        if k.endswith("weight") and len(shape) == 4:  # OHWI convs: unit gain
            a = rng.normal(0, np.sqrt(1.0 / np.prod(shape[1:])), shape)
        elif k.endswith("weight") and len(shape) == 2:  # linears: He gain before a GELU, unit otherwise
            gain = 2.0 if any(s in k for s in ("fc1", "stem", "pointwise")) else 1.0
            a = rng.normal(0, np.sqrt(gain / shape[1]), shape)
        elif ".norm." in k and k.endswith("weight"):
            a = 1 + 0.1 * rng.normal(size=shape)
        elif "layer_scale" in k:
            a = rng.uniform(0.05, 0.2, shape)
        else:
            a = 0.1 * rng.normal(size=shape)
        new.append((k, mx.array(a.astype(np.float32))))
    tower.update(tree_unflatten(new))
    mx.eval(tower.parameters())
    return tower


def test_full_size_fastvithd_at_128(ct, tmp_path):
    """The published architecture (122.7M parameters, 3072 channels) exports; checked at 128px to stay fast."""
    import mlx.core as mx

    from fastvlm_convert.coreml import export_coreml, load_program

    tower = _randomized_full_size()
    path = export_coreml(tower, tmp_path / "fastvithd.mlpackage", resolution=128, precision="float16")
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    assert list(spec.description.input[0].type.multiArrayType.shape) == [1, 3, 128, 128]
    assert list(spec.description.output[0].type.multiArrayType.shape) == [1, 4, 3072]
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert 240e6 < size < 250e6  # 122.7M fp16 weights
    pixels = np.random.default_rng(1).uniform(size=(1, 128, 128, 3)).astype(np.float32)
    expected = np.array(tower(mx.array(pixels))).reshape(1, 4, 3072)
    assert np.abs(expected).max() > 0.1
    out = run_program(load_program(path), {"images": _nchw(pixels)})["image_features"]
    err = _rel(out, expected)
    print(f"full-size FastViTHD, 128px, float16: rel max error vs MLX {err:.2e}")
    assert err <= FP16_TOL


def test_bad_options(ct, model, tmp_path):
    from fastvlm_convert.coreml import export_coreml
    from fastvlm_mlx import FastVLMError

    with pytest.raises(FastVLMError, match="multiple of 64"):
        export_coreml(model, tmp_path / "a.mlpackage", resolution=100)
    with pytest.raises(FastVLMError, match="precision"):
        export_coreml(model, tmp_path / "a.mlpackage", precision="int8")
    with pytest.raises(FastVLMError, match=".mlpackage"):
        export_coreml(model, tmp_path / "a.mlmodel")
    with pytest.raises(FastVLMError, match="projector"):
        export_coreml(model.vision_tower, tmp_path / "a.mlpackage", include_projector=True)
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------------
# runtime: the CoreML tower in place of the MLX one


def test_coreml_tower_glue(ct, model, packages, ref, mlx_features):
    """CoreMLVisionTower's layout handling, with the interpreter standing in for MLModel.predict."""
    import mlx.core as mx

    from fastvlm_convert.coreml import load_program
    from fastvlm_mlx.coreml_vision import CoreMLVisionTower

    prog = load_program(packages["float32"])
    tower = CoreMLVisionTower(lambda inputs: run_program(prog, inputs), resolution=256)
    pixels = mx.array(ref["pixels"])
    features = tower(pixels)
    assert features.shape == (1, 4, 4, 128) and features.dtype == mx.float32
    assert _rel(np.array(features).reshape(1, 16, 128), mlx_features) <= FP32_TOL
    expected = np.array(model.encode_image(pixels))
    mlx_tower = model.vision_tower
    model.vision_tower = tower
    try:
        assert _rel(np.array(model.encode_image(pixels)), expected) <= FP32_TOL
    finally:
        model.vision_tower = mlx_tower


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the error message off macOS")
def test_coreml_backend_needs_macos():
    from fastvlm_mlx import FastVLMError, load

    with pytest.raises(FastVLMError, match="macOS"):
        load(str(FIXTURES / "format_a"), vision_backend="coreml")
    with pytest.raises(FastVLMError, match="vision_backend"):
        load(str(FIXTURES / "format_a"), vision_backend="ane")


@pytest.mark.skipif(
    sys.platform != "darwin",
    reason=f"CoreML prediction needs macOS (this is {sys.platform}); "
    "the package is checked by the MIL interpreter instead",
)
def test_coreml_predict_on_macos(ct, model, packages, ref, mlx_features, tmp_path):
    import shutil

    import mlx.core as mx

    from fastvlm_mlx import load

    for precision, tol in (("float32", FP32_TOL), ("float16", FP16_TOL)):
        mlmodel = ct.models.MLModel(str(packages[precision]), compute_units=ct.ComputeUnit.CPU_ONLY)
        out = mlmodel.predict({"images": _nchw(ref["pixels"])})["image_features"]
        assert _rel(out, mlx_features) <= tol, precision
    directory = tmp_path / "model"
    shutil.copytree(FIXTURES / "format_a", directory)
    shutil.copytree(packages["float32"], directory / "fastvithd.mlpackage")
    coreml_model, _ = load(str(directory), dtype=mx.float32, vision_backend="coreml")
    got = coreml_model.encode_image(mx.array(ref["pixels"]))
    assert _rel(np.array(got), np.array(model.encode_image(mx.array(ref["pixels"])))) <= 1e-3


# --------------------------------------------------------------------------------------------------
# CLI


def _convert_main(args) -> int:
    """``python -m fastvlm_mlx.convert ARGS`` in this process (cheaper than a subprocess); the exit status."""
    from fastvlm_mlx.convert import main

    try:
        return main(args)
    except SystemExit as e:
        return e.code or 0


def test_cli_writes_package_next_to_weights(ct, tmp_path, capsys):
    out = tmp_path / "mlx"
    proc = run_cli(
        "fastvlm_mlx.convert",
        "--hf-path",
        str(FIXTURES / "format_a"),
        "--mlx-path",
        str(out),
        "--dtype",
        "float32",
        "--coreml",
        "--coreml-precision",
        "float32",
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "Running MIL" not in proc.stderr
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    package = out / "fastvithd.mlpackage"
    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    assert spec.description.output[0].name == "image_features"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers

    # refuses to overwrite, and leaves what is there alone
    before = sorted(p.name for p in out.iterdir())
    assert _convert_main(["--hf-path", str(FIXTURES / "format_a"), "--mlx-path", str(out), "--coreml"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists" in err[0] and "--force" in err[0]
    assert sorted(p.name for p in out.iterdir()) == before


def test_cli_coreml_only(ct, tmp_path, capsys):
    main = _convert_main
    src = FIXTURES / "format_a"
    out = tmp_path / "app"
    assert main(["--hf-path", str(src), "--mlx-path", str(out), "--coreml-only", "--coreml-resolution", "128"]) == 0
    package = out / "fastvithd.mlpackage"
    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    assert list(spec.description.input[0].type.multiArrayType.shape) == [1, 3, 128, 128]
    assert sorted(p.name for p in out.iterdir()) == ["fastvithd.mlpackage"]

    capsys.readouterr()
    assert main(["--hf-path", str(src), "--mlx-path", str(out), "--coreml-only"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--force" in err[0]

    named = tmp_path / "encoder.mlpackage"
    assert main(["--hf-path", str(src), "--mlx-path", str(named), "--coreml-only", "--coreml-image-input"]) == 0
    assert named.is_dir()
    assert main(["--hf-path", str(src), "--mlx-path", str(named), "--coreml-only", "--force"]) == 0
    inp = ct.models.MLModel(str(named), skip_model_load=True).get_spec().description.input[0]
    assert inp.type.WhichOneof("Type") == "multiArrayType"  # replaced by the --force run

    assert (
        main(["--hf-path", str(src), "--mlx-path", str(tmp_path / "x"), "--coreml-only", "--coreml-resolution", "100"])
        == 1
    )
    assert "multiple of 64" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_without_coremltools(tmp_path):
    """coremltools is optional: without it --coreml is one clear error line, and nothing is written."""
    import os
    import subprocess

    out = tmp_path / "mlx"
    code = (
        "import sys; sys.modules['coremltools'] = None; "
        "from fastvlm_mlx.convert import main; sys.exit(main(sys.argv[1:]))"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for flags in (["--coreml"], ["--coreml-only"]):
        args = [sys.executable, "-c", code, "--hf-path", str(FIXTURES / "format_a"), "--mlx-path", str(out), *flags]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
        assert_clean_error(proc, "coremltools", "pip install")
        assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the error message off macOS")
def test_generate_cli_coreml_backend_off_macos():
    proc = run_cli(
        "fastvlm_mlx.generate", "--model", str(FIXTURES / "format_a"), "--prompt", "hi", "--vision-backend", "coreml"
    )
    assert_clean_error(proc, "macOS")
