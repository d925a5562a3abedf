"""Arrays on the wire: numpy <-> `retrieval.v1.Tensor` (raw little-endian bytes, dtype and shape)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from retrieval.v1 import retriever_pb2 as pb

_TO_NUMPY: dict[int, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_INT32: np.dtype("<i4"),
    pb.DTYPE_INT16: np.dtype("<i2"),
    pb.DTYPE_INT8: np.dtype("i1"),
    pb.DTYPE_UINT16: np.dtype("<u2"),
    pb.DTYPE_UINT8: np.dtype("u1"),
    pb.DTYPE_UINT32: np.dtype("<u4"),
    pb.DTYPE_UINT64: np.dtype("<u8"),
    pb.DTYPE_BOOL: np.dtype("?"),
}
_FROM_NUMPY: dict[str, int] = {dt.newbyteorder("=").str.lstrip("<>=|"): code for code, dt in _TO_NUMPY.items()}
_CODE_OF: dict[object, int] = {}  # dtype_code's answers by the dtype (or name, or type) it was asked about


def numpy_max_dims(make: Callable[[tuple[int, ...]], object] = np.empty) -> int:
    """The most dimensions an array may have, as the array constructor `make` (numpy's) shows: 64 from
    numpy 2, 32 before (the project takes numpy 1.24 on)."""
    try:
        make((1,) * 64)
    except ValueError:  # numpy 1: "maximum supported dimension for an ndarray is 32, found 64"
        return 32
    return 64


MAX_DIMS = numpy_max_dims()  # dimensions of an array's shape at most (numpy's own): a shape of more is refused unread
MAX_BYTES = (1 << 63) - 1  # what an array's dimensions other than 0, times its item size, make at most (numpy's)


class TensorError(ValueError):
    """A Tensor message that cannot be read as an array; the message says why."""


def dtype_code(dtype: np.dtype | str | type) -> int:
    """The `DType` enum value for a numpy dtype; raises TensorError for unsupported ones."""
    code = _CODE_OF.get(dtype)
    if code is None:
        key = np.dtype(dtype).newbyteorder("=").str.lstrip("<>=|")
        if key not in _FROM_NUMPY:
            raise TensorError(f"dtype {np.dtype(dtype)} cannot travel as a Tensor")
        code = _CODE_OF[dtype] = _FROM_NUMPY[key]
    return code


def numpy_dtype(code: int) -> np.dtype:
    """The numpy dtype of a `DType` enum value; raises TensorError for unknown ones."""
    if code not in _TO_NUMPY:
        raise TensorError(f"unknown dtype {code} (expected one of {sorted(_TO_NUMPY)})")
    return _TO_NUMPY[code]


def shape_bytes(shape: Sequence[int], dtype: np.dtype, name: str = "shape") -> int:
    """Bytes of an array of `dtype` and `shape` (Python ints); TensorError, naming `name`, for a shape no numpy
    array has: over MAX_DIMS dimensions (told before any is read: the work is bounded whatever the shape's
    length), a negative one, or dimensions too large (their product past MAX_BYTES, zeros aside, as numpy
    refuses it)."""
    if len(shape) > MAX_DIMS:
        raise TensorError(f"{name} has {len(shape)} dimensions, over the {MAX_DIMS} an array may have")
    if min(shape, default=1) > 0:  # the usual shape: its product is what numpy checks
        size = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
        if size <= MAX_BYTES:
            return size
    elif min(shape) < 0:
        raise TensorError(f"{name} {shown_shape(shape)} has a negative dimension")
    elif max(shape) <= MAX_BYTES and math.prod(s for s in shape if s) * dtype.itemsize <= MAX_BYTES:
        return 0
    raise TensorError(f"{name} {shown_shape(shape)} is too large for an array of {dtype.name}")


def nbytes(dtype: np.dtype | str, shape: Sequence[int]) -> int:
    """Bytes of an array of `dtype` and `shape`; TensorError for a shape no array has (`shape_bytes`)."""
    if len(shape) > MAX_DIMS:
        return shape_bytes(shape, np.dtype(dtype))  # refused before any dimension is read
    return shape_bytes([int(s) for s in shape], np.dtype(dtype))


def fill_tensor(field: pb.Tensor, array: np.ndarray) -> pb.Tensor:
    """Writes a numpy array into a Tensor field of a message in place (little-endian contiguous
    bytes). Much cheaper for large arrays than building a Tensor and copying it into a message."""
    code = dtype_code(array.dtype)
    field.dtype = code
    del field.shape[:]
    field.shape.extend(array.shape)
    field.data = np.ascontiguousarray(array, dtype=_TO_NUMPY[code]).tobytes()
    return field


def to_tensor(array: np.ndarray) -> pb.Tensor:
    """Packs a numpy array into a new Tensor (for small arrays; see `fill_tensor`)."""
    return fill_tensor(pb.Tensor(), array)


def shown_shape(shape: tuple[int, ...] | list[int], most: int = 8) -> str:
    """A shape for a message: its first `most` dimensions and, past them, how many there are (a
    request's shape is the caller's: it is shown bounded)."""
    dims = [int(s) for s in shape[:most]]
    return str(dims) if len(shape) <= most else f"{str(dims)[:-1]}, ...] ({len(shape)} dimensions)"


def checked_dtype(code: int, shape: Sequence[int], size: int, name: str) -> np.dtype:
    """The dtype of a Tensor of dtype `code`, `shape` and `size` bytes of data; TensorError, naming
    the field `name`, unless they make an array (work bounded by MAX_DIMS, whatever the shape's length)."""
    if code == pb.DTYPE_UNSPECIFIED:
        raise TensorError(f"{name}.dtype is unset")
    try:
        dtype = numpy_dtype(code)
    except TensorError as err:
        raise TensorError(f"{name}.dtype: {err}") from None
    expected = shape_bytes(shape, dtype, f"{name}.shape")
    if size != expected:
        raise TensorError(f"{name}.data has {size} bytes but shape {shown_shape(shape)} of {dtype.name} needs "
                          f"{expected}")
    return dtype


def from_tensor(tensor: pb.Tensor, name: str = "tensor") -> np.ndarray:
    """Reads a Tensor as a read-only numpy array without copying; `name` appears in errors."""
    data = tensor.data
    dtype = checked_dtype(tensor.dtype, tensor.shape, len(data), name)  # its length checked before it is read
    return np.frombuffer(data, dtype=dtype).reshape(tuple(tensor.shape))
