"""What ssl-bench writes to disk and reads back, in formats that can neither run code nor pass damage off as data.

Everything read back from the feature cache, the results store and a results folder is plain data: JSON,
SQLite, and numpy arrays of numeric dtypes loaded with ``allow_pickle=False``. Each file carries what is
needed to verify it (a CRC-32 of its content), so a truncated, emptied or altered file is ``Damaged`` --
recomputed or refused by its reader, never used.

- ``save_value`` / ``load_value``: a nested value (dicts, lists, tuples, JSON scalars, numpy arrays and CPU
  torch tensors of numeric or bool dtype) as one ``.npz``: the arrays as members, the structure as a JSON
  skeleton member, and a checksum member over both. Written atomically. Tuples come back as tuples, numpy
  scalars as Python numbers, tensors as tensors; anything else is refused when saving.
- ``write_checked_json`` / ``read_checked_json``: a JSON document with its own checksum.
- ``regular_file``: a path that is a regular file (a FIFO or a device would block a reader forever).

CRC-32, not a cryptographic hash: the checks catch accidents (a full disk, a killed writer, a bad
copy), not someone who can write the cache; what keeps such a person from running code is that nothing
read back can hold code.
"""

from __future__ import annotations

import errno
import io
import json
import os
import stat
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError

# dtype kinds kept: bool, signed and unsigned integers, floats, complex (never objects, strings, records)
PLAIN_KINDS = "biufc"
_SKELETON, _CHECKSUM = "__skeleton__", "__crc32__"


class Damaged(Exception):
    """A file ssl-bench wrote is not as written (truncated, altered, another format): recompute it or refuse."""


def crc32(data) -> int:
    """CRC-32 of bytes or of an array's memory (any contiguous buffer, no copy)."""
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    return zlib.crc32(data) & 0xFFFFFFFF


def regular_file(path: Path, what: str) -> Path:
    """``path`` if it is a regular file (after symlinks); a FIFO, device or socket is one clear line: opening
    one blocks, or reads forever. A missing path raises FileNotFoundError for the caller to word."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "a folder" if stat.S_ISDIR(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file")
        raise UserError(f"{what} {path} is {kind}, not a regular file -- replace it with the file, or remove it")
    return path


# ---- checked JSON ---------------------------------------------------------------------------------------

def _canonical(data) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def checked_json_bytes(data) -> bytes:
    return _canonical({"data": data, "crc32": crc32(_canonical(data))})


def parse_checked_json(raw: bytes, where: str) -> Any:
    try:
        doc = json.loads(raw)
        data, expected = doc["data"], doc["crc32"]
    except (ValueError, TypeError, KeyError, RecursionError):
        raise Damaged(f"{where} is not an ssl-bench metadata file (unreadable or written by an earlier version)") from None
    if crc32(_canonical(data)) != expected:
        raise Damaged(f"{where} does not match its checksum")
    return data


def write_checked_json(path: Path, data) -> None:
    from .store import write_atomically

    raw = checked_json_bytes(data)
    write_atomically(path, lambda f: f.write(raw))


def read_checked_json(path: Path) -> Any:
    """The data of a ``write_checked_json`` file; ``Damaged`` when it is not exactly that (FileNotFoundError
    when absent)."""
    try:
        raw = Path(regular_file(path, "cache file")).read_bytes()
    except UserError as err:
        raise Damaged(str(err)) from None
    return parse_checked_json(raw, str(path))


# ---- nested values as one .npz ----------------------------------------------------------------------------

def _encode(value, arrays: list, where: str):
    """The JSON skeleton of ``value``; its arrays are appended to ``arrays`` and named by position."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not np.isfinite(value):
            return {"t": "float", "v": repr(value)}  # JSON has no nan/inf
        return value
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return _encode(value.item(), arrays, where)
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in PLAIN_KINDS:
            raise TypeError(f"{where}: arrays of dtype {value.dtype} cannot be kept (numeric or bool only)")
        arrays.append(value)
        return {"t": "array", "i": len(arrays) - 1}
    if type(value).__module__ == "torch" and type(value).__name__ == "Tensor":
        node = _encode(value.detach().cpu().numpy(), arrays, where)  # bfloat16 has no numpy dtype: TypeError
        return {**node, "t": "tensor"}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else {"t": "tuple", "v": items}
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise TypeError(f"{where}: dict key {key!r} cannot be kept (text or int keys only)")
        return {"t": "dict", "v": [[k, _encode(v, arrays, f"{where}[{k!r}]")] for k, v in value.items()]}
    raise TypeError(f"{where}: a {type(value).__name__} cannot be kept (dicts, lists, tuples, numbers, text, "
                    f"None, numeric numpy arrays and tensors only)")


