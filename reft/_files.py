"""Files on disk, written atomically and read within bounds: the one place that writes and reads this
library's folders (adapters, training checkpoints, the trainer's log, the recipe beside an adapter).

Every write is atomic: files go into a temporary folder beside the target, are flushed to disk, and
the folder is then renamed onto the target (on Linux, atomically swapped with an existing one), so
a crash at any point leaves either the previous folder or the new one, never a mix. A write never
removes what it did not write: it refuses a target folder that holds anything but this library's own
files, and what it does not rewrite of those (checkpoints, the log, the recipe, other adapters) it
keeps. Reading is bounded by what the files record: sizes and checksums are checked before a tensor
file is read, and JSON files are capped in size and depth.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load as _st_load

from ._errors import short

CONFIG_NAME = "adapter_config.json"  # an adapter's files (reft.adapter)
WEIGHTS_NAME = "adapter_model.safetensors"
TRAINING_STATE_NAME = "training_state.json"  # and a training checkpoint's (reft.checkpoint)
TRAINING_TENSORS_NAME = "training_state.safetensors"
CHECKPOINT_FOLDER = re.compile(r"checkpoint-(\d+)")
_NUMBER_LIST = re.compile(r"\[\s*(-?\d+(?:\s*,\s*-?\d+)*)\s*\]")
# What a save may find in its target folder (and keeps, when it does not rewrite it): the adapter and
# training-state files, the recipe `reft train` saves beside an adapter (reft.cli.RECIPE_NAME), the
# trainer's log (reft.train.LOG_NAME), checkpoint-{step} folders, other adapter folders, and the
# temporaries of an interrupted write (`.{name}.tmp-*`, `.{name}.old-*`).
_OWN_FILES = (CONFIG_NAME, WEIGHTS_NAME, TRAINING_STATE_NAME, TRAINING_TENSORS_NAME, "recipe.yaml", "log.jsonl")
_TEMPORARY = re.compile(r"\..+\.(tmp|old)-.*")
_OWN_DEPTH = 3  # folders nested deeper than this in a target are not this library's
_MAX_JSON_BYTES = 64 * 2**20  # adapter_config.json is a few KB; training_state.json grows with the log
_MAX_JSON_DEPTH = 32  # the deepest file this library writes nests 6 levels

PathLike = str | os.PathLike


@contextmanager
def atomic_folder(path: PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; on success it replaces `path` in one rename.

    Before anything is written, `save_target` refuses a `path` whose folder holds entries this library
    did not write; of its own entries, those the new folder does not rewrite are kept.
    """
    target = save_target(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700: a saved folder has the user's usual permissions
        yield tmp
        _fsync(tmp)
        _replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(target.parent)


def save_target(path: PathLike) -> Path:
    """The folder a save to `path` replaces: `path`, or the folder a symlink at `path` points to.

    Raises a ValueError, before anything is written, when that is the working folder or one above it,
    a file, or a folder holding entries this library did not write (`_foreign_entries`).
    """
    given = Path(path)
    real = Path(os.path.realpath(given))
    cwd = Path(os.path.realpath(os.getcwd()))
    if real == cwd or real in cwd.parents:
        where = "the working folder" if real == cwd else "a folder above the working folder"
        raise ValueError(
            f"save path {str(path)!r} is {where} ({real}): a save replaces its folder as a whole; "
            f"give a sub-folder, e.g. {str(given / 'adapter')!r}"
        )
    target = given.resolve() if given.is_symlink() else given  # replace the folder a link points to, keep the link
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target}: exists and is not a folder; give a folder path to save into")
    if target.is_dir():
        _refuse_foreign(target)
    return target


def _refuse_foreign(target: Path) -> None:
    foreign = _foreign_entries(target)
    if foreign:
        raise ValueError(
            f"{target}: holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} this library did not write "
            f"({short(foreign)}); a save replaces the folder and would remove them: save into a new or empty "
            "folder, or move them away"
        )


