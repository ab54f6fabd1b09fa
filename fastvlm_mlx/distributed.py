"""One model over the ranks of an ``mx.distributed`` group (``mlx.launch``: ring over TCP, or MPI).

Two ways to use the ranks:

- **data parallel** (``batch --parallel data``): every rank holds the whole model and answers its own
  share of the inputs; ``barrier`` lets rank 0 merge the results.
- **model parallel** (``--parallel tensor``, mlx-lm's ``Model.shard()``; ``--parallel pipeline``,
  mlx-lm's ``pipeline()``): the decoder is split over the ranks.  Rank 0, the leader, renders prompts,
  reads images, runs the vision tower once and prints or serves.  Before each step it takes (a prompt to
  stream, requests to admit, a decode step) it ``announce``s the step, and the other ranks, the
  followers (``Follower``), take the same step on their part of the decoder, so every rank's KV caches
  and sampled tokens stay the same.  The image embeddings go from the leader to the ranks whose layers
  need them (``share_images``).

Every collective here first waits for the generation stream: mlx-lm leaves a decode step running on it,
and two collectives in flight at once would mix their bytes on the wire.
"""

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .errors import FastVLMError, lost_peer
from .mlx_thread import runs_on_mlx_thread

MODEL_PARALLEL = ("tensor", "pipeline")
PARALLEL_HELP = (
    "Under mlx.launch (several ranks): split the decoder over the ranks, 'tensor' "
    "(mlx-lm's shard) or 'pipeline' (mlx-lm's pipeline). Ignored in a single process."
)
CONNECT_HELP = "Seconds to wait for the other ranks to connect before giving up."
DEFAULT_CONNECT_TIMEOUT = 120.0
IDLE_NAP = 0.4  # a follower waiting in a collective spins a core; while the leader is idle it sleeps instead


# What mlx.launch (or mpirun) sets for each backend; a process started without any of them runs alone.
LAUNCH_VARIABLES = {"MLX_HOSTFILE": "ring", "MLX_JACCL_COORDINATOR": "jaccl", "OMPI_COMM_WORLD_SIZE": "mpi"}


def launched_backend() -> str | None:
    """The backend this process was started for as one rank of several, or None."""
    return next((b for v, b in LAUNCH_VARIABLES.items() if v in os.environ), None)


