"""EoRA (Liu et al. 2024, compress.correct): a rank-r residual path fitted to what the factorization left out,
in the data-weighted norm; its parameters count inside --ratio."""
from rankwise.compress.correct import eora_factors
from rankwise.compress.stages.base import Corrector, Statistics, register_corrector


@register_corrector("eora")
class EoRA(Corrector):
    statistics = Statistics(xtx=True)

    def reserved_params(self, shapes):
        r = self.cfg.eora_rank
        return sum(min(r, s.out, s.inp) * (s.out + s.inp) for s in shapes.values())

    def after_factorize(self, work):
        target = work.target(self.cfg.refit_damp)
        residual = target - work.B.double().to(target.device) @ work.A.double().to(target.device)
        work.lora_B, work.lora_A = eora_factors(residual, work.stats, self.cfg.eora_rank)
