"""Building the C kernels (fastvlm_mlx/cpu/native.py) where machines differ: $CC with flags, an unwritable or
missing home, processes starting together, a build killed midway, a compiler that rejects -march=native.

The failure cases use a fake compiler (a shell script that logs its arguments and writes a placeholder file), so
they run in well under a second; every test points XDG_CACHE_HOME (or HOME) at a temporary folder, so the real
cache is never touched.
"""

import fcntl
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import FIXTURES
from precision import requires_c_kernels

from fastvlm_mlx.cpu import native

# Logs its arguments, one call a line; with REJECT_MARCH set it fails on -march=native as older Apple clang does,
# with FAIL set it always fails; waits SLEEP seconds, then writes the -o file.
FAKE_CC = r"""#!/bin/sh
echo "$*" >> "$FAKE_CC_LOG"
out=""
prev=""
for arg in "$@"; do
  if [ "$arg" = "-march=native" ] && [ -n "$REJECT_MARCH" ]; then
    echo "clang: error: the clang compiler does not support '-march=native'" >&2
    exit 1
  fi
  if [ "$prev" = "-o" ]; then out="$arg"; fi
  prev="$arg"
done
if [ -n "$FAIL" ]; then echo "fake-cc: error: no such target" >&2; exit 1; fi
if [ -n "$SLEEP" ]; then sleep "$SLEEP"; fi
printf 'placeholder' > "$out"
"""

# Builds the library in a child process and prints where it is (native.py alone: it needs nothing but the stdlib).
BUILD = f"""
import importlib.util
spec = importlib.util.spec_from_file_location("native", {str(native.__file__)!r})
native = importlib.util.module_from_spec(spec)
spec.loader.exec_module(native)
print(native.build())
"""


@pytest.fixture
def fake_cc(tmp_path, monkeypatch):
    """A fake compiler as $CC (with an extra word, as in CC="gcc -m64"), a fresh cache, and the log of its calls."""
    script = tmp_path / "bin" / "fake cc"  # a space in the path: $CC is split as a shell would
    script.parent.mkdir()
    script.write_text(FAKE_CC)
    script.chmod(0o755)
    log = tmp_path / "calls.log"
    monkeypatch.setenv("CC", f"{shlex.quote(str(script))} -DFASTVLM_EXTRA_WORD=1")
    monkeypatch.setenv("FAKE_CC_LOG", str(log))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for name in ("REJECT_MARCH", "FAIL", "SLEEP"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(native, "_announced", False)

    def calls():
        return log.read_text().splitlines() if log.exists() else []

    return calls


def test_cc_is_split_into_words(fake_cc, tmp_path):
    path = native.build()
    assert path.parent == tmp_path / "cache" / "fastvlm_mlx" and path.read_text() == "placeholder"
    (call,) = fake_cc()
    assert call.startswith("-DFASTVLM_EXTRA_WORD=1 -O3 -march=native ")


def test_a_compiler_rejecting_march_native_is_asked_again_without_it(fake_cc, monkeypatch):
    monkeypatch.setenv("REJECT_MARCH", "1")
    assert native.build().read_text() == "placeholder"
    first, second = fake_cc()
    assert "-march=native" in first.split() and "-march=native" not in second.split()
    assert "-O3" in second.split()


def test_a_failing_compiler_is_reported_and_leaves_nothing(fake_cc, monkeypatch, tmp_path):
    monkeypatch.setenv("FAIL", "1")
    with pytest.raises(RuntimeError, match="fake cc.* failed: fake-cc: error: no such target"):
        native.build()
    assert len(fake_cc()) == 2  # with and without -march=native
    left = [p.name for p in (tmp_path / "cache" / "fastvlm_mlx").iterdir() if not p.name.endswith(".lock")]
    assert left == []


def test_a_missing_compiler_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(RuntimeError, match="no-such-cc"):
        native.build()


def test_the_first_build_says_so_once_per_process(fake_cc, capsys, monkeypatch, tmp_path):
    native.build()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "another-cache"))  # a second build in this process
    native.build()
    native.build()  # found built: no compiler call
    assert len(fake_cc()) == 2
    err = capsys.readouterr().err
    assert err.count("compiling the C kernels") == 1 and len(err.splitlines()) == 1, err


