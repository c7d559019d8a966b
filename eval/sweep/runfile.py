"""The run file of `compress run`: plain YAML read with the line of every key, and its schema.

A run file names defaults (any `compress model` option, same names), a `calib:` and an `eval:` block, a
`sweep:` of lists whose cartesian product gives the jobs, optional `jobs:` (extra jobs, not crossed) and
`overrides:` ({match: {...}, set: {...}}: settings for the jobs that match). Errors name the file, the line and
the key.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from rankwise.errors import RankwiseError

# ---------------------------------------------------------------- YAML with line numbers

def expand_vars(s: str) -> str:
    """${VAR}, ${VAR:-default} and $VAR from the environment, then a leading ~ (also after text:/jsonl:)."""
    def var(m):
        name, default = m.group(1) or m.group(3), m.group(2)
        return os.environ.get(name) or (default if default is not None else m.group(0))
    s = re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", var, s)
    return re.sub(r"(^|^text:|^jsonl:)~(?=/|$)", lambda m: m.group(1) + os.path.expanduser("~"), s)


# A run file is a few dozen keys: a document that expands (through aliases) beyond this many nodes is refused
# before it can exhaust memory (a "billion laughs" alias bomb).
MAX_YAML_NODES = 100_000
_PLAIN_TAGS = {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"}


def load_yaml(path: Path) -> tuple[dict, dict[tuple, int]]:
    """The document (env-expanded strings) and the line of every key / list item, keyed by its path.
    Plain YAML only: no language tags, no duplicate keys, no recursive aliases, bounded alias expansion."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RankwiseError(f"cannot read run file {str(path)!r}: {getattr(e, 'strerror', None) or e}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise RankwiseError(f"{path}: nested too deeply to be a run file") from None
    except yaml.YAMLError as e:
        raise RankwiseError(f"{path}: not valid YAML: {str(e).splitlines()[0]} "
                            f"(line {getattr(getattr(e, 'problem_mark', None), 'line', -1) + 1})") from None
    lines: dict[tuple, int] = {}
    constructor = yaml.SafeLoader("")
    visited = 0

    def refuse(node, what: str) -> RankwiseError:
        return RankwiseError(f"{path} line {node.start_mark.line + 1}: {what}")

    def scalar(node):
        if not isinstance(node, yaml.ScalarNode):
            raise refuse(node, "a key must be a plain value, not a list or mapping")
        try:
            return constructor.construct_object(node, deep=True)
        except yaml.YAMLError as e:  # e.g. !!python/object: SafeLoader builds no language objects
            raise refuse(node, f"not allowed: {str(e).splitlines()[-1].strip() or e}") from None

    def build(node, where: tuple, ancestors: frozenset):
        nonlocal visited
        visited += 1
        if visited > MAX_YAML_NODES:
            raise refuse(node, f"the document expands to more than {MAX_YAML_NODES} values (an alias bomb?)")
        if id(node) in ancestors:
            raise refuse(node, "recursive alias (a value that contains itself)")
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and node.tag not in _PLAIN_TAGS:
            raise refuse(node, f"tag {node.tag!r} is not allowed (plain YAML only)")
        inner = ancestors | {id(node)}
        if isinstance(node, yaml.MappingNode):
            out = {}
            for k, v in node.value:
                key = scalar(k)
                if key in out:
                    raise refuse(k, f"duplicate key {key!r} (first on line {lines[where + (key,)]})")
                lines[where + (key,)] = k.start_mark.line + 1
                out[key] = build(v, where + (key,), inner)
            return out
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[where + (i,)] = item.start_mark.line + 1
            return [build(item, where + (i,), inner) for i, item in enumerate(node.value)]
        value = scalar(node)
        return expand_vars(value) if isinstance(value, str) else value

    try:
        data = build(root, (), frozenset()) if root is not None else {}
    except RecursionError:
        raise RankwiseError(f"{path}: nested too deeply to be a run file") from None
    if not isinstance(data, dict):
        raise RankwiseError(f"{path}: the run file must be a mapping of keys (output_dir, model, sweep, ...)")
    return data, lines


