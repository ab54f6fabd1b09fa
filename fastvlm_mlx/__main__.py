"""``python -m fastvlm_mlx``: the commands, one line each; ``python -m fastvlm_mlx COMMAND ...`` runs one."""

import importlib
import sys

# command -> (module with its main(), what it does); each is also a console script, fastvlm-COMMAND
COMMANDS = {
    "generate": ("fastvlm_mlx.generate", "answer one prompt about images, streaming the answer"),
    "chat": ("fastvlm_mlx.chat", "talk about images in the terminal, keeping the conversation"),
    "server": ("fastvlm_mlx.server", "serve the OpenAI chat-completions and Responses APIs"),
    "batch": ("fastvlm_mlx.batch", "caption or question a whole image collection into a JSONL file, resumably"),
    "lora": ("fastvlm_mlx.lora", "fine-tune with LoRA, DoRA or full fine-tuning on images with Q&A (mlx-lm's tuner)"),
    "convert": ("fastvlm_mlx.convert", "convert Apple, transformers or mlx-vlm checkpoints (and export CoreML)"),
    "fuse": ("fastvlm_mlx.fuse", "fold fine-tuned adapters into a model and save it (or as Apple's app folder)"),
    "eval": ("fastvlm_mlx.eval", "answer a JSONL file of questions about images and score them (VQA, ANLS, ...)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: python -m fastvlm_mlx COMMAND [OPTIONS]   (or fastvlm-COMMAND; COMMAND --help for its options)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if args[0] not in COMMANDS:
        print(f"error: unknown command {args[0]!r} (one of {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[args[0]][0])
    sys.argv[0] = args[0]  # click then names the command "python -m fastvlm_mlx.COMMAND" in --help
    return module.main(args[1:])


if __name__ == "__main__":
    sys.exit(main())
