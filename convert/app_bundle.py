"""The model folder of Apple's FastVLM app (``app/FastVLM/model/`` in apple/ml-fastvlm), from any checkpoint.

The app (``app/FastVLM/FastVLM.swift`` on mlx-swift-examples' MLXVLM) reads one folder:

- ``config.json``: one flat JSON object that ``FastVLMConfiguration`` decodes three times (vision, text
  and base parts, see ``SWIFT_CONFIG_KEYS``) plus mlx-swift-examples' ``BaseConfiguration``
  (``model_type`` picks the registered type ``llava_qwen2``; ``quantization`` says how to quantize).
- every ``*.safetensors`` file: the MLX weights of the Swift modules, and nothing else. mlx-swift loads
  them with ``update(parameters:, verify: .all)``, so a missing or an unused key fails the load. The
  Swift model has ``language_model`` (Qwen2, same names as mlx-lm's), ``multi_modal_projector`` with
  ``linear_0`` / ``linear_2``, and a ``vision_tower`` without parameters: the vision encoder runs only
  in CoreML.
- ``fastvithd.mlpackage``, compiled by Xcode into the class ``fastvithd``: input ``images``
  ``[1, 3, S, S]``, output ``image_features``, which the Swift code requires to be ``[1, 256, 3072]``.
- ``tokenizer.json`` / ``tokenizer_config.json`` (swift-transformers). The prompt holds ``<image>``
  once per image feature, and the app looks for the id ``image_token_index`` among the tokens, so
  ``<image>`` must be one added token with that id. The app embeds those ids before overwriting
  them with the image features, so the id must also be a row of the embedding table.
- ``preprocessor_config.json``: ``processor_class`` picks the registered processor ``LlavaProcessor``,
  which decodes ``FastVLMPreProcessorConfiguration`` (CLIP-style resize and center crop).

``processor_config.json`` is not read by the app (``FastVLMProcessor`` uses the defaults of
``FastVLMProcessorConfiguration``); it is written, as Apple's ``model_export`` does, for mlx-vlm and
transformers.
"""

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from fastvlm_mlx.errors import FastVLMError
from fastvlm_mlx.model import FastVLM

from .coreml import PACKAGE_NAME, PRECISIONS, export_coreml, require_coremltools
from .writer import DTYPES, convert_into, copy_present, save_weights

APP_MODEL_TYPE = "llava_qwen2"  # FastVLM.register: typeRegistry.registerModelType("llava_qwen2")
APP_PROCESSOR_CLASS = "LlavaProcessor"  # FastVLM.register: processorRegistry.registerProcessorType(...)
IMAGE_TOKEN = "<image>"  # FastVLMProcessorConfiguration.imageToken
# FastVLM.swift, Vision.VisionModelCoreML.encode: precondition(output.image_features.shape == [1, 256, 3072])
APP_IMAGE_FEATURES_SHAPE = (1, 256, 3072)
# our projector's names -> FastVLMMultiModalProjector's (@ModuleInfo keys linear_0 / linear_2)
PROJECTOR_NAMES = {"linear_1": "linear_0", "linear_2": "linear_2"}

# Files copied from the source checkpoint as they are (the tokenizer files are edited, see add_image_token).
COPIED_FILES = (
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
)


# ---------------------------------------------------------------------------------------------------
# weights and config


def app_weights(model: FastVLM) -> dict[str, mx.array]:
    """The tensors of the Swift model: ``language_model.*`` as is, the projector renamed, no vision tower.

    Quantized layers keep their ``.scales`` / ``.biases``; the app quantizes exactly the layers that have them.
    """
    weights = {f"language_model.{k}": v for k, v in tree_flatten(model.language_model.parameters())}
    for key, value in tree_flatten(model.projector.parameters()):
        layer, rest = key.split(".", 1)
        weights[f"multi_modal_projector.{PROJECTOR_NAMES[layer]}.{rest}"] = value
    return weights


def _dtype_name(model: FastVLM) -> str:
    dtype = model.language_model.model.norm.weight.dtype  # never quantized
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))


