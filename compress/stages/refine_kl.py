"""End-to-end KL refinement (model corrector `kl-refine`): after the block walk, train every low-rank factor of
the compressed model so that its next-token distribution on the calibration tokens matches the dense model's.

    min over all factors (A, B, lora_A, lora_B)   mean over calibration tokens t of  KL(p_dense(.|t) || p_c(.|t))

This is knowledge distillation with the dense model as the teacher (Hinton, Vinyals & Dean 2015, "Distilling
the Knowledge in a Neural Network"). The block walk fits each block to the dense block's outputs one at a
time; this stage trains all the factors together against what the model finally predicts, so errors that
the blocks hand on to each other, and that only matter through the logits, are what it lowers.

Memory. The teacher is sparse, as in top-k distillation from cached teacher logits (Anshumann et al. 2025,
"Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs"): before the walk, while the model is
still dense, one no-grad pass over the calibration windows keeps per token only the log-probabilities of the
dense model's k most probable next tokens, their ids and the log of the remaining mass, tokens x (k+1)
values and tokens x k ids, never tokens x vocabulary. A top-k teacher alone is biased (its mass does not sum
to one); with the "rest" bucket the loss is the exact KL divergence between the two distributions coarsened
to k+1 outcomes (the teacher's top k, and every other token), a lower bound of the full KL (merging outcomes
never increases a KL divergence) that is zero exactly when the student puts the teacher's mass on those
tokens. Only one batch's full logits exist at a time. Training holds the model, Adam's two moments, two
copies of the factors (the starting ones and the best ones) and one batch's activations: the model's own
gradient checkpointing keeps one decoder block's activations at a time for the backward pass.

Data. The calibration windows can be few (32 x 512 tokens in bench/quality.py) and the student fits them long
before it has learnt the teacher: training KL falls while the held-out KL rises. `sampled_windows` adds
sequences sampled from the dense model itself (temperature 1, the full distribution), each continuing the first
`prompt_tokens` of a training window, as in data-free distillation (Liu et al. 2023, "LLM-QAT: Data-Free
Quantization Aware Training for Large Language Models"): they cost no real text, their teacher is exact
(the tokens are the teacher's own draws), and they only ever train; the held-out windows stay real text.

Only the factors train (biases and embeddings stay fixed; the norm weights too unless `norms`), with Adam, a
linear warm-up then cosine decay, gradient clipping and a cap on the epochs. A seeded part of the calibration
windows is held out: never trained on, it is evaluated `evals_per_epoch` times an epoch, stops the training
after `patience` evaluations without improvement, and judges it: the model keeps the best weights seen on it,
and only if they beat the starting factors there (the closed form's, or block refinement's); otherwise the
starting factors are restored. Without a hold-out the training windows judge. A half-precision model trains
in float32 and is cast back (Adam's eps and squared gradients underflow in float16; bfloat16 cannot hold small
updates).
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from pydantic import Field
from torch import nn
from transformers import GenerationConfig

from rankwise.calib.fisher import backward_mode, on_device
from rankwise.compress.loading import kept_random_state
from rankwise.compress.lowrank import LoraLinear, LowRankFactors
from rankwise.compress.stages.base import (CompressionJob, ModelCorrector, StageOptions, StageRecord,
                                           register_model_corrector)
from rankwise.compress.training import (HALF, copy_weights, finite_or_none, holdout_split, norm_parameters,
                                        restore_weights, warmup_cosine)


@dataclass
class SparseTeacher:
    """The dense model's next-token distribution at every calibration token, kept sparse: log_probs [N, T, k+1]
    (float32: the log-probabilities of its k most probable tokens, then the log of the remaining mass) and
    ids [N, T, k] (int32: those tokens)."""
    log_probs: torch.Tensor
    ids: torch.Tensor

    @property
    def top_k(self) -> int:
        return int(self.ids.shape[-1])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.log_probs, self.ids))

    def rows(self, windows: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.log_probs[windows].to(device), self.ids[windows].to(device).long()


def top_k_log_probs(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities [..., k+1]: the k most probable tokens' and the rest's, their ids [..., k]); k is at
    most vocabulary - 1, so the rest is never empty."""
    log_probs = torch.log_softmax(logits.float(), -1)
    top, ids = log_probs.topk(min(top_k, log_probs.shape[-1] - 1), -1)
    return torch.cat([top, _rest(log_probs, ids)], -1), ids


