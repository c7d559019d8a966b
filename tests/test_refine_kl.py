"""End-to-end KL refinement (`kl-refine`): every factor of the compressed model trained against the dense
model's next-token distribution on the calibration tokens, judged on held-out windows."""
import copy
import json
import warnings

import pytest
import torch
import yaml

from rankwise.compress.config import CompressConfig
from rankwise.compress.pipeline import compress_model
from rankwise.compress.stages.refine_kl import KLRefinement, sample_windows
from rankwise.compress.training import holdout_split
from rankwise.errors import RankwiseWarning
from helpers_methods import calib_ids, config, model
from test_memory import LiveBytes
from tiny import tiny_model

WINDOWS, SEQLEN = 24, 48


# The calibration windows alone, judged once an epoch, unless a test says otherwise.
REAL_ONLY = {"sampled_windows": 0, "evals_per_epoch": 1}


def compressed(dense, kl_options: dict | None = None, windows: int = WINDOWS):
    """A copy of `dense` compressed by svd-llm at 0.5 (then kl-refine with REAL_ONLY and these options, when
    given), and the kl-refine record (None without it)."""
    m = copy.deepcopy(dense)
    recipe = [{"stage": "svd-llm"}] + ([{"stage": "kl-refine", "options": {**REAL_ONLY, **kl_options}}]
                                       if kl_options else [])
    meta = compress_model(m, calib_ids(windows, SEQLEN), config(ratio=0.5, recipe=recipe))
    record = meta.stage_run("kl-refine").typed_record(KLRefinement) if kl_options else None
    return m, record, meta


