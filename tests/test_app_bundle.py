"""--app-bundle (convert/app_bundle.py): the model folder of Apple's FastVLM app, checked without a Mac.

What the app reads is fixed by app/FastVLM/FastVLM.swift in apple/ml-fastvlm and by the mlx-swift-examples
loader it uses (MLXLMCommon/Load.swift, MLXVLM/VLMModelFactory.swift). The checks below restate those
Swift requirements independently of the writer: the config keys the Codable structs need, the parameter
tree the Swift modules declare (rebuilt here from config.json alone, with the shapes Swift would give them),
and the tokenizer as swift-transformers reads it (tokenizer.json only).
"""

import json
import sys

import numpy as np
import pytest
from conftest import FIXTURES, assert_clean_error

SRC = FIXTURES / "format_a"

# FastVLM.swift, struct FastVLMConfiguration: the non-optional properties of VisionConfiguration,
# TextConfiguration and BaseConfiguration, by their CodingKeys (all three decode the same flat object).
SWIFT_REQUIRED_CONFIG_KEYS = {
    "mm_hidden_size": int,  # VisionConfiguration.hiddenSize
    "model_type": str,  # TextConfiguration.modelType, BaseConfiguration.modelType (and MLXLMCommon's)
    "hidden_size": int,
    "num_hidden_layers": int,
    "intermediate_size": int,
    "num_attention_heads": int,
    "vocab_size": int,
    "num_key_value_heads": int,
    "image_token_index": int,  # BaseConfiguration.imageTokenId
}
# Optional there (Swift default in the comment); when present they must still decode.
SWIFT_OPTIONAL_CONFIG_KEYS = {
    "rms_norm_eps": float,  # 1e-6
    "max_position_embeddings": int,  # 32768
    "rope_theta": float,  # 1_000_000
    "rope_traditional": bool,  # false
    "rope_scaling": dict,  # ["mrope_section": [2, 1, 1]]; any other dict without mrope_section is a fatalError
    "tie_word_embeddings": bool,  # TRUE: an untied model must say so, or its lm_head is an unused key
}
# FastVLM.swift, FastVLMPreProcessorConfiguration (+ processor_class for MLXVLM's BaseProcessorConfiguration)
SWIFT_PREPROCESSOR_KEYS = {
    "image_mean": list,
    "image_std": list,
    "size": dict,
    "crop_size": dict,
    "processor_class": str,
}
APP_FILES = {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "fastvithd.mlpackage",
    "chat_template.jinja",  # copied from the source checkpoint
}


def _decodes_as(value, kind) -> bool:
    if kind is float:  # a JSON number decodes as Swift Float
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return type(value) is int
    return isinstance(value, kind)


