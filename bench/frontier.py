"""Bytes frontier (not a test): perplexity against the stored bytes of the targeted Linears, in one run.

Every point is measured against the same dense model on wiki_eval.txt (the first `--windows` 512-token
windows, float32 compute). Bytes are those of the decoder Linears Rankwise factorizes
(compress/arch.named_target_linears), as a fraction of the same Linears at 16 bits per weight:

- dense: the weights rounded to bf16 (fraction 1.0);
- hqq: the dense model quantized weight-only by HQQ (`--hqq BITS:GROUP,...`: int8, int4 and 3-bit in groups of
  64 inputs, and 3-bit in groups of 128, which lands below 22% of the 16-bit bytes; bf16 scales and zeros),
  evaluated with the dequantized weights the quantized layer computes with; bytes = the packed weights plus
  the scales and zeros as HQQ stores them;
- hqq int4 + eora: `compress compensate` of the int4 model (written as a plain model) at each
  `--eora-ranks` rank, calibrated on wiki_calib.txt (seed 0); bytes = int4 + the paths at 16 bits;
- rankwise: each `--checkpoints` folder, bytes from its own record; one with float factors also with its
  factors re-stored as int8 (storage.store_factors: what `--factor-dtype int8` writes at the same ratio).

`--no-hqq` leaves out the HQQ and EoRA points and `--include F.json` adds the points another run of this
script wrote (same model, evaluation text and windows, checked by the dense perplexity), so checkpoints can be
measured as they are made.

Every float weight priced at 16 bits is rounded to bf16 before evaluation. Needs the `bench` extra (hqq).

    python bench/frontier.py --device cpu --threads 2 --checkpoints DIR[,DIR...] [--eora-ranks 16,64]
                             [--json frontier.json] [--plot frontier.png]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from rankwise.calib.data import load_text, tokenize
from rankwise.cli.main import app
from rankwise.compress.arch import named_target_linears
from rankwise.compress.describe import pipeline_name
from rankwise.compress.loading import load_model
from rankwise.compress.lowrank import QUANTIZED_LINEARS, LowRankFactors
from rankwise.compress.metadata import CompressionResult, read_result
from rankwise.compress.numerics import FLOAT_BYTES, MatrixShape
from rankwise.compress.pipeline import target_shapes
from rankwise.compress.storage import quantized_storages, stored_bytes, store_factors
from rankwise.eval.ppl import perplexity

ASSETS = Path(os.environ.get("RANKWISE_ASSETS", Path.home() / ".cache" / "rankwise-assets"))
BITS_NAME = {8: "int8", 4: "int4", 3: "3-bit"}
LINES_AT = (0.22, 0.30)  # byte fractions marked on the plot


@dataclass
class Point:
    family: str
    point: str
    bytes: float
    fraction: float
    ppl: float
    rel: float = 0.0
    seconds: float = 0.0


def tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


@torch.no_grad()
def round_to_16_bits(model: nn.Module) -> nn.Module:
    """Every float weight priced at 16 bits rounded to bf16 (kept float32 for compute); quantized factors, their
    float32 scales and factors stored in fp32 stay as they are."""
    exact = set()
    for module in model.modules():
        if isinstance(module, tuple(QUANTIZED_LINEARS.values())):
            exact |= {id(p) for p in module.parameters()}
        if isinstance(module, LowRankFactors) and module.factor_dtype == "fp32":
            exact |= {id(p) for p in (*module.A.parameters(), *module.B.parameters())}
    for p in model.parameters():
        if p.is_floating_point() and id(p) not in exact:
            p.data = p.data.to(torch.bfloat16).to(p.dtype)
    return model


def bytes_at_16_bits(shapes: dict[str, MatrixShape]) -> float:
    return sum(FLOAT_BYTES * s.dense_params for s in shapes.values())


@torch.no_grad()
def hqq_quantized(dense: nn.Module, nbits: int, group_size: int) -> tuple[nn.Module, int]:
    """A copy of `dense` whose targeted Linears hold HQQ's dequantized weights (bf16 compute dtype, as HQQ's
    layer computes them), and the bytes HQQ stores for them: packed weights, scales, zeros, bias."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    model = copy.deepcopy(dense)
    config = BaseQuantizeConfig(nbits=nbits, group_size=group_size)
    total = 0
    for lin in named_target_linears(model).values():
        q = HQQLinear(lin, config, del_orig=False, compute_dtype=torch.bfloat16, device="cpu")
        lin.weight.data = q.dequantize().to(lin.weight.dtype).reshape(lin.weight.shape)
        total += tensor_bytes(q.W_q) + sum(tensor_bytes(v) for v in q.meta.values() if torch.is_tensor(v))
        total += tensor_bytes(q.bias)
    return model, total


