"""Every depthwise-conv path of the CPU layer agrees with mx.conv2d and with each other.

Device and dtype: the CPU, float32 unless a test names another; they need the CPU layer (Linux's CPU) and say so
when they skip.  The compiled path falls back to the Toeplitz matmuls without a C compiler."""

import itertools

import mlx.core as mx
import pytest
from precision import requires_cpu_layer

from fastvlm_mlx.cpu import depthwise as vision

pytestmark = requires_cpu_layer

IMPLS = sorted(vision._DEPTHWISE_IMPLS)
CASES = list(itertools.product((3, 7), (1, 2), (1, 2), ((9, 9), (10, 12), (16, 13))))


def _reference(x, w, stride):
    return mx.conv2d(x, w, stride=stride, padding=w.shape[1] // 2, groups=x.shape[-1])


def _rel(a, b):
    return (mx.abs(a - b).max() / mx.abs(b).max()).item()


@pytest.mark.parametrize("k,stride,mult,hw", CASES)
def test_paths_agree(k, stride, mult, hw):
    mx.random.seed(k * 100 + stride * 10 + mult + hw[0])
    c = 5
    x = mx.random.normal((2, hw[0], hw[1], c))
    w = mx.random.normal((c * mult, k, k, 1))
    ref = _reference(x, w, stride)
    outs = {name: vision.depthwise_conv2d(x, w, stride, impl=name) for name in IMPLS}
    for name in IMPLS:  # the same conv on a channels-first input
        nchw = vision.depthwise_conv2d(x.transpose(0, 3, 1, 2), w, stride, channels_first=True, impl=name)
        outs[name + " (NCHW)"] = nchw.transpose(0, 2, 3, 1)
    for name, out in outs.items():
        assert out.shape == ref.shape, (name, out.shape, ref.shape)
        assert _rel(out, ref) < 1e-5, name
    for a, b in itertools.combinations(sorted(outs), 2):
        assert _rel(outs[a], outs[b]) < 1e-5, (a, b)


@pytest.mark.parametrize("name", IMPLS)
def test_tower_shapes(name):
    """A FastViTHD-like width (96 channels), and widths that take both Toeplitz tile sizes (8 and 16)."""
    for hw in (32, 64, 70):
        x = mx.random.normal((1, hw, hw, 96))
        for k, stride, mult in ((7, 1, 1), (3, 1, 1), (7, 2, 2), (3, 1, 2), (3, 2, 1)):
            w = mx.random.normal((96 * mult, k, k, 1))
            assert _rel(vision.depthwise_conv2d(x, w, stride, impl=name), _reference(x, w, stride)) < 1e-5, (hw, k)


def test_dtype_preserved():
    x = mx.random.normal((1, 12, 12, 4)).astype(mx.float16)
    w = mx.random.normal((4, 7, 7, 1)).astype(mx.float16)
    for name in IMPLS:
        assert vision.depthwise_conv2d(x, w, 1, impl=name).dtype == mx.float16, name


def test_default_choice(monkeypatch):
    monkeypatch.delenv(vision._DEPTHWISE_ENV, raising=False)
    # the CPU layer's default (GPUs use the plain model's conv); the Toeplitz matmuls without a C compiler
    assert vision.depthwise_impl() == ("compiled" if vision.compiled_kernel() is not None else "toeplitz")
    monkeypatch.setenv(vision._DEPTHWISE_ENV, "shift")
    assert vision.depthwise_impl() == "shift"