def swift_parameter_shapes(cfg: dict, weights: dict) -> dict:
    """Parameter path -> shape of the Swift FastVLM module tree, built from config.json the way FastVLM.swift does.

    Which layers are quantized follows MLXLMCommon.loadWeights: those whose ``<path>.scales`` is in the weights.
    """
    h, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim, inter, vocab = h // heads, cfg["intermediate_size"], cfg["vocab_size"]
    linears = {}  # path -> (in, out, bias)
    norms = {"language_model.model.norm": h}
    for i in range(cfg["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}"
        linears.update(
            {
                f"{p}.self_attn.q_proj": (h, heads * head_dim, True),
                f"{p}.self_attn.k_proj": (h, kv * head_dim, True),
                f"{p}.self_attn.v_proj": (h, kv * head_dim, True),
                f"{p}.self_attn.o_proj": (heads * head_dim, h, False),
                f"{p}.mlp.gate_proj": (h, inter, False),
                f"{p}.mlp.down_proj": (inter, h, False),
                f"{p}.mlp.up_proj": (h, inter, False),
            }
        )
        norms[f"{p}.input_layernorm"] = h
        norms[f"{p}.post_attention_layernorm"] = h
    if not cfg.get("tie_word_embeddings", True):
        linears["language_model.lm_head"] = (h, vocab, False)
    linears["multi_modal_projector.linear_0"] = (cfg["mm_hidden_size"], h, True)
    linears["multi_modal_projector.linear_2"] = (h, h, True)
    dense = {path: (n_in, n_out, bias) for path, (n_in, n_out, bias) in linears.items()}
    dense["language_model.model.embed_tokens"] = (h, vocab, False)  # Embedding(vocab, h): weight (vocab, h)

    shapes = {f"{path}.weight": (n,) for path, n in norms.items()}
    q = cfg.get("quantization")
    for path, (n_in, n_out, bias) in dense.items():
        if f"{path}.scales" in weights:
            assert q, f"{path} is quantized but config.json has no quantization"
            shapes[f"{path}.weight"] = (n_out, n_in * q["bits"] // 32)
            shapes[f"{path}.scales"] = shapes[f"{path}.biases"] = (n_out, n_in // q["group_size"])
        else:
            shapes[f"{path}.weight"] = (n_out, n_in)
        if bias:
            shapes[f"{path}.bias"] = (n_out,)
    return shapes


# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(ct, tmp_path_factory):
    """format_a written as an app bundle at float32 (so its weights compare exactly), and the warnings it gave."""
    from fastvlm_convert.app_bundle import convert_app_bundle

    dst = tmp_path_factory.mktemp("bundle") / "model"
    warned = []
    model = convert_app_bundle(SRC, dst, dtype="float32", coreml_precision="float32", warn=warned.append)
    return dst, model, warned


@pytest.fixture(scope="module")
def meta():
    return json.loads((FIXTURES / "reference.json").read_text())


def _convert_main(args):
    from fastvlm_mlx.convert import main

    try:
        return main(args)
    except SystemExit as e:
        return e.code or 0


def _load(path):
    import mlx.core as mx

    return mx.load(str(path / "model.safetensors"))


# --------------------------------------------------------------------------------------------------


def test_bundle_files_and_warning(bundle):
    dst, _, warned = bundle
    assert {p.name for p in dst.iterdir()} == APP_FILES
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    # the fixture's encoder is tiny, and the app hard-codes FastVLM's [1, 256, 3072]
    assert len(warned) == 1 and "[1, 256, 3072]" in warned[0] and "[1, 16, 128]" in warned[0]


def test_config_decodes_as_swift(bundle):
    dst, model, _ = bundle
    cfg = json.loads((dst / "config.json").read_text())
    for key, kind in SWIFT_REQUIRED_CONFIG_KEYS.items():
        assert key in cfg and _decodes_as(cfg[key], kind), key
    for key, kind in SWIFT_OPTIONAL_CONFIG_KEYS.items():
        if key in cfg:
            assert _decodes_as(cfg[key], kind), key
    assert cfg["model_type"] == "llava_qwen2"  # the type FastVLM.register adds to the registry
    assert "rope_scaling" not in cfg
    assert cfg["tie_word_embeddings"] is False  # format_a's config says true, but the checkpoint has an lm_head
    assert cfg["mm_hidden_size"] == 128 and cfg["hidden_size"] == 64 and cfg["vocab_size"] == 448
    assert cfg["eos_token_id"] == 402
    assert "quantization" not in cfg
    assert cfg["mm_vision_tower"]  # Apple's patched mlx-vlm needs it (VisionConfig.mm_vision_tower)

    pre = json.loads((dst / "preprocessor_config.json").read_text())
    for key, kind in SWIFT_PREPROCESSOR_KEYS.items():
        assert key in pre and isinstance(pre[key], kind), key
    assert pre["processor_class"] == "LlavaProcessor"
    assert pre["image_mean"] == [0, 0, 0] and pre["image_std"] == [1, 1, 1]
    assert type(pre["size"]["shortest_edge"]) is int and pre["size"]["shortest_edge"] == 256
    assert pre["crop_size"] == {"width": 256, "height": 256}
    proc = json.loads((dst / "processor_config.json").read_text())
    # the values FastVLMProcessorConfiguration has by default, which is what the app uses
    assert proc["image_token"] == "<image>" and proc["patch_size"] == 64 and proc["num_additional_image_tokens"] == 0


def test_weight_keys_are_the_swift_modules(bundle):
    from mlx.utils import tree_flatten

    dst, model, _ = bundle
    weights = _load(dst)
    expected = {f"language_model.{k}" for k, _ in tree_flatten(model.language_model.parameters())}
    renamed = {"linear_1": "linear_0", "linear_2": "linear_2"}
    for k, _ in tree_flatten(model.projector.parameters()):
        layer, rest = k.split(".", 1)
        expected.add(f"multi_modal_projector.{renamed[layer]}.{rest}")
    assert set(weights) == expected
    assert not [k for k in weights if k.startswith(("vision_tower.", "projector."))]
    # independently: exactly the parameters, with the shapes, that the Swift modules declare for config.json
    cfg = json.loads((dst / "config.json").read_text())
    assert {k: tuple(v.shape) for k, v in weights.items()} == swift_parameter_shapes(cfg, weights)


def test_weights_equal_source(bundle):
    from fastvlm_mlx.checkpoints import read_checkpoint

    dst, _, _ = bundle
    _, source = read_checkpoint(SRC)
    weights = _load(dst)
    back = {
        "multi_modal_projector.linear_0.": "projector.linear_1.",
        "multi_modal_projector.linear_2.": "projector.linear_2.",
    }
    for key, value in weights.items():
        src_key = key
        for new, old in back.items():
            src_key = src_key.replace(new, old)
        assert np.array_equal(np.array(value), np.array(source[src_key])), key


def test_tokenizer_has_image_token(bundle, meta):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    dst, model, _ = bundle
    cfg = json.loads((dst / "config.json").read_text())
    image_id = cfg["image_token_index"]
    assert image_id == 403  # after the highest added token (<|im_end|> 402), as Apple's export does
    assert image_id < cfg["vocab_size"] == model.config.text_args().vocab_size

    source_json = json.loads((SRC / "tokenizer.json").read_text())
    bundle_json = json.loads((dst / "tokenizer.json").read_text())
    assert bundle_json["model"] == source_json["model"]  # vocabulary and merges untouched
    assert bundle_json["added_tokens"][:-1] == source_json["added_tokens"]
    assert bundle_json["added_tokens"][-1]["content"] == "<image>" and bundle_json["added_tokens"][-1]["id"] == image_id
    decoder = json.loads((dst / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert decoder[str(image_id)]["content"] == "<image>"

    source, app = AutoTokenizer.from_pretrained(str(SRC)), AutoTokenizer.from_pretrained(str(dst))
    assert app.encode("<image>", add_special_tokens=False) == [image_id]
    for text in (meta["prompt_text"].replace("<image>\n", ""), meta["text_only_prompt"]):
        assert app.encode(text, add_special_tokens=False) == source.encode(text, add_special_tokens=False)

    # the prompt as FastVLMProcessor.prepare builds it, encoded from tokenizer.json alone (as swift-transformers does)
    n = model.config.num_image_tokens
    turn = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nDescribe the image."
    end = "<|im_end|>\n<|im_start|>assistant\n"
    ids = (
        Tokenizer.from_file(str(dst / "tokenizer.json"))
        .encode(turn + "<image>" * n + end, add_special_tokens=False)
        .ids
    )
    assert ids.count(image_id) == n
    assert [i for i in ids if i != image_id] == source.encode(turn + end, add_special_tokens=False)


def test_mlpackage_contract(ct, bundle):
    dst, _, _ = bundle
    spec = ct.models.MLModel(str(dst / "fastvithd.mlpackage"), skip_model_load=True).get_spec()
    assert spec.WhichOneof("Type") == "mlProgram"
    (inp,), (out,) = spec.description.input, spec.description.output
    f32 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32
    assert inp.name == "images" and inp.type.WhichOneof("Type") == "multiArrayType"
    assert list(inp.type.multiArrayType.shape) == [1, 3, 256, 256] and inp.type.multiArrayType.dataType == f32
    assert out.name == "image_features"
    assert list(out.type.multiArrayType.shape) == [1, 16, 128] and out.type.multiArrayType.dataType == f32


def test_cli_quantized_bundle_and_refusal(ct, tmp_path, capsys):
    import mlx.core as mx

    from fastvlm_mlx.checkpoints import read_checkpoint

    dst = tmp_path / "model"
    dst.mkdir()
    (dst / "old.txt").write_text("keep me")
    args = [
        "--hf-path",
        str(SRC),
        "--mlx-path",
        str(dst),
        "--app-bundle",
        "-q",
        "--q-bits",
        "8",
        "--q-group-size",
        "32",
    ]
    assert _convert_main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not empty" in err[0] and "--force" in err[0]
    assert [p.name for p in dst.iterdir()] == ["old.txt"]

    assert _convert_main(args + ["--force", "--coreml-precision", "float16"]) == 0
    assert {p.name for p in dst.iterdir()} == APP_FILES  # old.txt is gone with the replaced folder
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 32, "bits": 8}  # exactly the keys every mlx-swift-examples 2.x reads
    weights = _load(dst)
    scaled = {k[: -len(".scales")] for k in weights if k.endswith(".scales")}
    assert scaled and all(k.startswith("language_model.") for k in scaled)  # the LM only; projector stays float
    assert "language_model.model.embed_tokens" in scaled and "language_model.lm_head" in scaled
    assert {k: tuple(v.shape) for k, v in weights.items()} == swift_parameter_shapes(cfg, weights)
    # the int8 embedding still holds the source's table (the app embeds the <image> ids through it)
    _, source = read_checkpoint(SRC)
    embed = [weights[f"language_model.model.embed_tokens.{p}"] for p in ("weight", "scales", "biases")]
    table = mx.dequantize(*embed, group_size=32, bits=8)
    ref = source["language_model.model.embed_tokens.weight"].astype(mx.float32)
    assert (mx.abs(table.astype(mx.float32) - ref).max() / mx.abs(ref).max()).item() < 1e-2
    spec = ct.models.MLModel(str(dst / "fastvithd.mlpackage"), skip_model_load=True).get_spec()
    assert spec.description.output[0].name == "image_features"


def test_cli_rejects_other_coreml_contracts(tmp_path, capsys):
    for flag in (["--coreml-image-input"], ["--coreml-include-projector"], ["--coreml-resolution", "128"]):
        out = tmp_path / "x"
        assert _convert_main(["--hf-path", str(SRC), "--mlx-path", str(out), "--app-bundle", *flag]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and flag[0] in err[0]
        assert not out.exists()


def test_cli_without_coremltools(tmp_path):
    import os
    import subprocess

    out = tmp_path / "model"
    code = (
        "import sys; sys.modules['coremltools'] = None; "
        "from fastvlm_mlx.convert import main; sys.exit(main(sys.argv[1:]))"
    )
    args = [sys.executable, "-c", code, "--hf-path", str(SRC), "--mlx-path", str(out), "--app-bundle"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert_clean_error(proc, "coremltools", "pip install")
    assert not out.exists() and not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------------
# the tokenizer step alone (no CoreML)


def test_existing_image_token_is_kept(tmp_path):
    from fastvlm_convert.app_bundle import add_image_token

    src = FIXTURES / "format_b"  # transformers format: <image> is already added token 403
    assert add_image_token(src, tmp_path, vocab_size=512) == 403
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == json.loads((src / "tokenizer.json").read_text())


def test_no_spare_embedding_row_fails(tmp_path):
    from fastvlm_convert.app_bundle import add_image_token
    from fastvlm_mlx.errors import FastVLMError

    with pytest.raises(FastVLMError, match="vocab_size 403"):
        add_image_token(SRC, tmp_path, vocab_size=403)


def test_tokenizer_json_built_from_vocab_and_merges(tmp_path, meta):
    """LLaVA-trained checkpoints often carry only the slow tokenizer files; swift-transformers needs tokenizer.json."""
    from transformers import AutoTokenizer

    from fastvlm_convert.app_bundle import add_image_token

    fast = json.loads((SRC / "tokenizer.json").read_text())
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    (src / "vocab.json").write_text(json.dumps(fast["model"]["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in fast["model"]["merges"]]
    (src / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok_config = json.loads((SRC / "tokenizer_config.json").read_text())
    tok_config["added_tokens_decoder"] = {
        str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in fast["added_tokens"]
    }
    (src / "tokenizer_config.json").write_text(json.dumps(tok_config))

    assert add_image_token(src, out, vocab_size=448) == 403
    built = json.loads((out / "tokenizer.json").read_text())
    assert built["model"]["vocab"] == fast["model"]["vocab"]
    app, source = AutoTokenizer.from_pretrained(str(out)), AutoTokenizer.from_pretrained(str(SRC))
    before, after = meta["prompt_text"].split("<image>")
    expected = source.encode(before, add_special_tokens=False) + [403] + source.encode(after, add_special_tokens=False)
    assert app.encode(meta["prompt_text"], add_special_tokens=False) == expected
