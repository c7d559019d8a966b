"""Block refinement (compress.refine): each block's low-rank factors trained so that the compressed block, on
the compressed stream, reproduces the dense twin's outputs on the dense stream."""
import torch

from rankwise.calib.capture import call_block
from rankwise.compress.metadata import BlockRefinement, Refinement
from rankwise.compress.refine import RefineSettings, refine_block
from rankwise.compress.stages.base import BlockCorrector, register_block_corrector


@register_block_corrector("block-refine")
class BlockRefine(BlockCorrector):
    dense_stream = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.record = Refinement(steps=cfg.refine_steps, lr=cfg.refine_lr, seed=cfg.seed)

    def correct_block(self, work):
        kwargs = work.inputs.kwargs[work.index]
        with torch.no_grad():  # the dense block's outputs on the dense stream: the targets
            targets = [call_block(work.dense_block, h, kw, work.device).to(work.inputs.storage)
                       for h, kw in zip(work.dense_inputs.hidden, kwargs)]
        result = refine_block(work.block, work.inputs.hidden, targets, kwargs, work.device,
                              RefineSettings(self.cfg.refine_steps, self.cfg.refine_lr, self.cfg.seed))
        self.record.blocks[work.prefix] = BlockRefinement(mse_before=result.mse_before,
                                                          mse_after=result.mse_after, kept=result.kept)

    def result_fields(self):
        return {"refine": self.record}
