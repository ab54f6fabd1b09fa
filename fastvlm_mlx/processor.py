"""Prompt and image preparation, as Apple's predict.py does it.

The prompt uses Apple's ``qwen_2`` conversation template with ``<image>\\n`` in
front of the user text; each ``<image>`` is tokenized as a split point and
becomes IMAGE_PLACEHOLDER, which the model replaces by the image embeddings
(Apple's "-200 splice"), so no vocabulary row is ever used for the image.
"""

from pathlib import Path
from typing import List, Optional, Sequence

import mlx.core as mx
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_tokenizer

from .errors import FastVLMError
from .model import IMAGE_PLACEHOLDER, ModelConfig

IMAGE_TOKEN = "<image>"
DEFAULT_SYSTEM = "You are a helpful assistant."
IM_END = "<|im_end|>"


def render_prompt(prompt: str, num_images: int = 1, system: Optional[str] = DEFAULT_SYSTEM) -> str:
    """One user turn in Apple's qwen_2 template; images go first, each followed by a newline, as Apple places them."""
    user = IMAGE_TOKEN * num_images + ("\n" if num_images else "") + prompt
    parts = []
    if system:
        parts.append(f"<|im_start|>system\n{system}<|im_end|>\n")
    parts.append(f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
    return "".join(parts)


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

    def encode(self, text: str) -> List[int]:
        """Token ids with IMAGE_PLACEHOLDER at each ``<image>``; chunks are tokenized separately, as Apple does."""
        ids: List[int] = []
        for i, chunk in enumerate(text.split(IMAGE_TOKEN)):
            if i:
                ids.append(IMAGE_PLACEHOLDER)
            if chunk:
                ids.extend(self.tokenizer.encode(chunk, add_special_tokens=False, verbose=False))
        return ids

    def prompt_ids(self, prompt: str, num_images: int, num_image_tokens: int, system: Optional[str] = DEFAULT_SYSTEM) -> List[int]:
        """Render and tokenize one prompt, checking that it (with its image positions) fits the context."""
        if not prompt or not prompt.strip():
            raise FastVLMError("the prompt is empty")
        if IMAGE_TOKEN in prompt:
            raise FastVLMError(f"the prompt contains {IMAGE_TOKEN}; pass images with the image argument instead")
        ids = self.encode(render_prompt(prompt, num_images, system))
        length = len(ids) + num_images * (num_image_tokens - 1)
        if length >= self.context_length:
            raise FastVLMError(
                f"the prompt is {length} tokens (images included), over the model's context of {self.context_length}"
            )
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i != IMAGE_PLACEHOLDER])
