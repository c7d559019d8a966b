import pytest

from rankwise.compress.config import PRESETS, CompressConfig
from rankwise.compress.describe import pipeline_name


@pytest.mark.parametrize("preset, refiner", [("best", "kl-refine"), ("fast", "block-refine")])
def test_each_preset_is_svd_llm_with_loss_aware_ranks_and_one_refiner(preset, refiner):
    cfg = CompressConfig(model="m", ratio=0.2, preset=preset)
    for key, value in PRESETS[preset].items():
        assert getattr(cfg, key) == value
    stages = [e["stage"] for e in cfg.stages()]
    assert stages == ["svd-llm", "loss-aware", refiner], stages


def test_preset_fills_in_and_explicit_options_override():
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


def test_preset_streams_once_its_whole_model_stages_are_swapped(tmp_path, tiny_dirs, austen_file, cli):
    """The preset's loss-aware ranks and end-to-end refinement need every block at once: refused with
    --stream-weights in one line naming both ways out, which then work (block refinement streams)."""
    from rankwise.compress.metadata import read_result
    common = ["--ratio", "0.3", "--preset", "best", "--stream-weights", "--calib", f"text:{austen_file}",
              "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--refine-steps", "2"]
    r = cli("model", tiny_dirs["llama"], "-o", tmp_path / "refused", *common)
    said = " ".join(r.output.split())
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "loss-aware" in said and "--ranks uniform" in said and "kl-refine" in said and "--no-kl-refine" in said
    r = cli("model", tiny_dirs["llama"], "-o", tmp_path / "c", *common, "--ranks", "uniform", "--no-kl-refine",
            "--refine")
    assert r.exit_code == 0, r.output
    meta = read_result(str(tmp_path / "c"))
    assert meta.ranks_allocation == "uniform" and meta.stage_run("block-refine") is not None
    assert meta.stage_run("kl-refine") is None
    assert pipeline_name(meta) == "svd-llm + uniform ranks + block-refine steps=2 (preset best)"
    r = cli("inspect", tmp_path / "c")
    assert "pipeline: svd-llm + uniform ranks + block-refine steps=2 (preset best)" in r.output, r.output


def test_the_preset_refines_end_to_end(tmp_path, tiny_dirs, austen_file, cli):
    from rankwise.compress.metadata import read_result
    r = cli("model", tiny_dirs["llama"], "-o", tmp_path / "c", "--ratio", "0.3", "--preset", "best", "--calib",
            f"text:{austen_file}", "--nsamples", "8", "--seqlen", "32", "--device", "cpu")
    assert r.exit_code == 0, r.output
    meta = read_result(str(tmp_path / "c"))
    assert [s.stage for s in meta.recipe if s.kind != "pass"] == ["svd-llm", "loss-aware", "kl-refine"]
    record = meta.stage_run("kl-refine").record
    assert record["heldout_windows"] == 2  # a quarter of the 8 windows
    assert (record["sampled_windows"], record["train_windows"]) == (64, 6 + 64)  # the dense model's own text


def test_the_fast_preset_runs_block_refinement_from_the_command_line(tmp_path, tiny_dirs, austen_file, cli):
    from rankwise.compress.metadata import read_result
    r = cli("model", tiny_dirs["llama"], "-o", tmp_path / "c", "--ratio", "0.3", "--preset", "fast", "--calib",
            f"text:{austen_file}", "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--refine-steps", "2")
    assert r.exit_code == 0, r.output
    meta = read_result(str(tmp_path / "c"))
    assert meta.preset == "fast" and meta.ranks_allocation == "loss-aware"
    assert meta.stage_run("block-refine").record["blocks"] and meta.stage_run("kl-refine") is None
