"""Training data: a folder of ``train.jsonl``/``valid.jsonl``/``test.jsonl`` (mlx-lm's layout) -> tokenized examples.

A line is either OpenAI-style ``{"messages": [...]}`` (image parts ``{"type": "image", "image": PATH}`` or
``{"type": "image_url", "image_url": {"url": PATH or data URL}}``), or LLaVA's
``{"id", "image": PATH or [PATHS], "conversations": [{"from": "human"|"gpt", "value": "<image>\\n..."}]}``.

Conversations are rendered with the inference template (``processor.render``) and tokenized as
``Engine.prepare`` does, one piece per turn: what precedes an assistant answer (ending with
``<|im_start|>assistant\\n``) is exactly the prompt the model sees when it answers, and the answer is its own
token stream, as the model generates it.  The loss covers each assistant answer's tokens and the
``<|im_end|>`` that closes it (the token the model must learn to stop with); the ``assistant\\n`` header and
the newline after ``<|im_end|>`` are part of the prompt, not of the answer.
"""

import base64
import binascii
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import FastVLMError
from ..model import IMAGE_PLACEHOLDER
from ..processor import IM_END, IMAGE_TOKEN, FastVLMProcessor

SPLITS = ("train", "valid", "test")
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class BadLine(FastVLMError):
    """One line of a data file that cannot be trained on; the message is ``FILE:LINE: problem``."""


@dataclass
class Example:
    """One tokenized conversation: ``ids`` hold IMAGE_PLACEHOLDER per image; ``labels[i]`` says whether the
    loss covers token ``i``; ``images`` are local paths or bytes, in placeholder order."""

    ids: list[int]
    labels: list[bool]
    images: list
    where: str

    def positions(self, image_tokens: int) -> int:
        """The sequence length the decoder sees (each image is ``image_tokens`` positions)."""
        return len(self.ids) + len(self.images) * (image_tokens - 1)


class ImageResolver:
    """Image references of a data file -> local paths (or bytes of a data URL), checked once each."""

    def __init__(self, data_file: Path, image_folder: str | None):
        self.base = Path(image_folder).expanduser() if image_folder else data_file.parent
        self.checked: dict[str, object] = {}

    def __call__(self, ref) -> object:
        if not isinstance(ref, str) or not ref.strip():
            raise FastVLMError("an image must be given as a path or a data URL string")
        if ref not in self.checked:
            self.checked[ref] = self._resolve(ref)
        return self.checked[ref]

    def _resolve(self, ref: str):
        from ..image import load_image

        if ref.startswith("data:"):
            head, _, payload = ref.partition(",")
            if not head.endswith(";base64"):
                raise FastVLMError("a data URL must be base64 (data:image/...;base64,...)")
            try:
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise FastVLMError("the data URL is not valid base64") from None
            load_image(data)
            return data
        if ref.startswith(("http://", "https://")):
            raise FastVLMError(f"{ref}: training images must be local files (download it first)")
        path = Path(ref.removeprefix("file://")).expanduser()
        if not path.is_absolute():
            path = self.base / path
        if not path.is_file():
            raise FastVLMError(f"image not found: {path}")
        load_image(str(path))  # a broken file fails here, before training
        return str(path)


def _image_ref(part: dict):
    """The reference of an ``image`` or ``image_url`` part."""
    if part.get("type") == "image":
        return part.get("image")
    url = part.get("image_url")
    return url.get("url") if isinstance(url, dict) else url


def openai_messages(messages, resolve: ImageResolver) -> list[dict]:
    """OpenAI-style messages -> the engine's messages, with ``image_url`` parts as ``image`` parts."""
    if not isinstance(messages, list) or not messages:
        raise FastVLMError("'messages' must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise FastVLMError(f"message {i} is not an object")
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") in ("image", "image_url"):
                    parts.append({"type": "image", "image": resolve(_image_ref(part))})
                else:
                    parts.append(part)
            content = parts
        out.append({**message, "content": content})
    return out


def llava_messages(record: dict, resolve: ImageResolver) -> list[dict]:
    """LLaVA's ``conversations`` -> the engine's messages; each ``<image>`` in a human turn takes the next image
    (with no ``<image>`` anywhere, the images go to the first human turn, as LLaVA does)."""
    conversations = record["conversations"]
    if not isinstance(conversations, list) or not conversations:
        raise FastVLMError("'conversations' must be a non-empty list")
    images = record.get("image")
    images = [] if images is None else [images] if isinstance(images, str) else images
    if not isinstance(images, list):
        raise FastVLMError("'image' must be a path or a list of paths")
    images = [resolve(ref) for ref in images]
    for j, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in LLAVA_ROLES:
            raise FastVLMError(f"conversation turn {j}: needs 'from' (human or gpt) and a string 'value'")
    marks = sum(t["value"].count(IMAGE_TOKEN) for t in conversations)
    if marks and marks != len(images):
        raise FastVLMError(f"the conversation has {marks} {IMAGE_TOKEN} mark(s) but {len(images)} image(s)")
    pending = iter(images)
    messages = []
    for j, turn in enumerate(conversations):
        role, value = LLAVA_ROLES[turn["from"]], turn["value"]
        count = value.count(IMAGE_TOKEN)
        if role != "user" and count:
            raise FastVLMError(f"conversation turn {j}: only a human turn may hold {IMAGE_TOKEN}")
        if role == "user" and not marks and not any(m["role"] == "user" for m in messages):
            count = len(images)
        text = value.replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "").strip()
        parts = [{"type": "image", "image": next(pending)} for _ in range(count)]
        messages.append({"role": role, "content": parts + [{"type": "text", "text": text}]})
    return messages


