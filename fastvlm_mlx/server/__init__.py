"""``python -m fastvlm_mlx.server``: an OpenAI-compatible server (chat completions and the Responses API).

HTTP handling (FastAPI + uvicorn) runs on the event loop; all MLX work runs on one generation thread that admits
queued requests, prefills them through the engine (images of requests that arrive together in one vision-tower
call, prefixes from the prompt cache) and decodes every running request in one batch (``batching.BatchDecoder``),
each with its own sampling, stop strings and token budget. Requests are parsed and checked before they are queued;
every error is an OpenAI error body.

The layers, as vLLM's OpenAI entry points have them: ``protocol`` (the wire format, pydantic), ``images`` (image
sources and limits), ``scheduler`` (the generation thread, typed events), ``serving`` (request -> scheduler ->
response), ``routes`` (the FastAPI routes and app), ``metrics``, ``config`` (``ServerConfig``, the one place of
the defaults) and ``cli``.
"""

import importlib

from .cli import listen, main
from .config import ServerConfig

# What needs the server's extra packages (pydantic, FastAPI) is imported when first asked for, so that the command
# can still say which packages are missing.
_LAZY = {
    "APIError": "protocol",
    "ChatCompletionRequest": "protocol",
    "SUPPORTED": "protocol",
    "load_image_url": "images",
    "Metrics": "metrics",
    "memory_gauges": "metrics",
    "ParsedRequest": "scheduler",
    "Scheduler": "scheduler",
    "parse_request": "serving",
    "ChatService": "serving",
    "create_app": "routes",
}

__all__ = ["ServerConfig", "listen", "main", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
