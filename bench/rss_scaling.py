"""Peak RSS of bnfold.recalibrate against the sample count, at a fixed memory budget.

    python -m bench.rss_scaling --samples 1024 --budget-mib 256
    python -m bench.rss_scaling --samples 4096 --budget-mib 256

Samples stream from bnfold's lazy .npy reader as batches of 64, so the samples themselves are
never all in memory; one process per run, so ru_maxrss is this run's peak.
"""

import argparse
import resource
import time

import onnx

import bnfold
from bnfold.inputs.arrays import load_samples

from . import models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--budget-mib", type=int, default=256)
    parser.add_argument("--workdir", default="bench/out")
    args = parser.parse_args()
    paths = models.prepare(args.workdir, sample_counts=(4096,), log=lambda *a: None)
    model = onnx.load(paths["onnx"])
    source = load_samples(paths["samples_4096"])
    batches = (source[i : min(i + 64, args.samples)] for i in range(0, args.samples, 64))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    result = bnfold.recalibrate(model, batches, batch_size=64, memory_budget=args.budget_mib * 2**20)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    store = result.report.extra["store"]
    print(
        f"samples={args.samples} budget={args.budget_mib} MiB peak RSS={peak:.0f} MiB (before {before:.0f}) "
        f"store peak in RAM={store['peak_bytes_in_memory'] / 2**20:.0f} MiB spilled={store['bytes_spilled'] / 1e9:.1f} GB "
        f"time={time.perf_counter() - started:.1f} s"
    )


if __name__ == "__main__":
    main()
