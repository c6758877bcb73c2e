"""numpy or torch: the few operations where the two spell things differently, so each maps function is written once.

Why: the CPU serving path must run without torch installed (``pip install atomstream[serve]`` has none), and the
GPU path keeps frames as torch tensors on the device. The maps functions (``tiling``, ``spectral``, ``preprocess``,
``atoms``, the defect score in ``novelty``) take either and give back the same kind, on the same device; where the
two libraries already agree (indexing, ``reshape``, arithmetic, ``mean``/``sum`` with ``axis``/``keepdims``,
``clip``, ``abs``) they are called directly, and the rest goes through this module.

torch is never imported here: a tensor can only exist once its caller imported torch, so ``is_tensor`` asks
``sys.modules``. ``require_torch`` imports it for the things that need it whatever the input (the TorchScript
backend, a CUDA device) and says how to install it when it is missing.

Why not array-api-compat: it wraps the standard subset, and more than half of what these functions need is outside
it (strided sliding windows, in-place writes into a batch buffer, selection, max filters, convolutions), so a
dispatch of our own would be needed beside it anyway; these dozen lines cost no dependency.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "Array",
    "DType",
    "TorchMissingError",
    "amax",
    "amin",
    "arange",
    "argsort_stable",
    "as_dtype",
    "asarray_like",
    "astype",
    "copy",
    "copy_into",
    "dtype_name",
    "einsum",
    "flatnonzero",
    "floor",
    "is_floating",
    "is_tensor",
    "log1p",
    "maximum",
    "median",
    "minimum",
    "on_gpu",
    "require_torch",
    "sqrt",
    "std",
    "sync",
    "take_along_axis",
    "to_host",
    "unique",
    "where",
    "zeros",
]

#: A numpy array or a torch tensor (torch only where the caller has it).
Array: TypeAlias = "np.ndarray | torch.Tensor"
DType = Literal["float32", "float64", "int64", "bool"]


class TorchMissingError(ImportError):
    """Something that needs PyTorch (TorchScript, a CUDA device) was asked for in an install without it."""


def require_torch(purpose: str) -> ModuleType:
    """``import torch``, or a ``TorchMissingError`` that names ``purpose`` and the install that brings torch."""
    try:
        import torch
    except ImportError:
        raise TorchMissingError(
            f"{purpose} needs PyTorch, which is not installed: pip install 'atomstream[gpu]' (CUDA) or "
            "'atomstream[train]' (CPU); the ONNX backend on the CPU needs no torch"
        ) from None
    return torch


def is_tensor(x: object) -> bool:
    """Whether ``x`` is a torch tensor, without importing torch (none can exist before its caller imported it)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def on_gpu(x: object) -> bool:
    """Whether ``x`` is a tensor on an accelerator (the torch path); numpy and CPU tensors are host arrays."""
    return is_tensor(x) and x.device.type != "cpu"  # type: ignore[attr-defined]


def as_dtype(like: Array, dtype: DType | str) -> Any:
    """The ``dtype`` of ``like``'s library (``np.float32`` or ``torch.float32``)."""
    if is_tensor(like):
        return getattr(sys.modules["torch"], dtype)
    return np.dtype(dtype)


def astype(x: Array, dtype: DType | str) -> Array:
    """``x`` as ``dtype`` (itself when it already is)."""
    if is_tensor(x):
        return x.to(as_dtype(x, dtype))
    return x.astype(dtype, copy=False)


def dtype_name(x: Array) -> str:
    """``"float32"`` for ``np.float32`` and ``torch.float32`` alike."""
    return str(x.dtype).removeprefix("torch.")


def is_floating(x: Array) -> bool:
    return bool(x.is_floating_point()) if is_tensor(x) else bool(np.issubdtype(x.dtype, np.floating))


def zeros(shape: tuple[int, ...], dtype: DType | str, *, like: Array) -> Array:
    """Zeros of ``like``'s library and device."""
    if is_tensor(like):
        return sys.modules["torch"].zeros(shape, dtype=as_dtype(like, dtype), device=like.device)
    return np.zeros(shape, dtype)


def arange(start: int, stop: int, *, like: Array, dtype: DType = "int64") -> Array:
    if is_tensor(like):
        return sys.modules["torch"].arange(start, stop, dtype=as_dtype(like, dtype), device=like.device)
    return np.arange(start, stop, dtype=dtype)


def amin(x: Array, axis: int | tuple[int, ...], *, keepdims: bool = False) -> Array:
    return x.amin(dim=axis, keepdim=keepdims) if is_tensor(x) else x.min(axis=axis, keepdims=keepdims)


def amax(x: Array, axis: int | tuple[int, ...], *, keepdims: bool = False) -> Array:
    return x.amax(dim=axis, keepdim=keepdims) if is_tensor(x) else x.max(axis=axis, keepdims=keepdims)