def local_hosts(n: int) -> list:
    """A ring hostfile's contents for ``n`` ranks on this machine (127.0.0.1, ports free right now), for
    trying several processes on one machine and for tests."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [[f"127.0.0.1:{s.getsockname()[1]}"] for s in socks]
    finally:
        for s in socks:
            s.close()


def _connect(timeout: float) -> "mx.distributed.Group":
    """Join the group; a rank that never comes up ends this one with a clear line after ``timeout`` s.

    ``mx.distributed.init`` blocks holding the interpreter until every peer is there, so the watchdog
    is a separate little process rather than a thread."""
    backend = launched_backend()
    rank = os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "?"))
    message = (
        f"error: rank {rank}: the other ranks did not connect within {timeout:g} s "
        f"({backend} backend); start every rank, or check the hostfile and the network"
    )
    watchdog = subprocess.Popen(
        ["sh", "-c", f'sleep {timeout}; echo "$0" >&2; kill -TERM {os.getpid()}', message],
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the sleep goes with it (and with it, our stderr)
    )
    try:
        return mx.distributed.init(backend=backend, strict=True)
    except RuntimeError as e:
        raise FastVLMError(f"rank {rank}: could not join the distributed group ({backend}): {e}") from None
    finally:
        os.killpg(watchdog.pid, signal.SIGKILL)
        watchdog.wait()


@dataclass
class Cluster:
    """This process's place in the group and how the model is spread over it."""

    group: "mx.distributed.Group"
    mode: str  # "data", "tensor" or "pipeline"

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def size(self) -> int:
        return self.group.size()

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def splits_model(self) -> bool:
        return self.mode in MODEL_PARALLEL

    # ------------------------------------------------------------------ splitting the decoder
    def check_split(self, text_args) -> None:
        """Refuse a split mlx-lm cannot make, before any weights are read."""
        n = self.size
        if self.mode == "tensor":
            for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
                value = getattr(text_args, name)
                if value % n:
                    raise FastVLMError(
                        f"--parallel tensor cannot split this model over {n} ranks: its {value} "
                        f"{name.replace('num_', '').replace('_', ' ')} do not divide by {n} "
                        f"(use a divisor of {value} ranks, or --parallel pipeline)"
                    )
        elif self.mode == "pipeline" and text_args.num_hidden_layers < n:
            raise FastVLMError(
                f"--parallel pipeline cannot split {text_args.num_hidden_layers} decoder layers over {n} ranks"
            )

    def split(self, language_model) -> None:
        """Keep this rank's part of the decoder (mlx-lm's own sharding)."""
        if self.mode == "tensor":
            language_model.shard(self.group)
        elif self.mode == "pipeline":
            language_model.model.pipeline(self.group)

    @property
    def first_stage(self) -> int:
        """The rank whose layers take the input embeddings (mlx-lm gives the first layers to the last rank)."""
        return self.size - 1 if self.mode == "pipeline" else 0

    # ------------------------------------------------------------------ moving data
    def _settle(self) -> None:
        from .lm_internals import generation_stream

        mx.synchronize(generation_stream)
        mx.synchronize()

    def _sum(self, x: mx.array) -> mx.array:
        out = mx.distributed.all_sum(x, group=self.group, stream=mx.cpu)
        mx.eval(out)
        return out

    @runs_on_mlx_thread  # every collective on the thread that runs the model's, one at a time
    def share(self, obj=None):
        """The leader's ``obj`` (anything JSON can hold) on every rank."""
        self._settle()
        data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if self.leader else np.zeros(0, np.uint8)
        n = int(self._sum(mx.array([data.size], dtype=mx.int32)).item())
        payload = self._sum(mx.array(data) if self.leader else mx.zeros((n,), dtype=mx.uint8))
        return obj if self.leader else json.loads(bytes(np.array(payload)))

    @runs_on_mlx_thread
    def share_images(self, embeds: mx.array | None, shape: tuple, dtype: mx.Dtype) -> mx.array:
        """The leader's image embeddings on the ranks that need them; zeros of the same shape elsewhere
        (pipeline stages after the first only take the shape)."""
        self._settle()
        target = self.first_stage
        if self.mode == "tensor":
            return self._sum(embeds if self.leader else mx.zeros(shape, dtype=dtype))
        if self.leader and target != 0:
            mx.eval(mx.distributed.send(embeds, target, group=self.group, stream=mx.cpu))
            return embeds
        if self.rank == target and not self.leader:
            out = mx.distributed.recv(shape, dtype, 0, group=self.group, stream=mx.cpu)
            mx.eval(out)
            return out
        return embeds if self.leader else mx.zeros(shape, dtype=dtype)

    @runs_on_mlx_thread
    def sum_counts(self, counts: list) -> list:
        """Element-wise sums of small integer counts over the ranks."""
        self._settle()
        return [int(v) for v in self._sum(mx.array(counts, dtype=mx.int64)).tolist()]

    @runs_on_mlx_thread
    def gather_bytes(self, data: bytes, chunk: int = 64 << 20) -> list:
        """Every rank's ``data`` on the leader (a list in rank order; the others get []), in rounds of
        at most ``chunk`` bytes a rank so that large files never travel whole."""
        self._settle()
        parts = [bytearray() for _ in range(self.size)]
        offset = 0
        while True:
            piece = np.frombuffer(data[offset : offset + chunk], np.uint8)
            sizes = mx.distributed.all_gather(mx.array([piece.size], dtype=mx.int32), group=self.group, stream=mx.cpu)
            sizes = [int(v) for v in np.array(sizes)]
            if not any(sizes):
                break
            padded = np.zeros(max(sizes), np.uint8)
            padded[: piece.size] = piece
            rows = mx.distributed.all_gather(mx.array(padded), group=self.group, stream=mx.cpu)
            rows = np.array(rows).reshape(self.size, -1)
            if self.leader:
                for r, n in enumerate(sizes):
                    parts[r] += rows[r, :n].tobytes()
            offset += piece.size
        return [bytes(p) for p in parts] if self.leader else []

    @runs_on_mlx_thread
    def barrier(self) -> None:
        self._settle()
        self._sum(mx.zeros((1,)))

    def announce(self, op: str, **fields) -> None:
        """Leader only: tell the followers the step it is about to take."""
        if self.splits_model and self.leader:
            self.share(dict(fields, op=op))

    def close(self) -> None:
        """Leader: let the followers stop."""
        self.announce("exit")


