"""``python -m fastvlm_mlx.server`` (``fastvlm-server``): the command line; its defaults are ``ServerConfig``'s."""

import sys
from pathlib import Path

from ..errors import FastVLMError
from .config import MB, ServerConfig

DEFAULTS = ServerConfig(model="")


def listen(host: str, port: int):
    """A socket bound and listening on host:port, made before the model loads, so that a busy port fails
    at once; uvicorn then serves on it."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as e:
        raise FastVLMError(f"cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e})") from None
    try:
        if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: not blocked by TIME_WAIT
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise FastVLMError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    return sock


def main(argv: list[str] | None = None) -> int:
    import typer

    from .. import distributed
    from ..cli import (
        adapter_path_option,
        connect_timeout_option,
        dtype_option,
        model_option,
        parallel_option,
        sampling_options,
        use_one_line_warnings,
    )
    from ..engine import engine_for
    from ..errors import exit_on_user_error
    from ..loader import load

    use_one_line_warnings()
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    d = DEFAULTS

    @app.command(
        help="Serve FastVLM over the OpenAI chat-completions and Responses APIs (binds to 127.0.0.1 by default). "
        "The sampling options are the defaults of requests that leave them out."
    )
    @exit_on_user_error
    @sampling_options
    def run(
        model_path: str = model_option(),
        dtype: str | None = dtype_option(),
        adapter_path: str | None = adapter_path_option(),
        host: str = typer.Option(d.host, "--host"),
        port: int = typer.Option(d.port, "--port", help="Port to listen on (0: any free port, printed at start)."),
        api_key: str | None = typer.Option(d.api_key, "--api-key", help="Require 'Authorization: Bearer KEY'."),
        max_tokens_limit: int = typer.Option(
            d.max_tokens_limit, "--max-tokens-limit", help="Cap on max_tokens per request."
        ),
        max_queue: int = typer.Option(
            d.max_queue, "--max-queue", help="Requests waiting beyond the batch (429 when full)."
        ),
        max_batch: int = typer.Option(d.max_batch, "--max-batch", help="Requests decoded together."),
        request_timeout: float = typer.Option(
            d.request_timeout, "--request-timeout", help="Seconds before a request is ended (504)."
        ),
        max_body_mb: float = typer.Option(
            d.max_body_bytes / MB, "--max-body-mb", help="Largest request body accepted (413)."
        ),
        max_image_mb: float = typer.Option(
            d.max_image_bytes / MB, "--max-image-mb", help="Largest image file accepted."
        ),
        max_image_pixels: int = typer.Option(
            d.max_image_pixels, "--max-image-pixels", help="Largest decoded image accepted."
        ),
        allow_remote_images: bool = typer.Option(
            d.allow_remote_images, "--allow-remote-images", help="Fetch http(s) image URLs."
        ),
        allowed_image_dir: str | None = typer.Option(
            d.allowed_image_dir, "--allowed-image-dir", help="Serve local image paths under DIR."
        ),
        image_cache_mb: float = typer.Option(
            d.image_cache_bytes / MB, "--image-cache-mb", help="Image-feature cache bound (0 disables)."
        ),
        prompt_cache_mb: int = typer.Option(
            d.prompt_cache_bytes // MB, "--prompt-cache-mb", help="Prompt (KV) cache bound."
        ),
        ui: bool = typer.Option(d.ui, "--ui/--no-ui", help="Serve the web page (chat and live camera) at /."),
        open_page: bool = typer.Option(False, "--open", help="Open the web page in the browser once serving."),
        parallel: str = parallel_option(),
        connect_timeout: float = connect_timeout_option(),
        sampling: dict | None = None,
    ):
        if allowed_image_dir is not None and not Path(allowed_image_dir).is_dir():
            raise FastVLMError(f"{allowed_image_dir}: --allowed-image-dir is not a directory")
        cfg = ServerConfig(
            model=model_path,
            host=host,
            port=port,
            api_key=api_key,
            max_tokens_limit=max_tokens_limit,
            max_queue=max_queue,
            max_batch=max_batch,
            request_timeout=request_timeout,
            max_body_bytes=int(max_body_mb * MB),
            max_image_bytes=int(max_image_mb * MB),
            max_image_pixels=max_image_pixels,
            allow_remote_images=allow_remote_images,
            allowed_image_dir=allowed_image_dir,
            image_cache_bytes=int(image_cache_mb * MB),
            prompt_cache_bytes=prompt_cache_mb * MB,
            sampling=sampling,
            ui=ui,
        )
        if open_page and not ui:
            raise FastVLMError("--open needs the web page: drop --no-ui")
        try:
            import uvicorn

            from .routes import create_app
        except ImportError:
            raise FastVLMError("the server needs FastAPI and uvicorn: pip install -e '.[server]'") from None
        cluster = distributed.start(parallel, connect_timeout)
        sock = listen(host, port) if cluster is None or cluster.leader else None  # before the slow model load
        try:
            model, processor = load(model_path, dtype=dtype, cluster=cluster, adapter_path=adapter_path)
            if not distributed.follow_or_lead(cluster, engine_for(model, processor, cfg.image_cache_bytes)):
                return  # a follower rank: rank 0 serves
            service = create_app(model, processor, cfg, model_path)
            bound = sock.getsockname()
            url = f"http://{host}:{bound[1]}/v1"
            page = f"http://{host}:{bound[1]}/"

            class Announcing(uvicorn.Server):
                async def startup(self, sockets=None):
                    await super().startup(sockets=sockets)
                    if self.started:  # the app is up and the socket accepts requests
                        print(f"fastvlm-mlx serving {model_path} on {url}", file=sys.stderr, flush=True)
                        if ui:
                            print(f"web page: {page}", file=sys.stderr, flush=True)
                        if open_page:
                            import webbrowser

                            webbrowser.open(page)

            server = Announcing(uvicorn.Config(service, log_level="warning"))
            try:
                server.run(sockets=[sock])
            except KeyboardInterrupt:
                pass
            finally:  # the generation loop ends between steps, and lets follower ranks go
                service.state.generation.stop()
        finally:
            if sock is not None:
                sock.close()
        if service.state.generation.failure:
            raise FastVLMError(service.state.generation.failure)

    app(args=argv)
    return 0
