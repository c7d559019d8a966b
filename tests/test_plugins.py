"""Stages of a user's own, in modules of their own (written here to files, each under 40 lines), run through the
plugin mechanism from `compress model` and from a sweep file; their options and records reach the checkpoint
and `compress inspect`."""
import json
import textwrap

import pytest

GAIN = '''\
"""A corrector with one option: every factorized B scaled by `gain`; its record counts them."""
from pydantic import Field

from rankwise.compress.stages.base import Corrector, StageOptions, StageRecord, register_corrector


class GainOptions(StageOptions):
    gain: float = Field(1.0, gt=0)


class GainRecord(StageRecord):
    scaled: int = 0


@register_corrector("user-gain")
class Gain(Corrector):
    Options = GainOptions
    Record = GainRecord

    def after_factorize(self, work):
        work.B = work.B * self.options.gain
        self.record.scaled += 1
'''

PROBE = '''\
"""A block corrector: records how far each compressed block's output is from the dense twin's."""
import torch
from pydantic import Field

from rankwise.compress.stages.base import BlockCorrector, StageRecord, register_block_corrector


class ProbeRecord(StageRecord):
    error: dict[str, float] = Field(default_factory=dict)


@register_block_corrector("user-probe")
class Probe(BlockCorrector):
    Record = ProbeRecord

    def correct_block(self, work):
        kw = work.inputs.kwargs[work.index][0]
        first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
        with torch.no_grad():
            c = first(work.block(work.inputs.hidden[0].to(work.device), **kw))
            d = first(work.dense_block(work.dense_inputs.hidden[0].to(work.device), **kw))
        self.record.error[work.prefix] = float((c - d).norm())
'''


@pytest.fixture(scope="module")
def plugins(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugins")
    (root / "user_gain.py").write_text(GAIN)
    (root / "user_probe.py").write_text(PROBE)
    assert all(len(text.splitlines()) < 40 for text in (GAIN, PROBE))
    return root / "user_gain.py", root / "user_probe.py"


def _check_checkpoint(ckpt, cli):
    recipe = {r["stage"]: r for r in json.loads((ckpt / "config.json").read_text())["rankwise"]["recipe"]}
    assert recipe["user-gain"]["kind"] == "corrector" and recipe["user-gain"]["options"] == {"gain": 0.5}
    assert recipe["user-gain"]["record"]["scaled"] == 14  # 2 blocks x 7 Linears
    errors = recipe["user-probe"]["record"]["error"]
    assert sorted(errors) == ["model.layers.0", "model.layers.1"] and all(e > 0 for e in errors.values())
    r = cli("inspect", ckpt)
    assert r.exit_code == 0, r.output
    assert "corrector user-gain: gain=0.5; did: scaled=14" in r.output
    assert "block corrector user-probe: no options; did: error=2 entries" in r.output
    assert "pipeline: svd + uniform ranks + user-gain gain=0.5 + user-probe" in r.output


def test_user_stages_run_from_compress_model(plugins, tiny_dirs, austen_file, tmp_path, cli):
    gain, probe = plugins
    out = tmp_path / "c"
    r = cli("model", tiny_dirs["llama"], "-o", out, "--method", "svd", "--ratio", "0.3", "--plugin", gain,
            "--plugin", probe, "--stage", "user-gain:gain=0.5", "--stage", "user-probe",
            "--calib", f"text:{austen_file}", "--nsamples", "4", "--seqlen", "32", "--device", "cpu")
    assert r.exit_code == 0, r.output
    _check_checkpoint(out, cli)


def test_user_stages_run_from_a_sweep_file(plugins, tiny_dirs, austen_file, tmp_path, cli):
    gain, probe = plugins
    run = tmp_path / "run.yaml"
    run.write_text(textwrap.dedent(f"""\
        output_dir: {tmp_path / 'out'}
        model: {tiny_dirs['llama']}
        ratio: 0.3
        device: cpu
        plugins: [{gain}, {probe}]
        recipe:
          - {{stage: svd}}
          - {{stage: user-gain, options: {{gain: 0.5}}}}
          - {{stage: user-probe}}
        calib: {{source: "text:{austen_file}", nsamples: 4, seqlen: 32, batch_size: 4}}
        eval: {{ppl: ["text:{austen_file}"], seqlen: 32, max_windows: 2}}
        """))
    r = cli("run", run)
    assert r.exit_code == 0, r.output
    (ckpt,) = [d / "model" for d in (tmp_path / "out" / "checkpoints").iterdir()]
    assert "svd_0.3_user-gain-gain-0.5_user-probe" in ckpt.parent.name
    _check_checkpoint(ckpt, cli)


@pytest.mark.parametrize("stage, message", [("user-gain:gian=2", "'gian'"), ("user-gain:gain=-1", "'gain'"),
                                            ("nowhere", "unknown stage 'nowhere'")])
def test_a_bad_stage_or_option_is_one_line(plugins, tiny_dirs, tmp_path, cli, stage, message):
    r = cli("model", tiny_dirs["llama"], "-o", tmp_path / "c", "--ratio", "0.3", "--plugin", plugins[0],
            "--stage", stage)
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "c").exists()


def test_a_missing_plugin_is_one_line(tiny_dirs, tmp_path, cli):
    r = cli("model", tiny_dirs["llama"], "-o", tmp_path / "c", "--ratio", "0.3", "--plugin", "no_such_module_xyz")
    assert r.exit_code == 2 and "no_such_module_xyz" in r.output, r.output


def test_a_recipe_file_gives_the_stages_and_excludes_the_shorthand(tiny_dirs, austen_file, tmp_path, cli):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("- {stage: asvd, options: {alpha: 0.25}}\n- {stage: uniform, options: {rank_multiple: 2}}\n"
                      "- {stage: refit, options: {damp: 2.0}}\n")
    common = ["--ratio", "0.3", "--calib", f"text:{austen_file}", "--nsamples", "4", "--seqlen", "32",
              "--device", "cpu"]
    r = cli("model", tiny_dirs["llama"], "-o", tmp_path / "c", "--recipe", recipe, *common)
    assert r.exit_code == 0, r.output
    section = json.loads((tmp_path / "c" / "config.json").read_text())["rankwise"]
    assert [(s["stage"], s["options"]) for s in section["recipe"]] == [
        ("asvd", {"alpha": 0.25}), ("uniform", {"rank_multiple": 2, "keep_dense": []}), ("refit", {"damp": 2.0})]
    assert all(m["rank"] % 2 == 0 for m in section["modules"].values())
    r = cli("model", tiny_dirs["llama"], "-o", tmp_path / "d", "--recipe", recipe, "--refine", *common)
    assert r.exit_code == 2 and "--refine is shorthand" in r.output and not (tmp_path / "d").exists(), r.output
