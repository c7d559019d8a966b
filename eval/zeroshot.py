"""Zero-shot tasks through lm-eval on the model already in memory (no second load, no hand-written scorer).

A task spec is an lm-eval task name (`arc_easy`, `hellaswag`: data from the hub), the name of a task YAML
in configs/tasks/ (`austen_mc`), or a path to a task YAML anywhere. Local YAMLs may point `data_files` at
files relative to themselves; we resolve those against the YAML's folder before lm-eval sees the config,
so a task works from any working directory and offline (the `json` builder needs no network).

Indexing all of lm-eval's ~15k built-in task YAMLs takes tens of seconds, so it happens only when a spec is
not a local task.
"""
from __future__ import annotations

import logging
import os
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rankwise.errors import RankwiseError, first_line

if TYPE_CHECKING:  # the record's module imports torch; checking task names must not
    from rankwise.eval.records import TaskResult

LOCAL_TASK_DIR = Path(__file__).resolve().parents[1] / "configs" / "tasks"
LOCAL_HELP = ("use a local task instead: a YAML with `dataset_path: json` and `dataset_kwargs: {data_files: "
              "...}` (see configs/tasks/austen_mc.yaml), passed as --tasks PATH.yaml")


def _quiet_lm_eval():
    # lm-eval logs every request batch and task at INFO/WARNING; our CLI shows its own progress and messages
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


# the sections of lm-eval's result dict that are keyed by task: merged over the specs of one run
LM_EVAL_TASK_SECTIONS = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot",
                         "higher_is_better", "n-samples")


@dataclass
class TaskRun:
    """What the task specs of one evaluation gave: Rankwise's flat per-task metrics, lm-eval's own result dict
    (its per-task sections merged over specs, the rest from the last spec) and, when asked, the samples."""
    metrics: dict[str, TaskResult] = field(default_factory=dict)
    lm_eval: dict = field(default_factory=lambda: {k: {} for k in LM_EVAL_TASK_SECTIONS})
    samples: dict = field(default_factory=dict)

    def add(self, out: dict) -> None:
        for key, value in out.items():
            if key == "samples":
                self.samples.update(value)
            elif key in LM_EVAL_TASK_SECTIONS and isinstance(value, dict):
                self.lm_eval.setdefault(key, {}).update(value)
            else:
                self.lm_eval[key] = value


def _quiet_git_hash():
    """lm-eval's git_hash without the "fatal: not a git repository" that `git describe` prints to the
    terminal outside a repository (its stderr is not captured)."""
    from lm_eval.loggers.utils import get_commit_from_path
    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return get_commit_from_path(os.getcwd())


@contextmanager
def _git_quiet():
    import lm_eval.evaluator as evaluator
    loud = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = _quiet_git_hash
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = loud


def _absolute_data_files(data_files, base: Path, task: str):
    """data_files (str | list | {split: str | list}) with relative paths made relative to `base`."""
    if isinstance(data_files, dict):
        return {k: _absolute_data_files(v, base, task) for k, v in data_files.items()}
    if isinstance(data_files, (list, tuple)):
        return [_absolute_data_files(v, base, task) for v in data_files]
    path = str(data_files)
    if "://" in path or os.path.isabs(path):
        resolved = path
    else:
        resolved = str((base / path).resolve())
    if "://" not in resolved and not any(c in resolved for c in "*?[") and not os.path.exists(resolved):
        raise RankwiseError(f"task {task!r}: data file {resolved!r} does not exist")
    return resolved


def load_local_task_config(yaml_path: str | Path) -> dict:
    """A task YAML as lm-eval's config dict, with its data files made absolute."""
    from lm_eval.tasks._yaml_loader import load_yaml
    path = Path(yaml_path)
    if not path.is_file():
        raise RankwiseError(f"task file {str(path)!r} does not exist")
    try:
        cfg = load_yaml(path)
    except Exception as e:
        raise RankwiseError(f"cannot read task file {str(path)!r}: {first_line(e, 300)}") from None
    if "task" not in cfg:
        raise RankwiseError(f"task file {str(path)!r} has no `task:` name (groups are not supported here)")
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    if "data_files" in kwargs:
        kwargs["data_files"] = _absolute_data_files(kwargs["data_files"], path.resolve().parent, cfg["task"])
        cfg["dataset_kwargs"] = kwargs
    return cfg


