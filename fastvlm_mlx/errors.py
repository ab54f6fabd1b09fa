"""One exception type for every problem a user can cause (bad path, bad checkpoint, bad image, bad prompt).

The CLIs catch exactly this type and print its message as one line; anything else is a bug and keeps its traceback.
"""


class FastVLMError(Exception):
    """A user-facing problem with an input: the message names the input and what is wrong with it."""
