"""The checkpoint's `rankwise` section: typed on the way out, validated once on the way in."""
import json
import subprocess
import sys

import pytest

from rankwise.compress.lowrank import FORMAT_VERSION, load_rankwise_model
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


def test_section_without_format_version_is_read_as_the_first_format(checkpoint, tmp_path):
    old = _with_section(checkpoint, tmp_path / "old")
    cfg = json.loads((old / "config.json").read_text())
    del cfg["rankwise"]["format_version"]
    (old / "config.json").write_text(json.dumps(cfg))
    assert read_result(old).format_version == 1
    load_rankwise_model(str(old))


def test_newer_format_is_refused_in_one_line_by_every_reader(checkpoint, tmp_path, austen_file):
    newer = _with_section(checkpoint, tmp_path / "newer", format_version=FORMAT_VERSION + 1)
    with pytest.raises(RankwiseError, match="format_version"):
        read_result(newer)
    with pytest.raises(ValueError, match="format_version"):  # the copy every checkpoint carries
        load_rankwise_model(str(newer))
    for args in (["evaluate", str(newer), "--ppl", f"text:{austen_file}", "--seqlen", "16", "--max-windows", "1"],
                 ["compensate", str(checkpoint), str(newer), "-o", str(tmp_path / "c"), "--eora-rank", "2",
                  "--calib", f"text:{austen_file}", "--nsamples", "2", "--seqlen", "16"]):
        r = subprocess.run([sys.executable, "-m", "rankwise.cli.main", *args], capture_output=True, text=True)
        assert r.returncode == 2, r.stderr
        lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
        assert len(lines) == 1 and "format_version" in lines[0], lines
    assert not (tmp_path / "c").exists()


def test_malformed_section_names_the_field(checkpoint, tmp_path):
    bad = _with_section(checkpoint, tmp_path / "bad", ratio_achieved="lots")
    with pytest.raises(RankwiseError, match="ratio_achieved"):
        read_result(bad)
