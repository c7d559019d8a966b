import torch

import pytest

from rankwise.calib.fisher import output_fisher
from rankwise.compress.numerics import Decomposition, MatrixShape, total_params
from rankwise.compress.stages.allocate_loss_aware import loss_aware_ranks
from rankwise.compress.stages.allocate_uniform import uniform_ranks
from rankwise.compress.arch import named_target_linears
from rankwise.compress.pipeline import compress_model
from helpers_methods import calib_ids, config, model


def test_budget_goes_where_truncation_loses_least():
    # same shapes, same energy; "fast" decays quickly (its tail costs little), "slow" barely decays
    shapes = {"fast": MatrixShape(64, 64), "slow": MatrixShape(64, 64)}
    i = torch.arange(64, dtype=torch.float64)
    costs = {"fast": torch.exp(-i / 4) ** 2, "slow": torch.exp(-i / 64) ** 2}
    ranks = loss_aware_ranks(shapes, costs, ratio=0.5)
    assert ranks["fast"] < ranks["slow"]
    dense = sum(s.dense_params for s in shapes.values())
    assert total_params(shapes, ranks) <= 0.5 * dense


def test_predicted_loss_below_uniform_at_the_same_budget():
    torch.manual_seed(0)
    shapes = {f"m{j}": MatrixShape(96, 64) for j in range(6)}
    costs = {n: torch.rand(64, dtype=torch.float64).sort(descending=True).values ** (2 + j) * 10 ** j
             for j, n in enumerate(shapes)}

    def loss(ranks):  # predicted loss of the dropped components (what loss-aware minimises)
        return sum(float(c[ranks[n] or 64:].sum()) for n, c in costs.items())
    la, uni = loss_aware_ranks(shapes, costs, 0.4), uniform_ranks(shapes, 0.4)
    assert total_params(shapes, la) <= total_params(shapes, uni) + max(s.out + s.inp for s in shapes.values())
    assert loss(la) < loss(uni)


def test_loss_aware_hits_budget_with_non_uniform_ranks():
    for target in (0.2, 0.4):
        m = model("llama")
        meta = compress_model(m, calib_ids(), config(ranks="loss-aware", ratio=target))
        assert abs(meta.ratio_achieved - target) <= 0.005
        assert meta.ratio_achieved >= target
        ranks = {}
        for name, spec in meta.modules.items():  # same shape, different ranks: not uniform
            ranks.setdefault((spec.in_features, spec.out_features), set()).add(spec.rank)
        assert any(len(r) > 1 for r in ranks.values())


def test_a_layer_whose_errors_cost_more_keeps_more_rank():
    # identical spectra; the output Fisher says b's output errors cost 100x more
    shapes = {"a": MatrixShape(64, 64), "b": MatrixShape(64, 64)}
    sq = torch.exp(-torch.arange(64, dtype=torch.float64) / 16) ** 2
    ranks = loss_aware_ranks(shapes, {"a": sq, "b": 100 * sq}, ratio=0.3)
    # b keeps everything (dense), a pays the whole budget: the largest rank within 70% of 2 x 4096 parameters
    assert ranks == {"a": 12, "b": None}
    assert 4096 + 12 * 128 <= 0.7 * 2 * 4096 < 4096 + 13 * 128


