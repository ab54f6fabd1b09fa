"""``python -m fastvlm_mlx.chat``: chat with FastVLM about images in the terminal (or from a script).

Each answer streams to stdout.  Commands: ``/image PATH`` attaches an image (a file or an http(s) URL) to
the next message, ``/schema FILE`` makes the following answers JSON that matches the JSON Schema in FILE
(``/schema off`` goes back to free text, ``/schema`` alone says which is in force; ``--schema``, ``--regex``
or ``--choices`` set one from the start), ``/reset`` starts over, ``/save FILE`` and ``/load FILE`` keep a
conversation (history and KV cache, in ``FILE.safetensors``), ``/quit`` leaves.  In a terminal the input line
can be edited and earlier lines recalled (prompt_toolkit); Ctrl-C stops the answer being written and keeps
the conversation, Ctrl-C at the prompt or Ctrl-D leaves.  When stdin is not a terminal, each line is one user
message and each answer one line of output.  A bad command or input prints one ``error: ...`` line and the
conversation goes on.
"""

import sys
from collections.abc import Callable

from .errors import FastVLMError
from .processor import DEFAULT_SYSTEM

HELP = "commands: /image PATH, /schema FILE|off, /reset, /save FILE, /load FILE, /quit"


def _stats_line(r) -> str:
    new = r.prompt_tokens - r.cached_tokens
    return (
        f"TTFT {r.ttft_ms:.1f} ms | vision {r.vision_ms:.1f} ms | prompt {r.prompt_tokens} positions "
        f"({r.cached_tokens} cached, {new} new) | generation {r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s"
    )


class ChatREPL:
    """The loop, apart from the model loading, so that it can be driven line by line."""

    def __init__(self, chat, sampling: dict, verbose: bool = False, out=sys.stdout, err=sys.stderr, constraint=None):
        self.chat, self.sampling, self.verbose = chat, sampling, verbose
        self.out, self.err = out, err
        self.images: list[str] = []
        self.constraint = constraint  # what the answers must match (structured.Constraint), None for free text

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
        from .cli import image_argument
        from .session import ChatSession, conversation_file

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
            self.images.append(image_argument(arg))  # fails now, with the file named, not at the next message
        elif name == "/save":
            if not arg:
                raise FastVLMError("/save needs a file name")
            path = conversation_file(arg)
            self.chat.save(path)
            print(f"saved to {path}", file=self.err, flush=True)
        elif name == "/load":
            if not arg:
                raise FastVLMError("/load needs a file name")
            self.chat = ChatSession.load(conversation_file(arg), self.chat.model, self.chat.processor)
            self.images = []
        elif name == "/schema":
            self._schema(arg)
        elif name == "/help":
            print(HELP, file=self.err, flush=True)
        else:
            raise FastVLMError(f"unknown command {name} ({HELP})")
        return True

    def _schema(self, arg: str) -> None:
        """``/schema FILE`` sets the answers' JSON Schema, ``/schema off`` clears it, ``/schema`` shows it."""
        import json

        from .cli import schema_file

        if arg and arg != "off":
            self.constraint = schema_file(arg)  # a bad file raises here, and the schema in force stays
            print(f"answers follow the JSON schema in {arg} (/schema off: free text)", file=self.err, flush=True)
            return
        if arg == "off":
            self.constraint = None
        if self.constraint is None:
            said = "no schema: answers are free text"
        elif self.constraint.schema is not None:
            said = "answers follow the JSON schema " + json.dumps(self.constraint.schema, separators=(",", ":"))
        else:
            said = {"regex": "answers match the --regex given at the start"}.get(
                self.constraint.kind, "answers are one of the --choices given at the start"
            )
        print(said, file=self.err, flush=True)

    def _ask(self, text: str) -> None:
        from .cli import cut_short
        from .engine import Sampling

        last = None
        answer = self.chat.stream(text, self.images or None, response_format=self.constraint, **self.sampling)
        try:
            for last in answer:
                self.out.write(last.text)
                self.out.flush()
        except KeyboardInterrupt:  # Ctrl-C: the answer stops here and stays in the conversation, as far as it got
            answer.close()
            self.out.write("\n")
            self.out.flush()
            print("(stopped)", file=self.err, flush=True)
            if last is not None:  # the turn is in the history; if nothing came, the images wait for the next one
                self.images = []
            return
        self.images = []  # attached to this message only; it is now part of the history
        self.out.write("\n")
        self.out.flush()
        if self.verbose and last is not None:
            print(_stats_line(last), file=self.err, flush=True)
        if self.constraint is not None and last is not None and last.finish_reason == "length":
            max_tokens = self.sampling.get("max_tokens", Sampling.max_tokens)
            print(
                f"warning: {cut_short(self.constraint, max_tokens, last.generation_tokens)}", file=self.err, flush=True
            )


