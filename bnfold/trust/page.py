"""One self-contained HTML page of a report: what changed per layer, how sure, did it help, what was folded.

Plots are drawn with matplotlib (the ``report`` extra) and embedded as base64 PNG, so the page
needs no network and no other file. Input is the report as JSON data (`Report.to_dict()`), so the
same page can be made from a saved report.json. Figures use `matplotlib.figure.Figure` directly
(no pyplot): no global state, safe in a server's worker threads.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np

from bnfold.errors import InvalidOptions, plural

FATE_WORDS = {"folded_backward": "folded into the layer before", "folded_forward": "folded into the layer after",
              "affine": "kept as a per-channel scale and shift", "kept": "kept as BatchNorm"}


def render(report: dict[str, Any], title: str = "bnfold report") -> str:
    """The page as a string (UTF-8 HTML)."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        raise InvalidOptions("the HTML report needs matplotlib: pip install 'bnfold[report]'") from None
    parts = [_HEAD.format(title=html.escape(title)), _summary(report)]
    layers = report.get("layers") or []
    if layers:
        parts.append("<h2>1. What changed, layer by layer</h2>" + _LAYER_TEXT)
        parts.append(_img(_layer_figure(Figure, FuncFormatter, layers)))
    parts.append("<h2>2. Did it help?</h2>" + _help_section(Figure, report))
    parts.append("<h2>3. What happened to each BatchNorm when folding</h2>" + _fold_section(report))
    quantized = (report.get("extra") or {}).get("quantize")
    if quantized:
        parts.append("<h2>4. INT8</h2>" + _int8_section(quantized))
    parts.append("</body></html>")
    return "\n".join(parts)


def _summary(report: dict[str, Any]) -> str:
    totals = report.get("totals", {})
    samples, recommended = totals.get("samples", 0), totals.get("samples_recommended")
    enough = totals.get("samples_sufficient")
    verdict = ("enough" if enough else "too few") if enough is not None else "not assessed"
    stats = (report.get("extra") or {}).get("statistics") or {}
    prior = (f"; source prior N = {stats['prior']:g} (source weight {stats['source_weight']:.0%})"
             if stats.get("prior") else "; statistics from the new samples only")
    rows = [("BatchNorm layers", totals.get("bn_layers", 0)), ("Unlabeled samples used", samples),
            ("Samples recommended", f"{recommended} ({verdict}: standard error ≤ 2 % of σ in 90 % of channels)"
             if recommended is not None else "—"), ("Statistics written", "new mean and variance" + prior)]
    table = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    warnings = list(report.get("warnings") or []) + [f"{layer['name']}: {w}" for layer in report.get("layers") or []
                                                     for w in layer.get("warnings") or []]
    notes = "".join(f"<li>{html.escape(w)}</li>" for w in dict.fromkeys(warnings))
    return (_INTRO + f"<table class='kv'>{table}</table>"
            + (f"<div class='warn'><b>Warnings</b><ul>{notes}</ul></div>" if notes else "<p class='ok'>No warnings.</p>"))


def _layer_figure(Figure, FuncFormatter, layers: list[dict[str, Any]]):  # matplotlib classes, imported late
    names = [layer["name"] for layer in layers]
    shift, shift_err, ratio, ratio_lo, ratio_hi = [], [], [], [], []
    for layer in layers:
        old_sd = np.sqrt(np.asarray(layer["old_var"], float) + layer["epsilon"])
        new_s2 = np.asarray(layer["new_var"], float) + layer["epsilon"]
        delta = np.abs(np.asarray(layer["new_mean"], float) - np.asarray(layer["old_mean"], float))
        shift.append(float(np.mean(delta / old_sd)))
        se_mean, se_var = layer.get("stderr_mean"), layer.get("stderr_var")
        shift_err.append(float(np.median(2 * np.asarray(se_mean, float) / old_sd)) if se_mean is not None else 0.0)
        r = float(np.exp(np.mean(np.log(new_s2 / (old_sd**2)))))
        rel = float(np.median(2 * np.asarray(se_var, float) / new_s2)) if se_var is not None else 0.0
        ratio.append(r)
        ratio_lo.append(r - r * max(1 - rel, 1e-3))
        ratio_hi.append(r * rel)
    height = max(2.6, 0.3 * len(layers) + 1.6)
    fig = Figure(figsize=(11, height), layout="constrained")
    left, right = fig.subplots(1, 2, sharey=True)
    y = np.arange(len(layers))
    thick = 0.6
    left.barh(y, shift, height=thick, xerr=shift_err, color="#4c72b0", ecolor="#222", capsize=3)
    left.set_title("Mean shift  |Δμ| / σ_old  (mean over channels)")
    left.set_xlabel("source standard deviations the activations moved")
    right.barh(y, np.asarray(ratio) - 1, left=1, height=thick, xerr=[ratio_lo, ratio_hi], color="#dd8452",
               ecolor="#222", capsize=3)
    right.axvline(1, color="#555", lw=1)
    right.set_xscale("log")
    reach = max(max(ratio), 1 / min(ratio), 1.1) * 1.6  # symmetric around 1: shrinking and growing look alike
    right.set_xlim(1 / reach, reach)
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    right.xaxis.set_major_formatter(plain)
    right.xaxis.set_minor_formatter(plain)
    if len(layers) <= 40:  # values next to the bars while they stay readable
        for i, (s_value, r_value) in enumerate(zip(shift, ratio)):
            left.text(s_value + shift_err[i], i, f"  {s_value:.2f}", va="center", fontsize=8)
            # at the right edge, clear of bars and error bars
            right.text(0.99, i, f"×{r_value:.2f}", va="center", ha="right", fontsize=8,
                       transform=right.get_yaxis_transform())
        left.set_xlim(0, max(max(shift) + max(shift_err), 1e-3) * 1.2)
    right.set_title("Variance ratio  var_new / var_old  (geometric mean)")
    right.set_xlabel("1 = unchanged;  < 1: activations shrank,  > 1: grew")
    left.set_yticks(y, names, fontsize=8 if len(layers) > 30 else 10)
    left.invert_yaxis()  # graph order, input at the top
    for axis in (left, right):
        axis.grid(axis="x", alpha=0.3)
    return fig