def floor(x: Array) -> Array:
    return x.floor() if is_tensor(x) else np.floor(x)


def log1p(x: Array) -> Array:
    return x.log1p() if is_tensor(x) else np.log1p(x)


def copy_into(dst: Array, src: Array) -> None:
    """``dst[...] = src``; host arrays on the calling thread alone (numpy), not on torch's intra-op threads.

    The service writes patches into its encoder batch buffer while the encoder runs on every core with its own
    threads; a second parallel runtime on the same cores makes both wait at their barriers for a thread the other
    one preempted (measured on 2 cores, cutting a 1024² frame's 64 MB of patches: one thread 4.3 ms of CPU, two
    torch threads 5.6–6.8 ms). A copy is a copy: the values are the same either way.
    """
    if on_gpu(dst) or on_gpu(src):
        dst.copy_(src if is_tensor(src) else sys.modules["torch"].from_numpy(np.ascontiguousarray(src)))
        return
    host_dst = dst.numpy() if is_tensor(dst) else dst
    np.copyto(host_dst, src.numpy() if is_tensor(src) else src, casting="unsafe")


def asarray_like(x: Array, like: Array) -> Array:
    """``x`` (numpy or torch) as ``like``'s kind of array, on ``like``'s device."""
    if is_tensor(like):
        return sys.modules["torch"].as_tensor(x, device=like.device)
    return to_host(x)


def to_host(x: Array) -> np.ndarray:
    """A numpy array on the host (a view where ``x`` already is one)."""
    return x.detach().to("cpu").numpy() if is_tensor(x) else np.asarray(x)


def sync(x: Array) -> None:
    """Wait for queued device work on ``x``'s device: stage timings on CUDA would measure kernel launches only."""
    if on_gpu(x) and x.device.type == "cuda":
        sys.modules["torch"].cuda.synchronize(x.device)


# The defect score's operations (``streamer.maps.novelty``), which runs on the encoder's device: the GPU path scores
# there instead of on the host, where the per-frame medians bounded an H200's stream.


def minimum(a: Array, b: Array) -> Array:
    return sys.modules["torch"].minimum(a, b) if is_tensor(a) else np.minimum(a, b)


def maximum(a: Array, b: Array | float) -> Array:
    """Element-wise larger of two arrays, or of an array and a scalar floor."""
    if not is_tensor(a):
        return np.maximum(a, b)
    torch = sys.modules["torch"]
    return torch.maximum(a, b) if is_tensor(b) else torch.clamp_min(a, b)


def sqrt(x: Array) -> Array:
    return x.sqrt() if is_tensor(x) else np.sqrt(x)


def where(cond: Array, x: Array, y: float) -> Array:
    if is_tensor(x):
        return sys.modules["torch"].where(cond, x, sys.modules["torch"].as_tensor(y, dtype=x.dtype, device=x.device))
    return np.where(cond, x, y)


def median(x: Array, axis: int | None = None) -> Array:
    """numpy's median (the mean of the two middle values of an even count), also of a tensor: ``torch.median``
    gives the lower one, and ``torch.quantile`` refuses inputs of more than 16M values."""
    if not is_tensor(x):
        return np.median(x, axis=axis)
    flat = x.reshape(-1) if axis is None else x
    dim = 0 if axis is None else axis
    n = int(flat.shape[dim])
    ranked = flat.sort(dim=dim).values
    return (ranked.select(dim, (n - 1) // 2) + ranked.select(dim, n // 2)) * 0.5


def std(x: Array, axis: int) -> Array:
    """The population standard deviation (numpy's default; torch's is the sample one)."""
    return x.std(dim=axis, correction=0) if is_tensor(x) else x.std(axis=axis)


def copy(x: Array) -> Array:
    return x.clone() if is_tensor(x) else x.copy()


def unique(x: Array) -> Array:
    return sys.modules["torch"].unique(x) if is_tensor(x) else np.unique(x)


def flatnonzero(x: Array) -> Array:
    return x.reshape(-1).nonzero().reshape(-1) if is_tensor(x) else np.flatnonzero(x)


def argsort_stable(x: Array, axis: int) -> Array:
    """Stable argsort (booleans too, which torch does not sort)."""
    if is_tensor(x):
        torch = sys.modules["torch"]
        keys = x.to(torch.int8) if x.dtype == torch.bool else x
        return torch.argsort(keys, dim=axis, stable=True)
    return np.argsort(x, axis=axis, kind="stable")


def take_along_axis(x: Array, idx: Array, axis: int) -> Array:
    return x.gather(axis, idx) if is_tensor(x) else np.take_along_axis(x, idx, axis=axis)


def einsum(subscripts: str, *operands: Array) -> Array:
    return (
        sys.modules["torch"].einsum(subscripts, *operands)
        if is_tensor(operands[0])
        else np.einsum(subscripts, *operands)
    )
