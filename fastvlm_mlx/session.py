"""``ChatSession``: a conversation that keeps its KV cache, so a follow-up prefills only its new positions.

    chat = ChatSession(model, processor)
    print(chat.ask("What is in this photo?", images=["photo.jpg"]))
    print(chat.ask("And what colour is the car?"))     # the image and the first turn come from the cache
    chat.parse("Is it raining?", choices=["yes", "no"])   # structured output, as fastvlm_mlx.parse
    chat.save("trip.safetensors")                      # history and KV cache; ChatSession.load(...) resumes

The history (``messages``) is re-rendered every turn and matched position by position against what the
cache holds (images by the digest of their pixels, so a changed file at the same path is a new image);
the cache is trimmed to the shared prefix.  Editing ``messages``, or stopping a generation early, is
therefore always safe.  Everything else (rendering, images, decoding) is the engine's.
"""

import base64
import hashlib
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

from .engine import Engine, GenerationResponse, PromptCache, Sampling, engine_for
from .errors import FastVLMError
from .mlx_thread import runs_on_mlx_thread
from .model import FastVLM
from .processor import DEFAULT_SYSTEM, FastVLMProcessor, one_turn
from .structured import KEYWORDS, pop_constraint

SAVE_FORMAT = "fastvlm_mlx.chat/1"


def conversation_file(name: str | Path) -> Path:
    """Where ``save(name)`` writes and ``load(name)`` reads: ``~`` expanded, ``.safetensors`` added when
    missing (the format's extension, which MLX's writer adds anyway)."""
    path = Path(name).expanduser()
    return path if path.suffix == ".safetensors" else path.with_name(path.name + ".safetensors")


def model_fingerprint(model: FastVLM) -> str:
    """Which model a KV cache belongs to: the decoder's shapes and dtype and a few of its weights."""
    lm = model.language_model.model
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps([model.config.text_config, model.config.num_image_tokens], sort_keys=True).encode())
    for weight in (lm.norm.weight, lm.embed_tokens.weight[:4]):
        # a bfloat16 table in a float32 model is only stored so (cpu.decoder): it computes as the float32 one
        digest.update(str(lm.norm.weight.dtype if weight.dtype == mx.bfloat16 else weight.dtype).encode())
        digest.update(np.asarray(weight.astype(mx.float32) if weight.dtype == mx.bfloat16 else weight).tobytes())
    return digest.hexdigest()