def test_an_unwritable_cache_falls_back_to_a_private_temporary_folder(fake_cc, monkeypatch, tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")  # a file where the cache folder would be: unwritable even for root
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    path = native.build()
    assert path.parent == tmp_path / "tmp" / f"fastvlm_mlx-{os.getuid()}"
    assert path.parent.stat().st_mode & 0o777 == 0o700


def test_without_home_the_cache_is_a_private_temporary_folder(fake_cc, monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    assert native.cache_dirs() == [tmp_path / f"fastvlm_mlx-{os.getuid()}"]
    assert native.build().parent == tmp_path / f"fastvlm_mlx-{os.getuid()}"


def test_a_temporary_folder_others_can_write_is_refused(fake_cc, monkeypatch, tmp_path):
    """In the shared temporary directory, a folder open to others could hand us someone else's library."""
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    planted = tmp_path / f"fastvlm_mlx-{os.getuid()}"
    planted.mkdir()
    planted.chmod(0o777)
    with pytest.raises(RuntimeError, match="no writable cache directory"):
        native.build()
    assert fake_cc() == []


def test_processes_starting_together_build_once(fake_cc, monkeypatch):
    monkeypatch.setenv("SLEEP", "1")
    procs = [
        subprocess.Popen([sys.executable, "-c", BUILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    try:
        outputs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert all(p.returncode == 0 for p in procs), outputs
    assert len({out.strip() for out, _ in outputs}) == 1
    assert len(fake_cc()) == 1
    assert sum("compiling the C kernels" in err for _, err in outputs) == 1


def test_a_build_killed_midway_leaves_nothing_behind(fake_cc, monkeypatch, tmp_path):
    cache = tmp_path / "cache" / "fastvlm_mlx"
    monkeypatch.setenv("SLEEP", "60")
    killed = subprocess.Popen(
        [sys.executable, "-c", BUILD], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )  # its own group: the compiler dies with it
    try:
        deadline = time.monotonic() + 30
        while not (fake_cc() and list(cache.glob("*.partial"))) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(cache.glob("*.partial")), "the build never started"
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
    (partial,) = cache.glob("*.partial")
    # a partial library of another build whose process is gone, and one whose build is still running
    gone, running = cache / "kernels-0000000000000000.x.partial", cache / "kernels-1111111111111111.x.partial"
    gone.write_text(""), running.write_text("")
    monkeypatch.delenv("SLEEP")
    with open(cache / "kernels-1111111111111111.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        path = native.build()
    assert path.read_text() == "placeholder"
    assert not partial.exists() and not gone.exists() and running.exists()


@requires_c_kernels
def test_load_builds_the_kernels_so_that_vision_time_excludes_the_compile(monkeypatch, tmp_path, capfd):
    """A real compile, with $CC holding a flag: it happens in ``load`` (at ``cpu.install``), once, with one line
    on stderr, and the first generation compiles nothing, even with the few-row kernel switched off (which used
    to leave the first build to the vision tower's first depthwise conv)."""
    import mlx.core as mx

    from fastvlm_mlx import generate, load
    from fastvlm_mlx.cpu import attention, depthwise, mlp, skinny

    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None or mx.default_device() != mx.cpu:
        pytest.skip("the C kernels are built only by the CPU layer, with a C compiler (none here)")
    for module, name in (
        (native, "_library"),
        (skinny, "_kernels"),
        (attention, "_kernel"),
        (depthwise, "_compiled"),
        (mlp, "_kernel"),
        (attention, "_one_position"),
    ):
        monkeypatch.setattr(module, name, None)
    monkeypatch.setattr(native, "_announced", False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", f"{shlex.quote(cc)} -DFASTVLM_EXTRA_WORD=1")
    monkeypatch.setenv("FASTVLM_MLX_SKINNY", "0")
    builds = []
    real_build = native.build
    monkeypatch.setattr(native, "build", lambda: builds.append(1) or real_build())

    model, processor = load(str(FIXTURES / "format_a"))
    assert len(builds) == 1 and not isinstance(native._library, Exception), native._library
    assert len(list(tmp_path.glob("fastvlm_mlx/kernels-*.so"))) == 1
    generate(model, processor, "Describe the image.", image=str(FIXTURES / "images" / "photo.png"), max_tokens=2)
    assert len(builds) == 1 and depthwise.compiled_kernel() is not None
    err = capfd.readouterr().err
    assert err.count("compiling the C kernels") == 1, err
