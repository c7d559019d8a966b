"""Predicted loss of dropping each singular component of every matrix the factorizer truncates: the
component's output error sigma_i u_i weighted by the output Fisher (pass `output-fisher`: its diagonal, or a
sketch of the whole matrix), with statistics from the dense model, block by block (only the costs are kept:
memory = one block + the costs)."""
from rankwise.compress.stages.base import ModelPass, register_pass
from rankwise.compress.stages.pass_spectra import dense_decompositions


@register_pass("truncation-loss")
class TruncationLossPass(ModelPass):
    def run(self, job):
        output_fisher = job.passes["output-fisher"]
        return {full: d.output_weighted_spectrum(output_fisher[full].to(job.device)).cpu()
                for full, d in dense_decompositions(job, "truncation-loss")}
