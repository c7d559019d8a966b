"""Every covered pipeline combination gives the ranks and logits recorded in tests/golden (make_golden.py)."""
import pytest
import torch
from safetensors.torch import load_file

from golden.make_golden import GOLDEN, combinations, run

EXPECTED = load_file(str(GOLDEN))


@pytest.mark.parametrize("name", sorted(combinations()))
def test_pipeline_reproduces_the_recorded_ranks_and_logits(name):
    ranks, logits = run(combinations()[name])
    assert torch.equal(ranks, EXPECTED[f"{name}:ranks"])
    torch.testing.assert_close(logits, EXPECTED[f"{name}:logits"], rtol=1e-5, atol=1e-5)
