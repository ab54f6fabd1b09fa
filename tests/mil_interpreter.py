"""A small NumPy interpreter for the MIL ops of the exported FastViTHD program, to check it without a Mac.

It runs a pymil Program (as loaded back from a saved .mlpackage, i.e. after coremltools' passes) op by
op.  Every op is computed in float32 (float64 for reductions) and its result is then rounded to the
dtype the program declares for that output, so an fp16 program is simulated with fp16 storage of every
intermediate tensor, as CoreML's GPU and Neural Engine keep them.

Deliberately strict: an op type it does not know, an input it does not expect, or an attribute value
outside what it implements (dilated conv, 'same' padding, ...) raises, so a new op or option in the
exporter cannot slip through unchecked.
"""

import math
from collections.abc import Callable

import numpy as np

try:
    from scipy.special import erf as _erf
except ImportError:  # pragma: no cover - scipy is optional
    _erf = np.vectorize(math.erf, otypes=[np.float64])


class UnsupportedOp(NotImplementedError):
    pass


_HANDLERS: dict[str, Callable] = {}
_KNOWN_INPUTS: dict[str, set] = {}


def _op(name: str, inputs: set):
    def register(fn):
        _HANDLERS[name] = fn
        _KNOWN_INPUTS[name] = set(inputs)
        return fn

    return register


def _f32(a):
    return np.asarray(a, dtype=np.float32)


def _scalar(v):
    return np.asarray(v).item()


def _ints(v):
    return [int(i) for i in np.asarray(v).reshape(-1)]


@_op("cast", {"x", "dtype"})
def _cast(a):
    dtype = {"fp16": np.float16, "fp32": np.float32, "int32": np.int32}.get(str(_scalar(a["dtype"])))
    if dtype is None:
        raise UnsupportedOp(f"cast to {a['dtype']!r}")
    return [np.asarray(a["x"]).astype(dtype)]


@_op("conv", {"x", "weight", "bias", "strides", "pad_type", "pad", "dilations", "groups"})
def _conv(a):
    x, w = _f32(a["x"]), _f32(a["weight"])
    if x.ndim != 4:
        raise UnsupportedOp(f"conv of rank {x.ndim}")
    groups = int(_scalar(a.get("groups", 1)))
    sh, sw = _ints(a.get("strides", [1, 1]))
    if _ints(a.get("dilations", [1, 1])) != [1, 1]:
        raise UnsupportedOp("dilated conv")
    pad_type = str(_scalar(a.get("pad_type", "valid")))
    if pad_type == "valid":
        pt = pb = pl = pr = 0
    elif pad_type == "custom":
        pt, pb, pl, pr = _ints(a["pad"])
    else:
        raise UnsupportedOp(f"conv pad_type {pad_type!r}")
    n, cin, _, _ = x.shape
    cout, cin_g, kh, kw = w.shape
    if cin != cin_g * groups or cout % groups:
        raise ValueError(f"conv: {cin} input channels do not fit weight {w.shape} with {groups} groups")
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    ho = (xp.shape[2] - kh) // sh + 1
    wo = (xp.shape[3] - kw) // sw + 1
    xg = xp.reshape(n, groups, cin_g, xp.shape[2], xp.shape[3])
    wg = w.reshape(groups, cout // groups, cin_g, kh, kw)
    out = np.zeros((n, groups, cout // groups, ho, wo), dtype=np.float32)
    for i in range(kh):
        for j in range(kw):
            patch = xg[:, :, :, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw]
            wij = wg[:, :, :, i, j]  # (g, cout_g, cin_g)
            if cin_g == 1:
                out += wij[None, :, :, 0, None, None] * patch  # depthwise: a broadcast multiply
            else:
                out += np.einsum("goc,ngchw->ngohw", wij, patch, optimize=True)
    out = out.reshape(n, cout, ho, wo)
    if a.get("bias") is not None:
        out += _f32(a["bias"]).reshape(1, -1, 1, 1)
    return [out]


@_op("gelu", {"x", "mode"})
def _gelu(a):
    mode = str(_scalar(a.get("mode", "EXACT")))
    if mode != "EXACT":
        raise UnsupportedOp(f"gelu mode {mode!r} (the model uses the exact, erf GELU)")
    x = np.asarray(a["x"], dtype=np.float64)
    return [0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))]


@_op("relu", {"x"})
def _relu(a):
    return [np.maximum(_f32(a["x"]), 0)]


@_op("sigmoid", {"x"})
def _sigmoid(a):
    return [1.0 / (1.0 + np.exp(-np.asarray(a["x"], dtype=np.float64)))]


@_op("add", {"x", "y"})
def _add(a):
    return [_f32(a["x"]) + _f32(a["y"])]


@_op("sub", {"x", "y"})
def _sub(a):
    return [_f32(a["x"]) - _f32(a["y"])]


@_op("mul", {"x", "y"})
def _mul(a):
    return [_f32(a["x"]) * _f32(a["y"])]


@_op("real_div", {"x", "y"})
def _div(a):
    return [_f32(a["x"]) / _f32(a["y"])]


@_op("layer_norm", {"x", "axes", "gamma", "beta", "epsilon"})
def _layer_norm(a):
    x = np.asarray(a["x"], dtype=np.float64)
    axes = tuple(int(i) % x.ndim for i in _ints(a["axes"]))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + float(_scalar(a.get("epsilon", 1e-5))))
    shape = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
    if a.get("gamma") is not None:
        y = y * _f32(a["gamma"]).reshape(shape)
    if a.get("beta") is not None:
        y = y + _f32(a["beta"]).reshape(shape)
    return [y]