def start(mode: str, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, allowed=MODEL_PARALLEL) -> Cluster | None:
    """The group this process is a rank of, or None when it runs alone."""
    if mode not in allowed:
        raise FastVLMError(f"--parallel must be one of {', '.join(allowed)} (got {mode!r})")
    if connect_timeout <= 0:
        raise FastVLMError(f"--connect-timeout must be positive (got {connect_timeout:g})")
    if launched_backend() is None:
        return None
    group = _connect(connect_timeout)
    if group.size() == 1:
        return None
    return Cluster(group, mode)


# ------------------------------------------------------------------ replicating calls over the ranks
# A model split over ranks runs the same engine code on every rank in lockstep.  The leader's front-ends call
# a ``Replica`` of the engine (and the ``ReplicatedDecoder`` it makes), which broadcast each call before making
# it; the followers receive each call and dispatch it from ``OPERATIONS``.  The engine and the batched decoder
# know nothing of ranks: what differs between ranks is only where image embeddings come from (the leader
# encodes and shares them; see ``image_sharing``).

OPERATIONS: dict[str, Callable] = {}


def operation(name: str):
    """Register how a follower replays the leader's call ``name`` (a function of the follower and the fields)."""

    def register(replay: Callable) -> Callable:
        OPERATIONS[name] = replay
        return replay

    return register


def image_sharing(engine, cluster: Cluster) -> Callable:
    """Where the engine's ``embed`` takes image embeddings from on a rank of a split model: the leader encodes
    them (with its image-feature cache) and sends them to the ranks whose layers take them."""
    encode_here = engine.encode_images

    def share(pixels, digests) -> list[mx.array]:
        if not digests:
            return []
        shape = (len(digests), engine.model.config.num_image_tokens, engine.model.config.text_args().hidden_size)
        mine = mx.stack(encode_here(pixels, digests)).astype(engine.dtype) if cluster.leader else None
        return list(cluster.share_images(mine, shape, engine.dtype))

    return share


def refuse_logits_processors(sampling) -> None:
    """Custom logits processors are code, which cannot be sent to the other ranks."""
    if sampling.logits_processors:
        raise FastVLMError("custom logits processors cannot be used with a decoder split over several ranks")


class Replica:
    """The leader's engine for a model split over ranks: the engine's interface, each call first broadcast."""

    def __init__(self, engine, cluster: Cluster):
        self.engine, self.cluster = engine, cluster
        engine.image_source = image_sharing(engine, cluster)

    def __getattr__(self, name):  # prepare, embed, image_cache, model, processor, dtype: the engine's own
        return getattr(self.engine, name)

    def stream(self, prompt, sampling, cache=None, **generate_kwargs):
        """The engine's stream on every rank.  After each token but the last the leader says whether its caller
        wants the next one, so that all ranks stop together."""
        sampling = sampling.seeded()  # ranks drawing from different keys would part ways
        refuse_logits_processors(sampling)
        self.cluster.announce(
            "stream",
            prompt=prompt.shareable(),
            sampling=sampling.fields(),
            cache=None if cache is None else cache.key,
            **generate_kwargs,
        )
        tokens = self.engine.stream(prompt, sampling, cache, **generate_kwargs)
        try:
            for r in tokens:
                try:
                    yield r
                except GeneratorExit:  # the caller stopped early: so do the followers
                    if r.finish_reason is None:
                        self.cluster.share(False)
                    raise
                if r.finish_reason is None:
                    self.cluster.share(True)
        finally:
            tokens.close()

    def forget(self, cache) -> None:
        self.cluster.announce("forget", cache=cache.key)

    def decoder(self, **options) -> "ReplicatedDecoder":
        self.cluster.announce("decoder", **options)
        return ReplicatedDecoder(self.engine.decoder(**options), self.cluster)