def main(argv: list[str] | None = None) -> int:
    import typer

    from .cli import (
        adapter_path_option,
        connect_timeout_option,
        dtype_option,
        image_argument,
        model_option,
        parallel_option,
        run_ranked,
        sampling_options,
        structured_options,
        use_one_line_warnings,
    )
    from .errors import exit_on_user_error

    use_one_line_warnings()
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.command(help="Chat with FastVLM about images. " + HELP + ".")
    @exit_on_user_error
    @structured_options
    @sampling_options
    def run(
        model_path: str = model_option(),
        dtype: str | None = dtype_option(),
        adapter_path: str | None = adapter_path_option(),
        image: list[str] | None = typer.Option(None, "--image", "-i", help="Image(s) for the first message."),
        system: str = typer.Option(DEFAULT_SYSTEM, "--system", help="System prompt ('' for none)."),
        image_cache_mb: int = typer.Option(256, "--image-cache-mb", help="Image-feature cache size (0 disables)."),
        verbose: bool = typer.Option(
            False, "--verbose", "-v", help="Per turn: TTFT, vision time, cached and new positions."
        ),
        parallel: str = parallel_option(),
        connect_timeout: float = connect_timeout_option(),
        sampling: dict | None = None,
        constraint=None,
    ):
        from .session import ChatSession

        images = [image_argument(i) for i in image or []]  # a bad image fails before the model loads, as in generate

        def converse(engine) -> None:
            chat = ChatSession(engine.model, engine.processor, system=system or None, engine=engine)
            repl = ChatREPL(chat, sampling, verbose, constraint=constraint)
            repl.images = images
            _converse(repl)

        run_ranked(
            converse,
            model_path,
            parallel,
            connect_timeout,
            dtype=dtype,
            adapter_path=adapter_path,
            image_cache_bytes=image_cache_mb << 20,
        )

    app(args=argv)
    return 0


def line_reader(interactive: bool, **session_options) -> Callable[[], str]:
    """How the next input line is read: with line editing and history in a terminal (prompt_toolkit,
    else ``input``), plain lines otherwise.  Returns "" at the end of input."""
    if not interactive:
        return sys.stdin.readline
    try:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import InMemoryHistory
    except ImportError:
        return lambda: input(">> ") + "\n"
    session = PromptSession(history=InMemoryHistory(), **session_options)
    return lambda: session.prompt(">> ") + "\n"


def _converse(repl: ChatREPL, read: Callable[[], str] | None = None) -> None:
    """Read and handle lines until /quit, the end of input, or Ctrl-C / Ctrl-D at the prompt."""
    interactive = read is not None or sys.stdin.isatty()
    if read is None:
        read = line_reader(interactive)
        if interactive:
            print(f"fastvlm-mlx chat ({HELP}; Ctrl-C stops an answer, Ctrl-D quits)", file=sys.stderr)
    while True:
        try:
            line = read()
        except (EOFError, KeyboardInterrupt):
            break
        if not line or not repl.handle(line):
            break


if __name__ == "__main__":
    sys.exit(main())
