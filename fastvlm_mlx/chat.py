"""``python -m fastvlm_mlx.chat``: chat with FastVLM about images in the terminal (or from a script).

Each answer streams to stdout.  Commands: ``/image PATH`` attaches an image to the next message,
``/reset`` starts over, ``/save FILE`` and ``/load FILE`` keep a conversation (history and KV cache),
``/quit`` leaves.  When stdin is not a terminal, each line is one user message and each answer one
line of output.  A bad command or input prints one ``error: ...`` line and the conversation goes on.
"""

import sys
from typing import List, Optional

from . import distributed
from .errors import FastVLMError
from .processor import DEFAULT_SYSTEM

HELP = "commands: /image PATH, /reset, /save FILE, /load FILE, /quit"


def _stats_line(r) -> str:
    new = r.prompt_tokens - r.cached_tokens
    return (
        f"TTFT {r.ttft_ms:.1f} ms | vision {r.vision_ms:.1f} ms | prompt {r.prompt_tokens} positions "
        f"({r.cached_tokens} cached, {new} new) | generation {r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s"
    )


class ChatREPL:
    """The loop, apart from the model loading, so that it can be driven line by line."""

    def __init__(self, chat, sampling: dict, verbose: bool = False, out=sys.stdout, err=sys.stderr):
        self.chat, self.sampling, self.verbose = chat, sampling, verbose
        self.out, self.err = out, err
        self.images: List[str] = []

    def handle(self, line: str) -> bool:
        """One line of input; returns False when the session should end."""
        line = line.strip()
        if not line:
            return True
        try:
            if line.startswith("/"):
                return self._command(line)
            self._ask(line)
        except FastVLMError as e:
            print(f"error: {e}", file=self.err, flush=True)
        return True

    def _command(self, line: str) -> bool:
        from .image import load_image
        from .session import ChatSession

        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit", "/q"):
            return False
        if name == "/reset":
            self.chat.reset()
            self.images = []
        elif name == "/image":
            if not arg:
                raise FastVLMError("/image needs a path")
            load_image(arg)  # fails now, with the file named, rather than at the next message
            self.images.append(arg)
        elif name == "/save":
            if not arg:
                raise FastVLMError("/save needs a file name")
            self.chat.save(arg)
        elif name == "/load":
            if not arg:
                raise FastVLMError("/load needs a file name")
            self.chat = ChatSession.load(arg, self.chat.model, self.chat.processor)
        elif name == "/help":
            print(HELP, file=self.err, flush=True)
        else:
            raise FastVLMError(f"unknown command {name} ({HELP})")
        return True

    def _ask(self, text: str) -> None:
        last = None
        for last in self.chat.stream(text, self.images or None, **self.sampling):
            self.out.write(last.text)
            self.out.flush()
        self.images = []  # attached to this message only; it is now part of the history
        self.out.write("\n")
        self.out.flush()
        if self.verbose and last is not None:
            print(_stats_line(last), file=self.err, flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    import typer

    from .errors import exit_on_user_error
    from .loader import DEFAULT_MODEL, load

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.command(help="Chat with FastVLM about images. " + HELP + ".")
    @exit_on_user_error
    def run(
        model_path: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Model directory or Hugging Face repo id."),
        image: Optional[List[str]] = typer.Option(None, "--image", "-i", help="Image(s) for the first message."),
        system: str = typer.Option(DEFAULT_SYSTEM, "--system", help="System prompt ('' for none)."),
        max_tokens: int = typer.Option(256, "--max-tokens", help="Most tokens per answer."),
        temperature: float = typer.Option(0.0, "--temperature", "--temp", help="0 means greedy."),
        top_p: float = typer.Option(1.0, "--top-p"),
        seed: Optional[int] = typer.Option(None, "--seed"),
        image_cache_mb: int = typer.Option(256, "--image-cache-mb", help="Image-feature cache size (0 disables)."),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Per turn: TTFT, vision time, cached and new positions."),
        parallel: str = typer.Option("tensor", "--parallel", help=distributed.PARALLEL_HELP),
        connect_timeout: float = typer.Option(distributed.DEFAULT_CONNECT_TIMEOUT, "--connect-timeout",
                                              help=distributed.CONNECT_HELP),
    ):
        from .engine import Sampling, engine_for
        from .session import ChatSession

        sampling = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        Sampling(**sampling)  # bad options fail before the model is loaded
        cluster = distributed.start(parallel, connect_timeout)
        model, processor = load(model_path, cluster=cluster)
        engine = engine_for(model, processor, image_cache_bytes=image_cache_mb << 20)
        if not distributed.follow_or_lead(cluster, engine):
            return  # a follower rank: rank 0 reads the input and prints
        with distributed.leading(cluster):
            repl = ChatREPL(ChatSession(model, processor, system=system or None, engine=engine), sampling, verbose)
            for path in image or []:
                repl.handle(f"/image {path}")
            _converse(repl)

    app(args=argv)
    return 0


def _converse(repl: ChatREPL) -> None:
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"fastvlm-mlx chat ({HELP})", file=sys.stderr)
    while True:
        try:
            line = input(">> ") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            break
        if not interactive and not line:
            break
        if not repl.handle(line):
            break


if __name__ == "__main__":
    sys.exit(main())
