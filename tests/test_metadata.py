"""The checkpoint's `rankwise` section: typed on the way out, validated once on the way in."""
import json
import subprocess
import sys

import pytest

from rankwise.compress.lowrank import FORMAT_VERSION, load_rankwise_model
from rankwise.compress.describe import pipeline_name
from rankwise.compress.metadata import CompressionResult, read_result
from rankwise.errors import RankwiseError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_dirs, austen_file):
    from typer.testing import CliRunner

    from rankwise.cli.main import app
    out = tmp_path_factory.mktemp("meta") / "ck"
    res = CliRunner().invoke(app, ["model", str(tiny_dirs["llama"]), "-o", str(out), "--method", "svd-llm",
                                   "--ratio", "0.3", "--calib", f"text:{austen_file}", "--nsamples", "2",
                                   "--seqlen", "16", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    return out


def _with_section(src, dst, **changes):
    import shutil
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["rankwise"].update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_written_section_reads_back_as_the_same_record(checkpoint):
    section = json.loads((checkpoint / "config.json").read_text())["rankwise"]
    assert section["format_version"] == FORMAT_VERSION
    meta = read_result(checkpoint)
    assert isinstance(meta, CompressionResult)
    assert meta.to_json() == section
    spec = next(iter(meta.modules.values()))
    assert section["modules"][next(iter(meta.modules))] == {"rank": spec.rank, "in": spec.in_features,
                                                           "out": spec.out_features, "bias": spec.bias,
                                                           "lora_rank": 0}


# The stage fields of a version-1 section (written before the recipe was stored), as such checkpoints hold them.
VERSION_1_STAGES = {"method": "asvd", "method_options": {"alpha": 0.25}, "ranks_allocation": "loss-aware",
                    "rank_multiple": 8, "refit": True, "compensate": "eora", "eora_rank": 4,
                    "refine": {"steps": 8, "lr": 0.001, "seed": 0,
                               "blocks": {"model.layers.0": {"mse_before": 0.5, "mse_after": 0.25, "kept": True}}}}


def test_a_version_1_section_reads_as_its_recipe_and_still_loads(checkpoint, tmp_path, cli):
    old = _with_section(checkpoint, tmp_path / "old", **VERSION_1_STAGES)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["rankwise"]["format_version"], cfg["rankwise"]["recipe"]  # version 1 had neither
    (old / "config.json").write_text(json.dumps(cfg))
    meta = read_result(old)
    assert [(r.stage, r.kind) for r in meta.recipe] == [
        ("asvd", "factorizer"), ("loss-aware", "allocator"), ("refit", "corrector"), ("eora", "corrector"),
        ("block-refine", "block corrector")]
    assert meta.stage_run("eora").options == {"rank": 4} and meta.stage_run("eora").adds_paths
    assert meta.stage_run("block-refine").record["blocks"]["model.layers.0"]["kept"] is True
    assert pipeline_name(meta) == "asvd alpha=0.25 + loss-aware ranks (multiple of 8) + refit + EoRA rank 4 + block-refine"
    load_rankwise_model(str(old))
    r = cli("inspect", old)
    assert r.exit_code == 0 and "block corrector block-refine: steps=8, lr=0.001, seed=0" in r.output, r.output


def test_newer_format_is_refused_in_one_line_by_every_reader(checkpoint, tmp_path, austen_file, cli):
    newer = _with_section(checkpoint, tmp_path / "newer", format_version=FORMAT_VERSION + 1)
    with pytest.raises(RankwiseError, match="format_version"):
        read_result(newer)
    with pytest.raises(ValueError, match="format_version"):  # the copy every checkpoint carries
        load_rankwise_model(str(newer))
    r = subprocess.run([sys.executable, "-m", "rankwise.cli.main", "evaluate", str(newer), "--ppl",
                        f"text:{austen_file}", "--seqlen", "16", "--max-windows", "1"], capture_output=True, text=True)
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "format_version" in lines[0], lines
    res = cli("compensate", checkpoint, newer, "-o", tmp_path / "c", "--eora-rank", 2, "--calib",
              f"text:{austen_file}", "--nsamples", 2, "--seqlen", 16)
    assert res.exit_code == 2 and "format_version" in res.output
    assert not (tmp_path / "c").exists()


def test_malformed_section_names_the_field(checkpoint, tmp_path):
    bad = _with_section(checkpoint, tmp_path / "bad", ratio_achieved="lots")
    with pytest.raises(RankwiseError, match="ratio_achieved"):
        read_result(bad)
