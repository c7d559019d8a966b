"""bench/frontier.py end to end on a tiny model: HQQ's stored bytes match the bits it packs (scales and zeros
included), EoRA paths add their 16-bit bytes to int4's, int8 re-stored factors take about half the float
factors' bytes, and every point is evaluated. Runs where HQQ (the `bench` extra) is installed."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("hqq", reason="HQQ is not installed (pip install -e .[bench])")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import frontier  # noqa: E402
from tiny import tiny_model, tiny_tokenizer  # noqa: E402

GROUP = 64
EORA_RANK = 4
# HQQ's bits per weight: 8 and 4 bits one or two to a byte, 3 bits ten to an int32; a bf16 scale and zero
# per group of 64 inputs
EXPECTED_BITS = {"int8": 8 + 32 / GROUP, "int4": 4 + 32 / GROUP, "3-bit": 3.2 + 32 / GROUP}


@pytest.fixture(scope="module")
def measured(tmp_path_factory, austen_file):
    root = tmp_path_factory.mktemp("frontier")
    # every targeted Linear holds a multiple of 10 groups of 64, so 3-bit packing has no padding
    model = tiny_model("llama", hidden_size=320, intermediate_size=640, head_dim=80, max_position_embeddings=512)
    model.save_pretrained(root / "dense")
    tiny_tokenizer().save_pretrained(root / "dense")
    from typer.testing import CliRunner

    from rankwise.cli.main import app
    res = CliRunner().invoke(app, ["model", str(root / "dense"), "-o", str(root / "ck"), "--ratio", "0.3",
                                   "--calib", f"text:{austen_file}", "--nsamples", "4", "--seqlen", "32",
                                   "--device", "cpu"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    argv = ["--model", str(root / "dense"), "--calib", f"text:{austen_file}", "--eval", f"text:{austen_file}",
            "--checkpoints", str(root / "ck"), "--hqq", "8:64,4:64,3:64", "--eora-ranks", str(EORA_RANK),
            "--nsamples", "4", "--seqlen", "32", "--windows", "2", "--json", str(root / "f.json"), "--plot", str(root / "f.png")]
    points = frontier.main(argv)
    shapes = frontier.target_shapes(model)
    return {(p.family, p.point.split(",")[0]): p for p in points}, shapes, root


def test_hqq_bytes_are_the_packed_bits_with_scales_and_zeros(measured):
    points, _, _ = measured
    fractions = [points["hqq", name].fraction for name in EXPECTED_BITS]
    assert fractions == sorted(fractions, reverse=True)
    for name, bits in EXPECTED_BITS.items():
        assert points["hqq", name].fraction == pytest.approx(bits / 16, rel=0.03), name
    assert points["dense", "bf16"].fraction == 1.0
    # int8 group-wise barely moves the model; every point scores a finite perplexity
    assert points["hqq", "int8"].rel == pytest.approx(1.0, abs=0.01)
    assert all(math.isfinite(p.ppl) and p.ppl > 1 for p in points.values())


def test_eora_paths_add_their_16_bit_bytes_to_int4(measured):
    points, shapes, _ = measured
    paths = 2 * EORA_RANK * sum(s.out + s.inp for s in shapes.values())
    assert points["hqq int4 + eora", f"rank {EORA_RANK}"].bytes == points["hqq", "int4"].bytes + paths


def test_checkpoint_bytes_from_its_record_and_int8_restored(measured):
    points, shapes, root = measured
    record = json.loads((root / "ck" / "config.json").read_text())["rankwise"]
    float_point = next(p for (family, _), p in points.items() if family == "rankwise, float factors")
    restored = next(p for (family, _), p in points.items() if family == "rankwise, int8 factors (re-stored)")
    assert float_point.bytes == record["targeted_bytes_after"]
    assert float_point.fraction == pytest.approx(1 - record["ratio_achieved"], abs=0.01)
    # int8 values and one float32 scale per factor row: a bit over half the 16-bit factors' bytes
    assert 0.5 < restored.bytes / float_point.bytes < 0.56
    assert float_point.point == restored.point and "svd-llm" in float_point.point


def test_json_and_plot_are_written(measured):
    points, _, root = measured
    written = json.loads((root / "f.json").read_text())
    assert [(p["family"], p["ppl"]) for p in written["points"]] == [(p.family, p.ppl) for p in points.values()]
    assert (root / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_another_runs_points_are_included_and_a_foreign_one_refused(measured, austen_file):
    points, _, root = measured
    argv = ["--model", str(root / "dense"), "--eval", f"text:{austen_file}", "--no-hqq", "--windows", "2",
            "--include", str(root / "f.json")]
    again = frontier.main([*argv, "--json", str(root / "again.json")])
    assert json.loads((root / "again.json").read_text())["settings"]["include"] == [str(root / "f.json")]
    assert [(p.family, p.point, p.ppl) for p in again] == [(p.family, p.point, p.ppl) for p in points.values()]
    with pytest.raises(SystemExit, match="dense perplexity"):
        frontier.main([*argv[:-3], "1", "--include", str(root / "f.json")])  # one window: another dense figure
