"""The output Fisher pass (calib.fisher.output_fisher): per targeted Linear, the sum over calibration tokens of
the squared loss gradient at each output feature, what an output error of that Linear costs the model; or,
with `sketch`, a Gaussian sketch of the whole output Fisher matrix, which also prices errors that several
output features make together."""
from pydantic import Field

from rankwise.calib.fisher import output_fisher
from rankwise.compress.arch import named_target_linears
from rankwise.compress.stages.base import ModelPass, StageOptions, register_pass


class OutputFisherOptions(StageOptions):
    sketch: int = Field(0, ge=0, description="rows of a Gaussian sketch of the full output Fisher matrix per "
                        "Linear (sketch x out values each); 0: its diagonal only")
    seed: int = Field(0, description="the sketch's random draws")


@register_pass("output-fisher")
class OutputFisherPass(ModelPass):
    Options = OutputFisherOptions
    streams = False
    unsupported_reason = "its output Fisher pass needs every block at once (--ranks uniform or welore stream)"

    def run(self, job):
        return output_fisher(job.model, job.calib_ids, named_target_linears(job.model), job.device, job.progress,
                             sketch=self.options.sketch, seed=self.options.seed)
