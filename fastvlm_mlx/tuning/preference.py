"""Preference tuning (``--train-mode dpo``): Direct Preference Optimization (Rafailov et al.) on mlx-lm's tuner.

A line is ``{"prompt": str}`` or ``{"messages": [...]}`` (the conversation before the answer, OpenAI-style, with
image parts as the SFT data takes them), an optional ``"image"`` (a path or a list; a prompt's ``<image>`` marks
place them, as in LLaVA's data, else they go to the first user turn), and the two answers ``"chosen"`` and
``"rejected"``.  Each answer is tokenized as the SFT data is, and its log-probability is summed over the same
tokens the SFT loss covers: the answer's tokens and the ``<|im_end|>`` that closes it.

The reference model is the base model.  Its log-probabilities are computed once per example before training,
with the trainable model as it starts: LoRA/DoRA's B is zero then (the model is the base), and full fine-tuning
starts from the base weights.  A batch holds each pair's chosen sequence, then each pair's rejected sequence,
and their reference log-probabilities, so mlx-lm's ``train``/``evaluate`` run DPO with the SFT trainer's batches.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..errors import FastVLMError
from ..processor import FastVLMProcessor
from .data import Example, ImageResolver, llava_messages, openai_messages, read_lines, tokenize
from .trainer import Batches, image_embeddings, splice


@dataclass
class PreferencePair:
    """The chosen and the rejected answer to one prompt; ``reference`` holds the base model's summed
    log-probabilities of (chosen, rejected) once computed."""

    chosen: Example
    rejected: Example
    where: str
    reference: tuple[float, float] | None = None

    def positions(self, image_tokens: int) -> int:
        return max(self.chosen.positions(image_tokens), self.rejected.positions(image_tokens))


def _answer(record: dict, name: str) -> str:
    value = record.get(name)
    if not isinstance(value, str) or not value.strip():
        raise FastVLMError(f"'{name}' must be a non-empty string (the {name} answer)")
    return value


def prompt_messages(record: dict, resolve: ImageResolver) -> list[dict]:
    """The conversation before the answer, as the engine's messages."""
    if ("prompt" in record) == ("messages" in record):
        raise FastVLMError("a preference line needs 'prompt' or 'messages' (one of them)")
    if "prompt" in record:
        prompt = record["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise FastVLMError("'prompt' must be a non-empty string")
        return llava_messages(
            {"image": record.get("image"), "conversations": [{"from": "human", "value": prompt}]}, resolve
        )
    messages = openai_messages(record["messages"], resolve)
    if messages[-1].get("role") != "user":
        raise FastVLMError("'messages' must end with the user message the answers reply to")
    images = record.get("image")
    images = [] if images is None else [images] if isinstance(images, str) else images
    if not isinstance(images, list):
        raise FastVLMError("'image' must be a path or a list of paths")
    if images:
        first = next(k for k, m in enumerate(messages) if m.get("role") == "user")
        content = messages[first]["content"]
        content = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
        parts = [{"type": "image", "image": resolve(ref)} for ref in images]
        messages[first] = {**messages[first], "content": parts + content}
    return messages


def answer_example(messages: list[dict], answer: str, processor: FastVLMProcessor, where: str) -> Example:
    """The conversation with ``answer`` appended; the labels cover that answer's tokens and its ``<|im_end|>``
    only (not earlier answers of the conversation)."""
    ids, labels, images = tokenize(messages + [{"role": "assistant", "content": answer}], processor)
    covered = len(processor.tokenizer.encode(answer, add_special_tokens=False)) + 1
    return Example(ids, [False] * (len(ids) - covered) + labels[-covered:], images, where)


def read_preference_split(
    path: Path,
    processor: FastVLMProcessor,
    image_tokens: int,
    *,
    image_folder: str | None = None,
    max_seq_length: int = 2048,
    **_,
) -> tuple[list[PreferencePair], list[str]]:
    """Every line of one JSONL file as a PreferencePair; returns (pairs, problems) as ``data.read_lines`` does
    (``data.read_split``'s contract, for ``load_splits``)."""

    def parse(record: dict, resolve, where: str) -> PreferencePair:
        chosen, rejected = _answer(record, "chosen"), _answer(record, "rejected")
        messages = prompt_messages(record, resolve)
        return PreferencePair(
            answer_example(messages, chosen, processor, where),
            answer_example(messages, rejected, processor, where),
            where,
        )

    return read_lines(path, image_folder, image_tokens, max_seq_length, parse)


class PreferenceBatches(Batches):
    """``Batches`` over pairs: ``(ids, labels, slots, images, reference)`` with the B chosen sequences first,
    then the B rejected ones, and ``reference`` (2B,) their reference log-probabilities in that order."""

    def batch(self, pairs: Sequence[PreferencePair]) -> tuple:
        sequences = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        known = [p.reference or (0.0, 0.0) for p in pairs]
        reference = mx.array([c for c, _ in known] + [r for _, r in known], dtype=mx.float32)
        return (*super().batch(sequences), reference)


def groups(pairs: Sequence[PreferencePair], batch_size: int, image_tokens: int) -> list[list[PreferencePair]]:
    """The batches ``Batches`` makes of ``pairs`` (length-sorted, then cut), in order: computing the reference on
    the very batches the loss sees makes policy and reference agree bit for bit while they are the same model."""
    order = sorted(range(len(pairs)), key=lambda i: pairs[i].positions(image_tokens))
    return [[pairs[j] for j in order[i : i + batch_size]] for i in range(0, len(order), batch_size)]


def sequence_logps(model, ids, labels, slots, images, kind: str) -> mx.array:
    """(2B,) summed log-probabilities of the tokens the labels cover."""
    embeddings = splice(model, ids, slots, image_embeddings(model, images, kind))
    logits = model(ids, input_embeddings=embeddings)[:, :-1].astype(mx.float32)
    return -(nn.losses.cross_entropy(logits, ids[:, 1:]) * labels[:, 1:]).sum(-1)


def dpo_margins(model, ids, labels, slots, images, reference, kind: str, beta: float) -> mx.array:
    """(B,) beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)))."""
    gain = sequence_logps(model, ids, labels, slots, images, kind) - reference
    half = ids.shape[0] // 2
    return beta * (gain[:half] - gain[half:])


def make_dpo_loss(kind: str, beta: float):
    """mlx-lm's loss signature: (mean of -log sigmoid(margin) over the batch's pairs, the number of pairs), so
    ``evaluate`` averages over pairs."""

    def loss(model, ids, labels, slots, images, reference):
        margins = dpo_margins(model, ids, labels, slots, images, reference, kind, beta)
        return mx.logaddexp(mx.zeros_like(margins), -margins).mean(), mx.array(margins.shape[0])

    return loss


def set_references(model, pairs, batches: PreferenceBatches, batch_size: int, kind: str) -> None:
    """Each pair's reference log-probabilities, from the model as it is now (call it before any update)."""
    model.eval()
    for group in groups(pairs, batch_size, batches.image_tokens):
        logps = sequence_logps(model, *batches.batch(group)[:4], kind).tolist()
        for pair, chosen, rejected in zip(group, logps[: len(group)], logps[len(group) :]):
            pair.reference = (chosen, rejected)


def reward_accuracy(model, pairs, batches: PreferenceBatches, batch_size: int, kind: str, beta: float) -> float:
    """The fraction of pairs whose chosen answer gained more over the reference than the rejected one."""
    model.eval()
    wins = 0
    for group in groups(pairs, batch_size, batches.image_tokens):
        wins += int((dpo_margins(model, *batches.batch(group), kind, beta) > 0).sum().item())
    return wins / len(pairs)