def _answer_text(message: dict, index: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise FastVLMError(f"message {index} (assistant): an answer holds text only")


def tokenize(messages: list[dict], processor: FastVLMProcessor, mask_prompt: bool = True) -> tuple:
    """(ids, labels, images) of a conversation that ends with an assistant answer (see the module docstring)."""
    tokenizer = processor.tokenizer
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    answers = [k for k, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"]
    if not answers:
        raise FastVLMError("the conversation has no assistant message to train on")
    if answers[-1] != len(messages) - 1:
        raise FastVLMError("the conversation must end with an assistant message")
    ids, labels, consumed, images = [], [], "", []
    for k in answers:
        if k == 0 or messages[k - 1].get("role") != "user":
            raise FastVLMError(f"message {k} (assistant): an answer must follow a user message")
        text, shown = processor.render(messages[:k])
        if not text.startswith(consumed):  # the template renders earlier turns as the answers were tokenized
            raise FastVLMError(f"message {k}: the conversation does not render as a prefix of itself")
        prompt = processor.encode(text[len(consumed) :])
        ids += prompt
        labels += [not mask_prompt and t != IMAGE_PLACEHOLDER for t in prompt]
        images += shown[len(images) :]
        answer = _answer_text(messages[k], k)
        if IMAGE_TOKEN in answer:
            raise FastVLMError(f"message {k} (assistant): the answer contains {IMAGE_TOKEN}")
        answer_ids = tokenizer.encode(answer, add_special_tokens=False) + [im_end]
        ids += answer_ids
        labels += [True] * len(answer_ids)
        consumed = text + answer + IM_END
    return ids, labels, images


def read_lines(
    path: Path, image_folder: str | None, image_tokens: int, max_seq_length: int, parse
) -> tuple[list, list]:
    """Every line of one JSONL file through ``parse(record, resolve, where)``; returns (items, problems), one
    ``FILE:LINE: problem`` per line that could not be used (blank lines are allowed and skipped).  Each item
    knows its ``positions(image_tokens)``, which must fit ``max_seq_length``."""
    resolve = ImageResolver(path, image_folder)
    items, problems = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise FastVLMError(f"{path}: cannot read the data file ({getattr(e, 'strerror', None) or e})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise FastVLMError(f"not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise FastVLMError("a line must be a JSON object")
            item = parse(record, resolve, where)
            length = item.positions(image_tokens)
            if length > max_seq_length:
                raise FastVLMError(
                    f"the example is {length} positions (images included), over --max-seq-length {max_seq_length}"
                )
            items.append(item)
        except FastVLMError as e:
            problems.append(f"{where}: {e}")
    return items, problems


def read_split(
    path: Path,
    processor: FastVLMProcessor,
    image_tokens: int,
    *,
    image_folder: str | None = None,
    max_seq_length: int = 2048,
    mask_prompt: bool = True,
) -> tuple[list[Example], list[str]]:
    """Every line of one JSONL file as an Example; returns (examples, problems) as ``read_lines`` does."""

    def parse(record: dict, resolve, where: str) -> Example:
        if "messages" in record:
            messages = openai_messages(record["messages"], resolve)
        elif "conversations" in record:
            messages = llava_messages(record, resolve)
        else:
            raise FastVLMError("a line needs 'messages' (OpenAI style) or 'conversations' (LLaVA style)")
        return Example(*tokenize(messages, processor, mask_prompt), where)

    return read_lines(path, image_folder, image_tokens, max_seq_length, parse)


def load_splits(
    data: str,
    processor: FastVLMProcessor,
    image_tokens: int,
    names: tuple[str, ...],
    *,
    skip_bad_lines: bool = False,
    report=print,
    reader=read_split,
    **options,
) -> dict[str, list[Example]]:
    """The named splits of a data folder, each file read by ``reader`` (``read_split``, or preference pairs').
    Every bad line is reported (``report``); unless ``skip_bad_lines``, any bad line stops the run here, before
    training."""
    folder = Path(data).expanduser()
    if not folder.is_dir():
        raise FastVLMError(f"{data}: no such data folder (it holds train.jsonl, valid.jsonl, test.jsonl)")
    splits, problems = {}, []
    for name in names:
        path = folder / f"{name}.jsonl"
        if not path.is_file():
            raise FastVLMError(f"{path}: no such file (the {name} split is needed)")
        splits[name], bad = reader(path, processor, image_tokens, **options)
        problems += bad
        if not splits[name] and not bad:
            raise FastVLMError(f"{path}: no examples")
    for problem in problems:
        report(f"skipped {problem}" if skip_bad_lines else problem)
    if problems and not skip_bad_lines:
        raise FastVLMError(f"{len(problems)} bad line(s) in {data} (listed above); fix them or pass --skip-bad-lines")
    for name, examples in splits.items():
        if not examples:
            raise FastVLMError(f"{folder / f'{name}.jsonl'}: no usable examples (every line was skipped)")
    return splits
