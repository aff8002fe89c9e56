"""A reader of the numeric arrays in a MATLAB v5 ``.mat`` file (the IIC / STEGO Potsdam layout), in numpy.

``scipy.io.loadmat`` crashes the whole process (SIGSEGV in its compiled reader) on some damaged files,
found by ``ssl-bench fuzz``: one bad file in a dataset would kill a sweep. This reader parses the few
element kinds such files hold (numeric matrices, optionally zlib-compressed), checks every length
against the bytes present before using it, and raises ``MatError`` for anything else. On valid files it
returns what ``loadmat`` returns for numeric variables (the stored dtype, MATLAB's column-major order,
no squeezing); other variables (cells, structs, text, sparse, complex) are skipped.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

HEADER = 128
MI_MATRIX, MI_COMPRESSED = 14, 15
MI_DTYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
NUMERIC_CLASSES = range(6, 16)  # mxDOUBLE .. mxUINT64
COMPLEX_FLAG = 0x800


class MatError(ValueError):
    """Not a MATLAB v5 file, or damaged."""


def load_numeric(path: Path, max_bytes: int = 2**32) -> dict[str, np.ndarray]:
    """The numeric variables of the v5 ``.mat`` at ``path``; compressed ones may inflate to ``max_bytes``."""
    data = path.read_bytes()
    if len(data) < HEADER:
        raise MatError("shorter than a MAT-file header")
    if data[:19] == b"MATLAB 7.3 MAT-file":
        raise MatError("a MATLAB 7.3 (HDF5) file; save it with -v7 or scipy.io.savemat")
    order = {b"IM": "<", b"MI": ">"}.get(data[126:128])
    if order is None or not data.startswith(b"MATLAB 5.0 MAT-file"):
        raise MatError("not a MATLAB 5 MAT-file")
    variables: dict[str, np.ndarray] = {}
    position = HEADER
    while position < len(data):
        kind, body, position = _element(data, position, order)
        if kind == MI_COMPRESSED:
            kind, body, _ = _element(_inflate(body, max_bytes), 0, order)
        if kind == MI_MATRIX:
            name, array = _matrix(body, order)
            if array is not None:
                variables[name] = array
    return variables


def _element(buffer: bytes, position: int, order: str) -> tuple[int, bytes, int]:
    """(data type, body, position of the next element) of the element at ``position``."""
    if position + 8 > len(buffer):
        raise MatError(f"an element tag is cut at byte {position}")
    kind, size = np.frombuffer(buffer, f"{order}u4", 2, position)
    kind, size = int(kind), int(size)
    if kind >> 16:  # small element: type and size in the first 4 bytes, data in the next 4
        size, kind = kind >> 16, kind & 0xFFFF
        if size > 4:
            raise MatError(f"a small element of {size} bytes at byte {position}")
        return kind, buffer[position + 4:position + 4 + size], position + 8
    end = position + 8 + size
    if end > len(buffer):
        raise MatError(f"an element of {size} bytes at byte {position} runs past the end ({len(buffer)} bytes)")
    padded = end if kind == MI_COMPRESSED else position + 8 + (size + 7) // 8 * 8
    return kind, buffer[position + 8:end], padded


def _inflate(body: bytes, max_bytes: int) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(body, max_bytes)
    except zlib.error as err:
        raise MatError(f"a compressed element does not decompress ({err})") from None
    if inflater.unconsumed_tail:
        raise MatError(f"a compressed element inflates past {max_bytes:,} bytes")
    return out


def _matrix(body: bytes, order: str) -> tuple[str, np.ndarray | None]:
    """(name, array) of an miMATRIX element; array None for what is not a real numeric matrix."""
    parts, position = [], 0
    while position < len(body) and len(parts) < 4:
        kind, part, position = _element(body, position, order)
        parts.append((kind, part))
    if len(parts) < 3 or parts[0][0] != 6 or len(parts[0][1]) != 8 or parts[1][0] != 5 or parts[2][0] not in (1, 2):
        raise MatError("a matrix without flags, dimensions and name")
    flags = int(np.frombuffer(parts[0][1], f"{order}u4", 1)[0])
    if len(parts[1][1]) % 4 or not parts[1][1]:
        raise MatError("matrix dimensions of a bad length")
    dims = tuple(int(d) for d in np.frombuffer(parts[1][1], f"{order}i4"))
    name = parts[2][1].decode("latin-1")
    if (flags & 0xFF) not in NUMERIC_CLASSES or flags & COMPLEX_FLAG:
        return name, None
    if any(d < 0 for d in dims) or len(parts) < 4 or parts[3][0] not in MI_DTYPES:
        raise MatError(f"variable {name!r} has no real numeric data")
    dtype = np.dtype(MI_DTYPES[parts[3][0]]).newbyteorder(order)
    count = int(np.prod(dims, dtype=np.int64))
    if count * dtype.itemsize != len(parts[3][1]):
        raise MatError(f"variable {name!r} is {dims} but holds {len(parts[3][1])} bytes of {dtype}")
    values = np.frombuffer(parts[3][1], dtype, count).reshape(dims, order="F")
    return name, values.astype(dtype.newbyteorder("="), copy=True)
