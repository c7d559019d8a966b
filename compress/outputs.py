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


def is_rankwise_output(path: Path) -> bool:
    """A folder Rankwise wrote (or an empty one): a checkpoint whose config.json has a `rankwise` section,
    or a PEFT adapter folder holding nothing but the adapter's files."""
    if not path.is_dir():
        return False
    names = {p.name for p in path.iterdir()}
    if not names:
        return True
    if "adapter_config.json" in names and names <= PEFT_ADAPTER_FILES:
        return True
    try:
        return RANKWISE_KEY in json.loads((path / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: Path, what: str) -> None:
    """The folder that will hold `path` exists as a writable folder, or can be created in one."""
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise RankwiseError(f"{what} {str(path)!r} cannot be created: {str(base)!r} is not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise RankwiseError(f"{what} {str(path)!r} cannot be written: no write permission in {str(base)!r}")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_dir(out_dir: str | Path, overwrite: bool, inputs: Iterable[str | Path] = ()) -> Path:
    """Fail early (before any work): the output exists and --overwrite was not given, --overwrite would
    delete something Rankwise did not write or an input of the run, or the output cannot be written."""
    out = Path(out_dir)
    resolved = out.resolve()
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
    if out.exists() and not is_rankwise_output(out):
        raise RankwiseError(f"output directory {str(out)!r} is not a Rankwise checkpoint or adapter: --overwrite "
                            f"replaces only those; remove it yourself or choose another output folder")
    check_writable(resolved, "output folder")
    return out


def check_output_file(path: str | Path, what: str = "output file") -> Path:
    """A result file: not a folder, and its folder writable (checked before the work)."""
    p = Path(path)
    if p.is_dir():
        raise RankwiseError(f"{what} {str(p)!r} is a folder")
    check_writable(p.resolve(), what)
    return p


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


@contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool = False, inputs: Iterable[str | Path] = ()):
    """Yield a temporary sibling folder to write into; on success it replaces `out_dir` (swapped in, then the
    old one dropped, with --overwrite), on any failure it is removed: never a half-written output."""
    out = check_output_dir(out_dir, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out, "tmp"), dir=out.parent))
    try:
        yield tmp
        _finish_tree(tmp)
        if out.exists():
            _swap(tmp, out)
        else:
            os.rename(tmp, out)
        _fsync(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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
    path = Path(path)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path, "tmp"), dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync(path.parent)
