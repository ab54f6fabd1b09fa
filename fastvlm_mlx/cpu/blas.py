"""Make MLX's Linux CPU build use an optimized BLAS, and say so when it cannot.

The Linux CPU wheel of MLX (mlx-cpu) links against the bundled reference BLAS, a plain single-threaded
implementation; OpenBLAS or MKL run the same fp32 matmuls many times faster (``python -m benchmarks.blas``).
A library loaded with RTLD_GLOBAL *before* mlx.core is first imported is searched before mlx's own dependencies, so its
cblas_sgemm (and LAPACK) symbols are the ones MLX binds to.  This has to happen before the first
`import mlx.core` anywhere in the process, which is why the package calls `load_fast_blas()` first.

A program may also have bound an optimized BLAS itself (LD_PRELOAD, or its own RTLD_GLOBAL load before
importing mlx).  So what counts is never the order of imports but the library that MLX's `cblas_sgemm`
slot actually points into (`bound_library()`), read from the process's memory.

Environment variable FASTVLM_MLX_BLAS: `0`, `off`, `none` or `false` loads nothing; a path loads that
library (and nothing else); anything else (or unset) searches the usual places.
"""

import contextlib
import ctypes
import ctypes.util
import os
import platform
import site
import sys
import warnings

ENV_VAR = "FASTVLM_MLX_BLAS"

# The library that load_fast_blas() loaded (as passed to dlopen), or None; for --verbose and benchmarks.
loaded = None

# Whether mlx.core had been imported, bound to a reference BLAS, before the package could load a faster one
# that is installed; part of the one-line warning at model load.
imported_too_late = False

# Whether that warning was given (once per process).
_warned = False
# The FASTVLM_MLX_BLAS path that could not be loaded, if any (part of that warning).
unloadable = None

# Values of an on/off environment variable (this one and FASTVLM_MLX_MALLOC) that mean off.
OFF_VALUES = {"0", "off", "none", "false", "no"}


def switched_off(variable: str) -> bool:
    """Whether an on/off environment variable of the package is set to one of OFF_VALUES."""
    return os.environ.get(variable, "").strip().lower() in OFF_VALUES


_done = False


def _openblas_candidates():
    """Debian/Ubuntu paths (the alternatives symlink first, then each threading variant), then ld.so.cache."""
    libdir = f"/usr/lib/{platform.machine()}-linux-gnu"
    paths = [f"{libdir}/libopenblas.so.0"]
    paths += [f"{libdir}/openblas-{variant}/libopenblas.so.0" for variant in ("pthread", "openmp", "serial")]
    paths += ["/usr/lib64/libopenblas.so.0", "/usr/lib/libopenblas.so.0"]  # Fedora, Arch
    found = ctypes.util.find_library("openblas")
    if found:
        paths.append(found)
    # The cmeel-openblas wheel (pip); it needs the system's libgfortran.so.5 and is skipped without it.
    for sp in _site_dirs():
        paths.append(os.path.join(sp, "cmeel.prefix", "lib", "libopenblas.so.0"))
    return paths


def _mkl_candidates():
    """The `mkl` wheel puts libmkl_rt into <prefix>/lib (.so.3 since 2025, .so.2 before)."""
    prefixes = [sys.prefix, site.USER_BASE or ""]
    paths = [os.path.join(p, "lib", f"libmkl_rt.so.{v}") for p in prefixes if p for v in (3, 2)]
    found = ctypes.util.find_library("mkl_rt")
    if found:
        paths.append(found)
    return paths


def _site_dirs():
    dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    if site.ENABLE_USER_SITE and site.USER_SITE:
        dirs.append(site.USER_SITE)
    return dirs


def candidates():
    """Libraries to try, best first: OpenBLAS measured as fast as MKL (and is far smaller), so it comes first."""
    seen, result = set(), []
    for path in _openblas_candidates() + _mkl_candidates():
        # Bare sonames from find_library are kept; absolute paths must exist.
        if path not in seen and (not os.path.isabs(path) or os.path.exists(path)):
            seen.add(path)
            result.append(path)
    return result


# Symbols that only an optimized BLAS exports: OpenBLAS, MKL, BLIS.
_VENDOR_SYMBOLS = ("openblas_get_num_threads", "MKL_Get_Max_Threads", "bli_info_get_version")

