"""The package's C kernels (``pool.c``, ``skinny.c``, ``attention.c``, ``depthwise.c``, ``mlp.c``), compiled into one
library at model load.

They are built with the machine's C compiler (the one ``mx.compile`` already needs on a CPU; ``$CC`` may hold
flags too) into the user cache, keyed by the sources, the flags and the CPU, and called through ctypes on the
arrays' memory.  One library, so that the kernels share one pool of worker threads (``pool.c``).  Processes
that start together build it once (a file lock beside it); a build killed midway leaves nothing the next one
trips on; a compiler that rejects ``-march=native`` (older Apple clang) gets a second try without it.
"""

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no lock, concurrent builds still end in one atomic rename
    fcntl = None

HERE = Path(__file__).parent
SOURCES = [HERE / name for name in ("pool.c", "skinny.c", "attention.c", "depthwise.c", "mlp.c")]
HEADERS = [HERE / "native.h"]
NATIVE_ARCH = "-march=native"
FLAGS = ["-O3", NATIVE_ARCH, "-fPIC", "-shared", "-pthread"]
LIBRARIES = ["-lm"]
MAX_THREADS = 8  # beyond the memory's bandwidth for decoding, and plenty for the 2-16 cores of a Mac or PC
TEMP_SUFFIX = ".partial"  # a library being written; one whose lock is free was left by a killed build

_library = None  # the loaded library, or the exception that building it raised
_announced = False  # whether this process has said that it is compiling
_loading = threading.Lock()  # threads of one process load the library once


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    lines = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    lines.append(line.strip())
                if len(lines) >= 4:
                    break
    except OSError:
        pass
    return platform.machine() + "\n" + "\n".join(lines)


def compiler() -> list[str]:
    """The C compiler's command as words: ``$CC`` split as a shell would (``CC="gcc -m64"``), else cc, gcc or clang."""
    words = shlex.split(os.environ.get("CC", ""))
    if not words:
        found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        words = [found] if found else []
    if not words:
        raise RuntimeError("no C compiler found (cc, gcc or clang; or set CC)")
    return words


def cache_dirs() -> list[Path]:
    """Where the library may live, in order: ``$XDG_CACHE_HOME`` or ``$HOME/.cache``, then a per-user folder in the
    temporary directory (for a read-only home, or no HOME at all)."""
    dirs = []
    home = os.environ.get("HOME")
    base = os.environ.get("XDG_CACHE_HOME") or (os.path.join(home, ".cache") if home else None)
    if base:
        dirs.append(Path(base) / "fastvlm_mlx")
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    dirs.append(Path(tempfile.gettempdir()) / f"fastvlm_mlx-{user}")
    return dirs


def _writable(directory: Path) -> bool:
    """Whether we can write the library into ``directory`` (created if need be)."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK | os.X_OK)


def _private(directory: Path) -> bool:
    """Whether ``directory`` is ours and closed to other users: in the shared temporary directory nobody else
    may hand us a library to load."""
    if not hasattr(os, "getuid"):
        return True
    try:
        info = directory.stat()
    except OSError:
        return False
    return info.st_uid == os.getuid() and not info.st_mode & 0o077


def library_name(command: list[str]) -> str:
    key = hashlib.sha256()
    for source in SOURCES + HEADERS:
        key.update(source.name.encode() + source.read_bytes())
    key.update(" ".join(command + FLAGS + LIBRARIES).encode() + _cpu_identity().encode())
    return f"kernels-{key.hexdigest()[:16]}.so"


@contextmanager
def _locked(lock_path: Path, blocking: bool = True):
    """Hold an exclusive lock on ``lock_path`` (yields False where a non-blocking try finds it held)."""
    with open(lock_path, "a") as f:
        if fcntl is None:
            yield True
            return
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale(directory: Path, held: str) -> None:
    """Delete partial libraries whose builder is gone: a build killed midway.  Ours (``held``, whose lock we
    hold) are all stale; another library's are when its lock is free."""
    for partial in directory.glob(f"kernels-*{TEMP_SUFFIX}"):
        stem = partial.name.split(".", 1)[0]
        try:
            if stem == held:
                partial.unlink(missing_ok=True)
                continue
            with _locked(directory / f"{stem}.lock", blocking=False) as free:
                if free:
                    partial.unlink(missing_ok=True)
        except OSError:
            pass


def _announce() -> None:
    global _announced
    if not _announced:
        _announced = True
        print(
            "fastvlm_mlx: compiling the C kernels (once per machine and version, a few seconds)",
            file=sys.stderr,
            flush=True,
        )


def _compile(command: list[str], output: str) -> None:
    """Run the compiler; without -march=native a second time where it fails with it."""
    flags = FLAGS
    while True:
        argv = [*command, *flags, f"-I{HERE}", *map(str, SOURCES), *LIBRARIES, "-o", output]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RuntimeError(f"{shlex.join(command)}: {e}") from None
        if done.returncode == 0:
            return
        if NATIVE_ARCH not in flags:
            reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit status {done.returncode}"
            raise RuntimeError(f"{shlex.join(command)} failed: {reason}")
        flags = [f for f in flags if f != NATIVE_ARCH]


def build() -> Path:
    """Compile the sources once per machine: the first process to take the lock builds, the others wait for it and
    load what it wrote (written to a temporary name, then renamed)."""
    command = compiler()
    name = library_name(command)
    stem = name[: -len(".so")]
    dirs = cache_dirs()
    trusted = [d for d in dirs if d != dirs[-1] or _private(d)]  # the last is in the shared temporary directory
    for directory in trusted:
        if (directory / name).exists():
            return directory / name
    directory = next((d for d in dirs if _writable(d) and (d != dirs[-1] or _private(d))), None)
    if directory is None:
        raise RuntimeError(f"no writable cache directory for the compiled kernels (tried {', '.join(map(str, dirs))})")
    path = directory / name
    with _locked(directory / f"{stem}.lock"):
        if path.exists():  # another process built it while we waited
            return path
        _remove_stale(directory, held=stem)
        _announce()
        fd, tmp = tempfile.mkstemp(prefix=f"{stem}.", suffix=TEMP_SUFFIX, dir=directory)
        os.close(fd)
        try:
            _compile(command, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


def library() -> ctypes.CDLL:
    """The compiled library; raises (the same error on every call) when it cannot be built."""
    global _library
    with _loading:
        if _library is None:
            try:
                _library = ctypes.CDLL(str(build()))
            except Exception as e:  # noqa: BLE001 - kept, so that every caller gets the one reason
                _library = e
    if isinstance(_library, Exception):
        raise _library
    return _library


def function(name: str, argtypes: list):
    """The library's C function ``name``, typed with ``argtypes`` (returning void); raises as ``library``."""
    fn = getattr(library(), name)
    fn.argtypes = argtypes
    fn.restype = None
    return fn


def blas_kernel(name: str, argtypes: list):
    """(``function(name, argtypes)``, the address of the loaded BLAS's cblas_sgemm) for a kernel that calls
    the process's optimized BLAS (``blas.py``); None without one, or where the library cannot be built
    (``skinny.kernel`` warns about that once)."""
    from . import blas

    if blas.loaded is None:
        return None
    try:
        return function(name, argtypes), ctypes.cast(ctypes.CDLL(blas.loaded).cblas_sgemm, ctypes.c_void_p).value
    except Exception:  # noqa: BLE001 - MLX ops compute the same maths
        return None


def threads() -> int:
    """Threads for a kernel call: the cores this process may use, at most MAX_THREADS."""
    try:
        available = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        available = os.cpu_count() or 1
    return max(1, min(available, MAX_THREADS))