def _line_of(lines: dict[tuple, int], loc: tuple) -> int | None:
    for n in range(len(loc), 0, -1):  # the deepest part of the path that is in the file
        if tuple(loc[:n]) in lines:
            return lines[tuple(loc[:n])]
    return None


def validation_error(path: Path, lines: dict, err: dict, loc: tuple, name: str | None = None) -> RankwiseError:
    """One line naming the file, the line, the key (`name`, else the YAML path) and what is wrong."""
    line = _line_of(lines, loc)
    where = f"{path}" + (f" line {line}" if line else "")
    name = name or ".".join(str(x) for x in loc)
    if err["type"] == "extra_forbidden":
        return RankwiseError(f"{where}: unknown key {name.rsplit('.', 1)[-1]!r}"
                             + (f" (in {name})" if "." in name else ""))
    msg = err["msg"].removeprefix("Value error, ")
    return RankwiseError(f"{where}: invalid {name}: {msg}" if name else f"{where}: {msg}")  # no key: the message names it


# ---------------------------------------------------------------- schema

class CalibBlock(BaseModel):
    """`calib:` maps onto the compression options calib (source), nsamples, seqlen, seed, batch_size."""
    model_config = ConfigDict(extra="forbid")
    source: Optional[str] = None
    nsamples: Optional[int] = None
    seqlen: Optional[int] = None
    seed: Optional[int] = None
    batch_size: Optional[int] = None

    def as_options(self) -> dict:
        out = self.model_dump(exclude_none=True)
        if "source" in out:
            out["calib"] = out.pop("source")
        return out


class EvalBlock(BaseModel):
    """`eval:`: the options of `compress evaluate`. device defaults to the job's device."""
    model_config = ConfigDict(extra="forbid")
    ppl: list[str] = Field(default_factory=lambda: ["wikitext2"])
    tasks: list[str] = Field(default_factory=list)
    seqlen: int = Field(2048, ge=2)
    max_windows: Optional[int] = Field(None, ge=1)
    limit: Optional[Union[int, float]] = Field(None, gt=0, description="examples per task, or a fraction below 1")
    batch_size: Union[int, Literal["auto"]] = 1
    bos: Optional[bool] = None  # None: as the tokenizer does in normal use
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    device: Optional[str] = None

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype(cls, v):
        from rankwise.compress.loading import DTYPE_ALIASES
        return DTYPE_ALIASES.get(v, v) if isinstance(v, str) else v

    @field_validator("ppl", "tasks", mode="before")
    @classmethod
    def _comma_list(cls, v):
        if isinstance(v, str):  # "wikitext2,c4" as on the command line
            return [s.strip() for s in v.split(",") if s.strip()]
        return v


class JobEval(EvalBlock):
    """One job's evaluation settings: the `eval:` block on the job's device, trusting remote code as its
    compression does. The keyword arguments of evaluate_model."""
    device: str
    trust_remote_code: bool = False


class Override(BaseModel):
    model_config = ConfigDict(extra="forbid")
    match: dict[str, Any] = Field(default_factory=dict)
    set: dict[str, Any]


class RunFile(BaseModel):
    """The run file's own keys; every other top-level key is a compression option (checked per job)."""
    model_config = ConfigDict(extra="allow")
    output_dir: str
    calib: Union[str, CalibBlock] = Field(default_factory=CalibBlock)
    eval: EvalBlock = Field(default_factory=EvalBlock)
    sweep: dict[str, list[Any]] = Field(default_factory=dict)
    jobs: list[dict[str, Any]] = Field(default_factory=list)
    overrides: list[Override] = Field(default_factory=list)
    baseline: bool = Field(False, description="add a dense (uncompressed) job per model")
    keep_checkpoints: bool = Field(True, description="False: delete each compressed model once evaluated")
    ray: bool = Field(False, description="run the jobs as Ray tasks (as --ray)")
    ray_address: Optional[str] = Field(None, description="an existing Ray cluster (as --ray-address)")

    @field_validator("sweep", mode="before")
    @classmethod
    def _scalars_are_lists(cls, v):
        return {k: x if isinstance(x, list) else [x] for k, x in v.items()} if isinstance(v, dict) else v