def _rest(log_probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the probability outside `ids`: a log-sum-exp of the other entries (stable when it is tiny)."""
    return log_probs.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)


def sparse_kl(logits: torch.Tensor, teacher_log_probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token over the k + 1 outcomes (the teacher's top k and the rest), [..]."""
    log_q = torch.log_softmax(logits.float(), -1)
    student = torch.cat([log_q.gather(-1, ids), _rest(log_q, ids)], -1)
    return (teacher_log_probs.exp() * (teacher_log_probs - student)).sum(-1)


@torch.no_grad()
def sparse_teacher(model: nn.Module, calib_ids: torch.Tensor, top_k: int, batch: int, device,
                   storage) -> SparseTeacher:
    """The model's top-k next-token log-probabilities (and the rest) at every calibration token, computed one
    batch of windows at a time and kept on `storage`."""
    values, ids = [], []
    for start in range(0, calib_ids.shape[0], batch):
        logits = model(input_ids=calib_ids[start:start + batch].to(device), use_cache=False).logits
        v, i = top_k_log_probs(logits, top_k)
        values.append(v.to(storage))
        ids.append(i.to(torch.int32).to(storage))
    return SparseTeacher(torch.cat(values), torch.cat(ids))


@torch.no_grad()
def sample_windows(model: nn.Module, prompts: torch.Tensor, length: int, batch: int, device,
                   progress=None) -> torch.Tensor:
    """[len(prompts), length] token ids: each prompt continued by the model, sampled at temperature 1 from its
    full distribution (no top-k or top-p: the teacher's own distribution), never stopping at end-of-text.
    Draws from torch's global generator (the caller seeds it)."""
    new = length - prompts.shape[1]
    settings = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new,
                                min_new_tokens=new, pad_token_id=0, eos_token_id=None)
    out = []
    for start in range(0, prompts.shape[0], batch):
        chunk = prompts[start:start + batch].to(device)
        out.append(model.generate(input_ids=chunk, attention_mask=torch.ones_like(chunk),
                                  generation_config=settings)[:, :length].cpu())
        if progress:
            progress("kl-refine sampling", start + chunk.shape[0], prompts.shape[0])
    return torch.cat(out)


@torch.no_grad()
def mean_kl(model: nn.Module, calib_ids: torch.Tensor, teacher: SparseTeacher, windows: list[int], batch: int,
            device) -> float:
    """The sparse KL averaged over every token of the given windows."""
    total, count = 0.0, 0
    for chunk in _chunks(windows, batch):
        log_probs, ids = teacher.rows(chunk, device)
        kl = sparse_kl(model(input_ids=calib_ids[chunk].to(device), use_cache=False).logits, log_probs, ids)
        total += float(kl.double().sum())
        count += kl.numel()
    return total / max(count, 1)


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def factor_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The weights the stage trains: every low-rank layer's A and B and every residual path (lora_A, lora_B),
    when stored in a floating dtype; not biases."""
    params: dict[int, nn.Parameter] = {}
    for module in model.modules():
        names = ["A", "B"] if isinstance(module, LowRankFactors) else []
        if isinstance(module, (LowRankFactors, LoraLinear)) and module.lora_rank:
            names += ["lora_A", "lora_B"]
        for name in names:
            weight = getattr(module, name).weight
            if weight.is_floating_point():
                params[id(weight)] = weight
    return list(params.values())


@contextmanager
def _training(model: nn.Module, params: list[nn.Parameter], device):
    """The model on `device` with gradient checkpointing and only `params` requiring gradients; half-precision
    parameters held in float32 meanwhile. Yields the training dtype; everything is restored after."""
    dtypes = {id(p): p.dtype for p in model.parameters()}
    for p in model.parameters():
        if p.dtype in HALF:
            p.data = p.data.float()
    try:
        with backward_mode(model, device, {}, lambda name, grad: None):
            for p in params:
                p.requires_grad_(True)
            yield params[0].dtype
    finally:
        for p in model.parameters():
            p.data = p.data.to(dtypes[id(p)])


# ---------------------------------------------------------------- the stage

class KLRefineOptions(StageOptions):
    """Adam over the factors for at most `epochs` passes over the training windows, `batch` windows a step;
    held-out windows stop it and judge it."""
    lr: float = Field(1e-4, gt=0, allow_inf_nan=False, description="peak learning rate (warm-up, then cosine "
                      "decay over the capped steps)")
    epochs: int = Field(2, ge=1, description="the most passes over the training windows")
    batch: int = Field(2, ge=1, description="calibration windows per optimizer step (and per teacher batch)")
    holdout: float = Field(0.25, ge=0, lt=1, description="fraction of the calibration windows held out (a "
                           "seeded split) to stop the training and to judge it (0: the training windows judge)")
    patience: int = Field(2, ge=1, description="evaluations without improvement on the judging windows before "
                          "stopping")
    evals_per_epoch: int = Field(2, ge=1, description="evaluations on the judging windows per epoch (evenly "
                                 "spaced; the last ends the epoch)")
    sampled_windows: int = Field(64, ge=0, description="windows sampled from the dense model before the walk, "
                                 "added to the training windows (never held out)")
    prompt_tokens: int = Field(16, ge=1, description="each sampled window continues this many first tokens of a "
                               "training window")
    sample_batch: int = Field(16, ge=1, description="windows sampled at once")
    warmup: float = Field(0.1, ge=0, lt=1, description="fraction of the steps with a linear learning-rate warm-up")
    clip: float | None = Field(1.0, gt=0, allow_inf_nan=False, description="largest gradient norm (None: no "
                               "clipping)")
    seed: int = Field(0, description="order of the windows and the held-out split")
    top_k: int = Field(64, ge=1, description="the dense model's most probable tokens kept per calibration token")
    norms: bool = Field(False, description="train every norm weight of the model too (RMSNorm / LayerNorm)")


class KLRefinement(StageRecord):
    """The sparse KL to the dense model, mean per token, on the real training windows (kl_*; the sampled ones
    would cost a pass each and measure nothing new) and on the held-out ones (heldout_kl_*; None without a
    hold-out), before and after; kept: the trained factors were kept (they lowered the KL on the judging
    windows); steps, epochs and evaluations taken, and the judging windows' KL at each evaluation
    (heldout_kls); the windows (train_windows counts the sampled ones); the teacher's k and bytes; the dtype
    the factors trained in; seconds of sampling, of the teacher pass (sampling included) and of the training."""
    kl_before: float | None = None
    kl_after: float | None = None
    heldout_kl_before: float | None = None
    heldout_kl_after: float | None = None
    kept: bool = False
    steps: int = 0
    epochs: int = 0
    evaluations: int = 0
    heldout_kls: list[float | None] = Field(default_factory=list)
    train_windows: int = 0
    heldout_windows: int = 0
    sampled_windows: int = 0
    sample_seconds: float = 0.0
    top_k: int = 0
    teacher_bytes: int = 0
    train_dtype: str = ""
    teacher_seconds: float = 0.0
    seconds: float = 0.0

    def warning(self) -> str | None:
        if self.steps and not self.kept:
            judged = "held-out" if self.heldout_windows else "training"
            return (f"kl-refine was reverted: it never lowered the KL to the dense model on the {judged} "
                    f"windows (try a smaller lr)")
        return None


@dataclass(frozen=True)
class _Windows:
    """Indices into the stage's windows: the training ones (the calibration windows first, then the sampled
    ones) and the held-out ones."""
    train: list[int]
    held: list[int]
    real_train: int  # how many of `train` are calibration text

    @property
    def measured(self) -> list[int]:
        """The training windows the record's training KL is measured on: the calibration ones."""
        return self.train[:self.real_train]


