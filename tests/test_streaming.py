"""--stream-weights: the same compressed model as a full load, blocks read lazily and prefetched, clear refusals."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from rankwise.compress.config import CompressConfig
from rankwise.compress.job import compress_in_memory
from rankwise.compress.pipeline import compress_model
from rankwise.compress.streaming import open_streaming_model
from tiny import save_tiny


def cfg_for(src, austen_file, **kw):
    return CompressConfig(model=str(src), method="svd-llm", ratio=0.3, calib=f"text:{austen_file}", nsamples=4,
                          seqlen=32, device="cpu", **kw)


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory):
    """Tiny Llama (tied embeddings) saved in shards with a model.safetensors.index.json."""
    src = save_tiny(tmp_path_factory.mktemp("sharded") / "llama", "llama", layers=4)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(src)
    (src / "model.safetensors").unlink()
    model.save_pretrained(src, max_shard_size="100KB")
    assert (src / "model.safetensors.index.json").is_file()
    return src


@pytest.mark.parametrize("case", ["llama-sharded-tied", "qwen2-gqa-bias", "llama-welore-refit"])
def test_stream_gives_the_full_load_result(case, sharded_llama, tiny_dirs, austen_file):
    src, extra = {"llama-sharded-tied": (sharded_llama, {}),
                  "qwen2-gqa-bias": (tiny_dirs["qwen2"], {}),
                  "llama-welore-refit": (sharded_llama, {"ranks": "welore", "refit": True})}[case]
    full, _, meta_full = compress_in_memory(cfg_for(src, austen_file, **extra), torch.device("cpu"))
    lazy, _, meta_lazy = compress_in_memory(cfg_for(src, austen_file, stream_weights=True, **extra),
                                            torch.device("cpu"))
    assert meta_lazy.modules == meta_full.modules
    assert meta_lazy.model_params_before == meta_full.model_params_before
    want, got = full.state_dict(), lazy.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want), [k for k in want if not torch.equal(want[k], got[k])]
    for name, buf in full.named_buffers():  # rotary tables built, not read
        assert torch.equal(buf, lazy.get_buffer(name)), name
    assert (lazy.lm_head.weight is lazy.model.embed_tokens.weight) == lazy.config.tie_word_embeddings
    assert (full.lm_head.weight is full.model.embed_tokens.weight) == full.config.tie_word_embeddings
    x = torch.randint(0, full.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(lazy(x).logits, full(x).logits)


class PrefetchProbe:
    """The BlockSource the pipeline is given: passes each call on to the stream and records, for every block
    still on meta when a pass asks for it, whether its read had already started in the background."""

    def __init__(self, stream):
        self.stream, self.reads = stream, []

    def ensure(self, i):
        if self.stream.is_meta(i):
            self.reads.append((i, i in self.stream.pending))
        self.stream.ensure(i)

    def release(self, i):
        self.stream.release(i)


def test_blocks_are_read_when_reached_and_the_next_one_in_the_background(sharded_llama, austen_file):
    model, _, stream = open_streaming_model(str(sharded_llama), "fp32", "cpu")
    blocks = model.model.layers
    n = len(blocks)

    def on_meta():
        return [all(p.device.type == "meta" for p in b.parameters()) for b in blocks]

    assert on_meta() == [True] * n
    assert all(p.device.type == "cpu" for name, p in model.named_parameters() if ".layers." not in name)
    assert model.lm_head.weight is model.model.embed_tokens.weight

    source = PrefetchProbe(stream)
    seen = []

    def progress(stage, done, total):
        if stage in ("spectra", "compress"):
            seen.append((stage, done - 1, on_meta(), set(stream.pending)))

    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    try:  # WeLore: a spectra pass (blocks read, then released) before the compression pass
        compress_model(model, ids, cfg_for(sharded_llama, austen_file, ranks="welore"), progress, source)
    finally:
        stream.close()
    assert [(s, i) for s, i, _, _ in seen] == [("spectra", i) for i in range(n)] + [("compress", i) for i in range(n)]
    for stage, i, meta, pending in seen:
        # the spectra pass gives each block back; the compression pass keeps the compressed ones
        assert meta == [stage == "spectra" or j > i for j in range(n)], (stage, i, meta)
        assert pending == ({i + 1} if i + 1 < n else set()), (stage, i, pending)  # read ahead, not yet loaded
    assert [i for i, _ in source.reads] == 2 * list(range(n))  # every block read once per pass, in order
    assert [started for _, started in source.reads] == [i != 0 for i, _ in source.reads]  # only block 0 waited for
    assert not any(on_meta())


def calib_args(austen_file):
    return ["--ratio", "0.3", "--calib", f"text:{austen_file}", "--nsamples", "2", "--seqlen", "16", "--device", "cpu"]


def bin_checkpoint(src, dst):
    shutil.copytree(src, dst)
    torch.save(load_file(dst / "model.safetensors"), dst / "pytorch_model.bin")
    (dst / "model.safetensors").unlink()
    return dst


def renamed_checkpoint(src, dst):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    tensors["model.final_norm.weight"] = tensors.pop("model.norm.weight")
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def rankwise_checkpoint(src, dst):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["rankwise"] = {"method": "svd-llm"}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def truncated_checkpoint(src, dst):
    """The checkpoint with its model.safetensors cut short (an interrupted download or copy)."""
    shutil.copytree(src, dst)
    data = (dst / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[:-1000])
    return dst


REFUSALS = {  # how to make the source, extra options, what the message must say
    "bin checkpoint": (bin_checkpoint, [], ["safetensors", "pytorch_model.bin", "drop --stream-weights"]),
    "renamed tensors": (renamed_checkpoint, [], ["tensor names", "model.norm.weight", "drop --stream-weights"]),
    "rankwise checkpoint": (rankwise_checkpoint, [], ["already a Rankwise checkpoint"]),  # with or without it
    "truncated file": (truncated_checkpoint, [], ["the checkpoint file", "model.safetensors' is corrupt"]),
    "fwsvd": (None, ["--method", "fwsvd"], ["--stream-weights does not support fwsvd: its Fisher pass needs every "
                                            "block at once"]),
    "loss-aware": (None, ["--ranks", "loss-aware"], ["--stream-weights does not support loss-aware: its output "
                                                     "Fisher pass needs every block at once"]),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_stream_refusals_are_one_line_and_exit_2(case, tiny_dirs, austen_file, tmp_path, cli):
    make, extra, needles = REFUSALS[case]
    src = make(tiny_dirs["llama"], tmp_path / "src") if make else tiny_dirs["llama"]
    out = tmp_path / "out"
    res = cli("model", src, "-o", out, *calib_args(austen_file), "--stream-weights", *extra)
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())  # rich wraps long lines at the terminal width
    assert all(needle in text for needle in needles), res.output
    assert text.startswith("error:") and "Traceback" not in res.output
    assert not out.exists()
    if make is bin_checkpoint:  # the same checkpoint compresses the normal way
        res = cli("model", src, "-o", out, *calib_args(austen_file), *extra)
        assert res.exit_code == 0, res.output


def test_a_truncated_shard_read_in_the_background_is_one_line_naming_it(sharded_llama, austen_file, tmp_path, cli):
    """A shard holding only the last block's tensors is first opened by the prefetch thread, mid-compression."""
    src = shutil.copytree(sharded_llama, tmp_path / "src")
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    last = {f for n, f in weight_map.items() if n.startswith("model.layers.3.")}
    others = {f for n, f in weight_map.items() if not n.startswith("model.layers.3.")}
    (shard,) = last - others
    (src / shard).write_bytes((src / shard).read_bytes()[:-1000])
    out = tmp_path / "out"
    res = cli("model", src, "-o", out, *calib_args(austen_file), "--stream-weights")
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert text.count("error:") == 1 and "error: the checkpoint file" in text, res.output  # after the progress
    assert f"{shard}' is corrupt" in text, res.output
    assert "Traceback" not in res.output and "SafetensorError" not in res.output
    assert not out.exists()


