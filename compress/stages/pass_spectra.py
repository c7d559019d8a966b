"""Singular values of every matrix's transformed weight (what the factorizer truncates), with statistics
from the dense model, block by block (only the spectra are kept: memory = one block + the spectra)."""
from rankwise.compress.arch import block_runner, dense_weight
from rankwise.compress.stages.base import LinearStatistics, ModelPass, register_pass


def dense_decompositions(job, stage: str):
    """(full Linear name, the factorizer's Decomposition of its dense weight) for every targeted Linear, with
    input statistics from the dense model, one block at a time."""
    runner = block_runner(job.model, job.calib_ids, job.cfg.batch_size, job.device, job.storage, job.block_source,
                          progress=job.progress)
    for step, stats in runner.unchanged(job.factorizer.statistics, stage):
        for name, lin in step.linears.items():
            full = step.full_name(name)
            view = LinearStatistics(stats.get(name), job.pass_values(full))
            yield full, job.factorizer.decompose(dense_weight(lin).to(job.device), view)


@register_pass("spectra")
class SpectraPass(ModelPass):
    def run(self, job):
        return {full: d.spectrum.cpu() for full, d in dense_decompositions(job, "spectra")}