def _decode(node, arrays: dict, where: str):
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [_decode(n, arrays, where) for n in node]
    if not isinstance(node, dict):
        raise Damaged(f"{where}: unknown node in its skeleton")
    tag = node.get("t")
    if tag in ("array", "tensor"):
        array = arrays.get(f"a{node.get('i')}")
        if array is None:
            raise Damaged(f"{where}: array {node.get('i')} is missing")
        if tag == "tensor":
            import torch

            return torch.from_numpy(array)
        return array
    if tag == "tuple" and isinstance(node.get("v"), list):
        return tuple(_decode(n, arrays, where) for n in node["v"])
    if tag == "dict" and isinstance(node.get("v"), list):
        if not all(isinstance(kv, list) and len(kv) == 2 and isinstance(kv[0], (str, int)) for kv in node["v"]):
            raise Damaged(f"{where}: bad dict in its skeleton")
        return {k: _decode(v, arrays, where) for k, v in node["v"]}
    if tag == "float" and node.get("v") in ("nan", "inf", "-inf"):
        return float(node["v"])
    raise Damaged(f"{where}: unknown node in its skeleton")


def same_value(kept, back) -> bool:
    """Whether ``back`` is ``kept`` as ``load_value`` gives it back: arrays of the same dtype and values (NaN equal
    to NaN), tuples as tuples, numpy scalars as the Python numbers they hold."""
    if isinstance(kept, np.ndarray):
        return isinstance(back, np.ndarray) and kept.dtype == back.dtype and \
            np.array_equal(kept, back, equal_nan=kept.dtype.kind in "fc")
    if type(kept).__module__ == "torch" and type(kept).__name__ == "Tensor":
        return type(back) is type(kept) and same_value(kept.numpy(), back.numpy())
    if isinstance(kept, dict):
        return isinstance(back, dict) and list(kept) == list(back) and all(same_value(kept[k], back[k]) for k in kept)
    if isinstance(kept, (list, tuple)):
        return type(kept) is type(back) and len(kept) == len(back) and all(map(same_value, kept, back))
    if isinstance(kept, float) and np.isnan(kept):
        return isinstance(back, float) and np.isnan(back)
    if isinstance(kept, np.generic):
        return kept.item() == back and type(kept.item()) is type(back)
    return type(kept) is type(back) and kept == back


def _value_checksum(skeleton: bytes, arrays: list[np.ndarray]) -> int:
    """CRC-32 over the skeleton and every array's dtype, shape and bytes, in order."""
    crc = zlib.crc32(skeleton)
    for array in arrays:
        crc = zlib.crc32(f"{array.dtype.str}{array.shape}".encode(), crc)
        crc = zlib.crc32(np.ascontiguousarray(array).view(np.uint8).reshape(-1), crc)
    return crc & 0xFFFFFFFF


def save_value(path: Path, value) -> None:
    """``value`` as one verified ``.npz`` at ``path``, whole or absent (TypeError for what cannot be kept)."""
    from .store import write_atomically

    arrays: list[np.ndarray] = []
    skeleton = json.dumps(_encode(value, arrays, "value"), allow_nan=False).encode()
    members = {f"a{i}": a for i, a in enumerate(arrays)}
    members[_SKELETON] = np.frombuffer(skeleton, dtype=np.uint8)
    members[_CHECKSUM] = np.array(_value_checksum(skeleton, arrays), dtype=np.uint32)
    write_atomically(path, lambda f: np.savez(f, **members))


def load_value(path: Path):
    """What ``save_value`` wrote at ``path``; ``Damaged`` for anything else (FileNotFoundError when absent)."""
    try:
        regular_file(path, "cache file")
    except UserError as err:
        raise Damaged(str(err)) from None
    try:
        with np.load(path, allow_pickle=False) as npz:
            members = {name: npz[name] for name in npz.files}
    except Exception as err:  # noqa: BLE001 -- zip, npy header and dtype errors alike: not what we wrote
        raise Damaged(f"{path} is not a kept value ({type(err).__name__})") from None
    skeleton, checksum = members.pop(_SKELETON, None), members.pop(_CHECKSUM, None)
    if skeleton is None or checksum is None or skeleton.dtype != np.uint8 or checksum.shape != ():
        raise Damaged(f"{path} is not a kept value (no skeleton or checksum)")
    if any(a.dtype.kind not in PLAIN_KINDS for a in members.values()):
        raise Damaged(f"{path} holds an array of a dtype ssl-bench never keeps")
    ordered = [members.get(f"a{i}") for i in range(len(members))]
    if any(a is None for a in ordered):
        raise Damaged(f"{path} has misnamed members")
    if _value_checksum(skeleton.tobytes(), ordered) != int(checksum):
        raise Damaged(f"{path} does not match its checksum")
    try:
        return _decode(json.loads(skeleton.tobytes()), members, str(path))
    except (ValueError, RecursionError):
        raise Damaged(f"{path} has an unreadable skeleton") from None


