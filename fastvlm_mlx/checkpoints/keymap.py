"""Tensor names of the three published layouts -> this project's module tree.

Apple (A) and mlx-vlm (C) name the vision tower after Apple's flat ``network``
list; transformers (B) uses timm's ``stages``.  Both are first brought to
"stage" form and then renamed by one shared rule table, so a block type has one
rule wherever it comes from.  A name that no rule knows is an error: a
checkpoint is never half-loaded.
"""

import re
from collections import defaultdict
from collections.abc import Iterable

from ..errors import FastVLMError
from .files import APPLE, FASTVLM_MLX, HF, MLXVLM

DROP = None  # a rule target meaning "known, and not used at run time"

# Where each format keeps its parts: (source prefix, target prefix, vision naming).
_PREFIXES = {
    APPLE: [
        ("model.vision_tower.vision_tower.model.", "vision_tower.", "apple"),
        ("model.mm_projector.0.", "projector.linear_1.", None),
        ("model.mm_projector.2.", "projector.linear_2.", None),
        ("lm_head.", "language_model.lm_head.", None),
        ("model.", "language_model.model.", None),
    ],
    HF: [
        ("model.vision_tower.timm_model.", "vision_tower.", "timm"),
        ("model.multi_modal_projector.linear_1.", "projector.linear_1.", None),
        ("model.multi_modal_projector.linear_2.", "projector.linear_2.", None),
        ("model.language_model.", "language_model.model.", None),
        ("lm_head.", "language_model.lm_head.", None),
    ],
    MLXVLM: [
        ("vision_tower.vision_model.", "vision_tower.", "apple"),
        ("mm_projector.0.", "projector.linear_1.", None),
        ("mm_projector.2.", "projector.linear_2.", None),
        ("language_model.", "language_model.", None),
    ],
    FASTVLM_MLX: [("", "", None)],
}

# Vision names in stage form (after the network list is resolved) -> module tree.
_VISION_RULES = [
    (r"stem\.(?:blocks\.)?(\d)\.reparam_conv\.(weight|bias)", r"stem.layers.\1.\2"),
    (
        r"stages\.(\d+)\.downsample\.proj\.0\.(?:lkb_reparam|reparam_conv)\.(weight|bias)",
        r"stages.\1.downsample.conv.\2",
    ),
    (r"stages\.(\d+)\.downsample\.proj\.1\.reparam_conv\.(weight|bias)", r"stages.\1.downsample.pointwise.\2"),
    (r"stages\.(\d+)\.pos_emb\.reparam_conv\.(weight|bias)", r"stages.\1.pos_emb.\2"),
    (r"(stages\.\d+\.blocks\.\d+)\.token_mixer\.reparam_conv\.(weight|bias)", r"\1.token_mixer.\2"),
    (r"(stages\.\d+\.blocks\.\d+)\.token_mixer\.(qkv\.weight|proj\.weight|proj\.bias)", r"\1.token_mixer.\2"),
    (r"(stages\.\d+\.blocks\.\d+)\.(layer_scale(?:_1|_2)?)(?:\.gamma)?", r"\1.\2"),
    (r"(stages\.\d+\.blocks\.\d+)\.norm\.(weight|bias)", r"\1.norm.\2"),
    (r"(stages\.\d+\.blocks\.\d+)\.(?:convffn|mlp)\.conv\.conv\.weight", r"\1.mlp.conv.weight"),
    (r"(stages\.\d+\.blocks\.\d+)\.(?:convffn|mlp)\.conv\.bn\.(weight|bias|running_mean|running_var)", r"\1.mlp.bn.\2"),
    (r"stages\.\d+\.blocks\.\d+\.(?:convffn|mlp)\.conv\.bn\.num_batches_tracked", DROP),
    (r"(stages\.\d+\.blocks\.\d+)\.(?:convffn|mlp)\.(fc1|fc2)\.(weight|bias)", r"\1.mlp.\2.\3"),
    (r"(?:conv_exp|final_conv)\.reparam_conv\.(weight|bias)", r"final_conv.conv.\1"),
    (r"(?:conv_exp|final_conv)\.se\.(?:reduce|fc1)\.(weight|bias)", r"final_conv.se.reduce.\1"),
    (r"(?:conv_exp|final_conv)\.se\.(?:expand|fc2)\.(weight|bias)", r"final_conv.se.expand.\1"),
    (r"head\.proj", DROP),  # Apple's pooled CLIP head: FastVLM never uses it
]
_VISION_RULES = [(re.compile(p + r"$"), t) for p, t in _VISION_RULES]

_TEXT_DROP = re.compile(r".*rotary_emb\.inv_freq$")


def _network_stages(names: Iterable[str]) -> dict[int, tuple[int, str]]:
    """Apple's flat ``network`` list -> {index: (stage, part)}; a downsample opens a new stage."""
    kinds = {}
    for name in names:
        m = re.match(r"network\.(\d+)\.(\w+)", name)
        if not m:
            continue
        n, child = int(m.group(1)), m.group(2)
        kind = "blocks" if child.isdigit() else "downsample" if child == "proj" else "pos_emb"
        if kinds.setdefault(n, kind) != kind:
            raise FastVLMError(f"vision tower: network.{n} mixes {kinds[n]} and {kind} tensors")
    stages, stage = {}, 0
    for i, n in enumerate(sorted(kinds)):
        if kinds[n] == "downsample" and i > 0:
            stage += 1
        stages[n] = (stage, kinds[n])
    return stages


def _apple_to_stage_form(name: str, stages: dict[int, tuple[int, str]]) -> str:
    name = re.sub(r"^patch_embed\.", "stem.", name)
    m = re.match(r"network\.(\d+)\.(.*)", name)
    if not m:
        return name
    stage, kind = stages[int(m.group(1))]
    rest = m.group(2)
    if kind == "blocks":
        return f"stages.{stage}.blocks.{rest}"
    if kind == "downsample":
        return f"stages.{stage}.downsample.{rest}"
    return f"stages.{stage}.pos_emb.{rest}"


def _vision_target(name: str) -> str | None:
    for pattern, target in _VISION_RULES:
        if pattern.match(name):
            return DROP if target is DROP else pattern.sub(target, name)
    raise KeyError(name)


def to_mlx_names(fmt: str, weights: dict) -> tuple[dict, list[str]]:
    """Rename every tensor to the module tree.  Returns (renamed, dropped names).

    Raises FastVLMError listing the tensors that no rule recognises.
    """
    groups = defaultdict(dict)  # vision naming -> {stripped name: original}
    renamed, dropped, unknown = {}, [], []
    for key, value in weights.items():
        for src, dst, naming in _PREFIXES[fmt]:
            if key.startswith(src):
                if naming:
                    groups[naming][key[len(src) :]] = key
                elif _TEXT_DROP.match(key):
                    dropped.append(key)
                else:
                    renamed[dst + key[len(src) :]] = value
                break
        else:
            unknown.append(key)
    for naming, names in groups.items():
        stages = _network_stages(names) if naming == "apple" else {}
        for name, key in names.items():
            stage_name = _apple_to_stage_form(name, stages) if naming == "apple" else name
            try:
                target = _vision_target(stage_name)
            except KeyError:
                unknown.append(key)
                continue
            if target is DROP:
                dropped.append(key)
            else:
                renamed["vision_tower." + target] = weights[key]
    if unknown:
        shown = ", ".join(sorted(unknown)[:5]) + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise FastVLMError(f"unexpected tensor(s) for a {fmt} checkpoint: {shown}")
    return renamed, dropped