def _help_section(Figure, report: dict[str, Any]) -> str:
    signals, check = report.get("signals"), report.get("check")
    out = []
    if check:
        worse = check["after"] < check["before"]
        out.append(f"<p class='{'warn' if worse else 'ok'}'><b>Labelled check</b> on {plural(check['samples'], 'sample')}: "
                   f"{check['metric'].replace('_', ' ')} {check['before']:.1%} before → <b>{check['after']:.1%}</b> "
                   "after adaptation.</p>")
    else:
        out.append("<p>No labelled check was given (<code>--check-samples X.npy --check-labels Y.npy</code> scores the "
                   "model before and after on a few labelled samples, and refuses an adaptation that makes it worse).</p>")
    if signals:
        out.append(f"<p><b>Label-free signals</b> on {signals['samples']} of the samples. These are <b>signals, not "
                   "accuracy</b>: they show how the outputs moved, not whether they are right.</p>")
        out.append(_signal_table(signals))
    figure = _help_figure(Figure, signals, check)
    return "\n".join(out) + (_img(figure) if figure is not None else "")


def _signal_table(signals: dict[str, Any]) -> str:
    if signals.get("kind") == "classifier":
        b, a = signals["before"], signals["after"]
        rows = [("Mean entropy (nats; lower = more confident)", f"{b['mean_entropy']:.3f}", f"{a['mean_entropy']:.3f}"),
                ("Mean top probability", f"{b['mean_max_probability']:.1%}", f"{a['mean_max_probability']:.1%}"),
                ("Predictions that changed", "", f"{signals['changed_argmax']:.1%}")]
    else:
        rows = [("Output shift |Δμ|/σ_before (mean over channels)", "", f"{signals['output_shift']:.3f}"),
                ("Output spread ratio σ_after/σ_before", "", f"{signals['output_std_ratio']:.3f}")]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{b}</td><td>{a}</td></tr>" for k, b, a in rows)
    return f"<table class='kv'><tr><th></th><th>before</th><th>after</th></tr>{body}</table>"


def _help_figure(Figure, signals, check):
    bars = []
    if check:
        bars.append((check["metric"].replace("_", " ") + " (labelled)", check["before"], check["after"]))
    if signals and signals.get("kind") == "classifier":
        bars.append(("mean top probability (signal)", signals["before"]["mean_max_probability"],
                     signals["after"]["mean_max_probability"]))
    if not bars:
        return None
    fig = Figure(figsize=(7, 0.9 * len(bars) + 1.3), layout="constrained")
    axis = fig.subplots()
    y = np.arange(len(bars))
    axis.barh(y - 0.2, [b[1] for b in bars], height=0.4, color="#999", label="before (source statistics)")
    axis.barh(y + 0.2, [b[2] for b in bars], height=0.4, color="#55a868", label="after (recalibrated)")
    for i, (_, before, after) in enumerate(bars):
        axis.text(before, i - 0.2, f" {before:.1%}", va="center", fontsize=9)
        axis.text(after, i + 0.2, f" {after:.1%}", va="center", fontsize=9)
    axis.set_yticks(y, [b[0] for b in bars])
    axis.set_xlim(0, 1.12)
    axis.invert_yaxis()
    fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return fig


def _fold_section(report: dict[str, Any]) -> str:
    fold = (report.get("extra") or {}).get("fold")
    if not fold:
        return "<p>Not folded (the BatchNorm nodes stay in the model with their new statistics).</p>"
    counts = ", ".join(f"{n} {FATE_WORDS.get(f, f)}" for f, n in fold["counts"].items() if n)
    rows = "".join(f"<tr><td>{html.escape(d['bn'])}</td><td>{html.escape(FATE_WORDS.get(d['fate'], d['fate']))}</td>"
                   f"<td>{html.escape(d['into'] or '')}</td><td>{html.escape(d['reason'])}</td></tr>"
                   for d in fold["decisions"])
    return (f"<p>{html.escape(counts)}. Folding removes BatchNorm by merging it into a neighbouring layer's "
            "weights; the result was checked to compute the same outputs.</p>"
            f"<table class='grid'><tr><th>BatchNorm</th><th>fate</th><th>into</th><th>why</th></tr>{rows}</table>")


