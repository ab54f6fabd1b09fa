"""Conversion to this project's MLX format, written atomically.

Everything goes into a temporary sibling directory that is renamed into place
only when complete, so an interrupted or failed conversion never leaves a
half-written model where a user (or ``load``) would find it.
"""

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from fastvlm_mlx.checkpoints import read_checkpoint
from fastvlm_mlx.errors import FastVLMError
from fastvlm_mlx.loader import build_model
from fastvlm_mlx.model import FastVLM

from .quantize import quantize

# Files a checkpoint carries besides its weights that the runtime (tokenizer, processor) needs.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
)
SHARD_BYTES = 4 << 30
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def check_destination(dst: Path, force: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise FastVLMError(f"{dst}: exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise FastVLMError(f"{dst}: destination exists and is not empty (use --force to replace it)")


@contextmanager
def atomic_directory(dst: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary directory next to ``dst``; on success it replaces ``dst``, on any failure it is removed."""
    check_destination(dst, force)
    dst.parent.mkdir(parents=True, exist_ok=True)
    for stale in dst.parent.glob(f".{dst.name}.partial-*"):  # left by a killed earlier run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()  # mode 0o777 less the umask, as the folder the user gets (mkdtemp's would be 0700)
    try:
        yield tmp
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            dst.rename(old / "model")
            tmp.rename(dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_weights(weights: dict[str, mx.array], directory: Path) -> None:
    """Safetensors shards of at most SHARD_BYTES, with an index when there is more than one."""
    shards, current, size = [], {}, 0
    for key, value in weights.items():
        if current and size + value.nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[key] = value
        size += value.nbytes
    shards.append(current)
    if len(shards) == 1:
        mx.save_safetensors(str(directory / "model.safetensors"), shards[0], metadata={"format": "mlx"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(directory / name), shard, metadata={"format": "mlx"})
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def prepare_model(
    src: Path,
    dtype: str = "float16",
    quantize_bits: int | None = None,
    group_size: int = 64,
    quantize_projector: bool = False,
    progress: Callable[[str], None] = lambda step: None,
) -> FastVLM:
    """Read any supported checkpoint, load it strictly, cast it to ``dtype`` and optionally quantize the decoder."""
    if dtype not in DTYPES:
        raise FastVLMError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype})")
    progress("reading checkpoint")
    config, weights = read_checkpoint(src)
    progress("building model")
    model = build_model(config, weights, str(src))
    del weights
    model.set_dtype(DTYPES[dtype])
    if quantize_bits:
        if config.quantization:
            raise FastVLMError(f"{src}: already quantized; convert from a floating-point checkpoint")
        progress(f"quantizing decoder to {quantize_bits} bits")
        config.quantization = quantize(model, quantize_bits, group_size, quantize_projector)
    return model


def copy_present(src: Path, dst: Path, names) -> None:
    """Copy those of the files ``names`` that ``src`` has into ``dst``, unchanged."""
    for name in names:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def convert_into(
    src: Path,
    dst: Path,
    write: Callable[[FastVLM, Path], None],
    dtype: str,
    quantize_bits: int | None,
    group_size: int,
    quantize_projector: bool,
    force: bool,
    progress: Callable[[str], None],
) -> FastVLM:
    """The steps every output format shares: refuse a bad destination before the slow read, prepare the
    model, then ``write(model, directory)`` into a temporary directory that replaces ``dst`` when complete."""
    check_destination(dst, force)
    model = prepare_model(src, dtype, quantize_bits, group_size, quantize_projector, progress)
    progress("writing")
    with atomic_directory(dst, force) as tmp:
        write(model, tmp)
    progress("done")
    return model


def convert_checkpoint(
    src: Path,
    dst: Path,
    dtype: str = "float16",
    quantize_bits: int | None = None,
    group_size: int = 64,
    quantize_projector: bool = False,
    force: bool = False,
    progress: Callable[[str], None] = lambda step: None,
    extra_export: Callable[[FastVLM, Path], None] | None = None,
) -> FastVLM:
    """Convert ``src`` (any supported format) into an MLX directory at ``dst``; returns the converted model.

    ``extra_export(model, directory)``, if given, writes more files (e.g. the CoreML vision encoder) into
    the temporary directory before it is renamed into place, so they are part of the same atomic write.
    """
    src, dst = Path(src), Path(dst)

    def write(model: FastVLM, directory: Path) -> None:
        save_weights(dict(tree_flatten(model.parameters())), directory)
        out_config = model.config.to_dict()
        out_config["torch_dtype"] = dtype
        (directory / "config.json").write_text(json.dumps(out_config, indent=2))
        copy_present(src, directory, SIDE_FILES)
        if extra_export is not None:
            extra_export(model, directory)

    return convert_into(src, dst, write, dtype, quantize_bits, group_size, quantize_projector, force, progress)
