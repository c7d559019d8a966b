"""Damaged inputs and unlucky runs: no silent random weights, no lost data, checkpoints that stay loadable."""
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from rankwise.compress.lowrank import load_rankwise_model
from rankwise.compress.outputs import remove_stale_temporaries

CALIB_TOKENS = ["--nsamples", "2", "--seqlen", "16"]


def calib(austen_file):
    return ["--calib", f"text:{austen_file}", *CALIB_TOKENS]


@pytest.fixture(scope="module")
def compressed(tiny_dirs, austen_file, tmp_path_factory):
    """A Rankwise checkpoint of the tiny Llama (plain SVD, 30% removed)."""
    from typer.testing import CliRunner

    from rankwise.cli.main import app
    out = tmp_path_factory.mktemp("ckpt") / "svd-30"
    res = CliRunner().invoke(app, ["model", str(tiny_dirs["llama"]), "-o", str(out), "--method", "svd",
                                   "--ratio", "0.3", *calib(austen_file)])
    assert res.exit_code == 0, res.output
    return out


def copy_with_tensors(src: Path, dst: Path, edit) -> Path:
    """A copy of a checkpoint folder whose tensors went through `edit(dict) -> dict`."""
    shutil.copytree(src, dst)
    state = edit(load_file(dst / "model.safetensors"))
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def one_line_error(res, *needles):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    for needle in needles:
        assert needle in res.output, res.output


# ---------------------------------------------------------------- 1. missing weights are errors

def test_dense_checkpoint_with_a_layer_removed_is_refused(tiny_dirs, austen_file, tmp_path, cli):
    broken = copy_with_tensors(tiny_dirs["llama"], tmp_path / "broken",
                               lambda sd: {k: v for k, v in sd.items() if ".layers.1." not in k})
    out = tmp_path / "out"
    one_line_error(cli("model", broken, "-o", out, "--ratio", "0.3", *calib(austen_file)), "model.layers.1.")
    assert not out.exists()
    one_line_error(cli("evaluate", broken, "--ppl", f"text:{austen_file}", "--seqlen", "16", "--max-windows", "1"),
                   "model.layers.1.")


def test_checkpoint_that_lost_its_rankwise_section_is_refused(compressed, austen_file, tmp_path, cli):
    damaged = tmp_path / "damaged"
    shutil.copytree(compressed, damaged)
    cfg = json.loads((damaged / "config.json").read_text())
    del cfg["rankwise"]
    (damaged / "config.json").write_text(json.dumps(cfg))
    one_line_error(cli("evaluate", damaged, "--ppl", f"text:{austen_file}", "--seqlen", "16", "--max-windows", "1"),
                   "no tensor for model.layers.0.", ".A.weight", "'rankwise' section")


# ---------------------------------------------------------------- 2. --overwrite replaces only our own output

def test_overwrite_refuses_a_foreign_folder_and_the_input(tiny_dirs, austen_file, tmp_path, cli):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"user data")
    one_line_error(cli("model", tiny_dirs["llama"], "-o", foreign, "--ratio", "0.3", "--overwrite",
                       *calib(austen_file)), "photos", "not a Rankwise")
    assert (foreign / "holiday.jpg").read_bytes() == b"user data"

    model = tmp_path / "models" / "llama"
    shutil.copytree(tiny_dirs["llama"], model)
    files = sorted(p.name for p in model.iterdir())
    for target in (model, model.parent):  # the input itself, and a folder that holds it
        one_line_error(cli("model", model, "-o", target, "--ratio", "0.3", "--overwrite", *calib(austen_file)),
                       "input")
        assert sorted(p.name for p in model.iterdir()) == files
    text_home = austen_file.parent  # the calibration text is an input too
    one_line_error(cli("model", model, "-o", text_home, "--ratio", "0.3", "--overwrite", *calib(austen_file)),
                   "input")
    assert austen_file.is_file()


def test_overwrite_refuses_the_current_folder(tiny_dirs, austen_file, tmp_path, cli, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("user data")
    monkeypatch.chdir(work)
    one_line_error(cli("model", tiny_dirs["llama"], "-o", ".", "--ratio", "0.3", "--overwrite",
                       *calib(austen_file)), "current folder")
    assert (work / "notes.txt").read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"], "nothing left beside it"


# ---------------------------------------------------------------- 3. checkpoints that stay loadable

def tiny_inputs():
    return torch.tensor([[5, 17, 42, 99, 3, 250]])


def test_reloaded_and_saved_checkpoint_loads_with_plain_transformers(compressed, tmp_path):
    model = load_rankwise_model(str(compressed))
    model.save_pretrained(tmp_path / "resaved")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "resaved", trust_remote_code=True)
    with torch.no_grad():
        torch.testing.assert_close(again(tiny_inputs()).logits, model(tiny_inputs()).logits)
    assert (tmp_path / "resaved" / "modeling_rankwise.py").read_text() == \
        (compressed / "modeling_rankwise.py").read_text()


