"""The one thread that runs the package's MLX work, so that the public API can be called from any thread.

MLX gives each thread its own streams: an array built lazily on one thread cannot be evaluated on
another ("There is no Stream(cpu, 0) in current thread"), and a thread that ran some MLX operations and
then ended can abort the process at exit.  So ``load``, the engine's streams, the batched decoder and
the chat session's files hand their work to one long-lived thread owned by this module, and wait for
it.  Calls from several threads are thereby serialized (a stream yields a token at a time, so streams of
different threads interleave token by token); each call runs exactly as it would alone.

A call made on the MLX thread itself runs directly, so decorated functions may call each other.
"""

import atexit
import functools
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future

_DONE = object()  # the end of a stream (a StopIteration cannot cross a Future into a generator)
_STOP = object()


class _Worker:
    def __init__(self):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()
        atexit.register(self.stop)

    def current(self) -> bool:
        return threading.current_thread() is self.thread

    def ensure_started(self) -> None:
        with self.lock:
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._loop, name="fastvlm-mlx", daemon=True)
                self.thread.start()

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is _STOP:
                break
            fn, args, kwargs, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:  # handed to the caller, who raises it
                future.set_exception(e)
        import mlx.core as mx

        # a thread that ran MLX work must release its streams before the process ends, or exit can abort
        mx.synchronize()
        mx.clear_streams()

    def submit(self, fn: Callable, *args, **kwargs) -> Future:
        self.ensure_started()
        future: Future = Future()
        self.jobs.put((fn, args, kwargs, future))
        return future

    def stop(self, timeout: float = 30.0) -> None:
        """At interpreter exit: let the job in progress finish, then end the thread cleanly."""
        thread = self.thread
        if thread is not None and thread.is_alive() and not self.current():
            self.jobs.put(_STOP)
            thread.join(timeout)


_worker = _Worker()


def on_mlx_thread() -> bool:
    """Whether the caller is the MLX thread."""
    return _worker.current()


def run(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` on the MLX thread; returns its result or raises its exception."""
    if _worker.current():
        return fn(*args, **kwargs)
    return _worker.submit(fn, *args, **kwargs).result()


def iterate(generator: Iterator) -> Iterator:
    """Step ``generator`` on the MLX thread, one item per job; closing this closes it there too."""
    try:
        while True:
            item = run(next, generator, _DONE)
            if item is _DONE:
                return
            yield item
    finally:
        run(generator.close)


def runs_on_mlx_thread(fn: Callable) -> Callable:
    """Decorator: the function runs on the MLX thread whichever thread calls it."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return run(fn, *args, **kwargs)

    return wrapper


def streams_on_mlx_thread(fn: Callable) -> Callable:
    """Decorator for a generator function: its body runs on the MLX thread, its items reach the caller."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _worker.current():
            return fn(*args, **kwargs)
        return iterate(fn(*args, **kwargs))

    return wrapper
