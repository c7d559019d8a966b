"""The empirical Fisher pass (calib.fisher): per-row squared-gradient sums of every targeted weight (FWSVD)."""
from rankwise.calib.fisher import row_fisher
from rankwise.compress.arch import Conv1D, named_target_linears
from rankwise.compress.stages.base import ModelPass, register_pass


def fisher_pass(model, calib_ids, device, progress=None) -> dict:
    """Full Linear name -> Fisher row sums [out] (float64, CPU)."""
    linears = named_target_linears(model)
    weights = {name: lin.weight for name, lin in linears.items()}
    transposed = {name for name, lin in linears.items() if Conv1D and isinstance(lin, Conv1D)}
    return row_fisher(model, calib_ids, weights, device, transposed, progress)


@register_pass("fisher")
class FisherPass(ModelPass):
    streams = False
    unsupported_reason = "its Fisher pass needs every block at once"

    def run(self, job):
        return fisher_pass(job.model, job.calib_ids, job.device, job.progress)