def app_config(model: FastVLM, image_token_index: int) -> dict:
    """The flat ``llava_qwen2`` config.json the Swift decoder (and Apple's patched mlx-vlm) accepts."""
    config = model.config
    args = config.text_args()
    if args.rope_scaling:
        raise FastVLMError(
            f"the text model uses RoPE scaling ({args.rope_scaling}), which the app's decoder does not implement"
        )
    tied = "lm_head" not in model.language_model  # mlx-lm's qwen2 has an lm_head only when untied
    out = {
        "model_type": APP_MODEL_TYPE,
        "architectures": ["LlavaQwen2ForCausalLM"],
        "hidden_size": args.hidden_size,
        "num_hidden_layers": args.num_hidden_layers,
        "intermediate_size": args.intermediate_size,
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_key_value_heads,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.rms_norm_eps,
        "max_position_embeddings": args.max_position_embeddings,
        "rope_theta": float(args.rope_theta),
        "rope_traditional": bool(args.rope_traditional),
        # always written: the Swift default is true, and an untied model would then lack its lm_head
        "tie_word_embeddings": tied,
        "mm_hidden_size": config.mm_hidden_size,
        "mm_projector_type": config.projector_type,
        "mm_vision_tower": f"mobileclip_l_{config.image_size}",  # required by Apple's patched mlx-vlm
        "image_token_index": image_token_index,
        "torch_dtype": _dtype_name(model),
    }
    eos = list(config.eos_token_id)
    if eos:
        out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if config.quantization:
        # only these two keys: mlx-swift-examples 2.22-2.25.8 read every other key of this object as a
        # per-layer override and fail on e.g. "mode": "affine" (affine is the default anyway)
        out["quantization"] = {
            "group_size": int(config.quantization["group_size"]),
            "bits": int(config.quantization["bits"]),
        }
    return out


def app_preprocessor_config(image_size: int) -> dict:
    """CLIPImageProcessor settings of FastVLM, as Apple's export saves them, plus the processor class."""
    return {
        "crop_size": {"height": image_size, "width": image_size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.0, 0.0, 0.0],
        "image_processor_type": "CLIPImageProcessor",
        "image_std": [1.0, 1.0, 1.0],
        "processor_class": APP_PROCESSOR_CLASS,
        "resample": 3,  # bicubic
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": image_size},
    }


def app_processor_config(patch_size: int) -> dict:
    return {
        "image_token": IMAGE_TOKEN,
        "num_additional_image_tokens": 0,
        "patch_size": patch_size,
        "processor_class": APP_PROCESSOR_CLASS,
    }


def app_compatibility_problems(model: FastVLM) -> list[str]:
    """What in this model the app's Swift code would stop at (its shapes are hard-coded for FastVLM at 1024px)."""
    shape = (1, model.config.num_image_tokens, model.config.mm_hidden_size)
    if shape == APP_IMAGE_FEATURES_SHAPE:
        return []
    return [
        f"the app's FastVLM.swift requires image features {list(APP_IMAGE_FEATURES_SHAPE)} but this model's encoder "
        f"gives {list(shape)}; the app will stop at its precondition unless that line is changed"
    ]


# ---------------------------------------------------------------------------------------------------
# tokenizer


def _tokenizer_json(source_dir: Path) -> dict:
    path = source_dir / "tokenizer.json"
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise FastVLMError(f"{path}: not a readable tokenizer.json ({e})") from None
    # swift-transformers needs tokenizer.json; LLaVA-trained checkpoints often have only vocab.json/merges.txt
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(source_dir))
        return json.loads(tokenizer.backend_tokenizer.to_str())
    except Exception as e:  # transformers raises many types for missing or broken tokenizer files
        raise FastVLMError(
            f"{source_dir}: no tokenizer.json, and none could be built from its tokenizer files "
            f"({type(e).__name__}: {e})"
        ) from None


def _added_token_entry(token_id: int | None) -> dict:
    flags = dict(single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)  # as Qwen2's own
    entry = {"content": IMAGE_TOKEN, **flags}
    return entry if token_id is None else {"id": token_id, **entry}


