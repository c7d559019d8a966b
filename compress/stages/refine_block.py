"""Block refinement (compress.refine): each block's low-rank factors trained so that the compressed block, on
the compressed stream, reproduces the dense twin's outputs on the dense stream."""
import math

import torch
from pydantic import BaseModel, Field

from rankwise.calib.capture import call_block
from rankwise.compress.refine import RefineSettings, refine_block
from rankwise.compress.stages.base import (BlockCorrector, StageOptions, StageRecord,
                                           register_block_corrector)


class RefineOptions(StageOptions):
    steps: int = Field(32, ge=1, description="optimizer steps per block (one calibration batch each)")
    lr: float = Field(1e-4, gt=0, allow_inf_nan=False, description="Adam's peak learning rate (cosine decay)")
    seed: int = Field(0, description="order of the calibration batches")


class BlockRefinement(BaseModel):
    """One block's output error (mean squared, calibration set) before and after refinement (None: not a finite
    number); kept: whether the refined factors were kept (only when they lowered it)."""
    mse_before: float | None
    mse_after: float | None
    kept: bool


class Refinement(StageRecord):
    """What refinement did to each block (prefix -> BlockRefinement) and the precision it trained in."""
    train_dtype: str = ""
    blocks: dict[str, BlockRefinement] = Field(default_factory=dict)

    def warning(self) -> str | None:
        if self.blocks and not any(b.kept for b in self.blocks.values()):
            return (f"block-refine was reverted on every block ({len(self.blocks)}): it never lowered a block's "
                    f"output error (try a smaller lr, or --dtype fp32)")
        return None


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


@register_block_corrector("block-refine")
class BlockRefine(BlockCorrector):
    Options = RefineOptions
    Record = Refinement
    dense_stream = True

    def correct_block(self, work):
        kwargs = work.inputs.kwargs[work.index]
        with torch.no_grad():  # the dense block's outputs on the dense stream: the targets
            targets = [call_block(work.dense_block, h, kw, work.device).to(work.inputs.storage)
                       for h, kw in zip(work.dense_inputs.hidden, kwargs)]
        o = self.options
        result = refine_block(work.block, work.inputs.hidden, targets, kwargs, work.device,
                              RefineSettings(o.steps, o.lr, o.seed))
        self.record.train_dtype = result.train_dtype
        self.record.blocks[work.prefix] = BlockRefinement(mse_before=_finite(result.mse_before),
                                                          mse_after=_finite(result.mse_after), kept=result.kept)
