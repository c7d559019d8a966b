import copy

import torch

from rankwise.compress.lowrank import LowRankLinear
from rankwise.compress.pipeline import compress_model
from helpers_methods import calib_ids, config, model


def _block_output_error(dense, compressed, ids, layer: int) -> float:
    """|| block output in the compressed model - same block's output in the dense model ||."""
    outs = []
    for m in (dense, compressed):
        box = []
        h = m.model.layers[layer].register_forward_hook(lambda mod, a, o: box.append(o[0] if isinstance(o, tuple)
                                                                                   else o))
        with torch.no_grad():
            m(input_ids=ids)
        h.remove()
        outs.append(box[0])
    return (outs[0] - outs[1]).norm().item()


def test_refit_lowers_block_output_error_on_calibration_data():
    ids = calib_ids()
    dense = model("llama")
    errs = {}
    for refit in (False, True):
        m = copy.deepcopy(dense)
        meta = compress_model(m, ids, config(method="asvd", ratio=0.4, refit=refit))
        assert sum(isinstance(x, LowRankLinear) for x in m.modules()) == len(meta.modules) == 14
        errs[refit] = [_block_output_error(dense, m, ids, i) for i in range(2)]
    assert errs[True][0] < errs[False][0]
    assert errs[True][1] < errs[False][1]