def test_sweep_accepts_stream_weights_and_keeps_job_names(tiny_dirs, austen_file, tmp_path):
    """A sweep can turn streaming on; how weights are read does not change a job's result, so not its name."""
    from rankwise.eval.sweep.plan import load_plan
    from test_sweep import write_run
    names = {}
    for flag in ("", "stream_weights: true"):
        where = tmp_path / ("stream" if flag else "plain")
        where.mkdir()
        plan = load_plan(write_run(where, tiny_dirs["llama"], austen_file, extra=flag))
        assert [job.compress.stream_weights for job in plan.jobs] == [bool(flag)] * 2
        names[flag] = [job.name for job in plan.jobs]
    assert names[""] == names["stream_weights: true"]



def test_hub_id_streams_from_the_local_cache(tiny_dirs, austen_file, tmp_path, cli):
    """A hub id resolves through the hub cache (HF_HUB_CACHE, offline): a cache laid out as huggingface_hub
    does. The hub reads its environment when imported, so the CLI runs in a fresh interpreter."""
    repo = tmp_path / "hub" / "models--rankwise-test--tiny-llama"
    shutil.copytree(tiny_dirs["llama"], repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    args = ["--method", "svd", *calib_args(austen_file)]
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "rankwise.cli.main", "model", "rankwise-test/tiny-llama", "-o",
                           str(tmp_path / "hub-out"), "--stream-weights", "--quiet", *args], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    res = cli("model", tiny_dirs["llama"], "-o", tmp_path / "local-out", "--quiet", *args)
    assert res.exit_code == 0, res.output
    want, got = load_file(tmp_path / "local-out" / "model.safetensors"), load_file(tmp_path / "hub-out" /
                                                                                   "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
