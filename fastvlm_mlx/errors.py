"""One exception type for every problem a user can cause (bad path, bad checkpoint, bad image, bad prompt).

The CLIs catch exactly this type and print its message as one line; anything else is a bug and keeps its traceback.
"""


class FastVLMError(Exception):
    """A user-facing problem with an input: the message names the input and what is wrong with it."""


class NonFiniteLogitsError(FastVLMError):
    """The model's logits overflowed the precision it computes in (float16 on Qwen2's larger models)."""


class ContextLengthError(FastVLMError):
    """The prompt leaves no room to generate in the model's context: a bad request, not a server fault."""


def lost_peer(e: BaseException) -> bool:
    """Whether MLX's distributed backend failed because another rank went away."""
    return isinstance(e, RuntimeError) and str(e).startswith(("[ring]", "[mpi]", "[jaccl]"))


def exit_on_user_error(command):
    """Wrap a CLI command: a FastVLMError, or another rank of a distributed run going away, becomes one
    'error: ...' line on stderr and exit status 1."""
    import functools
    import sys

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except FastVLMError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        except RuntimeError as e:
            if not lost_peer(e):
                raise
            print(f"error: lost another rank of the distributed group, which stopped or crashed ({e})", file=sys.stderr)
            raise SystemExit(1) from None

    return wrapper
