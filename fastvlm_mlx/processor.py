"""Prompt and image preparation, as Apple's predict.py does it.

Conversations are rendered with Apple's ``qwen_2`` template, ``<image>\\n`` in
front of a message's text for each of its images; each ``<image>`` is tokenized as
a split point and becomes IMAGE_PLACEHOLDER, which the model replaces by the image
embeddings (Apple's "-200 splice"), so no vocabulary row is ever used for the image.
"""

from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_tokenizer

from .errors import ContextLengthError, FastVLMError
from .model import IMAGE_PLACEHOLDER, ModelConfig

IMAGE_TOKEN = "<image>"
DEFAULT_SYSTEM = "You are a helpful assistant."
IM_END = "<|im_end|>"


ROLES = ("system", "user", "assistant")


def one_turn(prompt: str | None, image=None) -> list[dict]:
    """``prompt`` + ``image`` (one, a list, or None) as the one user message they stand for."""
    if prompt is None:
        raise FastVLMError("no prompt given (pass a prompt, or messages=[...])")
    if not isinstance(prompt, str) or not prompt.strip():
        raise FastVLMError("the prompt is empty")
    images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
    parts = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": prompt}]
    return [{"role": "user", "content": parts}]


def _parts(message: dict, where: str) -> list[dict]:
    """A message's content as a list of text and image parts, each checked."""
    content = message.get("content")
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise FastVLMError(f"{where}: content must be a string or a list of parts")
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise FastVLMError(f"{where}, part {j}: a text part needs a string 'text'")
            if IMAGE_TOKEN in part["text"]:
                raise FastVLMError(
                    f"{where}, part {j}: the text contains {IMAGE_TOKEN}; pass images as image parts instead"
                )
        elif kind == "image":
            if part.get("image") is None:
                raise FastVLMError(
                    f"{where}, part {j}: an image part needs an 'image' (path, bytes, PIL image or array)"
                )
        else:
            raise FastVLMError(f"{where}, part {j}: unknown part type {kind!r} (expected 'text' or 'image')")
    return content


def render_messages(messages: Sequence[dict], system: str | None = DEFAULT_SYSTEM) -> tuple[str, list]:
    """Apple's qwen_2 conversation template: (prompt text with one ``<image>`` per image, the images in order).

    Messages are ``{"role": "system" | "user" | "assistant", "content": str | [parts]}`` with parts
    ``{"type": "text", "text": ...}`` and ``{"type": "image", "image": ...}``.  ``system`` is used when
    the conversation has no system message of its own (None or "" for none).  Within a message each
    image becomes ``<image>\n``, in order, followed by the message's text parts; the prompt ends by
    opening the assistant's turn.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise FastVLMError("messages must be a non-empty list")
    turns, images = [], []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        where = f"message {i} ({role})" if isinstance(role, str) else f"message {i}"
        if role not in ROLES:
            raise FastVLMError(f"{where}: role must be one of {', '.join(ROLES)}")
        parts = _parts(message, where)
        pictures = [p["image"] for p in parts if p["type"] == "image"]
        text = "".join(p["text"] for p in parts if p["type"] == "text")
        if role == "system" and (i > 0 or pictures):
            raise FastVLMError(f"{where}: a system message must come first and hold only text")
        if role == "user" and not pictures and not text.strip():
            raise FastVLMError(f"{where}: the message is empty")
        images.extend(pictures)
        turns.append(f"<|im_start|>{role}\n" + f"{IMAGE_TOKEN}\n" * len(pictures) + f"{text}<|im_end|>\n")
    if messages[-1].get("role") != "user":
        raise FastVLMError(f"the last message must be the user's (got {messages[-1].get('role')!r})")
    if system and messages[0].get("role") != "system":
        turns.insert(0, f"<|im_start|>system\n{system}<|im_end|>\n")
    return "".join(turns) + "<|im_start|>assistant\n", images


class FastVLMProcessor:
    """Tokenizer (mlx-lm's wrapper, with its streaming detokenizer) plus the image pipeline."""

    def __init__(self, tokenizer: TokenizerWrapper, image_size: int, context_length: int):
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.context_length = context_length

    @classmethod
    def from_pretrained(cls, path: Path, config: ModelConfig) -> "FastVLMProcessor":
        if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
            raise FastVLMError(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # it warns that config.json's model_type is not a transformers model
        try:
            tokenizer = load_tokenizer(path, eos_token_ids=list(config.eos_token_id) or None)
        except Exception as e:  # transformers raises many types for broken tokenizer files
            raise FastVLMError(f"{path}: could not load the tokenizer ({type(e).__name__}: {e})") from None
        finally:
            hf_logging.set_verbosity(verbosity)
        im_end = tokenizer.convert_tokens_to_ids(IM_END) if IM_END in tokenizer.get_vocab() else None
        if im_end is not None:
            tokenizer.add_eos_token(im_end)  # Apple's template ends every turn with it
        context = int(config.text_config.get("max_position_embeddings", 32768))
        return cls(tokenizer, config.image_size, context)

    def preprocess(self, image) -> mx.array:
        """Image (path, bytes, PIL image or array) -> (1, S, S, 3) float32 in [0, 1]."""
        from .image import preprocess

        return preprocess(image, self.image_size)

    def encode(self, text: str) -> list[int]:
        """Token ids with IMAGE_PLACEHOLDER at each ``<image>``; chunks are tokenized separately, as Apple does."""
        ids: list[int] = []
        for i, chunk in enumerate(text.split(IMAGE_TOKEN)):
            if i:
                ids.append(IMAGE_PLACEHOLDER)
            if chunk:
                ids.extend(self.tokenizer.encode(chunk, add_special_tokens=False, verbose=False))
        return ids

    def render(self, messages: Sequence[dict], system: str | None = DEFAULT_SYSTEM) -> tuple[str, list]:
        return render_messages(messages, system)

    def check_length(self, positions: int) -> None:
        """A prompt of this many positions (image positions included) must leave room to generate."""
        if positions >= self.context_length:
            raise ContextLengthError(
                f"the prompt is {positions} tokens (images included), over the model's context of {self.context_length}"
            )

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i != IMAGE_PLACEHOLDER])