def test_checkpoint_in_the_hub_cache_loads_by_its_hub_id(compressed, austen_file, tmp_path):
    """The hub cache layout (models--ORG--NAME/snapshots/REV, refs/main), read offline by its hub id."""
    repo = tmp_path / "hub" / "models--someone--tiny-svd"
    shutil.copytree(compressed, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "HF_MODULES_CACHE": str(tmp_path / "modules")}
    script = ("import sys, torch, transformers\n"
              "m = transformers.AutoModelForCausalLM.from_pretrained('someone/tiny-svd', trust_remote_code=True)\n"
              "print('lowrank' , sum('LowRankLinear' in type(x).__name__ for x in m.modules()))\n"
              "from rankwise.cli.main import app\n"
              f"sys.argv = ['compress', 'evaluate', 'someone/tiny-svd', '--ppl', 'text:{austen_file}',"
              " '--seqlen', '16', '--max-windows', '1']\n"
              "app()\n")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    factorized = len(json.loads((compressed / "config.json").read_text())["rankwise"]["modules"])
    assert f"lowrank {factorized}" in res.stdout
    assert "token ppl" in res.stdout


def test_edited_ranks_name_the_module_and_both_shapes(compressed, austen_file, tmp_path, cli):
    edited = tmp_path / "edited"
    shutil.copytree(compressed, edited)
    cfg = json.loads((edited / "config.json").read_text())
    name, spec = next(iter(cfg["rankwise"]["modules"].items()))
    spec["rank"] += 3
    (edited / "config.json").write_text(json.dumps(cfg))
    res = cli("evaluate", edited, "--ppl", f"text:{austen_file}", "--seqlen", "16", "--max-windows", "1")
    one_line_error(res, name, f"rank {spec['rank']}", str(spec["rank"] - 3))


def code_writing_a_marker(marker: Path, body: str) -> str:
    """Module source that, when imported, leaves `marker` behind (what remote code could do)."""
    return f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n{body}"


@pytest.fixture
def custom_tokenizer_model(tiny_dirs, tmp_path):
    """The tiny Llama whose tokenizer_config.json names its own code, which leaves a marker file when run."""
    model, marker = tmp_path / "custom-tok", tmp_path / "tokenizer-code-ran"
    shutil.copytree(tiny_dirs["llama"], model)
    (model / "tokenization_custom.py").write_text(code_writing_a_marker(
        marker, "from transformers import PreTrainedTokenizerFast\n\n\n"
                "class CustomTokenizer(PreTrainedTokenizerFast):\n    pass\n"))
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": [None, "tokenization_custom.CustomTokenizer"]}
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    return model, marker


def test_untrusted_tokenizer_code_is_not_copied(custom_tokenizer_model, austen_file, tmp_path, cli):
    model, marker = custom_tokenizer_model
    out = tmp_path / "out"
    # without --trust-remote-code the tokenizer loads as its base class: its code is neither run nor copied
    res = cli("model", model, "-o", out, "--ratio", "0.3", "--method", "svd", *calib(austen_file))
    assert res.exit_code == 0, res.output
    assert not (out / "tokenization_custom.py").exists()
    assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())
    # loaded as the model card says (trust_remote_code=True): still none of the source's code runs
    transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert not marker.exists()


def test_trusted_tokenizer_code_is_copied(custom_tokenizer_model, austen_file, tmp_path, cli):
    model, _ = custom_tokenizer_model
    out = tmp_path / "out"
    res = cli("model", model, "-o", out, "--ratio", "0.3", "--method", "svd", "--trust-remote-code",
              *calib(austen_file))
    assert res.exit_code == 0, res.output
    tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert type(tok).__name__ == "CustomTokenizer"


