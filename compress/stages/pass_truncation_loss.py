"""Predicted loss of dropping each singular component of every matrix the factorizer truncates: the
component's output error sigma_i u_i weighted by the output Fisher diagonal (pass `output-fisher`), with
statistics from the dense model, block by block (only the costs are kept: memory = one block + the costs)."""
from rankwise.compress.arch import dense_weight
from rankwise.compress.stages.base import LinearStatistics, ModelPass, register_pass


@register_pass("truncation-loss")
class TruncationLossPass(ModelPass):
    def run(self, job):
        from rankwise.compress.pipeline import unchanged_block_stats
        wanted = job.factorizer.statistics
        output_fisher = job.passes["output-fisher"]
        costs = {}
        for block_prefix, linears, stats in unchanged_block_stats(
                job.model, job.calib_ids, job.cfg.batch_size, job.device, job.storage, want_xtx=wanted.xtx,
                want_abs=wanted.abs_mean, progress=job.progress, stage="truncation-loss",
                block_source=job.block_source):
            for name, lin in linears.items():
                full = f"{block_prefix}.{name}"
                view = LinearStatistics(stats.get(name), job.pass_values(full))
                decomposition = job.factorizer.decompose(dense_weight(lin).to(job.device), view)
                costs[full] = decomposition.output_weighted_spectrum(output_fisher[full].to(job.device)).cpu()
        return costs
