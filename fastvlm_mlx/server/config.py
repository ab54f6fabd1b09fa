"""The server's settings and their defaults, stated once: the command line reads its defaults from here."""

from dataclasses import dataclass, field

MB = 1 << 20


@dataclass
class ServerConfig:
    model: str
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    max_tokens_limit: int = 4096
    sampling: dict = field(default_factory=dict)  # defaults for what a request leaves out (cli.sampling_defaults)
    max_queue: int = 64
    max_batch: int = 8
    request_timeout: float = 600.0
    max_body_bytes: int = 32 * MB
    max_image_bytes: int = 16 * MB
    max_image_pixels: int = 40_000_000
    allow_remote_images: bool = False
    allowed_image_dir: str | None = None
    image_cache_bytes: int = 256 * MB
    prompt_cache_bytes: int = 1024 * MB
    keepalive_s: float = 5.0
    remote_timeout_s: float = 10.0
    ui: bool = True  # the web page at / (static files in server/static/)