@pytest.mark.parametrize("entry", ["AutoConfig", "AutoModelForCausalLM"])
def test_a_rankwise_checkpoint_runs_only_its_own_code(entry, compressed, austen_file, tmp_path, cli):
    """A checkpoint whose config.json auto_map names other code is refused before anything is loaded."""
    damaged, marker = tmp_path / "foreign", tmp_path / "foreign-code-ran"
    shutil.copytree(compressed, damaged)
    (damaged / "configuration_foreign.py").write_text(code_writing_a_marker(
        marker, "from transformers import LlamaConfig, LlamaForCausalLM\n\n\n"
                "class ForeignConfig(LlamaConfig):\n    pass\n\n\nclass ForeignModel(LlamaForCausalLM):\n    pass\n"
                "\n\nfrom transformers import PreTrainedTokenizerFast as ForeignTokenizer\n"))
    tok = json.loads((damaged / "tokenizer_config.json").read_text())  # its tokenizer names the code too
    tok["auto_map"] = {"AutoTokenizer": [None, "configuration_foreign.ForeignTokenizer"]}
    (damaged / "tokenizer_config.json").write_text(json.dumps(tok))
    cfg = json.loads((damaged / "config.json").read_text())
    cfg["auto_map"][entry] = "configuration_foreign." + ("ForeignConfig" if entry == "AutoConfig" else "ForeignModel")
    (damaged / "config.json").write_text(json.dumps(cfg))
    res = cli("evaluate", damaged, "--ppl", f"text:{austen_file}", "--seqlen", "16", "--max-windows", "1",
              "--trust-remote-code")
    one_line_error(res, "configuration_foreign", "auto_map")
    assert not marker.exists()
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_rankwise.RankwiseForCausalLM"}  # its own code only
    (damaged / "config.json").write_text(json.dumps(cfg))
    res = cli("evaluate", damaged, "--ppl", f"text:{austen_file}", "--seqlen", "16", "--max-windows", "1",
              "--trust-remote-code")
    assert res.exit_code == 0, res.output
    assert not marker.exists(), "a Rankwise checkpoint is evaluated by Rankwise's code, its tokenizer's too"


# ---------------------------------------------------------------- 4. non-finite input

@pytest.mark.parametrize("method", ["svd", "svd-llm"])
def test_nan_weights_are_refused_naming_the_layer(method, tiny_dirs, austen_file, tmp_path, cli):
    def poison(sd):
        sd["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
        return sd
    broken = copy_with_tensors(tiny_dirs["llama"], tmp_path / "nan", poison)
    out = tmp_path / "out"
    one_line_error(cli("model", broken, "-o", out, "--ratio", "0.3", "--method", method, *calib(austen_file)),
                   "model.layers.1.mlp.down_proj", "non-finite")
    assert not out.exists()


def test_overflowing_activations_are_refused_naming_the_layer(tiny_dirs, austen_file, tmp_path, cli):
    """A finite but huge norm weight (not a targeted Linear) makes the next Linears' statistics overflow."""
    def blow_up(sd):
        sd["model.layers.1.post_attention_layernorm.weight"][0] = 3e38
        return sd
    broken = copy_with_tensors(tiny_dirs["llama"], tmp_path / "huge", blow_up)
    res = cli("model", broken, "-o", tmp_path / "out", "--ratio", "0.3", "--method", "svd-llm",
              *calib(austen_file))
    one_line_error(res, "model.layers.1.mlp.gate_proj", "statistics")


def test_nan_in_a_checkpoint_factor_is_refused_when_loaded(compressed, austen_file, tmp_path, cli):
    def poison(sd):
        name = next(k for k in sorted(sd) if k.endswith(".A.weight"))
        sd[name][0, 0] = float("nan")
        return sd
    broken = copy_with_tensors(compressed, tmp_path / "nan-factor", poison)
    name = next(k for k in sorted(load_file(broken / "model.safetensors")) if k.endswith(".A.weight"))
    one_line_error(cli("evaluate", broken, "--ppl", f"text:{austen_file}", "--seqlen", "16", "--max-windows", "1"),
                   name, "non-finite")
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):  # plain transformers runs the same loader
        transformers.AutoModelForCausalLM.from_pretrained(broken, trust_remote_code=True)


@pytest.mark.parametrize("family,tensor,value", [("mistral", "lm_head.weight", float("nan")),
                                                 ("llama", "model.embed_tokens.weight", float("inf"))])
@pytest.mark.parametrize("stream", [False, True])
def test_non_finite_head_or_embeddings_are_refused(family, tensor, value, stream, tiny_dirs, austen_file, tmp_path,
                                                   cli):
    def poison(sd):
        sd[tensor][1, 2] = value
        return sd
    broken = copy_with_tensors(tiny_dirs[family], tmp_path / "broken", poison)
    out = tmp_path / "out"
    res = cli("model", broken, "-o", out, "--ratio", "0.3", "--method", "svd", *calib(austen_file),
              *(["--stream-weights"] if stream else []))
    one_line_error(res, tensor, "non-finite")
    assert not out.exists()
    if not stream:
        one_line_error(cli("evaluate", broken, "--ppl", f"text:{austen_file}", "--seqlen", "16",
                           "--max-windows", "1"), tensor, "non-finite")


def test_json_written_holds_no_nan(compressed, tmp_path):
    """JSON has no NaN: a record holding one is refused naming its key, and nothing is written."""
    from rankwise.compress.checkpoint import save_checkpoint
    from rankwise.compress.metadata import read_result
    from rankwise.errors import RankwiseError
    meta = read_result(compressed)
    meta.wall_seconds = float("nan")
    with pytest.raises(RankwiseError, match="wall_seconds"):
        save_checkpoint(load_rankwise_model(str(compressed)), None, tmp_path / "out", meta)
    assert list(tmp_path.iterdir()) == []


