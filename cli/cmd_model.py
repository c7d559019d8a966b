"""`compress model`: compress a checkpoint and write a Rankwise checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.table import Table

from rankwise.errors import RankwiseError
from rankwise.compress.outputs import check_output_file, json_text, write_text_atomic

from rankwise.cli.common import (Bars, app, calib_batch_option, calib_source_option, console, eora_rank_option,
                                 out_console, quiet_option, ratio_table, use_hub_cache_when_offline,
                                 user_errors)
from rankwise.compress.describe import pipeline_name, ratio_warning

if TYPE_CHECKING:  # the CLI's import stays free of torch until a command runs
    from rankwise.compress.metadata import CompressionResult


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the option came from the command line or the environment, not from its default (typer keeps
    its own copy of click's ParameterSource enum, so it is compared by name)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name != "DEFAULT"


def summary_table(meta: CompressionResult) -> Table:
    """The end-of-run table: parameter counts and ratios, time and memory of the run."""
    t = ratio_table(meta, f"Rankwise: {pipeline_name(meta)} on {meta.source_model}")
    mem = f"host {meta.host_peak_gib:.2f} GiB" + (f", GPU {meta.gpu_peak_gib:.2f} GiB"
                                                   if meta.gpu_peak_gib is not None else "")
    dense = meta.kept_dense
    t.caption = (f"factorized {sum(m.rank is not None for m in meta.modules.values())} Linears, kept dense {len(dense)}"
                 + (f" ({', '.join(dense[:4])}{', ...' if len(dense) > 4 else ''})" if dense else "") + "; "
                 f"wall {meta.wall_seconds:.1f} s; peak memory {mem}")
    return t


def parse_stage(spec: str) -> dict:
    """`NAME` or `NAME:key=value,key=value` -> {"stage": NAME, "options": {...}}, values read as YAML."""
    import yaml
    name, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise RankwiseError(f"--stage {spec!r}: options are key=value, separated by commas")
        options[key.strip()] = yaml.safe_load(value)
    return {"stage": name.strip(), "options": options}


def _recipe_file(path: Path, plugins: list[str]) -> dict:
    """--recipe FILE: a YAML list of stages, or a mapping with `recipe:` (and `plugins:`)."""
    import yaml
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise RankwiseError(f"--recipe {str(path)!r}: {str(e).splitlines()[0]}") from None
    if isinstance(data, dict) and set(data) <= {"recipe", "plugins"}:
        return {"recipe": data.get("recipe") or [], "plugins": [*plugins, *(data.get("plugins") or [])]}
    if not isinstance(data, list):
        raise RankwiseError(f"--recipe {str(path)!r}: expected a list of {{stage, options}} or a mapping with "
                            f"recipe: (and plugins:)")
    return {"recipe": data}


@app.command("model")
@user_errors
def model_cmd(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Hub id (e.g. HuggingFaceTB/SmolLM2-135M) or local checkpoint folder."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder for the compressed checkpoint."),
    preset: str = typer.Option("none", help="A recommended pipeline: best (the combination that measures best in "
                                            "bench/README.md, section Quality: svd-llm, loss-aware ranks, "
                                            "end-to-end KL refinement) or fast (svd-llm, loss-aware ranks, block "
                                            "refinement: less time and memory). Options given "
                                            "explicitly beside it override its values."),
    method: str = typer.Option("svd-llm", "--method", "-m",
                               help="Factorization: svd (plain), asvd (activation-scaled), svd-llm (whitened), fwsvd "
                                    "(Fisher-weighted: one extra forward+backward pass over the calibration set, one "
                                    "sequence at a time with gradient checkpointing; memory ~ the model's weights + "
                                    "one sequence's activations and logits)."),
    ratio: Optional[float] = typer.Option(None, "--ratio", "-r", help="Fraction of the targeted Linear parameters "
                                          "REMOVED, in (0, 1): 0.2 keeps 80%. Or --size-ratio."),
    size_ratio: Optional[float] = typer.Option(None, "--size-ratio", help="Instead of --ratio, a byte budget: the "
                                               "stored bytes of the targeted Linears KEPT, as a fraction of the same "
                                               "Linears at 16 bits per weight, in (0, 1); every rank is priced at "
                                               "its stored bytes (--factor-dtype, scales included)."),
    ranks: str = typer.Option("uniform", help="Rank allocation: uniform (same fraction of every matrix) or welore "
                                              "(one global threshold on normalised spectra) or loss-aware "
                                              "(components kept by predicted output error per parameter); welore and "
                                              "loss-aware make an extra statistics pass over the dense model."),
    compensate: str = typer.Option("none", help="Residual path after truncation: none or eora (its parameters "
                                                "count inside --ratio)."),
    eora_rank: int = eora_rank_option("EoRA: rank of the residual path of every factorized Linear."),
    refit: bool = typer.Option(False, help="Re-solve B in closed form to match the dense model's layer outputs "
                                           "(keeps a second, dense stream of activations: 2x activation memory)."),
    refit_damp: float = typer.Option(1.0, help="Refit / EoRA: ridge damping of the least squares, relative to the mean input energy; shrinks the fit toward the plain truncation (1.0 chosen on held-out Austen text)."),
    refine: bool = typer.Option(False, help="Block refinement: train each block's low-rank factors (Adam, MSE, "
                                            "cosine schedule, seeded) so the block's outputs match the dense "
                                            "block's on the dense stream of activations (2x activation memory)."),
    refine_steps: int = typer.Option(32, help="Block refinement: optimizer steps per block, one calibration batch each."),
    refine_lr: float = typer.Option(1e-3, help="Block refinement: Adam's peak learning rate."),
    fisher_sketch: int = typer.Option(0, help="Loss-aware ranks: price each truncation error by a Gaussian sketch "
                                      "of this many rows of the Linear's whole output Fisher matrix instead of its "
                                      "diagonal (256: about the full matrix's allocation; rows x outputs floats "
                                      "per Linear)."),
    kl_refine: bool = typer.Option(False, help="End-to-end refinement after the block walk: train every low-rank "
                                               "factor so the model's next-token distribution matches the dense "
                                               "model's (top-k KL on the calibration windows and 64 windows "
                                               "sampled from the dense model; held-out calibration windows stop "
                                               "and judge it)."),
    calib: str = calib_source_option(),
    nsamples: int = typer.Option(256, help="Number of random calibration windows."),
    seqlen: int = typer.Option(2048, help="Tokens per calibration window (at most the model's context)."),
    seed: int = typer.Option(0, help="Seed of the window sampling (same seed, same windows)."),
    bos: Optional[bool] = typer.Option(None, "--bos/--no-bos", help="Start every calibration window with BOS "
                                       "(default: as the model's tokenizer does in normal use)."),
    calib_chat: Optional[str] = typer.Option(None, help="Conversations JSONL ({\"messages\": [{\"role\", "
                                             "\"content\"}, ...]} a line) rendered with the chat template and mixed "
                                             "into the calibration (default: a small set built from Austen's novels)."),
    chat_fraction: Optional[float] = typer.Option(None, help="Share of calibration windows from the conversations "
                                                  "(default: 0.25 when the tokenizer has a chat template, else 0)."),
    batch_size: int = calib_batch_option(),
    alpha: float = typer.Option(0.5, help="ASVD: exponent on mean |x| in the channel scaling."),
    rank_multiple: int = typer.Option(1, help="Round every rank down to a multiple of this (GPU-friendly shapes)."),
    keep_dense: str = typer.Option("", help="Comma-separated Linear names or suffixes to leave dense (e.g. k_proj,v_proj "
                                            "where factorized layers run slower); the others give up more."),
    dtype: str = typer.Option("auto", help="Weights dtype: auto (checkpoint's on GPU, fp32 on CPU), fp32, fp16, bf16."),
    factor_dtype: str = typer.Option("auto", help="How the factors are stored: auto (the model's dtype), bf16, fp16, "
                                     "fp32, int8 (one scale per output channel; CPU matmuls stay int8) or int4 "
                                     "(one scale per --int4-group inputs, ranks rounded to the group)."),
    int4_group: int = typer.Option(32, help="int4 factors: inputs per scale (it must divide the ranks)."),
    device: str = typer.Option("auto", help="Where blocks are calibrated and factorized: auto, cpu, cuda, cuda:N."),
    offload: bool = typer.Option(False, help="Keep calibration activations and statistics on CPU (saves GPU memory)."),
    stream_weights: bool = typer.Option(False, help="Read each decoder block from the checkpoint's safetensors files "
                                                    "only when it is compressed (the next one in the background): "
                                                    "host memory holds the compressed blocks and two dense ones, not "
                                                    "the dense model. Dense safetensors checkpoints whose tensor "
                                                    "names are the model's; not with --method fwsvd."),
    trust_remote_code: bool = typer.Option(False, help="Allow the model's own modeling code from the hub."),
    overwrite: bool = typer.Option(False, help="Replace the output folder if it exists."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the run's summary (the checkpoint's "
                                                                  "metadata, time, memory) as JSON here."),
    plugin: Optional[list[str]] = typer.Option(None, "--plugin", help="A module of your own (importable name or "
                                               ".py path) that registers stages; repeatable. Installed packages' "
                                               "`rankwise.stages` entry points load by themselves."),
    stage: Optional[list[str]] = typer.Option(None, "--stage", help="Add a stage to the recipe, after the ones "
                                              "the options above give: NAME or NAME:key=value,key=value (values "
                                              "read as YAML); repeatable, in order."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="A YAML file holding the recipe: a list of "
                                          "{stage, options} (or a mapping with `recipe:` and `plugins:`); "
                                          "instead of --method, --ranks, --refit, --compensate, --refine."),
    quiet: bool = quiet_option(),
):
    """Compress a causal LM: calibrate on real text, factorize every decoder Linear, write a checkpoint."""
    from rankwise.compress.config import CompressConfig
    from rankwise.compress.job import run_compress
    options = dict(model=model, preset=preset, method=method, ratio=ratio, size_ratio=size_ratio, ranks=ranks,
                   compensate=compensate, eora_rank=eora_rank, refit=refit, refit_damp=refit_damp, refine=refine,
                   refine_steps=refine_steps, refine_lr=refine_lr, kl_refine=kl_refine,
                   fisher_sketch=fisher_sketch, calib=calib, nsamples=nsamples, seqlen=seqlen,
                   seed=seed, bos=bos, calib_chat=calib_chat, chat_fraction=chat_fraction, batch_size=batch_size,
                   alpha=alpha, rank_multiple=rank_multiple, dtype=dtype, factor_dtype=factor_dtype,
                   int4_group=int4_group, device=device, offload=offload, stream_weights=stream_weights,
                   trust_remote_code=trust_remote_code,
                   keep_dense=[k.strip() for k in keep_dense.split(",") if k.strip()])
    if preset != "none":  # the preset fills in what the command line left at its default
        options = {k: v for k, v in options.items() if k in ("model", "preset") or _given(ctx, k)}
    options["plugins"] = list(plugin or [])
    if recipe is not None:
        options.update(_recipe_file(recipe, options["plugins"]))
    cfg = CompressConfig(**options)
    if stage:
        cfg = cfg.with_stages([parse_stage(spec) for spec in stage])
    use_hub_cache_when_offline([model], [calib])  # the options are valid: now the hub, before anything loads
    if json_path is not None:  # before the work, not after it; --overwrite never reaches an input
        from rankwise.compress.job import job_inputs
        check_output_file(json_path, "--json", overwrite, job_inputs(cfg), output_dirs=[output])
    with Bars(quiet) as bars:
        meta = run_compress(cfg, output, overwrite, bars)
    out_console.print(summary_table(meta))
    warning = ratio_warning(meta)
    if warning:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json_path, json_text(meta.to_json(), f"--json {json_path}", indent=2, sort_keys=True))
    out_console.print(f"wrote {output}" + (f" and {json_path}" if json_path else ""))


