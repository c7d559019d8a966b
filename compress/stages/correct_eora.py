"""EoRA (Liu et al. 2024, compress.correct): a rank-r residual path fitted to what the factorization left out,
in the data-weighted norm; its parameters count inside --ratio."""
from pydantic import Field

from rankwise.compress.correct import eora_factors
from rankwise.compress.defaults import EORA_RANK_DEFAULT
from rankwise.compress.stages.base import Corrector, StageOptions, StageRecord, Statistics, register_corrector


class EoRAOptions(StageOptions):
    rank: int = Field(EORA_RANK_DEFAULT, ge=1, description="rank of every residual path")
    damp: float = Field(1.0, ge=0, allow_inf_nan=False, description="ridge damping of W G C^-1 (with a dense "
                        "stream), relative to the mean input energy")


class EoRARecord(StageRecord):
    paths: int = 0    # residual paths added
    params: int = 0   # their parameters (inside the ratio)


@register_corrector("eora")
class EoRA(Corrector):
    Options = EoRAOptions
    Record = EoRARecord
    statistics = Statistics(xtx=True)

    def label(self) -> str:
        return f"EoRA rank {self.options.rank}"

    def reserved_params(self, shapes):
        r = self.options.rank
        return sum(min(r, s.out, s.inp) * (s.out + s.inp) for s in shapes.values())

    def after_factorize(self, work):
        target = work.target(self.options.damp)
        residual = target - work.B.double().to(target.device) @ work.A.double().to(target.device)
        work.lora_B, work.lora_A = eora_factors(residual, work.stats, self.options.rank)
        self.record.paths += 1
        self.record.params += work.lora_B.numel() + work.lora_A.numel()