# ---- flat arrays written without a map ----------------------------------------------------------------------

class NpyWriter:
    """A ``.npy`` file of known dtype and shape, its space reserved when created and its rows written with plain
    writes (``os.pwrite``), never through a memory map: on a full disk a write into a mapped file's hole is a
    SIGBUS that kills the process, a plain write is an ``OSError``."""

    def __init__(self, path: Path, dtype, shape: tuple[int, ...], fresh: bool):
        self.path, self.dtype, self.shape = path, np.dtype(dtype), tuple(int(n) for n in shape)
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64))
        if fresh:
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                          "fortran_order": False, "shape": self.shape})
            self.offset = len(header.getvalue())
            self.fd = open_reserved(path, self.offset + self.row_bytes * self.shape[0], fresh=True)
            try:
                os.pwrite(self.fd, header.getvalue(), 0)
            except BaseException:
                os.close(self.fd)
                path.unlink(missing_ok=True)
                raise
        else:
            self.offset = open_npy(path, self.dtype, self.shape).offset
            self.fd = os.open(path, os.O_RDWR)

    def write(self, row: int, rows: np.ndarray) -> None:
        data = np.ascontiguousarray(rows, dtype=self.dtype).view(np.uint8).reshape(-1)
        position, view = self.offset + row * self.row_bytes, memoryview(data)
        while view.nbytes:  # pwrite may write less than asked
            written = os.pwrite(self.fd, view, position)
            view, position = view[written:], position + written

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def open_npy(path: Path, dtype, shape: tuple[int | None, ...], mode: str = "r") -> np.memmap:
    """The ``.npy`` at ``path`` as a memory map, if it is exactly ``dtype`` x ``shape`` (None: any length on that
    axis) and the file holds all of it; ``Damaged`` otherwise (FileNotFoundError when absent)."""
    try:
        regular_file(path, "cache file")
    except UserError as err:
        raise Damaged(str(err)) from None
    try:
        array = np.load(path, mmap_mode=mode, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 -- a bad header (numpy's parser raises ValueError, SyntaxError,
        # tokenize.TokenError ...) or a file shorter than its header says
        raise Damaged(f"{path} is not a complete array file ({type(err).__name__})") from None
    fits = len(array.shape) == len(shape) and all(n is None or n == m for n, m in zip(shape, array.shape))
    if not isinstance(array, np.memmap) or array.dtype != np.dtype(dtype) or not fits:
        raise Damaged(f"{path} holds {getattr(array, 'dtype', '?')} {getattr(array, 'shape', '?')}, its metadata "
                      f"says {np.dtype(dtype)} {tuple('any' if n is None else n for n in shape)}")
    if os.stat(path).st_size != array.offset + array.nbytes:
        raise Damaged(f"{path} is {os.stat(path).st_size} bytes, its header says {array.offset + array.nbytes}")
    return array


# ---- disk errors ----------------------------------------------------------------------------------------

NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
NOT_A_FOLDER = (errno.ENOTDIR, errno.ENOENT, errno.EEXIST)


def open_reserved(path: Path, size: int, fresh: bool) -> int:
    """A read-write descriptor of ``path``: ``fresh``, a new file of ``size`` bytes reserved on disk (removed again
    when the disk cannot hold it: no half-made file is left behind); else the existing file."""
    if not fresh:
        return os.open(path, os.O_RDWR)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        reserve(fd, size)
    except BaseException as err:
        os.close(fd)
        path.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in NO_SPACE:
            raise OSError(err.errno, f"{err.strerror}; {size / 2**20:.1f} MiB needed for {path.name}") from None
        raise
    return fd


def reserve(fd: int, size: int) -> None:
    """Allocate ``size`` bytes of the open file ``fd`` now, so a full disk is an error here, at the start of the
    work, not halfway through it."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENODEV):  # some network file systems cannot:
            raise  # their plain writes report a full disk as an error too
    if os.fstat(fd).st_size < size:
        os.ftruncate(fd, size)


def disk_error(err: OSError, where: Path, what: str, fix: str) -> Exception:
    """One line for a write that failed for lack of space or permission; other errors are returned as they are."""
    if err.errno in NO_SPACE:
        return UserError(f"no space left on the disk of {where} for {what} ({err.strerror}) -- free space "
                         f"there, or {fix}")
    if err.errno in NOT_WRITABLE:
        return UserError(f"{where} is not writable ({err.strerror}) and {what} must be written there -- {fix}")
    if err.errno in NOT_A_FOLDER and err.filename and Path(where).is_relative_to(Path(os.fsdecode(err.filename))):
        # the folder, or one above it, cannot be made: a file in its place, a path under /proc
        return UserError(f"{where} cannot be made a folder ({err.strerror}: {os.fsdecode(err.filename)}) and "
                         f"{what} must be written there -- {fix}")
    return err