@dataclass
class _Run:
    """What one training run needs: the model, its factors, the calibration windows and the teacher."""
    model: nn.Module
    params: list[nn.Parameter]
    calib_ids: torch.Tensor
    teacher: SparseTeacher
    options: KLRefineOptions
    device: torch.device

    def kl(self, windows: list[int]) -> float | None:
        """The KL on these windows in eval mode (no dropout: the same weights always judge the same)."""
        if not windows:
            return None
        self.model.eval()
        try:
            return mean_kl(self.model, self.calib_ids, self.teacher, windows, self.options.batch, self.device)
        finally:
            self.model.train()

    def step_loss(self, windows: list[int]) -> torch.Tensor:
        log_probs, ids = self.teacher.rows(windows, self.device)
        logits = self.model(input_ids=self.calib_ids[windows].to(self.device), use_cache=False).logits
        return sparse_kl(logits, log_probs, ids).mean()


@register_model_corrector("kl-refine")
class KLRefine(ModelCorrector):
    Options = KLRefineOptions
    Record = KLRefinement
    streams = False
    unsupported_reason = ("it trains every block at once against the dense model's next-token distribution "
                          "(--no-kl-refine leaves it out; block refinement, --refine, streams)")

    def __init__(self, options=None, **values):
        super().__init__(options, **values)
        self.teacher: SparseTeacher | None = None
        self.ids: torch.Tensor | None = None  # every window it uses: the calibration ones, then the sampled ones
        # a seeded split of the calibration windows; the sampled windows, numbered after them, always train
        self.windows = _Windows([], [], 0)

    def before_walk(self, job: CompressionJob) -> None:
        t0 = time.perf_counter()
        self.record = self.Record()
        real = job.calib_ids.shape[0]
        fit, held = holdout_split(real, self.options.holdout, self.options.seed)
        with on_device(job.model, job.device):
            sampled = self._sample(job, fit)
            self.record.sample_seconds = round(time.perf_counter() - t0, 3)
            self.ids = job.calib_ids if sampled is None else torch.cat([job.calib_ids, sampled])
            self.windows = _Windows(fit + list(range(real, self.ids.shape[0])), held, len(fit))
            self.teacher = sparse_teacher(job.model, self.ids, self.options.top_k, self.options.batch, job.device,
                                          job.storage)
        self.record.top_k, self.record.teacher_bytes = self.teacher.top_k, self.teacher.nbytes()
        self.record.teacher_seconds = round(time.perf_counter() - t0, 3)

    def _sample(self, job: CompressionJob, fit: list[int]) -> torch.Tensor | None:
        """`sampled_windows` windows sampled from the (still dense) model, each continuing the first tokens of
        a training window `fit` in turn; seeded, and the caller's random state is kept."""
        options = self.options
        if not options.sampled_windows:
            return None
        prompt = min(options.prompt_tokens, job.calib_ids.shape[1] - 1)
        prompts = job.calib_ids[[fit[i % len(fit)] for i in range(options.sampled_windows)], :prompt]
        with kept_random_state(job.device, options.seed):
            sampled = sample_windows(job.model, prompts, job.calib_ids.shape[1], options.sample_batch, job.device,
                                     job.progress)
        self.record.sampled_windows = sampled.shape[0]
        return sampled.to(job.calib_ids.dtype)

    def correct_model(self, job: CompressionJob) -> None:
        if self.teacher is None:
            raise RuntimeError("kl-refine: correct_model ran before before_walk (no teacher)")
        t0 = time.perf_counter()
        params = factor_parameters(job.model) + (norm_parameters(job.model) if self.options.norms else [])
        windows = self.windows
        self.record.train_windows, self.record.heldout_windows = len(windows.train), len(windows.held)
        if params:  # a model with dropout draws its masks from the seed, and the caller's random state is kept
            with _training(job.model, params, job.device) as dtype, kept_random_state(job.device, self.options.seed):
                self.record.train_dtype = str(dtype).removeprefix("torch.")
                self._refine(_Run(job.model, params, self.ids, self.teacher, self.options, job.device),
                             windows, job.progress)
        self.teacher = self.ids = None  # their memory goes with the run
        self.record.seconds = round(time.perf_counter() - t0, 3)

    def _refine(self, run: _Run, windows: _Windows, progress) -> None:
        """Train, then keep the best weights on the judging windows if they beat the start, else revert."""
        record, held = self.record, windows.held
        saved = copy_weights(run.params)
        before, held_before = run.kl(windows.measured), run.kl(held)
        start = held_before if held else before if windows.measured == windows.train else run.kl(windows.train)
        best, best_kl = self._train(run, windows.train, held or windows.train, start, progress)
        record.kept = best is not None
        restore_weights(run.params, best if record.kept else saved)
        after = run.kl(windows.measured) if record.kept else before
        held_after = (best_kl if held else None) if record.kept else held_before
        record.kl_before, record.kl_after = finite_or_none(before), finite_or_none(after)
        record.heldout_kl_before, record.heldout_kl_after = finite_or_none(held_before), finite_or_none(held_after)

    def _train(self, run: _Run, fit: list[int], judge: list[int], start: float, progress):
        """Adam over the factors, one epoch at a time over the training windows (a seeded order), evaluated on
        the judging windows `evals_per_epoch` times an epoch. Returns (the best weights and their KL there, or
        None and `start` when no evaluation beat `start`)."""
        options = run.options
        optimizer = torch.optim.Adam(run.params, lr=options.lr)
        per_epoch = math.ceil(len(fit) / options.batch)
        evals, total = options.evals_per_epoch, options.epochs * per_epoch
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, options.warmup))
        evaluate_after = {round(per_epoch * (i + 1) / evals) for i in range(evals)}  # the last ends the epoch
        generator = torch.Generator().manual_seed(options.seed)
        best, best_kl, stale = None, start, 0
        for epoch in range(1, options.epochs + 1):
            order = [fit[i] for i in torch.randperm(len(fit), generator=generator).tolist()]
            for step, windows in enumerate(_chunks(order, options.batch), 1):
                with torch.enable_grad():
                    optimizer.zero_grad(set_to_none=True)
                    run.step_loss(windows).backward()
                if options.clip:
                    torch.nn.utils.clip_grad_norm_(run.params, options.clip)
                optimizer.step()
                schedule.step()
                self.record.steps += 1
                if progress:
                    progress("kl-refine", self.record.steps, total)
                if step not in evaluate_after:
                    continue
                self.record.evaluations += 1
                kl = run.kl(judge)
                self.record.heldout_kls.append(finite_or_none(kl))
                if math.isfinite(kl) and (best_kl is None or not math.isfinite(best_kl) or kl < best_kl):
                    best, best_kl, stale = copy_weights(run.params), kl, 0
                else:
                    stale += 1
                if stale >= options.patience:
                    break
            self.record.epochs = epoch
            if stale >= options.patience:
                if progress:  # stopped early: the run is complete at the steps it took
                    progress("kl-refine", self.record.steps, self.record.steps)
                break
        for p in run.params:
            p.grad = None
        return best, best_kl