def _int8_section(q: dict[str, Any]) -> str:
    """extra["quantize"] (bnfold.quantize.int8): size, the agreement gate per output, INT8 ops, latency."""
    size, gate = q["size"], q["gate"]
    calibrated = plural(q.get("calibration", {}).get("samples", 0), "sample")
    out = [(f"<p>Quantized statically ({html.escape(str(q['format']))}; weights {html.escape(str(q['weights']))}; "
            f"activations {html.escape(str(q['activations']))}), ranges calibrated ({html.escape(str(q['method']))}) "
            f"on {calibrated} of the new domain, after folding. Size {_mib(size['float_bytes'])} → "
            f"<b>{_mib(size['int8_bytes'])}</b> ({size['ratio']:.0%} of the float model).</p>")]
    rows = "".join(_agreement_row(o, gate) for o in gate["outputs"])
    out.append(f"<p><b>Agreement with the float model</b> on {plural(gate['samples'], 'sample')}; the INT8 model is "
               f"refused below top-1 {gate['min_agreement']:g} or cosine {gate['min_cosine']:g}.</p>"
               "<table class='grid'><tr><th>output</th><th>kind</th><th>top-1 agreement</th><th>cosine</th>"
               f"<th>max |Δ| / max |y|</th><th>mean |Δ| / mean |y|</th></tr>{rows}</table>")
    ops = q.get("ops") or {}
    out.append(f"<p>Runs in INT8: {html.escape(', '.join(ops.get('int8') or []) or 'none')}. "
               f"Left in float: {html.escape(', '.join(ops.get('float') or []) or 'none')}.</p>")
    latency = q.get("latency")
    if latency:
        cells = "".join(f"<tr><th>{html.escape(k.replace('_', ' '))}</th><td>{_ms(v.get('float_ms'))}</td>"
                        f"<td>{_ms(v.get('int8_ms'))}</td><td>{_times(v.get('speedup'))}</td></tr>"
                        for k, v in latency.items())
        out.append("<p>ONNX Runtime CPU latency (median of repeated runs on this machine):</p><table class='kv'>"
                   f"<tr><th></th><th>float</th><th>INT8</th><th>speed-up</th></tr>{cells}</table>")
    else:
        out.append("<p class='muted'>Latency was not measured.</p>")
    notes = "".join(f"<li>{html.escape(w)}</li>" for w in q.get("warnings") or [])
    return "\n".join(out) + (f"<div class='warn'><ul>{notes}</ul></div>" if notes else "")


def _agreement_row(o: dict[str, Any], gate: dict[str, Any]) -> str:
    def mark(value, threshold, digits):
        if value is None:
            return "—"
        return f"<span class='{'ok' if value >= threshold else 'bad'}'>{value:.{digits}f}</span>"
    def ratio(value):  # None: not finite (quantize.gate.to_dict), e.g. a float output that is all zeros
        return "∞" if value is None else f"{value:.2e}"
    cosine = "—" if o["kind"] == "discrete" else mark(o["cosine"], gate["min_cosine"], 5)
    return (f"<tr><td>{html.escape(o['name'])}</td><td>{html.escape(o['kind'])}</td>"
            f"<td>{mark(o.get('top1'), gate['min_agreement'], 4)}</td><td>{cosine}</td>"
            f"<td>{ratio(o['rel_max'])}</td><td>{ratio(o['rel_mean'])}</td></tr>")


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def _times(value: float | None) -> str:
    return "—" if value is None else f"×{value:.2f}"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g} ms"  # a small model runs in hundredths of a ms


def _img(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return f"<img alt='plot' src='data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}'>"


_HEAD = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;color:#222;line-height:1.45}}
h1{{margin-bottom:.2em}} table{{border-collapse:collapse;margin:.8em 0}} th,td{{padding:.25em .8em;text-align:left}}
table.grid td,table.grid th{{border-bottom:1px solid #ddd;font-size:.9em}} table.kv th{{font-weight:600}}
.warn{{background:#fff4e5;border-left:4px solid #e69500;padding:.5em 1em}} .ok{{color:#2e7d32}} .bad{{color:#c62828;font-weight:600}}
img{{max-width:100%}} .muted{{color:#666}}</style></head><body><h1>{title}</h1>"""

_INTRO = """<p class="muted">A model's BatchNorm layers normalise activations with a mean and variance measured on
the data it was trained on. bnfold re-measured them on unlabeled samples from a new domain (another lab, camera or
scanner) so the model sees activations on the scale it expects. This page shows what changed, how sure the new
values are, and whether it helped.</p>"""

_LAYER_TEXT = """<p class="muted">Layers from the input (top) to the output (bottom). Left: how far each layer's
input moved on the new samples, in standard deviations of the old data. Right: how much its spread changed.
Error bars: ±2 standard errors of a typical channel (the median over channels) — how much the new value could
still move with other samples from the same domain. Bars much longer than their error bars are real shifts.</p>"""
