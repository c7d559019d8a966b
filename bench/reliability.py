"""What the reliability checks cost on a real model: loading with the missing-tensor check, the NaN/Inf scan
of every targeted Linear, and the checkpoint write with its sync to disk, against the write alone.

    OMP_WAIT_POLICY=PASSIVE python bench/reliability.py --model ~/.cache/rankwise-assets/smollm2-135m --threads 1

The checkpoint written is the dense model itself through the atomic writer (the sync cost depends on the bytes
written, not on what they are). Each figure is the median of --reps runs; the output lands in a temporary
folder that is removed at the end.
"""
from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rankwise.compress.arch import check_finite_weights, named_target_linears
from rankwise.compress.loading import load_model
from rankwise.compress.outputs import atomic_output_dir


def _median_seconds(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _write(model, root: Path, sync: bool) -> None:
    out = root / ("synced" if sync else "plain")
    shutil.rmtree(out, ignore_errors=True)  # a dense folder is not ours to --overwrite
    if sync:
        with atomic_output_dir(out) as tmp:
            model.save_pretrained(tmp)
    else:
        model.save_pretrained(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="dense checkpoint folder or hub id")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dir", default=None, help="where to write the checkpoints (default: the system temp folder)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_s = _median_seconds(lambda: load_model(args.model, "fp32", "cpu"), args.reps)
    model, _, _ = load_model(args.model, "fp32", "cpu")
    linears = named_target_linears(model)
    scan_s = _median_seconds(lambda: check_finite_weights(linears), args.reps)
    root = Path(tempfile.mkdtemp(prefix="rankwise-reliability-", dir=args.dir))
    try:
        plain, synced = [], []
        for _ in range(args.reps):  # alternated, so a shared machine's load drift hits both alike
            plain.append(_median_seconds(lambda: _write(model, root, sync=False), 1))
            synced.append(_median_seconds(lambda: _write(model, root, sync=True), 1))
        plain_s, synced_s = statistics.median(plain), statistics.median(synced)
        size = sum(f.stat().st_size for f in (root / "synced").rglob("*") if f.is_file())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    params = sum(lin.weight.numel() for lin in linears.values())
    print(f"model {args.model}; {len(linears)} targeted Linears, {params:,} weights; checkpoint {size / 2**20:.0f} MiB")
    cpu = platform.processor() or platform.machine()
    print(f"written under {root.parent}; torch {torch.__version__}, {args.threads} thread(s), {cpu}, "
          f"median of {args.reps}")
    print("| step | seconds |\n|---|---|")
    print(f"| load (fp32, with the missing/unexpected tensor check) | {load_s:.2f} |")
    print(f"| NaN/Inf scan of every targeted Linear | {scan_s:.3f} |")
    print(f"| save_pretrained alone | {plain_s:.2f} |")
    print(f"| atomic write: save_pretrained, umask, fsync of every file, rename | {synced_s:.2f} |")


if __name__ == "__main__":
    main()
