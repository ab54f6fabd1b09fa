"""What mlx-lm's tuner needs for FastVLM: the model made trainable, the image features, the batches and the loss.

mlx-lm's ``train``/``evaluate`` run the loop (validation before the first update and every ``steps_per_eval``,
reports, saves of ``dict(tree_flatten(model.trainable_parameters()))`` of the FastVLM, so adapter keys are rooted
at it); this module gives them ``Batches`` (the batch iterator) and ``make_loss`` (masked next-token
cross-entropy with the images spliced in).

With the tower frozen, an image's features never change while training, so ``FeatureStore`` encodes each image
once (keyed by its pixel digest, in a bounded cache that can be saved next to the adapters and read back by a
resumed run): the projected embeddings when the projector is frozen, the tower's raw output when it is trained.
With ``--train-vision`` the loss runs the tower on the pixels every step.
"""

import hashlib
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..engine import ImageFeatureCache, image_digest
from ..errors import FastVLMError
from ..model import IMAGE_PLACEHOLDER, FastVLM
from ..processor import FastVLMProcessor
from .data import Example

# what the loss receives per image: projected embeddings, the tower's raw output, or pixels
PROJECTED, RAW, PIXELS = "projected", "raw", "pixels"
FEATURES_FILE = "image_features.safetensors"
PAD_TO = 32  # batch lengths round up to this, so the compiled step sees few shapes (as mlx-lm does)


def image_input(train_projector: bool, train_vision: bool) -> str:
    return PIXELS if train_vision else RAW if train_projector else PROJECTED