def test_a_cost_rising_after_a_fall_cannot_skip_components():
    # a rank cut drops a suffix: a cheap component cannot be dropped while a costlier later one is kept
    shapes = {"m": MatrixShape(32, 32), "n": MatrixShape(32, 32)}
    bumpy = torch.tensor([1.0, 1e-6] + [0.5] * 30, dtype=torch.float64)
    ranks = loss_aware_ranks(shapes, {"m": bumpy, "n": torch.full((32,), 0.01, dtype=torch.float64)}, ratio=0.5)
    assert ranks["m"] == 1   # scored by position, the 0.5-cost tail would have been kept (m dense)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_output_weighted_spectrum_is_each_components_weighted_output_error(shape):
    torch.manual_seed(0)
    M = torch.randn(*shape, dtype=torch.float64)
    w = torch.rand(shape[0], dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    expected = ((U * S).pow(2) * w[:, None]).sum(0)
    got = Decomposition(M).output_weighted_spectrum(w)
    assert torch.allclose(got[:len(S)], expected, rtol=1e-9, atol=1e-12)


def test_output_fisher_is_the_squared_output_gradient_summed_over_tokens():
    """Checkpointed backward passes with hooks give what plain autograd gives, and leave the model as it was."""
    torch.manual_seed(0)
    m, ids = model("llama"), calib_ids(nsamples=3, seqlen=24)
    linears = named_target_linears(m)
    flags = [p.requires_grad for p in m.parameters()]
    got = output_fisher(m, ids, linears, torch.device("cpu"))
    assert [p.requires_grad for p in m.parameters()] == flags and not m.training
    assert all(p.grad is None for p in m.parameters())
    outputs = {}
    handles = [lin.register_forward_hook(lambda mod, i, o, n=n: outputs.setdefault(n, []).append(o))
               for n, lin in linears.items()]
    expected = {n: torch.zeros(lin.weight.shape[0], dtype=torch.float64) for n, lin in linears.items()}
    with torch.enable_grad():
        for i in range(ids.shape[0]):
            outputs.clear()
            loss = m(input_ids=ids[i:i + 1], labels=ids[i:i + 1]).loss
            names = list(outputs)
            grads = torch.autograd.grad(loss, [outputs[n][0] for n in names])
            for n, g in zip(names, grads):
                expected[n] += g.double().pow(2).reshape(-1, g.shape[-1]).sum(0)
    for h in handles:
        h.remove()
    assert set(got) == set(expected)
    for n in got:
        assert torch.allclose(got[n], expected[n], rtol=1e-5, atol=1e-12), n


def test_output_fisher_runs_with_every_weight_frozen():
    """The pass needs no weight gradient: during it no parameter requires one and none is ever computed,
    and the values equal those of a backward pass that computes every weight's gradient (float32 rounding)."""
    m, ids = model("llama"), calib_ids(nsamples=2, seqlen=24)
    linears = named_target_linears(m)
    seen = []
    handle = m.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda mod, i, o: seen.append(any(p.requires_grad for p in m.parameters())))
    grads_seen = []
    grad_handles = [p.register_hook(lambda g: grads_seen.append(1)) for p in m.parameters()]
    got = output_fisher(m, ids, linears, torch.device("cpu"))
    handle.remove()
    for h in grad_handles:
        h.remove()
    assert seen and not any(seen) and not grads_seen
    expected = {}
    hooks = [lin.register_full_backward_hook(
        lambda mod, gi, go, n=n: expected.__setitem__(
            n, expected.get(n, 0) + go[0].double().pow(2).reshape(-1, go[0].shape[-1]).sum(0)))
        for n, lin in linears.items()]
    for p in m.parameters():
        p.requires_grad_(True)  # the weights' gradients computed and dropped
    with torch.enable_grad():
        for i in range(ids.shape[0]):
            m(input_ids=ids[i:i + 1], labels=ids[i:i + 1]).loss.backward()
    for h in hooks:
        h.remove()
    for n in got:
        assert torch.allclose(got[n], expected[n], rtol=1e-6, atol=1e-14), n


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_a_sketch_weight_prices_each_component_by_the_whole_matrix(shape):
    """With Z^T Z = F exactly, each component's cost is sigma_i^2 u_i^T F u_i, off-diagonal terms included;
    with a diagonal F it is the diagonal weighting."""
    torch.manual_seed(0)
    M = torch.randn(*shape, dtype=torch.float64)
    G = torch.randn(3 * shape[0], shape[0], dtype=torch.float64)
    F = G.T @ G
    U, S, _ = torch.linalg.svd(M, full_matrices=False)
    expected = S.pow(2) * torch.einsum("oi,op,pi->i", U, F, U)
    got = Decomposition(M).output_weighted_spectrum(G)   # G is a sketch of F with no error
    assert torch.allclose(got[:len(S)], expected, rtol=1e-9, atol=1e-12)
    d = torch.rand(shape[0], dtype=torch.float64)
    assert torch.allclose(Decomposition(M).output_weighted_spectrum(torch.diag(d.sqrt())),
                          Decomposition(M).output_weighted_spectrum(d), rtol=1e-9, atol=1e-12)


