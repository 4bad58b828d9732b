"""The real-architecture zoo as a table: what bnfold does to each export of `tests/zoo_models.py`.

    python -m bench.zoo --samples 16 --write bench/RESULTS.md

For every case (torchvision / timm / segmentation_models_pytorch, random init, BN kept at export):

* ``stats err``: max over BNs and channels of |Δμ|/sqrt(σ²+ε) and |Δσ²|/(σ²+ε) between
  ``bnfold.recalibrate`` and the float64 PyTorch eval-mode fixed point (the tests' reference);
* ``BN left`` / ``Mul+Add``: what the public pipeline (recalibrate → fold → verify) leaves;
* ``fold diff``: max |y_folded − y_unfolded| / max |y_unfolded| on the real samples, in ORT;
* ``time``: wall seconds of the pipeline job (recalibrate + fold + verify), and of one plain ORT
  inference pass over the same samples, for scale (at 16 samples fixed costs dominate).

The table is made by the same code as ``tests/zoo/test_zoo.py``; ``--write`` replaces the zoo
section of the given Markdown file (between its markers), keeping the rest.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the zoo is a test fixture
import zoo_models as zoo  # noqa: E402

import bnfold  # noqa: E402
from bnfold.pipeline import JobOptions, recalibrate_files  # noqa: E402

BEGIN, END = "<!-- zoo:begin -->", "<!-- zoo:end -->"
HEADER = ("| model | family | opset | BN params | axes | #BN | stats err (μ σ-units / σ² rel) | BN left | Mul+Add "
          "| fold diff (real) | pipeline s | ORT pass s | graph cut |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def run_case(case: zoo.Case, count: int, batch: int) -> str:
    net = zoo.build(case)
    model = zoo.export(net, case)
    x = zoo.samples(case, count)
    n_bn = zoo.count_op(model, "BatchNormalization")
    try:
        result = bnfold.recalibrate(model, x, batch_size=batch)
        mean_err, var_err = zoo.statistics_error(result.report.layers, zoo.torch_fixed_point(net, x))
        stats = f"{mean_err:.1e} / {var_err:.1e}"
    except bnfold.BnfoldError as exc:
        return _row(case, n_bn, f"refused: {exc}", "", "", "", "", "", "")
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "x.npy", x)
        started = time.perf_counter()
        try:
            out = recalibrate_files(model.SerializeToString(), Path(tmp) / "x.npy",
                                    JobOptions(batch_size=batch, verify_samples=count))
        except bnfold.BnfoldError as exc:
            return _row(case, n_bn, stats, f"pipeline refused: {str(exc)[:160]}", "", "", "", "", "")
        seconds = time.perf_counter() - started
    counts = out.report.extra["fold"]["counts"]
    diff = zoo.fold_difference(result.model, out.model, x)
    return _row(case, n_bn, stats, zoo.count_op(out.model, "BatchNormalization"), counts["affine"], f"{diff:.1e}",
                f"{seconds:.1f}", f"{_ort_pass(model, x, batch):.2f}", result.report.extra["stage_graph"])


def _ort_pass(model, x: np.ndarray, batch: int) -> float:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    started = time.perf_counter()
    for i in range(0, len(x), batch):
        session.run(None, {name: x[i : i + batch]})
    return time.perf_counter() - started


def _row(case: zoo.Case, n_bn, stats, left, affine, diff, seconds, ort_seconds, cut) -> str:
    params = "perturbed" if case.perturbed else "untouched (shared)"
    axes = "N,H,W" if case.dynamic else "N"
    cells = [case.name, case.family, case.opset, params, axes, n_bn, stats, left, affine, diff, seconds, ort_seconds, cut]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def write_section(path: Path, text: str) -> None:
    old = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + block + old[old.index(END) + len(END) :]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(new)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=6)
    ap.add_argument("--only", nargs="*", help="case names to run (default: all)")
    ap.add_argument("--write", type=Path, help="Markdown file whose zoo section is replaced by the table")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    rows, started = [], time.perf_counter()
    for case in zoo.CASES:
        if args.only and case.name not in args.only:
            continue
        rows.append(run_case(case, args.samples, args.batch_size))
        print(rows[-1], flush=True)
    table = HEADER + "\n" + "\n".join(rows)
    command = "python -m bench.zoo " + " ".join(argv if argv is not None else sys.argv[1:])
    text = f"```sh\n{command}\n```\n\n({time.perf_counter() - started:.0f} s in all)\n\n{table}"
    print(text)
    if args.write:
        write_section(args.write, text)


if __name__ == "__main__":
    main()