def _local_yamls(include_dir: Path) -> dict[str, Path]:
    """task name -> YAML path for the local include folder (a cheap scan; only files with a `task:`)."""
    import yaml
    out = {}
    for p in sorted(include_dir.glob("*.y*ml")) if include_dir.is_dir() else []:
        try:
            with open(p, encoding="utf-8") as f:
                cfg = yaml.load(f, Loader=yaml.BaseLoader)  # no !function resolution just to read the name
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(cfg, dict) and isinstance(cfg.get("task"), str):
            out[cfg["task"]] = p
    return out


def is_task_path(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) or os.sep in spec


def names_in_no_task_file(names: list[str]) -> list[str]:
    """The names that occur in none of lm-eval's task files (YAML and Python, read as bytes: about a second,
    against tens of seconds for lm-eval's index, and lm-eval is not imported). Such a name is no task; a name
    that occurs somewhere is left to the index to decide."""
    import importlib.util
    spec = importlib.util.find_spec("lm_eval")
    roots = [Path(p) / "tasks" for p in (spec.submodule_search_locations or [])] if spec else []
    missing = {n: n.encode() for n in names}
    for root in roots:
        for path in root.rglob("*"):
            if not missing:
                return []
            if path.suffix in (".yaml", ".yml", ".py") and path.is_file():
                data = path.read_bytes()
                missing = {n: b for n, b in missing.items() if b not in data}
    return [n for n in names if n in missing]


class TaskSet:
    """Resolves task specs to lm-eval Task objects, loading each task's data with a clear error."""

    def __init__(self, include_dir: Path = LOCAL_TASK_DIR, builtin: bool = True):
        """include_dir: local task YAMLs; builtin: also lm-eval's own ~15k tasks (indexed when first needed)."""
        self.include_dir = include_dir
        self.builtin = builtin
        self._local_names = _local_yamls(include_dir)
        self._full = None

    def source(self, spec: str) -> str:
        """Where a task spec's YAML is ("lm-eval" for lm-eval's own tasks)."""
        if is_task_path(spec):
            return str(Path(spec).resolve())
        return str(self._local_names[spec].resolve()) if spec in self._local_names else "lm-eval"

    def task_manager(self, full: bool = False):
        from lm_eval.tasks import TaskManager
        if full:
            if self._full is None:
                self._full = TaskManager(include_path=str(self.include_dir), include_defaults=self.builtin)
            return self._full
        return TaskManager(include_path=str(self.include_dir), include_defaults=False)

    def check_names(self, specs: list[str], index: bool = False) -> list[str]:
        """Every spec is a task YAML path, a local task or an lm-eval task name: names found in no lm-eval task
        file fail at once (lm-eval not imported); with `index`, the others are looked up in lm-eval's index.
        Returns the lm-eval task names (their data comes from the hub)."""
        hub = []
        for spec in specs:
            if is_task_path(spec):
                load_local_task_config(spec)
            elif spec not in self._local_names:
                hub.append(spec)
        unknown = names_in_no_task_file(hub)
        if hub and index and not unknown:
            known = set(self.task_manager(full=True).all_tasks)
            unknown = [spec for spec in hub if spec not in known]
        if unknown:
            raise RankwiseError(f"unknown task {unknown[0]!r}: not an lm-eval task name, not a task in "
                                f"{self.include_dir}, and not a path to a task YAML")
        return hub

    def prepare(self, specs: list[str]) -> list:
        """[(spec, {name: Task}, TaskManager)] with every task's data loaded: unknown tasks and unreachable
        data fail here, before the model is loaded."""
        self.check_names(specs, index=True)
        return [(spec, *self.load(spec)) for spec in specs]

    def load(self, spec: str):
        """(name, Task) for one spec; data loading errors become one line naming the task."""
        if is_task_path(spec):
            cfg, full = load_local_task_config(spec), False
        elif spec in self._local_names:
            cfg, full = load_local_task_config(self._local_names[spec]), False
        else:
            cfg, full = spec, True
        tm = self.task_manager(full)
        try:
            loaded = tm.load([cfg])["tasks"]
        except RankwiseError:
            raise
        except Exception as e:
            name = cfg["task"] if isinstance(cfg, dict) else spec
            where = cfg.get("dataset_path") if isinstance(cfg, dict) else None
            offline = " (HF_DATASETS_OFFLINE is set)" if os.environ.get("HF_DATASETS_OFFLINE") in ("1", "true") \
                else ""
            raise RankwiseError(
                f"task {name!r}: could not load its data{f' ({where})' if where else ''}{offline}: "
                f"{first_line(e, 300)}. Offline? {LOCAL_HELP}") from None
        return loaded, tm