def compensate(original: str, quantized_dir: Path, out: Path, rank: int, args) -> None:
    """`compress compensate ORIGINAL QUANTIZED -o OUT --eora-rank RANK`, in this process."""
    app(["compensate", original, str(quantized_dir), "-o", str(out), "--eora-rank", str(rank),
         "--calib", args.calib, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", "0",
         "--device", args.device, "--quiet"], standalone_mode=False)


def path_bytes(result: CompressionResult) -> int:
    return FLOAT_BYTES * sum(m.lora_params for m in result.modules.values())


def factor_label(result: CompressionResult) -> str:
    """How the factorized layers' factors are stored: float, int8, int4 g32 (or a mix, joined)."""
    kinds = {(m.factor_dtype or "float") + (f" g{m.group_size}" if m.group_size else "")
             for m in result.modules.values() if m.rank is not None}
    return "/".join(sorted(kinds)) or "float"


def checkpoint_point(result: CompressionResult) -> str:
    budget = (f"ratio {result.ratio_requested:g}" if result.ratio_requested is not None
              else f"size ratio {result.size_ratio_requested:g}")
    return f"{pipeline_name(result)}, {budget}"


def checkpoint_record(folder: str, shapes: dict[str, MatrixShape]) -> CompressionResult:
    """The checkpoint's record, refused when it was made from a model of other shapes."""
    result = read_result(folder)
    if result is None:
        raise SystemExit(f"{folder} is not a Rankwise checkpoint")
    before = round(bytes_at_16_bits(shapes))
    if result.targeted_bytes_before not in (None, before):
        raise SystemExit(f"{folder} targets {result.targeted_bytes_before} bytes at 16 bits, the dense model "
                         f"{before}: made from another model")
    return result


def checkpoint_variants(folder: str, result: CompressionResult, shapes: dict[str, MatrixShape]):
    """(family, point, model, stored bytes) for a checkpoint as stored and, when its factors are float,
    re-stored as int8."""
    after = result.targeted_bytes_after
    yield (f"rankwise, {factor_label(result)} factors", checkpoint_point(result), load_model(folder, "fp32", "cpu")[0],
           after if after is not None else stored_bytes(shapes, result.modules))
    if not quantized_storages(result):
        model = load_model(folder, "fp32", "cpu")[0]
        modules = store_factors(model, result.modules, "int8", 0)
        yield ("rankwise, int8 factors (re-stored)", checkpoint_point(result), model, stored_bytes(shapes, modules))


class Frontier:
    """The dense model, the evaluation windows and the points measured so far."""

    def __init__(self, args):
        self.args = args
        self.dense, self.tokenizer, _ = load_model(args.model, "fp32", "cpu")
        round_to_16_bits(self.dense)
        self.shapes = target_shapes(self.dense)
        self.checkpoints = {folder: checkpoint_record(folder, self.shapes) for folder in args.checkpoints}
        self.dense_bytes = bytes_at_16_bits(self.shapes)
        self.ids = tokenize(self.tokenizer, load_text(args.eval, "test"))
        self.points: list[Point] = []

    def measure(self, family: str, point: str, model: nn.Module, stored: float) -> Point:
        t0 = time.perf_counter()
        ppl = perplexity(round_to_16_bits(model).to(self.args.device), self.ids, 512, self.args.device,
                         max_windows=self.args.windows).ppl
        model.to("cpu")
        p = Point(family, point, float(stored), stored / self.dense_bytes, ppl,
                  seconds=round(time.perf_counter() - t0, 1))
        p.rel = ppl / self.points[0].ppl if self.points else 1.0
        self.points.append(p)
        print(f"{family:>34} | {point:<40} | {p.fraction:.4f} of 16-bit bytes | ppl {ppl:.3f} ({p.rel:.2f}x)",
              flush=True)
        return p

    def run(self, work: Path) -> list[Point]:
        self.measure("dense", "bf16", self.dense, self.dense_bytes)
        self.points += included_points(self.args.include, self.points[0])
        if self.args.no_hqq:
            return self.measure_checkpoints()
        int4_bytes = self.hqq_points(work / "hqq-int4")
        for rank in self.args.eora_ranks:
            out = work / f"hqq-int4-eora{rank}"
            compensate(self.args.model, work / "hqq-int4", out, rank, self.args)
            self.measure("hqq int4 + eora", f"rank {rank}", load_model(str(out), "fp32", "cpu")[0],
                         int4_bytes + path_bytes(read_result(out)))
        return self.measure_checkpoints()

    def measure_checkpoints(self) -> list[Point]:
        for folder, result in self.checkpoints.items():
            for family, point, model, stored in checkpoint_variants(folder, result, self.shapes):
                self.measure(family, point, model, stored)
        return self.points

    def hqq_points(self, int4_dir: Path) -> int:
        """The `--hqq` points; the first int4 model is written to `int4_dir` as a plain model (for EoRA).
        Returns its stored bytes."""
        int4_bytes = 0
        for nbits, group in self.args.hqq:
            model, stored = hqq_quantized(self.dense, nbits, group)
            self.measure("hqq", f"{BITS_NAME[nbits]}, group {group}", model, stored)
            if nbits == 4 and not int4_bytes:
                model.save_pretrained(int4_dir)
                self.tokenizer.save_pretrained(int4_dir)
                int4_bytes = stored
        return int4_bytes


