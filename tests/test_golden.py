"""Every covered pipeline combination gives the ranks and logits recorded in tests/golden (make_golden.py)."""
import pytest
import torch
from safetensors.torch import load_file

from golden.make_golden import GOLDEN, combinations, compress, probe_logits, run

EXPECTED = load_file(str(GOLDEN))
# CPUs round float32 sums differently: an AVX2-only CPU gives logits 1.7e-5 off these goldens (recorded on an
# AVX-512 one; the logits' magnitude is ~1.3). 1e-4 of the largest logit, relative and absolute, holds across
# them and still sees one factor of one Linear changed by 1% (test below; 0.1% moves these logits by 6e-5).
TOLERANCE = 1e-4


def differs_from(logits: torch.Tensor, expected: torch.Tensor) -> str | None:
    """None when `logits` match `expected` within TOLERANCE scaled to their magnitude, else the mismatch."""
    scale = float(expected.abs().max())
    try:
        torch.testing.assert_close(logits, expected, rtol=TOLERANCE, atol=TOLERANCE * scale)
    except AssertionError as e:
        return str(e)
    return None


@pytest.mark.parametrize("name", sorted(combinations()))
def test_pipeline_reproduces_the_recorded_ranks_and_logits(name):
    ranks, logits = run(combinations()[name])
    assert torch.equal(ranks, EXPECTED[f"{name}:ranks"])
    mismatch = differs_from(logits, EXPECTED[f"{name}:logits"])
    assert mismatch is None, mismatch


def test_the_tolerance_sees_one_factor_changed_by_one_percent():
    name = "svd-llm/uniform/plain"
    model, _ = compress(combinations()[name])
    assert differs_from(probe_logits(model), EXPECTED[f"{name}:logits"]) is None
    factor = model.model.layers[0].mlp.down_proj.B.weight
    with torch.no_grad():
        factor.mul_(1.01)
    mismatch = differs_from(probe_logits(model), EXPECTED[f"{name}:logits"])
    assert mismatch is not None and "Mismatched elements" in mismatch