# ELF relocation types that fill a GOT slot with a symbol's address: x86-64 and AArch64 GLOB_DAT, JUMP_SLOT.
_SLOT_RELOCATIONS = {6, 7, 1025, 1026}


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("fname", ctypes.c_char_p),
        ("fbase", ctypes.c_void_p),
        ("sname", ctypes.c_char_p),
        ("saddr", ctypes.c_void_p),
    ]


def _libdl():
    lib = ctypes.CDLL(None)
    lib.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    lib.dlinfo.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    return lib


def _library_at(address):
    """The path of the loaded object that holds ``address``, or None."""
    info = _DlInfo()
    if not address or not _libdl().dladdr(address, ctypes.byref(info)) or not info.fname:
        return None
    return os.path.realpath(os.fsdecode(info.fname))


def _symbol_slot(path, symbol):
    """The offset from its load address of the GOT slot through which the ELF file ``path`` calls ``symbol``.

    Reads only the section headers, the dynamic symbols and the relocations; None when there is no such slot
    (or the file is not a little-endian 64-bit ELF)."""
    import struct

    with open(path, "rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
            return None
        (shoff,) = struct.unpack_from("<Q", header, 0x28)
        entsize, count = struct.unpack_from("<HH", header, 0x3A)
        f.seek(shoff)
        sections = [struct.unpack_from("<IIQQQQIIQQ", f.read(entsize)) for _ in range(count)]

        def read(index):
            f.seek(sections[index][4])
            return f.read(sections[index][5])

        dynsym = next((i for i, sec in enumerate(sections) if sec[1] == 11), None)  # SHT_DYNSYM
        if dynsym is None:
            return None
        names, wanted = read(sections[dynsym][6]), symbol.encode() + b"\0"
        index = next(
            (
                n
                for n, (name, *_rest) in enumerate(struct.iter_unpack("<IBBHQQ", read(dynsym)))
                if names.startswith(wanted, name)
            ),
            None,
        )
        if index is None:
            return None
        for i, sec in enumerate(sections):
            if sec[1] == 4 and sec[6] == dynsym:  # SHT_RELA over the dynamic symbols
                for offset, info, _addend in struct.iter_unpack("<QQq", read(i)):
                    if info >> 32 == index and info & 0xFFFFFFFF in _SLOT_RELOCATIONS:
                        return offset
    return None


def _mlx_objects():
    """MLX's loaded shared objects that may call cblas_sgemm: its library first, then the extension module."""
    core = sys.modules.get("mlx.core")
    if core is None or not getattr(core, "__file__", None):
        return []
    package = os.path.dirname(core.__file__)
    found = (
        [
            os.path.join(package, "lib", name)
            for name in sorted(os.listdir(os.path.join(package, "lib")))
            if ".so" in name
        ]
        if os.path.isdir(os.path.join(package, "lib"))
        else []
    )
    return found + [core.__file__]


def bound_library():
    """The library whose cblas_sgemm MLX's matrix products call in this process, or None if it cannot be told.

    The address is read from the GOT slot of MLX's own library (what the dynamic loader bound), so a BLAS
    that the program preloaded itself counts, and one loaded after mlx.core does not."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        for path in _mlx_objects():
            slot = _symbol_slot(path, "cblas_sgemm")
            if slot is None:
                continue
            handle = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)._handle
            link_map = ctypes.c_void_p()
            if _libdl().dlinfo(handle, 2, ctypes.byref(link_map)) != 0:  # RTLD_DI_LINKMAP; l_addr comes first
                return None
            base = ctypes.c_size_t.from_address(link_map.value).value
            target = _library_at(ctypes.c_void_p.from_address(base + slot).value)
            # A lazily bound slot still points into MLX's own PLT; then the loader's first pick is the answer.
            return global_library() or None if target == os.path.realpath(path) else target
    except Exception:  # noqa: BLE001 - a diagnosis must never break loading a model
        return None
    return None


def global_library():
    """The library that provides cblas_sgemm in the global symbol scope (what mlx.core would bind to), or None."""
    try:
        return _library_at(ctypes.cast(ctypes.CDLL(None).cblas_sgemm, ctypes.c_void_p).value)
    except (AttributeError, OSError):
        return None


def is_reference(path) -> bool:
    """Whether a BLAS library is a reference (netlib) build, like the one the mlx-cpu wheel bundles:
    named libblas*, and exporting none of the optimized libraries' own calls."""
    if not os.path.basename(os.path.realpath(path)).startswith("libblas"):
        return False
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return False
    return not any(hasattr(lib, name) for name in _VENDOR_SYMBOLS)


def _try_load(path):
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return False
    return hasattr(lib, "cblas_sgemm")  # a library without cblas would not replace anything


def load_fast_blas():
    """Make sure MLX calls an optimized BLAS; return that library's path, or None.

    Never raises.  Does nothing off Linux (macOS MLX uses Accelerate/Metal) or when disabled by
    FASTVLM_MLX_BLAS.  An optimized BLAS that MLX is bound to already (mlx.core imported after the program
    preloaded one) or that the global scope holds already is used as it is; otherwise the first installed one
    is loaded, which helps only before mlx.core is imported.  Calling it again returns the first call's result.
    """
    global loaded, _done, imported_too_late, unloadable
    if _done:
        return loaded
    _done = True
    try:
        choice = os.environ.get(ENV_VAR, "").strip()
        if not sys.platform.startswith("linux") or choice.lower() in OFF_VALUES:
            return None
        if "mlx.core" in sys.modules:
            bound = bound_library()
            if bound and not is_reference(bound):
                loaded = bound
            else:
                imported_too_late = bool(candidates())  # importing the package first would have helped
            return loaded
        if os.sep in choice or choice.startswith("lib"):
            if _try_load(choice):
                loaded = choice
            else:  # said at model load, in the one warning (a command line has made warnings one line by then)
                unloadable = choice
            return loaded
        present = global_library()
        if present and not is_reference(present):
            loaded = present
            return loaded
        for path in candidates():
            if _try_load(path):
                loaded = path
                break
    except Exception:  # noqa: BLE001 - an import-time helper must never break the package import
        loaded = None
    return loaded


def _thread_controls():
    """(get, set) for the loaded library's thread count, or None when it has no such calls (or none is loaded)."""
    if loaded is None:
        return None
    try:
        lib = ctypes.CDLL(loaded)
    except OSError:
        return None
    for get, set_ in (
        ("openblas_get_num_threads", "openblas_set_num_threads"),
        ("MKL_Get_Max_Threads", "MKL_Set_Num_Threads"),
    ):
        if hasattr(lib, get) and hasattr(lib, set_):
            return getattr(lib, get), getattr(lib, set_)
    return None


@contextlib.contextmanager
def blas_threads(n: int):
    """BLAS calls that *run* inside this block use ``n`` threads (evaluate MLX arrays inside it).

    For work already split over two MLX CPU streams, one BLAS thread per stream avoids the two streams'
    matmuls contending for the same cores.  A no-op when the BLAS cannot be told (e.g. none was loaded).
    """
    controls = _thread_controls()
    if controls is None:
        yield
        return
    get, set_ = controls
    before = get()
    set_(n)
    try:
        yield
    finally:
        set_(before)


def describe() -> str:
    """The BLAS in use, for benchmark records: its path and, for OpenBLAS, the build and the kernels it
    runs (OPENBLAS_CORETYPE can force older ones: Haswell's run sgemm at half the speed of SkylakeX's)."""
    if loaded is None:
        return "MLX's bundled reference BLAS"
    try:
        lib = ctypes.CDLL(loaded)
        lib.openblas_get_config.restype = ctypes.c_char_p
        return f"{loaded} ({lib.openblas_get_config().decode().strip()})"
    except (OSError, AttributeError):
        return loaded


def slow_blas_message():
    """One line saying that MLX computes with a reference BLAS and how to fix it, or None when it does not
    (or when it cannot be told)."""
    if loaded is not None or not sys.platform.startswith("linux"):
        return None
    bound = bound_library()
    if bound is None or not is_reference(bound):
        return None
    fixes = []
    if unloadable:
        fixes.append(f"{ENV_VAR}={unloadable} could not be loaded as a BLAS library")
    elif switched_off(ENV_VAR):
        fixes.append(f"unset {ENV_VAR}")
    elif imported_too_late:
        fixes.append("import fastvlm_mlx first, before anything imports mlx.core")
    if not fixes or not candidates():
        fixes.append('install one: apt install libopenblas0-pthread, or pip install "fastvlm-mlx[fast-cpu]"')
    fix = "; ".join(fixes)
    return (
        f"MLX uses a reference BLAS ({os.path.basename(bound)}), so float32 matrix products on this CPU "
        f"run 20-40x slower: {fix}"
    )


def warn_if_slow_blas() -> None:
    """Give slow_blas_message() as a warning, once per process."""
    global _warned
    if _warned:
        return
    _warned = True
    message = slow_blas_message()
    if message:
        warnings.warn(message, stacklevel=3)