def included_points(files: list[Path], dense: Point) -> list[Point]:
    """The points other runs of this script wrote (their --json) but their dense one, which must match this
    run's."""
    out = []
    for f in files:
        points = [Point(**p) for p in json.loads(f.read_text())["points"]]
        if abs(points[0].ppl - dense.ppl) > 1e-6 * dense.ppl:
            raise SystemExit(f"{f}: its dense perplexity {points[0].ppl} is not this run's {dense.ppl} (another "
                             "model, text or number of windows)")
        out += points[1:]
    return out


def table(points: list[Point]) -> str:
    rows = ["| family | point | stored bytes (MB) | fraction of 16-bit bytes | ppl | x dense |",
            "|---|---|---|---|---|---|"]
    rows += [f"| {p.family} | {p.point} | {p.bytes / 1e6:.2f} | {p.fraction:.4f} | {p.ppl:.3f} | {p.rel:.2f} |"
             for p in points]
    return "\n".join(rows)


def plot(points: list[Point], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    markers = "o^sDvP*Xh<>"
    for i, family in enumerate(dict.fromkeys(p.family for p in points)):
        mine = [p for p in points if p.family == family]
        ax.plot([p.fraction for p in mine], [p.ppl for p in mine], markers[i % len(markers)], label=family)
    for x in LINES_AT:
        ax.axvline(x, color="grey", linestyle="--", linewidth=0.8)
        ax.annotate(f"{x:.0%}", (x, 1), xycoords=("data", "axes fraction"), xytext=(2, -12),
                    textcoords="offset points", color="grey", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("stored bytes of the targeted Linears / the same at 16 bits")
    ax.set_ylabel("wiki_eval perplexity (log)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ASSETS / "smollm2-135m"))
    ap.add_argument("--calib", default=f"text:{ASSETS / 'text' / 'wiki_calib.txt'}")
    ap.add_argument("--eval", default=f"text:{ASSETS / 'text' / 'wiki_eval.txt'}")
    ap.add_argument("--checkpoints", default="", help="comma-separated Rankwise checkpoint folders")
    ap.add_argument("--eora-ranks", default="16,64")
    ap.add_argument("--hqq", default="8:64,4:64,3:64,3:128", help="HQQ points, BITS:GROUP (inputs per group)")
    ap.add_argument("--no-hqq", action="store_true", help="dense and --checkpoints only (no HQQ, no EoRA)")
    ap.add_argument("--include", type=Path, action="append", default=[], help="a --json of another run to add")
    ap.add_argument("--nsamples", type=int, default=32, help="EoRA calibration windows")
    ap.add_argument("--seqlen", type=int, default=512, help="EoRA calibration window length")
    ap.add_argument("--windows", type=int, default=64, help="512-token evaluation windows")
    ap.add_argument("--device", default="cpu", help="where models are evaluated and compensated")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path, help="PNG: ppl (log) against the bytes fraction")
    args = ap.parse_args(argv)
    args.checkpoints = [c for c in args.checkpoints.split(",") if c]
    args.eora_ranks = [int(r) for r in args.eora_ranks.split(",") if r]
    args.hqq = [tuple(int(v) for v in spec.split(":")) for spec in args.hqq.split(",") if spec]
    return args


def main(argv: list[str] | None = None) -> list[Point]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    frontier = Frontier(args)
    with tempfile.TemporaryDirectory(prefix="rankwise-frontier-") as work:
        points = frontier.run(Path(work))
    print()
    print(table(points))
    if args.json:
        settings = {k: [str(p) for p in v] if k == "include" else str(v) if isinstance(v, Path) else v
                    for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"settings": settings, "threads": torch.get_num_threads(),
                                         "points": [asdict(p) for p in points]}, indent=2) + "\n")
    if args.plot:
        plot(points, args.plot, f"{Path(args.model).name}, wiki_eval, {args.windows} x 512 tokens")
    return points


if __name__ == "__main__":
    main()