def add_image_token(source_dir: Path, directory: Path, vocab_size: int) -> int:
    """Write the tokenizer files into ``directory`` with ``<image>`` as an added token; returns its id.

    A tokenizer that has ``<image>`` keeps its id. Otherwise ``<image>`` gets the id after the highest one
    in use, which for Qwen2 tokenizers is what Apple's ``export_vision_encoder.py`` gives it (the highest
    added token + 1). The vocabulary, merges and other added tokens are left as they are. The id must be
    below ``vocab_size``: the app looks the ``<image>`` ids up in the embedding table before it overwrites
    them, and a tokenizer without a spare row cannot be used (this fails rather than reuse a row).
    """
    tok = _tokenizer_json(source_dir)
    config_path = source_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    decoder = tok_config.get("added_tokens_decoder")

    added = tok.setdefault("added_tokens", [])
    model_vocab = (tok.get("model") or {}).get("vocab")
    vocab_ids = model_vocab.values() if isinstance(model_vocab, dict) else range(len(model_vocab or []))
    known = {t["content"]: t["id"] for t in added}
    if IMAGE_TOKEN in known:
        token_id = known[IMAGE_TOKEN]
    else:
        if isinstance(model_vocab, dict) and IMAGE_TOKEN in model_vocab:
            token_id = model_vocab[IMAGE_TOKEN]  # a vocabulary entry: make it split off as one piece
        else:
            used = [*vocab_ids, *known.values(), *(int(k) for k in (decoder or {}))]
            token_id = max(used, default=-1) + 1
        added.append(_added_token_entry(token_id))
    if token_id >= vocab_size:
        raise FastVLMError(
            f"the tokenizer has no spare id for {IMAGE_TOKEN} ({token_id} would be needed) below the model's "
            f"vocab_size {vocab_size}; the app embeds the {IMAGE_TOKEN} ids, so it needs such a row"
        )

    if decoder is None:  # what transformers writes: every added token, by id
        decoder = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added}
    elif str(token_id) not in decoder:
        decoder[str(token_id)] = _added_token_entry(None)
    tok_config["added_tokens_decoder"] = dict(sorted(decoder.items(), key=lambda kv: int(kv[0])))

    (directory / "tokenizer.json").write_text(json.dumps(tok, indent=2, ensure_ascii=False), encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(
        json.dumps(tok_config, indent=2, ensure_ascii=False), encoding="utf-8"
    )
    extra_path = source_dir / "added_tokens.json"  # slow tokenizers read added tokens from here
    if extra_path.is_file():
        extra = json.loads(extra_path.read_text(encoding="utf-8"))
        extra[IMAGE_TOKEN] = token_id
        (directory / "added_tokens.json").write_text(json.dumps(extra, indent=2, ensure_ascii=False), encoding="utf-8")
    return token_id


# ---------------------------------------------------------------------------------------------------


def export_app_bundle(
    model: FastVLM,
    source_dir: Path,
    directory: Path,
    coreml_precision: str = "float16",
    warn: Callable[[str], None] | None = None,
) -> None:
    """Write the app's model folder into ``directory`` (an existing, empty directory, e.g. an atomic write's).

    ``source_dir`` provides the tokenizer files. ``warn`` receives what the app would not accept
    (default: ``warnings.warn``).
    """
    require_coremltools()
    if coreml_precision not in PRECISIONS:
        raise FastVLMError(f"CoreML precision must be one of {', '.join(PRECISIONS)} (got {coreml_precision})")
    source_dir, directory = Path(source_dir), Path(directory)
    for problem in app_compatibility_problems(model):
        (warn or (lambda m: warnings.warn(m, stacklevel=3)))(problem)
    args = model.config.text_args()
    image_token_index = add_image_token(source_dir, directory, args.vocab_size)
    config = app_config(model, image_token_index)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "preprocessor_config.json").write_text(
        json.dumps(app_preprocessor_config(model.config.image_size), indent=2)
    )
    (directory / "processor_config.json").write_text(
        json.dumps(app_processor_config(model.config.vision_config.patch_size), indent=2)
    )
    copy_present(source_dir, directory, COPIED_FILES)
    save_weights(app_weights(model), directory)
    export_coreml(model, directory / PACKAGE_NAME, precision=coreml_precision)


def convert_app_bundle(
    src: Path,
    dst: Path,
    dtype: str = "float16",
    quantize_bits: int | None = None,
    group_size: int = 64,
    quantize_projector: bool = False,
    coreml_precision: str = "float16",
    force: bool = False,
    progress: Callable[[str], None] = lambda step: None,
    warn: Callable[[str], None] | None = None,
) -> FastVLM:
    """Convert ``src`` (any supported format) into the app's model folder ``dst``, atomically; returns the model.

    The steps and their checks are ``convert_checkpoint``'s; only what is written differs.
    """
    require_coremltools()
    if coreml_precision not in PRECISIONS:
        raise FastVLMError(f"--coreml-precision must be one of {', '.join(PRECISIONS)} (got {coreml_precision})")
    src, dst = Path(src), Path(dst)

    def write(model: FastVLM, directory: Path) -> None:
        export_app_bundle(model, src, directory, coreml_precision, warn)

    return convert_into(src, dst, write, dtype, quantize_bits, group_size, quantize_projector, force, progress)
