"""`rankwise.oneshot`: a model object compressed in memory by a recipe given as data."""
import json

import torch

import rankwise
from rankwise.compress.lowrank import LowRankLinear
from helpers_methods import calib_ids
from tiny import tiny_model, tiny_tokenizer


def test_oneshot_with_a_recipe_compresses_in_memory_and_returns_the_record():
    m = tiny_model("llama")
    recipe = [{"stage": "svd-llm"}, {"stage": "uniform", "options": {"rank_multiple": 2}},
              {"stage": "eora", "options": {"rank": 2}}]
    out, result = rankwise.oneshot(m, calib_ids(), ratio=0.4, recipe=recipe, batch_size=2, device="cpu")
    assert out is m
    layers = [x for x in m.modules() if isinstance(x, LowRankLinear)]
    assert len(layers) == 14 and all(x.lora_rank == 2 and x.rank % 2 == 0 for x in layers)
    assert [r.stage for r in result.recipe] == ["svd-llm", "uniform", "eora"]
    assert result.stage_run("eora").record == {"paths": 14, "params": result.compensation_params}
    assert 0.4 <= result.ratio_achieved < 0.45
    json.dumps(result.to_json(), allow_nan=False)


def test_oneshot_with_a_tokenizer_draws_its_calibration_and_takes_the_shorthand(austen_file):
    m = tiny_model("llama")
    before = m(input_ids=torch.tensor([[1, 2, 3]])).logits
    _, result = rankwise.oneshot(m, tiny_tokenizer(), ratio=0.3, method="asvd", alpha=0.25,
                                 calib=f"text:{austen_file}", nsamples=4, seqlen=32, device="cpu")
    assert result.calibration.source == f"text:{austen_file}" and result.calibration.nsamples == 4
    assert result.stage_run("asvd").options == {"alpha": 0.25}
    assert not torch.equal(m(input_ids=torch.tensor([[1, 2, 3]])).logits, before)


def test_compressing_leaves_the_callers_random_state_as_it_found_it():
    """A caller who seeds once and draws after compressing gets the draws the seed promised."""
    m = tiny_model("llama")
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    rankwise.oneshot(m, calib_ids(), ratio=0.4, recipe=[{"stage": "svd-llm"}, {"stage": "uniform"}],
                     batch_size=2, device="cpu")
    assert torch.equal(torch.rand(4), expected)