def test_evaluate_refuses_a_zero_seqlen(compressed, austen_file, cli):
    res = cli("evaluate", compressed, "--ppl", f"text:{austen_file}", "--seqlen", "0", "--max-windows", "1")
    one_line_error(res, "--seqlen", "got 0")
    assert "2048" not in res.output  # not silently the default window


# ---------------------------------------------------------------- 5. fail before the work

def test_unwritable_output_fails_before_calibration(tiny_dirs, tmp_path, cli):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # the calibration text does not exist: the output check comes first, so it is the one reported
    one_line_error(cli("model", tiny_dirs["llama"], "-o", blocker / "out", "--ratio", "0.3",
                       "--calib", "text:/nonexistent.txt"), "a-file")
    one_line_error(cli("evaluate", tiny_dirs["llama"], "--ppl", "text:/nonexistent.txt", "--json",
                       blocker / "r.json"), "a-file")


def test_compressing_a_rankwise_checkpoint_again_is_refused(compressed, austen_file, tmp_path, cli):
    out = tmp_path / "again"
    one_line_error(cli("model", compressed, "-o", out, "--ratio", "0.3", *calib(austen_file)),
                   "already a Rankwise checkpoint")
    assert not out.exists()


def test_eora_rank_beyond_a_layer_is_refused(tiny_dirs, compressed, austen_file, tmp_path, cli):
    out = tmp_path / "comp"
    one_line_error(cli("compensate", tiny_dirs["llama"], compressed, "-o", out, "--eora-rank", "500",
                       *calib(austen_file)), "--eora-rank 500", "at most")
    assert not out.exists()


def test_more_calibration_tokens_than_the_text_holds_warns(tiny_dirs, tmp_path, cli):
    short = tmp_path / "short.txt"
    short.write_text("It is a truth universally acknowledged, that a single man in possession of a fortune. " * 4)
    res = cli("model", tiny_dirs["llama"], "-o", tmp_path / "out", "--ratio", "0.3", "--method", "svd",
              "--calib", f"text:{short}", "--nsamples", "50", "--seqlen", "16")
    assert res.exit_code == 0, res.output
    assert "warning" in res.output and "--nsamples 50" in res.output


# ---------------------------------------------------------------- 6. leftovers, permissions

def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_a_dead_process_are_removed(tiny_dirs, austen_file, tmp_path, cli):
    import socket
    import re
    host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())
    stale = tmp_path / f".out.tmp-{dead_pid()}-{host}-abc123"
    live = tmp_path / f".out.tmp-{os.getpid()}-{host}-def456"
    for d in (stale, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    res = cli("model", tiny_dirs["llama"], "-o", tmp_path / "out", "--ratio", "0.3", "--method", "svd",
              *calib(austen_file))
    assert res.exit_code == 0, res.output
    assert not stale.exists() and live.exists()


def test_swap_interrupted_by_a_kill_gives_back_the_previous_output(tmp_path):
    import socket
    import re
    host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())
    old = tmp_path / f".out.old-{dead_pid()}-{host}-zz9"
    (old / "out").mkdir(parents=True)
    (old / "out" / "config.json").write_text("{}")
    assert remove_stale_temporaries(tmp_path / "out") == [old]
    assert (tmp_path / "out" / "config.json").is_file() and not old.exists()


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_written_folders_and_files_follow_the_umask(tiny_dirs, compressed, austen_file, tmp_path, cli):
    previous = os.umask(0o027)
    try:
        res = cli("model", tiny_dirs["llama"], "-o", tmp_path / "ckpt", "--ratio", "0.3", "--method", "svd",
                  *calib(austen_file))
        assert res.exit_code == 0, res.output
        res = cli("evaluate", compressed, "--ppl", f"text:{austen_file}", "--seqlen", "16", "--max-windows", "1",
                  "--json", tmp_path / "results" / "r.json")
        assert res.exit_code == 0, res.output
    finally:
        os.umask(previous)
    assert mode(tmp_path / "ckpt") == 0o750
    assert {mode(p) for p in (tmp_path / "ckpt").iterdir()} == {0o640}
    assert mode(tmp_path / "results" / "r.json") == 0o640 and mode(tmp_path / "results" / "r.md") == 0o640


def test_bench_reliability_prints_every_step(tiny_dirs, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import reliability
    reliability.main(["--model", str(tiny_dirs["llama"]), "--reps", "1"])
    table = capsys.readouterr().out
    for step in ("load", "NaN/Inf scan", "save_pretrained alone", "atomic write"):
        assert step in table
    from rankwise.compress.arch import named_target_linears
    from tiny import tiny_model
    assert f"{len(named_target_linears(tiny_model('llama')))} targeted Linears" in table
