"""Check that a folded model computes what the unfolded one does, in ONNX Runtime.

Both models run on the same batches: the caller's feeds (e.g. a subset of the samples) and
``random_batches`` random batches, by default at the scale the model implies (`bnfold.folding.probe`:
image-like noise·s + t fitted to the first BN's running statistics), or standard normal. Real samples are
the better test: random inputs far from the data a network was calibrated on (squeeze-excite
networks above all) push its outputs far beyond their real range, where the two models' roundings
grow with them. For every output r (reference) and c (candidate), over all batches,

    max_abs = max |c − r|,   scale = max |r|,   max_rel = max_abs / scale,

and the output passes when  max_abs ≤ atol + rtol · scale  and non-finite values (NaN, ±inf)
sit at the same places. The criterion is normwise on purpose: folding changes roundings whose
size follows the magnitude of the layer's terms, not of each output element, so an
elementwise relative difference is meaningless where the output crosses zero.

Integer and bool outputs (argmax, top-k indices) are compared exactly, except that up to
``DISCRETE_FLIP_FRACTION`` of their elements may differ: a near-tie flips under any rounding.

Graph optimisations are disabled in both sessions, so ONNX Runtime's own Conv+BN fusion does not
turn the reference into a folded model as well.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import EncodeError

from bnfold.errors import InvalidOptions, InvalidSamples, UnsupportedModel, VerificationFailed, plural
from bnfold.folding.probe import InputScale, batchnorm_statistics, fit_input_scale, probe_model
from bnfold.runtime import session_options

#: fraction of elements of an integer/bool output that may differ (near-ties of an argmax)
DISCRETE_FLIP_FRACTION = 1e-3

#: how random batches are drawn: at the scale the model implies (probe.py), or standard normal
RANDOM_INPUTS = ("implied", "normal")

# Default tolerance, from the unit roundoff u = eps/2 of the output's dtype. Folding rounds each
# folded weight once (relative error ≤ u) where the reference instead rounds ~5 times per BN
# ((x − μ)/σ·γ + β); a dot product of length K turns per-term errors of u into ~√K·u of the
# layer's magnitude (K·u worst case), and errors add over depth. 2^11·u ≈ 1.2e-4 for float32
# covers √K ≈ 70 (K ≈ 5000, a 512×3×3 convolution) across ~30 folded layers, while a wrong fold
# (a channel scaled twice, a missing shift) differs at the size of the output itself.
# 16-bit types: 2^11·u ≈ 1 would accept anything, and ONNX Runtime's CPU kernels accumulate
# float16 in float32, leaving about one rounding per layer output and per folded weight: 2^5·u
# (≈1.6e-2 float16, 0.125 bfloat16). atol only matters for outputs that are ≈ 0 everywhere:
# it treats output scales below 2^-10 as 2^-10 — 2^-4 for 16-bit types, whose roundings follow the
# terms *before* a cancellation or Relu (an output of 0.004 made of terms of 0.2 carries their
# 1e-4 rounding; found by the property tests).
_ULPS = {np.dtype(np.float64): 2**11, np.dtype(np.float32): 2**11, np.dtype(np.float16): 2**5}
_BFLOAT16_U = 2.0**-8
_ATOL_SCALE = 2.0**-10
_ATOL_SCALE_16BIT = 2.0**-4

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


def default_tolerance(dtype: Any) -> tuple[float, float]:
    """(rtol, atol) for outputs of ``dtype`` (see the comment above ``_ULPS``); (0, 0) if discrete."""
    dtype = np.dtype(dtype)
    if dtype.name == "bfloat16":
        rtol = 2**5 * _BFLOAT16_U
    elif dtype in _ULPS:
        rtol = _ULPS[dtype] * float(np.finfo(dtype).eps) / 2
    else:
        return 0.0, 0.0
    return rtol, rtol * (_ATOL_SCALE_16BIT if dtype.itemsize == 2 else _ATOL_SCALE)


@dataclasses.dataclass
class OutputDiff:
    """Differences on one graph output, over all batches. Floats are float64 maxima."""

    name: str
    dtype: str
    max_abs: float
    max_rel: float  # max_abs / scale (normwise, see module docstring)
    scale: float  # max |reference| over finite elements
    rtol: float
    atol: float
    mismatches: int = 0  # non-finite mismatches (float) or differing elements (integer/bool)
    elements: int = 0
    note: str = ""  # a shape/dtype mismatch, when there is one

    @property
    def tolerance(self) -> float:
        return self.atol + self.rtol * self.scale

    @property
    def discrete(self) -> bool:
        return not _is_float(self.dtype)

    @property
    def passed(self) -> bool:
        if self.note:
            return False
        if self.discrete:
            return self.mismatches <= math.floor(DISCRETE_FLIP_FRACTION * self.elements)
        return self.mismatches == 0 and self.max_abs <= self.tolerance

    def describe(self) -> str:
        if self.note:
            return f"output {self.name!r}: {self.note}"
        if self.discrete:
            return f"output {self.name!r}: {self.mismatches} of {plural(self.elements, 'element')} differ"
        text = (
            f"output {self.name!r}: max |Δ| = {self.max_abs:.3g} vs tolerance {self.tolerance:.3g} "
            f"(atol {self.atol:.3g} + rtol {self.rtol:.3g} × max|ref| {self.scale:.3g}), max rel {self.max_rel:.3g}"
        )
        if self.mismatches:
            text += f", {self.mismatches} NaN/inf in different places"
        return text


@dataclasses.dataclass
class VerifyReport:
    """Per-output differences; ``feeds`` given batches and ``random`` generated ones were run."""

    outputs: list[OutputDiff]
    feeds: int
    random: int
    seed: int
    random_inputs: InputScale | None = None  # how the random batches were drawn (None: there were none)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    @property
    def failures(self) -> list[OutputDiff]:
        return [o for o in self.outputs if not o.passed]

    def to_dict(self) -> dict[str, Any]:
        def finite(v: Any) -> Any:
            return v if not isinstance(v, float) or math.isfinite(v) else None  # strict JSON

        outputs = [
            {**{k: finite(v) for k, v in dataclasses.asdict(o).items()}, "tolerance": o.tolerance, "passed": o.passed}
            for o in self.outputs
        ]
        counts = {"feeds": self.feeds, "random": self.random, "seed": self.seed}
        drawn = {"random_inputs": self.random_inputs.to_dict()} if self.random_inputs is not None else {}
        return {"passed": self.passed, **counts, **drawn, "outputs": outputs}

    def failure_message(self) -> str:
        lines = "; ".join(o.describe() for o in self.failures)
        drawn = f" ({self.random_inputs.note})" if self.random and self.random_inputs is not None else ""
        hint = (
            " If the random inputs are unlike your data, verify on samples instead (bnfold fold --samples FILE)."
            if self.random else ""
        )
        return (
            f"the folded model differs from the unfolded one on {lines} "
            f"(over {self.feeds} given + {self.random} random batches{drawn}). Nothing was written. "
            "Only if this difference is acceptable, raise the tolerance: --rtol/--atol (bnfold recalibrate, "
            f"bnfold fold), rtol/atol (JobOptions, the SDK and the service's job options).{hint}"
        )


def verify_equivalent(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    feeds: Iterable[Mapping[str, np.ndarray] | np.ndarray] | None = None,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    random_batches: int = 2,
    random_inputs: str = "implied",
    seed: int = 0,
    dims: Mapping[str, int] | None = None,
    providers: Sequence[str] | None = None,
    threads: int = 0,
) -> VerifyReport:
    """Run both models on ``feeds`` plus random batches and compare every output.

    feeds: dicts input name → array (a bare array when the model has one input); consumed once.
    rtol/atol: override the per-dtype defaults of ``default_tolerance`` for every float output.
    random_batches: float batches drawn as ``random_inputs`` says — "implied": image-like noise·s + t at
    the scale the reference's first BN implies (`bnfold.folding.probe`), "normal": N(0, 1) —
    and integers in {0, 1}, shaped like the first feed, else like the declared input shapes with
    symbolic dimensions from ``dims`` or 2 for axis 0 and 8 elsewhere.
    threads: ONNX Runtime intra-op threads (0: its default).
    Raises ``UnsupportedModel`` if ONNX Runtime cannot run the reference, ``VerificationFailed``
    if it cannot run the candidate or their signatures differ.
    """
    _check_options(rtol, atol, random_batches, threads)
    if random_inputs not in RANDOM_INPUTS:
        raise InvalidOptions(f"random_inputs must be one of {', '.join(RANDOM_INPUTS)}, got {random_inputs!r}")
    if feeds is None and random_batches == 0:
        raise InvalidOptions("nothing to compare: no feeds and random_batches=0")
    ref = _session(reference, "unfolded", UnsupportedModel, providers, threads)
    cand = _session(candidate, "folded", VerificationFailed, providers, threads)
    inputs = _same_signature(ref, cand)
    diffs = {o.name: _Diff(o.name, rtol, atol) for o in ref.get_outputs()}
    first, given = None, 0
    for i, feed in enumerate(feeds or ()):
        feed = _as_feed(feed, inputs, i)
        first = first or feed
        _compare(ref, cand, feed, diffs)
        given += 1
    if given + random_batches == 0:
        raise InvalidOptions("nothing to compare: no feeds and random_batches=0")
    drawn = None
    if random_batches:
        rng = np.random.default_rng(seed)
        symbols = dict(dims or {})
        shapes = {arg.name: _shape(arg, first, symbols) for arg in inputs}
        drawn = InputScale()
        if random_inputs == "implied":
            drawn = _implied_scale(reference, inputs, shapes, rng, providers, threads)
        for _ in range(random_batches):
            _compare(ref, cand, {arg.name: _random(arg, shapes[arg.name], drawn, rng) for arg in inputs}, diffs)
    return VerifyReport([d.result() for d in diffs.values()], given, random_batches, seed, drawn)


def check_equivalent(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds=None, **kwargs) -> VerifyReport:
    """``verify_equivalent``, raising ``VerificationFailed`` (naming outputs and numbers) on failure."""
    report = verify_equivalent(reference, candidate, feeds, **kwargs)
    if not report.passed:
        raise VerificationFailed(report.failure_message())
    return report


# --------------------------------------------------------------------------- comparison


class _Diff:
    """Running maxima for one output across batches."""

    def __init__(self, name: str, rtol: float | None, atol: float | None):
        self.name, self.rtol, self.atol = name, rtol, atol
        self.dtype: np.dtype | None = None
        self.max_abs = self.scale = 0.0
        self.mismatches = self.elements = 0
        self.note = ""

    def add(self, r: np.ndarray, c: np.ndarray) -> None:
        if self.dtype is None:
            self.dtype = r.dtype
        if r.shape != c.shape or r.dtype != c.dtype:
            self.note = self.note or f"reference gives {r.dtype}{list(r.shape)}, folded model {c.dtype}{list(c.shape)}"
            return
        self.elements += r.size
        if not _is_float(r.dtype):
            self.mismatches += int(np.count_nonzero(r != c))
            if r.size:
                delta = np.abs(r.astype(np.float64) - c.astype(np.float64))
                self.max_abs = max(self.max_abs, float(delta.max()))
            return
        r, c = r.astype(np.float64), c.astype(np.float64)
        fr, fc = np.isfinite(r), np.isfinite(c)
        same_special = (r == c) | (np.isnan(r) & np.isnan(c))
        self.mismatches += int(np.count_nonzero((fr != fc) | (~fr & ~fc & ~same_special)))
        both = fr & fc
        if np.any(both):
            self.max_abs = max(self.max_abs, float(np.max(np.abs(r[both] - c[both]))))
            self.scale = max(self.scale, float(np.max(np.abs(r[both]))))

    def result(self) -> OutputDiff:
        dtype = np.dtype(np.float32 if self.dtype is None else self.dtype)
        d_rtol, d_atol = default_tolerance(dtype)
        discrete = not _is_float(dtype)
        rtol = d_rtol if self.rtol is None or discrete else self.rtol
        atol = d_atol if self.atol is None or discrete else self.atol
        if self.scale > 0:
            max_rel = self.max_abs / self.scale
        else:
            max_rel = 0.0 if self.max_abs == 0 else math.inf
        return OutputDiff(
            self.name, dtype.name, self.max_abs, max_rel, self.scale, rtol, atol,
            self.mismatches, self.elements, self.note,
        )


def _compare(ref, cand, feed: dict[str, np.ndarray], diffs: dict[str, _Diff]) -> None:
    names = list(diffs)
    try:
        expected = ref.run(names, feed)
    except Exception as err:  # noqa: BLE001 - ORT raises its own untyped errors
        raise UnsupportedModel(f"ONNX Runtime failed to run the unfolded model: {err}") from err
    try:
        got = cand.run(names, feed)
    except Exception as err:  # noqa: BLE001
        raise VerificationFailed(f"ONNX Runtime failed to run the folded model: {err}") from err
    for name, r, c in zip(names, expected, got):
        diffs[name].add(np.asarray(r), np.asarray(c))


def _is_float(dtype: Any) -> bool:
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or dtype.name == "bfloat16"


# --------------------------------------------------------------------------- sessions and inputs


def _session(model: onnx.ModelProto, which: str, error: type, providers: Sequence[str] | None, threads: int):
    options = session_options(threads)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.inter_op_num_threads = 1
    providers = list(providers or ["CPUExecutionProvider"])
    try:
        try:
            return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        except (ValueError, EncodeError):  # protobuf cannot serialise ≥ 2 GiB: use external data
            with tempfile.TemporaryDirectory(prefix="bnfold-verify-") as tmp:
                path = os.path.join(tmp, "model.onnx")
                onnx.save_model(model, path, save_as_external_data=True, location="model.data")
                return ort.InferenceSession(path, options, providers=providers)
    except Exception as err:  # noqa: BLE001 - ORT raises its own untyped errors
        raise error(f"ONNX Runtime cannot load the {which} model: {err}") from err


def _same_signature(ref, cand) -> list:
    for kind in ("inputs", "outputs"):
        r = [(a.name, a.type) for a in getattr(ref, f"get_{kind}")()]
        c = [(a.name, a.type) for a in getattr(cand, f"get_{kind}")()]
        if sorted(r) != sorted(c):
            raise VerificationFailed(f"the folded model's {kind} {c} differ from the unfolded model's {r}")
    return list(ref.get_inputs())


def _as_feed(feed: Any, inputs: list, index: int) -> dict[str, np.ndarray]:
    names = [a.name for a in inputs]
    if isinstance(feed, np.ndarray):
        if len(names) != 1:
            raise InvalidSamples(f"feed {index} is a bare array but the model has inputs {names}")
        feed = {names[0]: feed}
    missing, extra = sorted(set(names) - set(feed)), sorted(set(feed) - set(names))
    if missing or extra:
        raise InvalidSamples(
            f"feed {index} lacks inputs {missing} / has unknown inputs {extra}; the model takes {names}"
        )
    return {arg.name: _to_input_dtype(np.asarray(feed[arg.name]), arg) for arg in inputs}


def _to_input_dtype(array: np.ndarray, arg) -> np.ndarray:
    # float32 samples for a float16 model are the common case; other mismatches go to ORT as is
    dtype = _ORT_TYPES.get(arg.type)
    if dtype is not None and array.dtype != dtype and _is_float(array.dtype) and _is_float(dtype):
        return array.astype(dtype)
    return array


def _shape(arg, first: dict[str, np.ndarray] | None, symbols: dict[str, int]) -> tuple[int, ...]:
    template = first[arg.name] if first is not None else None
    if template is not None and template.ndim == len(arg.shape):
        return template.shape
    return tuple(_dim(d, axis, symbols) for axis, d in enumerate(arg.shape))


def _random(arg, shape: tuple[int, ...], drawn: InputScale, rng) -> np.ndarray:
    dtype = _ORT_TYPES.get(arg.type)
    if dtype is None:
        raise UnsupportedModel(f"cannot generate random values for input {arg.name!r} of type {arg.type}; "
                               "verify on samples instead (bnfold fold --samples FILE; feeds in the library)")
    if np.dtype(dtype).kind == "f":
        return drawn.draw(shape, dtype, rng)
    if dtype is np.bool_:
        return rng.random(shape) < 0.5
    return rng.integers(0, 2, shape).astype(dtype)  # {0, 1}: valid as an index or a flag


def _implied_scale(reference, inputs: list, shapes: dict, rng, providers, threads: int) -> InputScale:
    """`probe.fit_input_scale` on the reference's BNs; standard normal (with a note) if it cannot run."""
    found = batchnorm_statistics(reference)
    if not found:
        return InputScale(note="standard normal: no BatchNormalization with constant statistics to fit to")
    stats = [(bn.name or f"BatchNormalization({bn.output[0]})", bn.input[0], mean, var) for bn, mean, var in found]
    floats = {a.name: np.zeros(shapes[a.name], _ORT_TYPES[a.type]) for a in inputs
              if _ORT_TYPES.get(a.type) is not None and _is_float(_ORT_TYPES[a.type])}
    if not floats:
        return InputScale(note="standard normal: the model has no float input")
    others = {a.name: _random(a, shapes[a.name], InputScale(), rng) for a in inputs if a.name not in floats}
    try:
        probe, outputs = probe_model(reference, [bn for bn, _, _ in found])
        stats = [s for s in stats if s[1] in outputs]  # X of unknown rank is not probed
        if not stats:
            return InputScale(note="standard normal: no BN input of known rank to fit to")
        session = _session(probe, "probe", UnsupportedModel, providers, threads)

        def run(feeds: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
            values = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
            return {x: (values[m], values[s]) for x, (m, s) in outputs.items()}

        return fit_input_scale(run, stats, floats, others, rng)
    except Exception as err:  # noqa: BLE001 - a failed probe only means less realistic random inputs
        return InputScale(note=f"standard normal: probing the BN inputs failed ({str(err).splitlines()[0]})")


def _dim(d: Any, axis: int, symbols: dict[str, int]) -> int:
    if isinstance(d, int) and d >= 0:
        return d
    default = 2 if axis == 0 else 8  # a small batch; spatial sizes a 3×3 stack survives
    if isinstance(d, str) and d:
        return symbols.setdefault(d, default)  # one size per symbol, shared across inputs
    return default


def _check_options(rtol: float | None, atol: float | None, random_batches: int, threads: int) -> None:
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise InvalidOptions(f"{name} must be a finite number ≥ 0, got {value!r}")
    if random_batches < 0:
        raise InvalidOptions(f"random_batches must be ≥ 0, got {random_batches}")
    if threads < 0:
        raise InvalidOptions(f"threads must be ≥ 0, got {threads}")


__all__ = [
    "DISCRETE_FLIP_FRACTION",
    "RANDOM_INPUTS",
    "OutputDiff",
    "VerifyReport",
    "check_equivalent",
    "default_tolerance",
    "verify_equivalent",
]
