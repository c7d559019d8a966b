"""Folders and files Rankwise writes: checked before the work, written atomically, with the user's umask.

A folder (checkpoint, adapter) is written into a hidden sibling `.NAME.tmp-PID-HOST-XXXX` and renamed into
place once complete and synced to disk; a file is written the same way. `--overwrite` replaces only what
Rankwise itself writes (a checkpoint, a PEFT adapter folder, an empty folder), never an input of the run nor
a folder that holds one (or the current directory). The temporary names carry the writer's pid and host, so
the next run for the same output removes the leftovers of a process that was killed.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

from rankwise.errors import RankwiseError

RANKWISE_KEY = "rankwise"  # the checkpoint config.json section (compress.lowrank.RANKWISE_KEY)
PEFT_ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}
PEFT_BASE_DIR = "base"  # the checkpoint an exported adapter loads onto (compress.peft_export.BASE_DIR)
# What a checkpoint folder holds: transformers' weights, config and tokenizer files, our modeling file and card
CHECKPOINT_FILE = re.compile(
    r"(config\.json|generation_config\.json|README\.md|modeling_rankwise\.py|model(-\d+-of-\d+)?\.safetensors"
    r"|model\.safetensors\.index\.json|tokenizer.*|special_tokens_map\.json|added_tokens\.json"
    r"|chat_template\.(jinja|json)|vocab\.(json|txt)|merges\.txt|[^/]*\.model|[^/]*\.tiktoken)")
CHECKPOINT_DIRS = {"additional_chat_templates"}  # transformers' folder of extra chat templates
# What `compress run` writes into its output_dir; plan.json marks a folder it wrote
RUN_FILES = ("run.yaml", "plan.json", "results.csv", "results.md", "plots", "jobs")


def _tokenizer_modules(folder: Path) -> set[str]:
    """The tokenizer code modules a checkpoint's tokenizer_config.json names (copied when trusted)."""
    try:
        refs = json.loads((folder / "tokenizer_config.json").read_text()).get("auto_map") or {}
    except (OSError, ValueError, AttributeError):
        return set()
    return {r.split("--")[-1].rpartition(".")[0] + ".py"
            for v in refs.values() for r in (v if isinstance(v, list) else [v]) if isinstance(r, str)}


def foreign_entry(path: Path) -> str | None:
    """The first entry of folder `path` that Rankwise did not write, or None when it holds only a Rankwise
    output: nothing, a checkpoint (config.json with a `rankwise` section, checkpoint files only), or an
    exported PEFT adapter (the adapter's files and its base checkpoint). Names a nested checkpoint or user file
    that --overwrite would delete."""
    names = sorted(p.name for p in path.iterdir())
    if not names:
        return None
    if "adapter_config.json" in names:
        for name in names:
            if name == PEFT_BASE_DIR and (path / name).is_dir():
                inner = foreign_entry(path / name)
                if inner is not None:
                    return f"{name}/{inner}"
            elif name not in PEFT_ADAPTER_FILES:
                return name
        return None
    try:
        if RANKWISE_KEY not in json.loads((path / "config.json").read_text()):
            return "config.json"
    except (OSError, ValueError, TypeError):
        return names[0]
    code = _tokenizer_modules(path)
    for name in names:
        entry = path / name
        if entry.is_dir() and name not in CHECKPOINT_DIRS:
            return name + "/"
        if entry.is_file() and not (CHECKPOINT_FILE.fullmatch(name) or name in code):
            return name
    return None


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: Path, what: str) -> None:
    """The folder that will hold `path` exists as a writable folder, or can be created in one."""
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise RankwiseError(f"{what} {str(path)!r} cannot be created: {str(base)!r} is not a folder")
    try:  # create and remove a file: os.access says yes to root, also where nothing can be created (/proc)
        fd, probe = tempfile.mkstemp(prefix=".rankwise-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise RankwiseError(f"{what} {str(path)!r} cannot be written: no file can be created in {str(base)!r} "
                            f"({e.strerror})") from None


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_dir(out_dir: str | Path, overwrite: bool, inputs: Iterable[str | Path] = ()) -> Path:
    """Fail early (before any work): the output exists and --overwrite was not given, --overwrite would
    delete something Rankwise did not write or an input of the run, or the output cannot be written."""
    out = Path(out_dir)
    resolved = out.resolve()
    # a swap killed between its two renames left the previous output in `.NAME.old-*`: put it back first, so
    # that the rules below (--overwrite above all) apply to it
    remove_stale_temporaries(out)
    for ref in inputs:
        if ref and os.path.exists(ref) and _inside(Path(ref).resolve(), resolved):
            what = "is" if Path(ref).resolve() == resolved else "holds"
            raise RankwiseError(f"output {str(out)!r} {what} the input {str(ref)!r}: choose another output folder")
    if _inside(Path.cwd().resolve(), resolved):
        raise RankwiseError(f"output {str(out)!r} is the current folder or holds it: choose another output folder")
    if out.exists() and not out.is_dir():
        raise RankwiseError(f"output path {str(out)!r} exists and is not a directory")
    if out.exists() and not overwrite:
        raise RankwiseError(f"output directory {str(out)!r} already exists (use --overwrite to replace it)")
    foreign = foreign_entry(out) if out.exists() else None
    if foreign is not None:
        raise RankwiseError(f"output directory {str(out)!r} holds {foreign!r}, which Rankwise did not write: it is "
                            f"not a Rankwise checkpoint or adapter holding only its own files, the only folders "
                            f"--overwrite replaces; move that or choose another output folder")
    check_writable(resolved, "output folder")
    return out