def _foreign_entries(folder: Path, depth: int = 0) -> list[str]:
    """The entries of `folder` that are not this library's (paths relative to it, folders ending in /).

    This library's: the files named in `_OWN_FILES`, the temporaries of an interrupted write, and
    folders holding only such files that are checkpoints (`checkpoint-{step}`) or adapters (with an
    `adapter_config.json`). A symlink is never this library's: it writes none.
    """
    foreign = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if entry.is_symlink():
            foreign.append(name)
        elif _TEMPORARY.fullmatch(name):
            continue
        elif entry.is_file():
            if name not in _OWN_FILES:
                foreign.append(name)
        elif entry.is_dir() and depth + 1 < _OWN_DEPTH and (CHECKPOINT_FOLDER.fullmatch(name) or (entry / CONFIG_NAME).is_file()):
            foreign += [f"{name}/{inner}" for inner in _foreign_entries(entry, depth + 1)]
        else:
            foreign.append(name + "/" if entry.is_dir() else name)
    return foreign


def _umask() -> int:
    """The process's umask: from /proc where it says, so that it is read without being changed."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_dead_temporaries(target: Path) -> None:
    """Delete `.{name}.tmp-{pid}-*` folders beside `target` whose process is gone (a save killed
    before its rename). Those of live processes, and `.old-*` folders (which may hold the only copy
    of a previous version), are left alone."""
    if os.name != "posix":
        return
    prefix = f".{target.name}.tmp-"
    for folder in target.parent.glob(f"{glob.escape(prefix)}*"):
        pid = folder.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, as another user's
        return True
    return True


def _replace_folder(tmp: Path, target: Path) -> None:
    """Put complete folder `tmp` at `target`: a rename, or an atomic swap with an existing target after
    this library's entries of the target that `tmp` lacks are hard-linked into `tmp` (kept, not removed).

    Another process may create or replace `target` between the checks and the rename (two saves of the
    same new folder): the rename then fails with ENOTEMPTY and the swap is made instead.
    """
    for _ in range(10):
        if not os.path.lexists(target):
            try:
                os.rename(tmp, target)
                return
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                continue  # created meanwhile by another process: swap with it
        _refuse_foreign(target)
        _carry_over(target, tmp)
        if _exchange(tmp, target):
            shutil.rmtree(tmp)  # now the previous version: what it held that is kept is linked into the new one
            return
        # no atomic swap here: the previous version sits at `.{name}.old-*` for two renames
        old = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))
        try:
            os.rename(target, old)
        except FileNotFoundError:
            continue  # moved away meanwhile by another process
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
        shutil.rmtree(old)
        return
    raise OSError(errno.EBUSY, "other processes kept replacing this folder while it was saved", str(target))


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link (copy, where links are not supported) into `new` every entry of `old` that `new` lacks,
    except the temporary folders of writes in progress or interrupted."""
    for entry in old.iterdir():
        dest = new / entry.name
        if os.path.lexists(dest) or (_TEMPORARY.fullmatch(entry.name) and ".tmp-" in entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, dest, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, dest)


def _link_or_copy(src: PathLike, dst: PathLike) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux `renameat2(RENAME_EXCHANGE)`); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def write_bytes(file: Path, data: bytes) -> None:
    """Write `file` and flush it to disk: for files inside an `atomic_folder`, which makes them atomic."""
    with open(file, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_file(path: PathLike, data: bytes) -> None:
    """Write file `path` atomically: a temporary file beside it (`.{name}.tmp-*`), flushed, then renamed
    onto it; its permissions follow the umask, as those of a file the user creates."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_line(path: Path, line: str) -> None:
    """Append `line` to `path` whole or not at all: a write cut short (a full disk) is truncated away,
    and a line cut short before (a crash mid-write) is dropped first, so the file holds whole lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = line.encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        if end:
            size = min(end, 1 << 16)
            os.lseek(fd, end - size, os.SEEK_SET)
            tail = os.read(fd, size)
            if not tail.endswith(b"\n"):
                cut = tail.rfind(b"\n")
                if cut >= 0 or size == end:
                    end = end - size + cut + 1
                    os.ftruncate(fd, end)
                else:
                    data = b"\n" + data  # a cut line longer than we look back: leave it on its own line
        os.lseek(fd, end, os.SEEK_SET)
        written = 0
        try:
            while written < len(data):
                written += os.write(fd, data[written:])
        except OSError as e:
            try:
                os.ftruncate(fd, end)
            except OSError:
                pass
            raise OSError(e.errno, f"{e.strerror}; the record was not logged, the log keeps its whole lines", str(path)) from None
    finally:
        os.close(fd)


def _fsync(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some platforms and filesystems cannot fsync a folder
    finally:
        os.close(fd)


def json_bytes(value: dict) -> bytes:
    text = json.dumps(value, indent=2)
    text = _NUMBER_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m[1].split(",")) + "]", text)
    return (text + "\n").encode("utf-8")  # indented, with shapes and other number lists on one line