def _output_gradient_grams(m, ids, linears) -> dict[str, torch.Tensor]:
    """F = sum_t g_t g_t^T at every Linear's output, by plain autograd."""
    outputs, grams = {}, {}
    handles = [lin.register_forward_hook(lambda mod, i, o, n=n: outputs.setdefault(n, o)) for n, lin in linears.items()]
    with torch.enable_grad():
        for i in range(ids.shape[0]):
            outputs.clear()
            loss = m(input_ids=ids[i:i + 1], labels=ids[i:i + 1]).loss
            names = list(outputs)
            for n, g in zip(names, torch.autograd.grad(loss, [outputs[n] for n in names])):
                g = g.double().reshape(-1, g.shape[-1])
                grams[n] = grams.get(n, 0) + g.T @ g
    for h in handles:
        h.remove()
    return grams


def test_output_fisher_sketch_estimates_the_full_output_fisher():
    """E[Z^T Z] = F: with many sketch rows, ||Z u||^2 is u^T F u to within the sketch's noise (relative standard
    deviation sqrt(2 / rows) = 3% here) for every Linear and random directions u; and it is seeded."""
    torch.manual_seed(0)
    m, ids = model("llama"), calib_ids(nsamples=2, seqlen=24)
    linears = named_target_linears(m)
    sketch = output_fisher(m, ids, linears, torch.device("cpu"), sketch=2048, seed=1)
    again = output_fisher(m, ids, linears, torch.device("cpu"), sketch=2048, seed=1)
    grams = _output_gradient_grams(m, ids, linears)
    assert set(sketch) == set(grams)
    generator = torch.Generator().manual_seed(0)
    for n, F in grams.items():
        assert sketch[n].shape == (2048, F.shape[0]) and sketch[n].dtype == torch.float32
        assert torch.equal(sketch[n], again[n])
        u = torch.randn(F.shape[0], 8, dtype=torch.float64, generator=generator)
        exact = torch.einsum("oi,op,pi->i", u, F, u)
        estimated = (sketch[n].double() @ u).pow(2).sum(0)
        assert torch.allclose(estimated, exact, rtol=0.2), n


def test_a_recipe_can_allocate_from_the_output_fisher_sketch():
    recipe = [{"stage": "svd-llm"}, {"stage": "loss-aware"}, {"stage": "output-fisher", "options": {"sketch": 16}}]
    diagonal = compress_model(model("llama"), calib_ids(), config(ranks="loss-aware", ratio=0.3))
    sketched = compress_model(model("llama"), calib_ids(), config(recipe=recipe, ratio=0.3))
    assert sketched.stage_run("output-fisher").options["sketch"] == 16
    assert 0.3 <= sketched.ratio_achieved <= 0.305
    ranks = lambda meta: {n: s.rank for n, s in meta.modules.items()}   # noqa: E731
    assert ranks(sketched) != ranks(diagonal)   # the sketch prices components differently


def test_eora_paths_count_only_where_they_are_built():
    """Matrices kept dense get no EoRA path, so none is reserved for them: the ratio is still met exactly."""
    meta = compress_model(model("llama"), calib_ids(), config(ranks="loss-aware", ratio=0.3, compensate="eora",
                                                              eora_rank=2))
    assert meta.kept_dense  # the case this is about
    assert 0.3 <= meta.ratio_achieved <= 0.305


def test_fisher_sketch_option_lists_the_pass_and_is_refused_without_loss_aware_ranks(tmp_path, tiny_dirs,
                                                                                     austen_file, cli):
    from rankwise.compress.metadata import read_result
    cfg = config(ranks="loss-aware", fisher_sketch=32, seed=3)
    assert cfg.stages()[0] == {"stage": "output-fisher", "options": {"sketch": 32, "seed": 3}}
    assert all(e["stage"] != "output-fisher" for e in config(ranks="loss-aware").stages())
    common = ["--ratio", "0.3", "--calib", f"text:{austen_file}", "--nsamples", "4", "--seqlen", "32",
              "--device", "cpu", "--fisher-sketch", "8"]
    r = cli("model", tiny_dirs["llama"], "-o", tmp_path / "u", *common, "--ranks", "uniform")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "--fisher-sketch" in r.output and "uniform" in r.output
    assert not (tmp_path / "u").exists()
    r = cli("model", tiny_dirs["llama"], "-o", tmp_path / "c", *common, "--ranks", "loss-aware")
    assert r.exit_code == 0, r.output
    assert read_result(str(tmp_path / "c")).stage_run("output-fisher").options["sketch"] == 8
