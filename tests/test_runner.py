"""The block walk (calib.runner.BlockRunner) against the whole model's own forward, and the order it calls back."""
import torch

from rankwise.calib.stats import Statistics
from rankwise.compress.arch import block_runner
from tiny import tiny_model

CPU = torch.device("cpu")
ATTN, MLP = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["mlp.gate_proj", "mlp.up_proj"]


def calib_ids(model, rows=4, seqlen=16):
    return torch.randint(0, model.config.vocab_size, (rows, seqlen), generator=torch.Generator().manual_seed(0))


def full_forward_grams(model, ids, batch_size: int) -> dict[str, torch.Tensor]:
    """sum x x^T of every Linear's input, from the whole model's forward (float64), batch by batch."""
    grams: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x
        return hook
    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n]
    with torch.no_grad():
        for start in range(0, ids.shape[0], batch_size):
            model(input_ids=ids[start:start + batch_size], use_cache=False)
    for h in handles:
        h.remove()
    return grams


def test_unchanged_walk_gives_the_statistics_of_the_whole_models_forward():
    model = tiny_model("llama", layers=3)
    ids = calib_ids(model)
    want = full_forward_grams(model, ids, batch_size=2)
    seen = []
    runner = block_runner(model, ids, 2, CPU, CPU, progress=lambda stage, done, total: seen.append((stage, done)))
    for step, stats in runner.unchanged(Statistics(xtx=True, abs_mean=True), "probe"):
        assert set(stats) == set(step.linears)
        assert len({id(s) for s in stats.values()}) == 4  # q/k/v, o, gate/up, down: one object per input
        assert all(stats[n] is stats[ATTN[0]] for n in ATTN) and stats[MLP[0]] is stats[MLP[1]]
        for name, st in stats.items():
            assert st.count == 4 * 16 and st.cross is None
            ref = want[step.full_name(name)]  # float64; the walk forms each batch's product in float32
            torch.testing.assert_close(st.xtx, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    assert seen == [("probe", 1), ("probe", 2), ("probe", 3)]


def test_compress_walk_calls_back_group_by_group_in_forward_order():
    model = tiny_model("llama", layers=2)
    calls = []

    def on_group(step, group, stats):
        calls.append((step.index, group, None if stats is None else (stats.count, stats.cross is not None)))

    def on_block(step):
        calls.append((step.index, "block", step.dense_block is not None))
        return False
    runner = block_runner(model, calib_ids(model), 2, CPU, CPU)
    runner.compress(Statistics(xtx=True), True, on_group, on_block)
    groups = [ATTN, ["self_attn.o_proj"], MLP, ["mlp.down_proj"]]
    one_block = [(g, (64, True)) for g in groups]  # 4 x 16 tokens; the dense stream adds the cross term
    assert calls == [x for i in (0, 1) for x in [*[(i, g, s) for g, s in one_block], (i, "block", True)]]


def test_compress_walk_without_statistics_runs_no_forward():
    """No statistics and no dense stream: one group of all the block's Linears, nothing captured."""
    model = tiny_model("llama", layers=2)
    calls = []
    def on_block(step):
        calls.append((step.index, step.inputs))
        return False
    runner = block_runner(model, calib_ids(model), 2, CPU, CPU)
    runner.compress(Statistics(), False, lambda step, group, stats: calls.append((step.index, group, stats)),
                    on_block)
    everything = [*ATTN, "self_attn.o_proj", *MLP, "mlp.down_proj"]
    assert [(i, sorted(g), s) for i, g, s in calls[0::2]] == [(0, sorted(everything), None),
                                                              (1, sorted(everything), None)]
    assert calls[1::2] == [(0, None), (1, None)]
