from rankwise.compress.config import PRESETS, CompressConfig
from rankwise.compress.describe import pipeline_name


def test_preset_fills_in_and_explicit_options_override():
    cfg = CompressConfig(model="m", ratio=0.2, preset="best")
    for key, value in PRESETS["best"].items():
        assert getattr(cfg, key) == value
    cfg = CompressConfig(model="m", ratio=0.2, preset="best", refine=False, method="asvd")
    assert cfg.refine is False and cfg.method == "asvd" and cfg.ranks == PRESETS["best"]["ranks"]
    assert CompressConfig(model="m", ratio=0.2) == CompressConfig(model="m", ratio=0.2, preset="none")


def test_preset_on_the_command_line(tmp_path, tiny_dirs, austen_file, cli):
    from rankwise.compress.metadata import read_result
    out = tmp_path / "c"
    r = cli("model", tiny_dirs["llama"], "-o", out, "--ratio", "0.3", "--preset", "best", "--no-refine",
            "--compensate", "eora", "--eora-rank", "2",
            "--calib", f"text:{austen_file}", "--nsamples", "4", "--seqlen", "32", "--device", "cpu")
    assert r.exit_code == 0, r.output
    meta = read_result(str(out))
    assert meta.ranks_allocation == "loss-aware" and meta.method == "svd-llm"  # from the preset
    assert meta.stage_run("eora").options["rank"] == 2  # given beside it: added
    assert meta.stage_run("block-refine") is None  # --no-refine, given explicitly, overrides the preset
    assert meta.preset == "best"


def test_unknown_preset_is_one_line(tmp_path, tiny_dirs, cli):
    r = cli("model", tiny_dirs["llama"], "-o", tmp_path / "c", "--ratio", "0.3", "--preset", "fastest")
    assert r.exit_code == 2
    assert "preset" in r.output and "Traceback" not in r.output


def test_preset_streams_with_a_streaming_allocator(tmp_path, tiny_dirs, austen_file, cli):
    """The preset's loss-aware ranks need every block at once: refused with --stream-weights in one line that
    names the way out, which then works (block refinement streams)."""
    from rankwise.compress.metadata import read_result
    common = ["--ratio", "0.3", "--preset", "best", "--stream-weights", "--calib", f"text:{austen_file}",
              "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--refine-steps", "2"]
    r = cli("model", tiny_dirs["llama"], "-o", tmp_path / "refused", *common)
    assert r.exit_code == 2 and "--ranks uniform" in " ".join(r.output.split()), r.output
    r = cli("model", tiny_dirs["llama"], "-o", tmp_path / "c", *common, "--ranks", "uniform")
    assert r.exit_code == 0, r.output
    meta = read_result(str(tmp_path / "c"))
    assert meta.ranks_allocation == "uniform" and meta.stage_run("block-refine") is not None
    assert pipeline_name(meta) == "svd-llm + uniform ranks + block-refine steps=2 (preset best)"
    r = cli("inspect", tmp_path / "c")
    assert "pipeline: svd-llm + uniform ranks + block-refine steps=2 (preset best)" in r.output, r.output