def _flatten_metrics(task_result: dict) -> dict:
    """lm-eval's {"acc,none": x, "acc_stderr,none": s, "alias": ...} -> {"acc": x, "acc_stderr": s}."""
    out = {}
    for key, value in task_result.items():
        if key in ("alias", "sample_len") or not isinstance(value, (int, float)):
            if isinstance(value, str) and value == "N/A":
                out[key.split(",")[0]] = None
            continue
        metric, _, filt = key.partition(",")
        out[metric if filt in ("", "none") else f"{metric}[{filt}]"] = float(value)
    return out


def _counting_hflm():
    """HFLM that counts the requests it answers and the seconds spent in the model (for requests/s)."""
    from lm_eval.models.huggingface import HFLM

    class CountingHFLM(HFLM):
        requests = 0
        model_seconds = 0.0

        def _timed(self, fn, requests, **kw):
            t0 = time.perf_counter()
            out = fn(requests, **kw)
            self.model_seconds += time.perf_counter() - t0
            self.requests += len(requests)
            return out

        def loglikelihood(self, requests, disable_tqdm: bool = True):
            return self._timed(super().loglikelihood, requests, disable_tqdm=disable_tqdm)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = True):
            return self._timed(super().loglikelihood_rolling, requests, disable_tqdm=disable_tqdm)

        def generate_until(self, requests, disable_tqdm: bool = True):
            return self._timed(super().generate_until, requests, disable_tqdm=disable_tqdm)

    return CountingHFLM


def _seeds(seed: int | None) -> dict:
    """lm-eval's --seed N: the same seed for python, numpy, torch and the few-shot sampler."""
    if seed is None:
        return {}
    return {"random_seed": seed, "numpy_random_seed": seed, "torch_random_seed": seed,
            "fewshot_random_seed": seed}


def run_tasks(model, tokenizer, prepared: list, limit: int | float | None = None, batch_size: int | str = 1,
              bos: bool = False, num_fewshot: int | None = None, bootstrap_iters: int = 1000,
              task_set: TaskSet | None = None, progress=None, seed: int | None = None,
              log_samples: bool = False) -> TaskRun:
    """One simple_evaluate per spec. TaskRun.metrics: task -> TaskResult (metrics, their stderr, samples,
    requests, requests per second, seconds, source: the YAML's path or "lm-eval"). `limit` below 1
    is a fraction of each task's examples (as lm-eval's). `prepared` is TaskSet.prepare(specs) (or a list of
    specs, prepared here)."""
    import lm_eval

    from rankwise.eval.records import TaskResult
    _quiet_lm_eval()
    task_set = task_set or TaskSet()
    if all(isinstance(s, str) for s in prepared):
        prepared = task_set.prepare(prepared)
    lm = _counting_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_batch_size=64,
                          add_bos_token=bos or None)
    run = TaskRun()
    for i, (spec, tasks, tm) in enumerate(prepared):
        if progress:
            progress("lm-eval tasks", i, len(prepared))
        before_req, before_s = lm.requests, lm.model_seconds
        t0 = time.perf_counter()
        with _git_quiet():
            out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks.values()), task_manager=tm, limit=limit,
                                          num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters,
                                          log_samples=log_samples, batch_size=batch_size, **_seeds(seed))
        seconds = time.perf_counter() - t0
        n_req, model_s = lm.requests - before_req, lm.model_seconds - before_s
        for name, res in out["results"].items():
            n = out["n-samples"][name] if name in out.get("n-samples", {}) else {}  # lm-eval's own dict
            run.metrics[name] = TaskResult.model_validate({
                **_flatten_metrics(res), "samples": n["effective"] if "effective" in n else None,
                "requests": n_req, "seconds": round(seconds, 3),
                "requests_per_second": round(n_req / max(model_s, 1e-9), 2), "source": task_set.source(spec)})
        run.add(out)
        if progress:
            progress("lm-eval tasks", i + 1, len(prepared))
    return run