class ReplicatedDecoder:
    """The leader's batched decoder for a split model: admit, step and cancel are broadcast first."""

    def __init__(self, decoder, cluster: Cluster):
        self.decoder, self.cluster = decoder, cluster

    def __getattr__(self, name):  # running, cache_bytes, model, engine: the decoder's own
        return getattr(self.decoder, name)

    def __len__(self) -> int:
        return len(self.decoder)

    def admit(self, requests):
        seeded = [(prompt, sampling.seeded()) for prompt, sampling in requests]
        for _, sampling in seeded:
            refuse_logits_processors(sampling)
        self.cluster.announce("admit", requests=[(p.shareable(), s.fields()) for p, s in seeded])
        return self.decoder.admit(seeded)

    def step(self):
        self.cluster.announce("step" if len(self.decoder) else "idle")
        return self.decoder.step()

    def cancel(self, uid: int) -> None:
        if uid in self.decoder.running:
            self.cluster.announce("cancel", uid=uid)
        self.decoder.cancel(uid)


class Follower:
    """A rank other than the leader of a split model: replays every call the leader broadcasts on its part of
    the decoder, until the leader closes."""

    def __init__(self, engine, cluster: Cluster):
        self.engine, self.cluster = engine, cluster
        engine.image_source = image_sharing(engine, cluster)
        self.caches = {}  # the leader's conversation caches, by key
        self.decoder = None

    def run(self) -> None:
        while True:
            fields = self.cluster.share()
            name = fields.pop("op")
            if name == "exit":
                return
            replay = OPERATIONS.get(name)
            if replay is None:
                raise FastVLMError(f"rank {self.cluster.rank}: unknown step {name!r} from the leader")
            replay(self, **fields)


@operation("stream")
def _replay_stream(follower: Follower, prompt, sampling, cache, **generate_kwargs) -> None:
    from .engine import Prompt, PromptCache, Sampling

    kv = None if cache is None else follower.caches.setdefault(cache, PromptCache(follower.engine.model))
    for r in follower.engine.stream(Prompt.from_shareable(prompt), Sampling(**sampling), kv, **generate_kwargs):
        if r.finish_reason is None and not follower.cluster.share():
            break


@operation("forget")
def _replay_forget(follower: Follower, cache) -> None:
    follower.caches.pop(cache, None)


@operation("decoder")
def _replay_decoder(follower: Follower, **options) -> None:
    follower.decoder = follower.engine.decoder(**options)


@operation("admit")
def _replay_admit(follower: Follower, requests) -> None:
    from .engine import Prompt, Sampling

    follower.decoder.admit([(Prompt.from_shareable(p), Sampling(**s)) for p, s in requests])


@operation("step")
def _replay_step(follower: Follower) -> None:
    follower.decoder.step()


@operation("idle")
def _replay_idle(follower: Follower) -> None:
    time.sleep(IDLE_NAP)


@operation("cancel")
def _replay_cancel(follower: Follower, uid) -> None:
    follower.decoder.cancel(uid)


@contextmanager
def leading(cluster: Cluster | None):
    """The leader's part of a front-end: when it ends (done, or a user error), the followers are let go;
    when another rank went away there is nobody left to tell."""
    if cluster is None:
        yield
        return
    try:
        yield
    except BaseException as e:
        if not lost_peer(e):
            cluster.close()
        raise
    cluster.close()


def follow_or_lead(cluster: Cluster | None, engine) -> bool:
    """On a follower rank, replay the leader's calls until it closes and return False; True on the leader
    (or a single process), which goes on to do the work inside ``leading(cluster)``.  On the leader of a split
    model, the model's shared engine (``engine_for``) becomes a ``Replica``, so the API's one-call functions
    (``generate``, ``stream_generate``, ``ChatSession``) run on every rank."""
    if cluster is None or not cluster.splits_model:
        return True
    if not cluster.leader:
        Follower(engine, cluster).run()
        return False
    from .engine import share_engine

    share_engine(Replica(engine, cluster))
    return True