@torch.no_grad()
def full_kl(dense, student, ids) -> float:
    """KL(dense || student) over the whole vocabulary, mean per token (independent of the stage's code)."""
    p = torch.log_softmax(dense(input_ids=ids).logits.float(), -1)
    q = torch.log_softmax(student(input_ids=ids).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def held_out_ids(holdout: float = 0.25, seed: int = 0) -> torch.Tensor:
    _, held = holdout_split(WINDOWS, holdout, seed)
    return calib_ids(WINDOWS, SEQLEN)[held]


@pytest.mark.parametrize("lr", [1e-3, 10.0])
def test_kl_refinement_never_ends_above_its_start_on_the_held_out_windows(lr):
    dense = model("llama")
    start, _, _ = compressed(dense)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        refined, record, meta = compressed(dense, {"lr": lr, "epochs": 6, "patience": 2})
    reverted = [str(w.message) for w in caught if issubclass(w.category, RankwiseWarning)]
    held = held_out_ids()
    assert (record.train_windows, record.heldout_windows) == (18, 6)
    assert full_kl(dense, refined, held) <= full_kl(dense, start, held)
    if lr == 1e-3:  # a sensible step size: the held-out KL falls, on the stage's measure and on the full one
        assert record.kept and not reverted
        assert record.heldout_kl_after < 0.9 * record.heldout_kl_before
        assert record.kl_after < record.kl_before
        assert full_kl(dense, refined, held) < 0.97 * full_kl(dense, start, held)
    else:  # diverges: reverted to the closed form's factors, and the run says so in one line
        assert not record.kept and record.steps > 0
        assert record.heldout_kl_after == record.heldout_kl_before
        assert len(reverted) == 1 and "kl-refine was reverted" in reverted[0], reverted
        for (name, p), q in zip(refined.state_dict().items(), start.state_dict().values()):
            assert torch.equal(p, q), name
    json.dumps(meta.to_json(), allow_nan=False)


def test_the_teacher_holds_k_plus_one_values_per_token_never_the_vocabulary():
    """The dense model's distribution is kept as tokens x (k+1) float32 log-probabilities and tokens x k int32
    ids; what the stage adds to the pipeline's peak working memory is far below one logit per vocabulary entry
    and calibration token (counted over every tensor storage created during the run, tests/test_memory.py)."""
    windows, seqlen, k = 32, 64, 8
    peaks = {}
    for kl in (False, True):
        m = tiny_model("llama")
        ids = torch.randint(0, m.config.vocab_size, (windows, seqlen), generator=torch.Generator().manual_seed(0))
        kl_entry = {"stage": "kl-refine", "options": {**REAL_ONLY, "top_k": k, "epochs": 1}}
        recipe = [{"stage": "svd-llm"}] + ([kl_entry] if kl else [])
        cfg = CompressConfig(model="tiny", ratio=0.4, nsamples=windows, seqlen=seqlen, batch_size=4, device="cpu",
                             recipe=recipe)
        tracker = LiveBytes()
        tracker.exclude([*m.parameters(), *m.buffers(), ids])
        with tracker:
            meta = compress_model(m, ids, cfg, lambda *a: tracker.exclude(m.parameters()))
        peaks[kl] = tracker.peak
    record = meta.stage_run("kl-refine").typed_record(KLRefinement)
    tokens, vocab = windows * seqlen, m.config.vocab_size
    assert record.top_k == k and record.teacher_bytes == tokens * (k + 1) * 4 + tokens * k * 4
    assert record.steps == 12  # 24 training windows, 2 per step
    added = peaks[True] - peaks[False]
    assert record.teacher_bytes <= added < tokens * vocab * 4 / 4, (added, tokens * vocab * 4)


def test_kl_refinement_is_deterministic_for_a_seed():
    dense = model("llama")
    options = {"lr": 1e-3, "epochs": 3, "patience": 3}
    runs = [compressed(dense, {**options, "seed": seed}) for seed in (0, 0, 1)]
    (m0, r0, _), (m1, r1, _), (m2, r2, _) = runs
    same = ("kl_before", "kl_after", "heldout_kl_before", "heldout_kl_after", "kept", "steps", "epochs")
    assert [getattr(r0, f) for f in same] == [getattr(r1, f) for f in same]
    assert all(torch.equal(p, q) for p, q in zip(m0.state_dict().values(), m1.state_dict().values()))
    assert holdout_split(WINDOWS, 0.25, 0) != holdout_split(WINDOWS, 0.25, 1)
    assert r2.heldout_kl_before != r0.heldout_kl_before  # another split
    assert any(not torch.equal(p, q) for p, q in zip(m0.state_dict().values(), m2.state_dict().values()))


def test_early_stopping_stops_before_the_cap_when_the_held_out_kl_stops_falling():
    dense = model("llama")
    cap = 40
    _, stopped, _ = compressed(dense, {"lr": 1e-3, "epochs": cap, "patience": 2})
    assert stopped.kept and stopped.epochs < cap / 2, stopped
    assert stopped.steps == stopped.epochs * 9  # 18 training windows, 2 per step
    _, capped, _ = compressed(dense, {"lr": 1e-3, "epochs": 3, "patience": 3})
    assert capped.epochs == 3 and capped.steps == 27


def test_evaluating_several_times_an_epoch_counts_patience_in_evaluations():
    dense = model("llama")
    _, capped, _ = compressed(dense, {"lr": 1e-3, "epochs": 2, "patience": 10, "evals_per_epoch": 3})
    assert (capped.epochs, capped.evaluations, capped.steps) == (2, 6, 18) and len(capped.heldout_kls) == 6
    assert capped.heldout_kl_after == min(capped.heldout_kls)
    _, stopped, _ = compressed(dense, {"lr": 1e-3, "epochs": 40, "patience": 2, "evals_per_epoch": 3})
    assert stopped.kept and stopped.evaluations < stopped.epochs * 3 + 1 and stopped.epochs < 20, stopped


def test_sampled_windows_are_draws_from_the_models_own_next_token_distribution():
    """Temperature 1 over the full vocabulary: the frequencies of 4000 draws of the first new token match the
    model's probabilities (coarsened to its 8 likeliest tokens and the rest, where sampling noise is about
    0.02 in total variation; a temperature of 0.8 is 0.26 away, top-p 0.9 is 0.04 to 0.07 away)."""
    m = model("llama")
    with torch.no_grad():
        m.model.norm.weight.mul_(6)  # a peaked distribution, far from uniform
    prompt, draws = calib_ids(1, 8)[:1], 4000
    with torch.no_grad():
        probs = torch.softmax(m(prompt).logits[0, -1].float(), -1)
    torch.manual_seed(0)
    sampled = sample_windows(m, prompt.repeat(draws, 1), 9, draws, torch.device("cpu"))
    assert sampled.shape == (draws, 9) and torch.equal(sampled[:, :8], prompt.repeat(draws, 1))
    top = probs.topk(8).indices

    def coarse(p):
        return torch.cat([p[top], (1 - p[top].sum()).reshape(1)])
    frequencies = torch.bincount(sampled[:, 8], minlength=probs.numel()) / draws
    assert probs.max() > 0.2 and 0.5 * (coarse(frequencies) - coarse(probs)).abs().sum() < 0.035


def test_sampled_windows_only_train_and_are_seeded():
    dense = model("llama")
    options = {"lr": 1e-3, "epochs": 2, "sampled_windows": 10, "prompt_tokens": 4}
    start, _, _ = compressed(dense)
    runs = []
    for global_seed in (1, 2):  # the stage's own seed decides, not the caller's random state
        torch.manual_seed(global_seed)
        runs.append(compressed(dense, options))
    (m0, r0, _), (m1, r1, _) = runs
    assert (r0.sampled_windows, r0.train_windows, r0.heldout_windows) == (10, 28, 6)
    assert r0.steps == 2 * 14 and r0.sample_seconds > 0
    assert r0.model_dump(exclude={"seconds", "teacher_seconds", "sample_seconds"}) == \
        r1.model_dump(exclude={"seconds", "teacher_seconds", "sample_seconds"})
    assert all(torch.equal(p, q) for p, q in zip(m0.state_dict().values(), m1.state_dict().values()))
    held = held_out_ids()  # the real hold-out, as without sampling
    assert full_kl(dense, m0, held) <= full_kl(dense, start, held)
    _, real_only, _ = compressed(dense, {"lr": 1e-3, "epochs": 1})
    assert r0.kl_before == pytest.approx(real_only.kl_before, rel=1e-5)  # measured on the real training windows


def test_a_half_precision_model_trains_in_float32_and_stays_half():
    dense = model("llama").half()
    refined, record, meta = compressed(dense, {"lr": 1e-3, "epochs": 3})
    assert record.train_dtype == "float32" and record.kept
    assert record.heldout_kl_after < record.heldout_kl_before
    assert all(p.dtype == torch.float16 for p in refined.parameters())
    json.dumps(meta.to_json(), allow_nan=False)


def test_the_cli_runs_it_from_a_stage_flag_and_a_recipe_file(tiny_dirs, austen_file, tmp_path, cli):
    common = ["--ratio", "0.3", "--calib", f"text:{austen_file}", "--nsamples", "8", "--seqlen", "32", "-q"]
    r = cli("model", tiny_dirs["llama"], "-o", tmp_path / "a", *common, "--stage", "kl-refine:lr=1e-3,epochs=2")
    assert r.exit_code == 0, r.output
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump([{"stage": "svd-llm"},
                                           {"stage": "kl-refine", "options": {"lr": 1e-3, "top_k": 16}}]))
    r = cli("model", tiny_dirs["llama"], "-o", tmp_path / "b", *common, "--recipe", recipe_file)
    assert r.exit_code == 0, r.output
    for out, options in (("a", {"epochs": 2}), ("b", {"top_k": 16})):
        runs = json.loads((tmp_path / out / "config.json").read_text())["rankwise"]["recipe"]
        run = next(x for x in runs if x["stage"] == "kl-refine")
        assert run["kind"] == "model corrector" and run["options"]["lr"] == 1e-3
        assert all(run["options"][k] == v for k, v in options.items())
        assert run["record"]["steps"] > 0