@_op("reduce_mean", {"x", "axes", "keep_dims"})
def _reduce_mean(a):
    x = np.asarray(a["x"], dtype=np.float64)
    axes = tuple(_ints(a["axes"]))
    return [x.mean(axis=axes, keepdims=bool(_scalar(a.get("keep_dims", False))))]


@_op("softmax", {"x", "axis"})
def _softmax(a):
    x = np.asarray(a["x"], dtype=np.float64)
    axis = int(_scalar(a.get("axis", -1)))
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return [e / e.sum(axis=axis, keepdims=True)]


@_op("matmul", {"x", "y", "transpose_x", "transpose_y"})
def _matmul(a):
    x, y = _f32(a["x"]), _f32(a["y"])
    if bool(_scalar(a.get("transpose_x", False))):
        x = np.swapaxes(x, -1, -2)
    if bool(_scalar(a.get("transpose_y", False))):
        y = np.swapaxes(y, -1, -2)
    return [np.matmul(x, y)]


@_op("reshape", {"x", "shape"})
def _reshape(a):
    return [np.reshape(a["x"], _ints(a["shape"]))]


@_op("transpose", {"x", "perm"})
def _transpose(a):
    return [np.transpose(a["x"], _ints(a["perm"]))]


@_op("split", {"x", "num_splits", "split_sizes", "axis"})
def _split(a):
    x, axis = np.asarray(a["x"]), int(_scalar(a["axis"]))
    if a.get("split_sizes") is not None:
        return np.split(x, np.cumsum(_ints(a["split_sizes"]))[:-1], axis=axis)
    return np.split(x, int(_scalar(a["num_splits"])), axis=axis)


SUPPORTED_OPS = frozenset(_HANDLERS) | {"const"}


def _np_dtype(var):
    from coremltools.converters.mil.mil import types

    return types.nptype_from_builtin(var.dtype)


def run_program(prog, inputs: dict[str, np.ndarray], function: str = "main") -> dict[str, np.ndarray]:
    """Evaluate ``prog`` on numpy ``inputs`` (by input name); returns its outputs by name, as numpy."""
    func = prog.functions[function]
    env: dict[str, np.ndarray] = {}
    for name, var in func.inputs.items():
        if name not in inputs:
            raise KeyError(f"missing program input {name!r}")
        value = np.asarray(inputs[name])
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(f"input {name!r}: shape {value.shape}, the program wants {tuple(var.shape)}")
        env[var.name] = value.astype(_np_dtype(var))

    def value_of(var):
        if var.name in env:
            return env[var.name]
        if var.val is not None:
            return var.val
        raise KeyError(f"{var.name} has no value yet")

    for op in func.operations:
        if op.op_type == "const":
            env[op.outputs[0].name] = op.outputs[0].val
            continue
        handler = _HANDLERS.get(op.op_type)
        if handler is None:
            raise UnsupportedOp(f"op {op.op_type!r} ({op.name}) is not implemented by the test interpreter")
        given = {k for k, v in op.inputs.items() if v is not None}
        unknown = given - _KNOWN_INPUTS[op.op_type]
        if unknown:
            raise UnsupportedOp(f"op {op.op_type} ({op.name}): unexpected input(s) {sorted(unknown)}")
        args = {}
        for k, v in op.inputs.items():
            args[k] = [value_of(u) for u in v] if isinstance(v, (list, tuple)) else value_of(v)
        results = handler(args)
        if len(results) != len(op.outputs):
            raise ValueError(f"op {op.op_type} ({op.name}): {len(results)} results for {len(op.outputs)} outputs")
        for var, result in zip(op.outputs, results):
            result = np.asarray(result).astype(_np_dtype(var))
            if var.shape is not None and tuple(result.shape) != tuple(var.shape):
                raise ValueError(f"op {op.op_type} ({op.name}): shape {result.shape}, program says {var.shape}")
            env[var.name] = result
    return {var.name: env[var.name] for var in func.outputs}


def op_types(prog, function: str = "main") -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in prog.functions[function].operations:
        counts[op.op_type] = counts.get(op.op_type, 0) + 1
    return counts