class ChatSession:
    """A multi-turn conversation with one model; ``messages`` is its history in ``stream_generate``'s format."""

    def __init__(
        self,
        model: FastVLM,
        processor: FastVLMProcessor,
        system: str | None = DEFAULT_SYSTEM,
        engine: Engine | None = None,
    ):
        self.model, self.processor = model, processor
        self.engine = engine or engine_for(model, processor)
        self.system = system
        self.messages: list[dict] = []
        self.cache: PromptCache | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        if self.cache is not None:
            self.engine.forget(self.cache)
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cache = PromptCache(self.model)

    def stream(
        self,
        text: str,
        images: None | object | Sequence = None,
        *,
        video=None,
        frames: int | None = None,
        fps: float | None = None,
        **sampling,
    ) -> Iterator[GenerationResponse]:
        """Ask; yields what ``stream_generate`` yields.  The user turn and the answer (as far as it got,
        if the caller stops early) join ``messages``; a request that fails before generating leaves the
        history as it was.  ``video``, ``frames`` and ``fps`` add a video's frames, as ``stream_generate``."""
        if video is not None:
            from .video import video_turn

            turn = video_turn(text, video, frames, fps, self.engine, images, self.messages)
        elif frames is not None or fps is not None:
            raise FastVLMError("frames and fps sample a video: pass video= too")
        else:
            turn = one_turn(text, images)[0]
        constraint = pop_constraint(sampling)
        prompt = self.engine.prepare(self.messages + [turn], system=None)
        options = Sampling(**sampling, constraint=constraint.grammar if constraint else None)
        answer: list | None = None
        try:
            for response in self.engine.stream(prompt, options, self.cache):
                answer = (answer or []) + [response.text]
                yield response
        finally:
            if answer is not None:
                self.messages += [turn, {"role": "assistant", "content": "".join(answer)}]

    def ask(self, text: str, images=None, **sampling) -> str:
        """The whole answer as one string."""
        return "".join(r.text for r in self.stream(text, images, **sampling))

    def parse(self, text: str, images=None, **sampling):
        """Ask with a structured-output keyword (``schema=``, ...) and return the answer as a value, as
        ``fastvlm_mlx.parse`` does."""
        constraint = pop_constraint(sampling)
        if constraint is None:
            raise FastVLMError(f"parse needs one of {', '.join(KEYWORDS)}")
        responses = list(self.stream(text, images, response_format=constraint, **sampling))
        return constraint.parse("".join(r.text for r in responses), responses[-1].finish_reason)

    # --------------------------------------------------------------------------------- on disk
    @runs_on_mlx_thread
    def save(self, path: str | Path) -> None:
        """Write the history and the KV cache to one safetensors file (mlx-lm's prompt-cache format).

        Images given as paths are stored as paths (read again on the next turn); other images as PNGs
        of their preprocessed pixels, which preprocess to the very same pixels."""
        path = conversation_file(path)
        _refuse_when_split(self.engine)
        history = [dict(m, content=self._portable(m["content"])) for m in self.messages]
        meta = {
            "format": SAVE_FORMAT,
            "model": model_fingerprint(self.model),
            "system": self.system,
            "messages": history,
            "positions": [p if isinstance(p, int) else list(p) for p in self.cache.positions],
        }
        mx.eval([c.state for c in self.cache.kv])
        try:
            save_prompt_cache(str(path), self.cache.kv, {"fastvlm_mlx": json.dumps(meta)})
        except (OSError, RuntimeError) as e:  # mlx raises RuntimeError for a file it cannot open
            reason = getattr(e, "strerror", None) or e
            raise FastVLMError(f"{path}: could not write the conversation ({reason})") from None

    def _portable(self, content):
        if isinstance(content, str):
            return content
        parts = []
        for part in content:
            if part["type"] == "image" and not isinstance(part["image"], (str, Path)):
                pixels = np.asarray(self.processor.preprocess(part["image"]))[0]
                png = io.BytesIO()
                from PIL import Image

                Image.fromarray(np.rint(pixels * 255.0).astype(np.uint8)).save(png, format="PNG")
                part = {"type": "image", "image_png": base64.b64encode(png.getvalue()).decode()}
            elif part["type"] == "image":
                part = {"type": "image", "image": str(part["image"])}
            parts.append(part)
        return parts

    @classmethod
    @runs_on_mlx_thread
    def load(cls, path: str | Path, model: FastVLM, processor: FastVLMProcessor) -> "ChatSession":
        """Resume a conversation written by ``save``; refuses a file made with another model."""
        _refuse_when_split(engine_for(model, processor))
        path = Path(path).expanduser() if Path(path).expanduser().is_file() else conversation_file(path)
        if not path.is_file():
            raise FastVLMError(f"{path}: no such file")
        try:
            kv, metadata = load_prompt_cache(str(path), return_metadata=True)
            meta = json.loads(metadata["fastvlm_mlx"])
        except Exception:  # mlx and the cache loader raise many types for foreign files
            raise FastVLMError(f"{path}: not a conversation saved by ChatSession.save") from None
        if meta.get("format") != SAVE_FORMAT:
            raise FastVLMError(f"{path}: unknown conversation format {meta.get('format')!r}")
        if meta.get("model") != model_fingerprint(model) or len(kv) != len(model.layers):
            raise FastVLMError(
                f"{path}: this conversation was saved with a different model (or dtype); load that model"
            )
        chat = cls(model, processor, system=meta["system"])
        chat.messages = [dict(m, content=_restored(m["content"])) for m in meta["messages"]]
        chat.cache = PromptCache(model, kv, [p if isinstance(p, int) else tuple(p) for p in meta["positions"]])
        return chat


def _refuse_when_split(engine: Engine) -> None:
    if getattr(engine, "cluster", None) is not None:  # a distributed.Replica
        raise FastVLMError(
            "saving and loading conversations is not available with the decoder split over "
            "several ranks (each rank holds only its part of the KV cache)"
        )


def _restored(content):
    if isinstance(content, str):
        return content
    return [{"type": "image", "image": base64.b64decode(p["image_png"])} if "image_png" in p else p for p in content]