@pytest.mark.parametrize("extra, message", [
    (["--stream-weights", "--stage", "kl-refine"], "--stream-weights does not support kl-refine"),
    (["--stage", "kl-refine:lr=0"], "stage 'kl-refine': option 'lr'"),
    (["--stage", "kl-refine:holdout=1"], "stage 'kl-refine': option 'holdout'"),
])
def test_refused_in_one_line_before_any_work(tiny_dirs, tmp_path, cli, extra, message):
    r = cli("model", tiny_dirs["llama"], "-o", tmp_path / "c", "--ratio", "0.3", *extra)
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert message in r.output and not (tmp_path / "c").exists()


def norm_weights(m) -> list[torch.Tensor]:
    return [p.detach().clone() for n, p in m.named_parameters() if "norm" in n]


def test_norms_train_only_when_asked_and_the_held_out_kl_still_never_rises():
    dense = model("llama")
    before = norm_weights(dense)
    assert len(before) == 5  # 2 blocks x 2 norms + the final one
    held = held_out_ids()
    start, _, _ = compressed(dense)
    factors_only, _, _ = compressed(dense, {"lr": 1e-3, "epochs": 3})
    with_norms, record, _ = compressed(dense, {"lr": 1e-3, "epochs": 3, "norms": True})
    assert all(torch.equal(p, q) for p, q in zip(norm_weights(factors_only), before))
    assert record.kept and all(not torch.equal(p, q) for p, q in zip(norm_weights(with_norms), before))
    assert full_kl(dense, with_norms, held) < full_kl(dense, start, held)


@pytest.mark.parametrize("epochs", [3, 40])
def test_training_reports_progress_every_step_and_ends_complete(epochs):
    """Step by step against the capped steps; a run stopped early ends complete at the steps it took."""
    reports = []
    recipe = [{"stage": "svd-llm"},
              {"stage": "kl-refine", "options": {**REAL_ONLY, "lr": 1e-3, "epochs": epochs, "patience": 2}}]
    meta = compress_model(model("llama"), calib_ids(WINDOWS, SEQLEN), config(ratio=0.5, recipe=recipe),
                          progress=lambda stage, done, total: reports.append((done, total))
                          if stage == "kl-refine" else None)
    record = meta.stage_run("kl-refine").typed_record(KLRefinement)
    capped = [r for r in reports if r[1] == epochs * 9]  # 18 training windows, 2 a step
    assert [done for done, _ in capped] == list(range(1, record.steps + 1))
    assert reports[-1] == (record.steps, record.steps)
    assert (record.steps == epochs * 9) == (epochs == 3)  # the long cap stops early
