"""Singular values of every matrix's transformed weight (what the factorizer truncates), with statistics
from the dense model, block by block (only the spectra are kept: memory = one block + the spectra)."""
from rankwise.compress.arch import dense_weight
from rankwise.compress.stages.base import LinearStatistics, ModelPass, register_pass


def dense_decompositions(job, stage: str):
    """(full Linear name, the factorizer's Decomposition of its dense weight) for every targeted Linear, with
    input statistics from the dense model, one block at a time."""
    from rankwise.compress.pipeline import unchanged_block_stats
    wanted = job.factorizer.statistics
    for block_prefix, linears, stats in unchanged_block_stats(
            job.model, job.calib_ids, job.cfg.batch_size, job.device, job.storage, want_xtx=wanted.xtx,
            want_abs=wanted.abs_mean, progress=job.progress, stage=stage, block_source=job.block_source):
        for name, lin in linears.items():
            full = f"{block_prefix}.{name}"
            view = LinearStatistics(stats.get(name), job.pass_values(full))
            yield full, job.factorizer.decompose(dense_weight(lin).to(job.device), view)


@register_pass("spectra")
class SpectraPass(ModelPass):
    def run(self, job):
        return {full: d.spectrum.cpu() for full, d in dense_decompositions(job, "spectra")}