def check_not_input(path: str | Path, what: str, inputs: Iterable[str | Path] = ()) -> None:
    """`path` (to be written) is no input of the run and is not inside a folder that is one."""
    target = Path(path).expanduser().resolve()
    for ref in inputs:
        if not ref or not os.path.exists(ref):
            continue
        source = Path(ref).expanduser().resolve()
        if target == source or (source.is_dir() and source in target.parents):
            where = "is" if target == source else "is inside"
            raise RankwiseError(f"{what} {str(path)!r} {where} the input {str(ref)!r}: choose another path")


def check_output_file(path: str | Path, what: str = "output file", overwrite: bool = False,
                      inputs: Iterable[str | Path] = (), output_dirs: Iterable[str | Path] = ()) -> Path:
    """A result file, checked before the work: no input of the run nor inside one, not inside a folder the
    same command writes (its swap would drop the file, or the file would replace the folder's own), not a
    folder, not an existing file unless --overwrite, and its folder writable."""
    p = Path(path)
    check_not_input(p, what, inputs)
    target = p.expanduser().resolve()
    for folder in output_dirs:
        if _inside(target, Path(folder).expanduser().resolve()):
            raise RankwiseError(f"{what} {str(p)!r} is inside the output folder {str(folder)!r} the same command "
                                f"writes: choose a path outside it")
    if p.is_dir():
        raise RankwiseError(f"{what} {str(p)!r} is a folder")
    if p.exists() and not overwrite:
        raise RankwiseError(f"{what} {str(p)!r} already exists (use --overwrite to replace it)")
    check_writable(target, what)
    return p


def check_results_folder(path: str | Path, what: str, inputs: Iterable[str | Path] = ()) -> Path:
    """A folder that result files with new names are written into (e.g. lm-eval's --output-path): not an input
    nor inside one, not a file, writable."""
    p = Path(path)
    check_not_input(p, what, inputs)
    if p.exists() and not p.is_dir():
        raise RankwiseError(f"{what} {str(p)!r} is a file, not a folder")
    check_writable(p.expanduser().resolve() / "x", what)
    return p


def check_run_output_dir(output_dir: str | Path, run_file: str | Path) -> None:
    """`compress run` writes RUN_FILES into its output_dir and replaces them on every run: an existing folder
    that holds one of them but was not written by `compress run` (no plan.json of a run) is refused, naming
    the file, so a user's results.md, results.csv or run.yaml is never replaced. The run file itself may be
    the folder's run.yaml."""
    out = Path(output_dir)
    if not out.exists():
        return
    if not out.is_dir():
        raise RankwiseError(f"output_dir {str(out)!r} is a file, not a folder")
    try:
        plan = json.loads((out / "plan.json").read_text())
        if isinstance(plan, dict) and "jobs" in plan and "run_file" in plan:
            return
    except (OSError, ValueError):
        pass
    run_file = Path(run_file).resolve()
    for name in RUN_FILES:
        entry = out / name
        if entry.exists() and not (name == "run.yaml" and entry.resolve() == run_file):
            raise RankwiseError(f"output_dir {str(out)!r} holds {name}, which `compress run` writes, and is not a "
                                f"folder `compress run` wrote (no plan.json): move {name} or choose another "
                                f"output_dir")


