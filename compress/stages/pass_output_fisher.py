"""The output Fisher pass (calib.fisher.output_fisher): per targeted Linear, the sum over calibration tokens of
the squared loss gradient at each output feature, what an output error of that Linear costs the model."""
from rankwise.calib.fisher import output_fisher
from rankwise.compress.arch import named_target_linears
from rankwise.compress.stages.base import ModelPass, register_pass


@register_pass("output-fisher")
class OutputFisherPass(ModelPass):
    streams = False
    unsupported_reason = "its output Fisher pass needs every block at once (--ranks uniform or welore stream)"

    def run(self, job):
        return output_fisher(job.model, job.calib_ids, named_target_linears(job.model), job.device, job.progress)