def make_trainable(
    model: FastVLM,
    fine_tune_type: str,
    num_layers: int,
    lora_parameters: dict | None,
    train_projector: bool = False,
    train_vision: bool = False,
) -> None:
    """Freeze everything, then open what is trained: LoRA/DoRA layers (mlx-lm's) on the decoder's last
    ``num_layers`` layers (-1: all), or those layers whole (``full``); optionally the projector and the tower."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    lm = model.language_model
    if num_layers > len(lm.layers) or num_layers == 0 or num_layers < -1:
        raise FastVLMError(f"--num-layers must be 1 to {len(lm.layers)} or -1 for all (got {num_layers})")
    model.freeze()
    if fine_tune_type == "full":
        if model.config.quantization or any(isinstance(m, nn.QuantizedLinear) for _, m in lm.named_modules()):
            raise FastVLMError("full fine-tuning needs an unquantized model (use lora or dora on a quantized one)")
        for layer in lm.layers[-max(num_layers, 0) :]:
            layer.unfreeze()
    elif fine_tune_type in ("lora", "dora"):
        linear_to_lora_layers(lm, num_layers, lora_parameters, use_dora=fine_tune_type == "dora")
    else:
        raise FastVLMError(f"--fine-tune-type must be lora, dora or full (got {fine_tune_type!r})")
    if train_projector:
        model.projector.unfreeze()
    if train_vision:
        model.vision_tower.unfreeze()


def lora_keys(model: FastVLM) -> list[str]:
    """The module keys (relative to a decoder layer) mlx-lm turns into LoRA layers when none are named."""
    kinds = (nn.Linear, nn.QuantizedLinear, nn.Embedding, nn.QuantizedEmbedding)
    keys = set()
    for layer in model.language_model.layers:
        keys.update(k for k, m in layer.named_modules() if isinstance(m, kinds) or hasattr(m, "to_lora"))
    return sorted(keys)


def load_trained(model: FastVLM, file: str | Path) -> None:
    """Weights saved by a run (adapters, or the layers of full fine-tuning) back into the trainable model; the
    file must hold exactly the trainable parameters, shape for shape."""
    try:
        saved = mx.load(str(file))
    except (OSError, RuntimeError, ValueError) as e:
        raise FastVLMError(f"{file}: cannot read the adapter file ({e})") from None
    wanted = dict(tree_flatten(model.trainable_parameters()))
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise FastVLMError(f"{file}: does not match this run's trainable parameters ({what})")
    for key, value in saved.items():
        if value.shape != wanted[key].shape:
            raise FastVLMError(f"{file}: {key} has shape {tuple(value.shape)}, the model {tuple(wanted[key].shape)}")
    model.load_weights(list(saved.items()), strict=False)


class FeatureStore:
    """The image input of the loss for a list of images (paths or bytes), stacked in order.

    PROJECTED and RAW features come from the frozen tower through a bounded cache keyed by pixel digest
    (``encoded`` counts the images the tower ran on); PIXELS are the preprocessed images, for a trained tower.
    """

    def __init__(self, model: FastVLM, processor: FastVLMProcessor, kind: str, max_bytes: int):
        self.model = model
        self.processor = processor
        self.kind = kind
        self.cache = ImageFeatureCache(max_bytes if kind != PIXELS else 0)
        self.digests: dict = {}  # image reference -> pixel digest, so a cached image is not even decoded
        self.encoded = 0
        self.added = 0  # cache entries since the last save

    def _key(self, ref) -> str:
        return ref if isinstance(ref, str) else "bytes:" + hashlib.blake2b(ref, digest_size=16).hexdigest()

    def __call__(self, images: Sequence) -> mx.array:
        if self.kind == PIXELS:
            return mx.concatenate([self.processor.preprocess(ref) for ref in images])
        found, pixels = {}, {}
        for ref in images:
            key = self._key(ref)
            digest = self.digests.get(key)
            hit = self.cache.get(digest) if digest is not None else None
            if hit is None:
                p = self.processor.preprocess(ref)
                digest = self.digests[key] = image_digest(p)
                hit = self.cache.get(digest)
                if hit is None:
                    pixels[digest] = p
            found[key] = (digest, hit)
        if pixels:
            encoded = self.encode(mx.concatenate(list(pixels.values())))
            fresh = {d: encoded[i] for i, d in enumerate(pixels)}
            mx.eval(list(fresh.values()))
            for d, e in fresh.items():
                self.cache.put(d, e)
            self.added += len(fresh)
            found = {k: (d, fresh.get(d) if e is None else e) for k, (d, e) in found.items()}
        return mx.stack([found[self._key(ref)][1] for ref in images])

    def blank(self) -> mx.array:
        """The input of one black image, without encoding it."""
        config = self.model.config
        if self.kind == PIXELS:
            return mx.zeros((1, config.image_size, config.image_size, 3))
        width = config.mm_hidden_size if self.kind == RAW else config.text_args().hidden_size
        return mx.zeros((1, config.num_image_tokens, width))

    def encode(self, pixels: mx.array) -> mx.array:
        """(M, S, S, 3) pixels -> (M, N, C): the tower's raw output, or projected into the decoder's width."""
        self.encoded += pixels.shape[0]
        features = self.model.vision_tower(pixels.astype(self.model.vision_tower.dtype))
        b, h, w, c = features.shape
        features = features.reshape(b, h * w, c)
        return features if self.kind == RAW else self.model.projector(features)

    # ------------------------------------------------------------------ the file next to the adapters
    def fingerprint(self) -> str:
        """Identity of the weights the cached features depend on (the tower, and the projector for PROJECTED)."""
        digest = hashlib.blake2b(self.kind.encode(), digest_size=16)
        parts = [self.model.vision_tower] + ([self.model.projector] if self.kind == PROJECTED else [])
        for part in parts:
            for name, value in sorted(tree_flatten(part.parameters())):
                digest.update(name.encode())
                digest.update(np.asarray(value.astype(mx.float32)).tobytes())
        return digest.hexdigest()

    def save(self, path: Path) -> None:
        if self.kind == PIXELS or not self.added:
            return
        entries = dict(self.cache._entries)
        mx.save_safetensors(str(path), entries, metadata={"fingerprint": self.fingerprint()})
        self.added = 0

    def load(self, path: Path) -> int:
        """Features a previous run saved for the same weights (a file for other weights is ignored); returns how
        many were read."""
        if self.kind == PIXELS or not path.is_file():
            return 0
        try:
            entries, metadata = mx.load(str(path), return_metadata=True)
        except (OSError, RuntimeError, ValueError):
            return 0
        if metadata.get("fingerprint") != self.fingerprint():
            return 0
        for digest, features in entries.items():
            self.cache.put(digest, features)
        return len(entries)


class Batches:
    """mlx-lm's ``iterate_batches`` for FastVLM examples: length-sorted batches in a random order, each
    ``(ids, labels, slots, images)``, right-padded.

    ``ids`` (B, L) are the positions' token ids (0 at image and padding positions), ``labels`` (B, L) mark the
    tokens the loss covers, ``slots`` (B, L) index each image position into the batch's images flattened to
    (M * N, ...) (-1 elsewhere), ``images`` is the FeatureStore's input for the batch's M images.  Unlike
    mlx-lm's, the last partial batch of a pass is kept: no example is dropped.
    """

    def __init__(self, store: FeatureStore, image_tokens: int, on_pass_end=None):
        self.store = store
        self.image_tokens = image_tokens
        self.on_pass_end = on_pass_end

    def __call__(self, dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None):
        if comm_group is not None and comm_group.size() > 1:
            raise FastVLMError("distributed fine-tuning is not supported: run one process")
        order = sorted(range(len(dataset)), key=lambda i: dataset[i].positions(self.image_tokens))
        groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if seed is not None:
            np.random.seed(seed)
        while True:
            for i in np.random.permutation(len(groups)):
                yield self.batch([dataset[j] for j in groups[i]])
            if self.on_pass_end is not None:
                self.on_pass_end()
            if not loop:
                break

    def batch(self, examples: Sequence[Example]) -> tuple:
        n = self.image_tokens
        lengths = [e.positions(n) for e in examples]
        width = -(-max(lengths) // PAD_TO) * PAD_TO
        ids = np.zeros((len(examples), width), np.int32)
        labels = np.zeros((len(examples), width), np.float32)
        slots = np.full((len(examples), width), -1, np.int32)
        images, image = [], 0
        for b, example in enumerate(examples):
            at = 0
            for token, label in zip(example.ids, example.labels):
                if token == IMAGE_PLACEHOLDER:
                    slots[b, at : at + n] = np.arange(image * n, (image + 1) * n)
                    image += 1
                    at += n
                else:
                    ids[b, at], labels[b, at] = token, label
                    at += 1
            images += example.images
        if images:
            features = self.store(images)
        else:  # a text-only batch: one blank image, which no slot points at, keeps the loss's signature
            features = self.store.blank()
        return mx.array(ids), mx.array(labels), mx.array(slots), features


def image_embeddings(model: FastVLM, images: mx.array, kind: str) -> mx.array:
    """(M, N, hidden) from the batch's image input."""
    if kind == PIXELS:
        return model.encode_image(images)
    if kind == RAW:
        return model.projector(images)
    return images


def splice(model: FastVLM, ids: mx.array, slots: mx.array, image_embeds: mx.array) -> mx.array:
    """Token embeddings with the image positions taken from ``image_embeds``: ``model.embed_prompt`` for a
    right-padded batch, in array operations that mx.compile can trace (tests check the two agree)."""
    tokens = model.language_model.model.embed_tokens(ids)
    flat = image_embeds.reshape(-1, image_embeds.shape[-1]).astype(tokens.dtype)
    picked = flat[mx.maximum(slots, 0)]
    return mx.where((slots >= 0)[..., None], picked, tokens)


def make_loss(kind: str):
    """mlx-lm's loss signature, ``loss(model, *batch) -> (mean loss, tokens)``: cross-entropy of each next token
    the labels cover, averaged over those tokens."""

    def loss(model: FastVLM, ids, labels, slots, images):
        embeddings = splice(model, ids, slots, image_embeddings(model, images, kind))
        logits = model(ids, input_embeddings=embeddings)[:, :-1]
        mask = labels[:, 1:]
        ce = nn.losses.cross_entropy(logits.astype(mx.float32), ids[:, 1:]) * mask
        tokens = mask.sum()
        return ce.sum() / tokens, tokens

    return loss