def _first_nonfinite_key(obj, where: str = "") -> str | None:
    if isinstance(obj, float) and not math.isfinite(obj):
        return f"{where or 'the value'} = {obj}"
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = _first_nonfinite_key(value, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def json_text(obj, what: str, **dumps_kwargs) -> str:
    """`obj` as JSON text, never with NaN / Infinity (which JSON does not have and strict readers refuse):
    a non-finite number is an error naming its key and the file, before anything is written."""
    try:
        return json.dumps(obj, allow_nan=False, **dumps_kwargs) + "\n"
    except ValueError:
        where = _first_nonfinite_key(obj) or "a value"
        raise RankwiseError(f"cannot write {what}: {where} is not a finite number, which JSON cannot hold "
                            f"(nothing was written)") from None


# ---------------------------------------------------------------- temporary names and leftovers

_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _temp_prefix(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}-{os.getpid()}-{_HOST}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove the temporaries that a killed writer of `target` (a process of this host that no longer runs)
    left beside it. A stale `.old-` folder still holding the previous output while `target` is missing
    (killed in the middle of the swap) is renamed back to `target`. Returns what was removed."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old)-(\d+)-(.+)-[A-Za-z0-9_]+$")
    removed = []
    if not target.parent.is_dir():
        return removed
    for entry in target.parent.iterdir():
        m = pattern.match(entry.name)
        if not m or m.group(3) != _HOST or _pid_alive(int(m.group(2))):
            continue
        previous = entry / target.name
        if m.group(1) == "old" and previous.exists() and not target.exists():
            os.rename(previous, target)
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


# ---------------------------------------------------------------- permissions and durability

def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _finish_tree(root: Path) -> None:
    """Give every file and folder under `root` the user's umask (mkdtemp makes folders 0700, and libraries
    that write through temporary files leave them 0600), and put it on disk, so a rename never publishes
    data still in the page cache."""
    umask = current_umask()
    for folder, _, files in os.walk(root):
        for name in files:
            os.chmod(Path(folder) / name, 0o666 & ~umask)
            _fsync(Path(folder) / name)
        os.chmod(folder, 0o777 & ~umask)
        _fsync(Path(folder))


# the storage refused the data (from OSError.strerror, or inside a library's message: safetensors' SafetensorError)
_STORAGE_FAILURES = re.compile(r"No space left on device|Disk quota exceeded|File too large|Read-only file system|"
                               r"Input/output error")


def _raise_if_storage_failed(e: BaseException, target: Path, what: str) -> None:
    """A disk that is full (or over quota, read-only, failing) while an output is written: one line naming the
    output, after its temporary copy was removed."""
    found = _STORAGE_FAILURES.search(e.strerror or "" if isinstance(e, OSError) else str(e))
    if found:
        kept = "; the existing one is unchanged" if target.exists() else ""
        raise RankwiseError(f"could not write {str(target)!r}: {found.group(0)}; {what} was written under a "
                            f"temporary name and removed, nothing half-written is left{kept}") from None


@contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool = False, inputs: Iterable[str | Path] = ()):
    """Yield a temporary sibling folder to write into; on success it replaces `out_dir` (swapped in, then the
    old one dropped, with --overwrite), on any failure it is removed: never a half-written output."""
    out = check_output_dir(out_dir, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out, "tmp"), dir=out.parent))
    try:
        yield tmp
        _finish_tree(tmp)
        if out.exists():
            if not overwrite:  # it appeared while we worked
                raise RankwiseError(f"output directory {str(out)!r} appeared while writing (use --overwrite to "
                                    f"replace it)")
            _swap(tmp, out)
        else:
            os.rename(tmp, out)
        _fsync(out.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_if_storage_failed(e, out, "the folder")
        raise


def _swap(new: Path, out: Path) -> None:
    old = Path(tempfile.mkdtemp(prefix=_temp_prefix(out, "old"), dir=out.parent))
    os.rename(out, old / out.name)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old / out.name, out)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a temporary sibling, sync it, then rename it over `path`: readers never see a half-written file,
    and a crash right after never leaves an empty one."""
    write_texts_atomic({Path(path): text})


def _write_temporary(path: Path, text: str) -> Path:
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path, "tmp"), dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        _raise_if_storage_failed(e, path, "the file")
        raise
    return Path(tmp)


def write_texts_atomic(texts: dict[Path, str]) -> None:
    """Files that belong together (a JSON and its Markdown): every one written under a temporary name and
    synced before any is renamed into place, so a full disk leaves none of them new rather than one without
    the other."""
    written: dict[Path, Path] = {}
    try:
        for path, text in texts.items():
            written[Path(path)] = _write_temporary(Path(path), text)
    except BaseException:
        for tmp in written.values():
            tmp.unlink(missing_ok=True)
        raise
    for path, tmp in written.items():
        os.replace(tmp, path)
        _fsync(path.parent)