def file_record(data: bytes) -> dict:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def read_json(folder: Path, name: str, what: str) -> dict:
    file = folder / name
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder {str(folder)!r}: expected {what} with {name}")
    if not os.path.lexists(file):
        present = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise FileNotFoundError(f"{file}: missing; expected {what} here (the folder holds {short(present)})")
    data = _read_regular_file(file, None, _MAX_JSON_BYTES)  # not a FIFO, a device, nor a huge file
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e}); the file is truncated or corrupt") from None
    except RecursionError:
        value = None  # nested past Python's own limit: reported as too deep below
    depth = _json_depth(value) if value is not None else _MAX_JSON_DEPTH + 1
    if depth > _MAX_JSON_DEPTH:
        raise ValueError(f"{file}: JSON nested deeper than {_MAX_JSON_DEPTH} levels; not a file this library wrote")
    if not isinstance(value, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def _json_depth(value: Any) -> int:
    """How deeply lists and objects nest in a decoded JSON value (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if depth <= _MAX_JSON_DEPTH:  # deeper is already too deep: stop walking
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _read_regular_file(file: Path, size: int | None, limit: int | None = None) -> bytes:
    """The bytes of regular file `file` (through symlinks), read only when its size on disk is `size`
    (when given) and at most `limit`: never more bytes than were asked for, from a FIFO or a device."""
    try:
        info = file.stat()
    except OSError as e:
        raise FileNotFoundError(f"{file}: cannot read it ({e.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{file}: not a regular file; an adapter holds regular files only")
    if size is not None and info.st_size != size:
        raise ValueError(
            f"{file}: has {info.st_size} bytes, but the config records {size} bytes: the file is truncated, "
            "corrupt, replaced or was changed after saving"
        )
    if limit is not None and info.st_size > limit:
        raise ValueError(f"{file}: {info.st_size} bytes, more than the {limit} bytes such a file may have")
    want = info.st_size
    with open(file, "rb") as f:
        data = f.read(want + 1)  # one more: a file that grew since stat() is not read whole
    if len(data) != want:
        raise ValueError(f"{file}: changed size while being read ({want} bytes, then {len(data)}+)")
    return data


def read_tensors(folder: Path, name: str, record: dict) -> dict[str, torch.Tensor]:
    """The tensors of `folder/name`, read only after its size matches the one recorded in `record`
    (`{"files": {name: {"bytes", "sha256"}}}`), then checked against the recorded SHA-256."""
    file = folder / name
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing; {folder} is incomplete")
    files = record.get("files")
    expected = files.get(name) if isinstance(files, dict) else None
    if not isinstance(expected, dict):
        raise ValueError(
            f"{file}: its config records no size and checksum (\"files\": {{{name!r}: {{\"bytes\", \"sha256\"}}}}); "
            "this library writes them with every file and reads no tensor file without them"
        )
    size, digest = expected.get("bytes"), expected.get("sha256")
    if not (isinstance(size, int) and not isinstance(size, bool) and size >= 0 and isinstance(digest, str)):
        raise ValueError(f"{file}: malformed size and checksum record {short(expected)}; expected {{\"bytes\": int, \"sha256\": str}}")
    data = _read_regular_file(file, size)
    found = file_record(data)
    if found != {"bytes": size, "sha256": digest}:
        raise ValueError(
            f"{file}: has {found['bytes']} bytes with sha256 {found['sha256'][:16]}..., but the config records "
            f"{size} bytes with sha256 {digest[:16]}...: the file is truncated, corrupt or was changed after saving"
        )
    try:
        return _st_load(data)
    except Exception as e:  # safetensors raises its own error type for every malformed file
        raise ValueError(f"{file}: not a valid safetensors file ({e}); it is truncated or corrupt") from None
