"""Output shapes of the common aten ops on the meta device, without torch's Python meta kernels.

torch 2.13 registers Python meta kernels (torch._refs, torch._decomp, torch._meta_registrations) over the C++ ones
of most ops. They check shapes with torch._check, which imports sympy, and their type-promotion wrapper is
_disable_dynamo, which imports torch._dynamo on its first call: the first analysis in a process would pay over
a second for imports its figures never use. Under `MetaShapes`, the ops below get their empty meta outputs from
these rules (shapes; dtypes by torch's own promotion, torch.result_type; the layout torch's kernels give); any
other op, or a case a rule leaves out (a CPU operand but a 0-dim one, an input torch refuses or treats apart), runs torch's
own kernel as before. tests/test_analysis.py holds every rule to torch's kernels, output by output.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
Rule = Callable[..., Any]


class Unhandled(Exception):
    """A case the rules leave to torch's own kernel."""


def meta_operands(args: tuple, contiguous: bool = False, scalars: bool = False) -> list[torch.Tensor]:
    """The tensor operands on the meta device (contiguous if asked), which must be all of them but, with `scalars`,
    0-dim CPU tensors (a pointwise op takes them as numbers); any other case is left to torch."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    on_meta = [t for t in tensors if t.device.type == "meta"]
    others_are_scalars = all(t.device.type == "cpu" and t.dim() == 0 for t in tensors if t.device.type != "meta")
    if not on_meta or len(on_meta) < len(tensors) and not (scalars and others_are_scalars):
        raise Unhandled
    if contiguous and not all(t.is_contiguous() for t in on_meta):
        raise Unhandled
    return on_meta


def dense(t: torch.Tensor) -> bool:
    """Whether the tensor's elements fill its storage span without gaps or overlaps (in any dimension order)."""
    expected = 1
    for stride, size in sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def pointwise_layout(shape: tuple[int, ...], operands: list[torch.Tensor]) -> tuple[int, ...]:
    """The strides torch's pointwise meta kernels give their output: one dense operand's own strides; else the
    contiguous (or channels-last) layout when every operand, broadcast to `shape`, has it; else dense strides that
    order the dimensions as the operands' strides do (the first operand that orders two dimensions decides; a
    broadcast dimension orders nothing)."""
    if len(shape) <= 1:
        return (1,) * len(shape)
    if len(operands) == 1 and dense(operands[0]):
        return tuple(operands[0].stride())
    broadcast_operands = [t.expand(shape) for t in operands]
    contiguous = all(t.is_contiguous() for t in broadcast_operands)
    channels_last = len(shape) == 4 and all(t.is_contiguous(memory_format=torch.channels_last) for t in broadcast_operands)
    if contiguous != channels_last:
        order = list(range(len(shape))) if contiguous else [0, 2, 3, 1]
    else:
        order = outer_to_inner(shape, [t.stride() for t in broadcast_operands])
    strides, step = [0] * len(shape), 1
    for dim in reversed(order):
        strides[dim] = step
        step *= max(shape[dim], 1)
    return tuple(strides)


def outer_to_inner(shape: tuple[int, ...], operand_strides: list[tuple[int, ...]]) -> list[int]:
    """Dimensions from the outermost to the innermost by the operands' strides: an insertion sort from the last
    dimension, where a pair the operands leave undecided (strides of 0, or equal strides of a larger inner size)
    keeps its order."""
    def inner_first(inner: int, outer: int) -> int:  # 1: swap the pair, -1: keep it and stop, 0: undecided
        for strides in operand_strides:
            a, b = strides[inner], strides[outer]
            if a == 0 or b == 0:
                continue
            if a == b:
                if shape[outer] >= shape[inner]:
                    continue
                return 1
            return -1 if b > a else 1
        return 0

    order = list(reversed(range(len(shape))))  # innermost first while sorting
    for i in range(1, len(order)):
        moving = i
        for j in reversed(range(i)):
            decision = inner_first(order[j], order[moving])
            if decision > 0:
                order[j], order[moving] = order[moving], order[j]
                moving = j
            elif decision < 0:
                break
    return list(reversed(order))


def pointwise(shape: tuple[int, ...], dtype: torch.dtype, operands: list[torch.Tensor], compute: torch.dtype) -> torch.Tensor:
    """An empty meta result of a pointwise op computed in `compute`, laid out as torch's meta kernels lay it out.

    torch first converts each operand not already in `compute` (and every half-precision one, computed in fp32): the
    copy keeps a dense operand's strides, and lays one with gaps or overlaps out densely in its own dimension order."""
    converted = [torch.empty_strided(t.shape, pointwise_layout(tuple(t.shape), [t]), dtype=compute, device="meta")
                 if (t.dtype != compute or t.dtype in HALF) and not dense(t) else t for t in operands]
    return torch.empty_strided(shape, pointwise_layout(shape, converted), dtype=dtype, device="meta")


HALF = (torch.float16, torch.bfloat16)


def broadcast(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    """The broadcast shape; shapes that do not broadcast are left to torch (which raises its own error)."""
    ndim = max(len(shape) for shape in shapes)
    padded = [(1,) * (ndim - len(shape)) + tuple(shape) for shape in shapes]
    out = []
    for sizes in zip(*padded):
        others = set(sizes) - {1}
        if len(others) > 1:
            raise Unhandled
        out.append(others.pop() if others else 1)
    return tuple(out)


def empty(shape: tuple[int, ...] | list[int], dtype: torch.dtype) -> torch.Tensor:
    """A contiguous meta tensor (aten.empty has a C++ meta kernel)."""
    return torch.empty(tuple(shape), dtype=dtype, device="meta")


def shape_of(value: Any) -> tuple[int, ...]:
    """An operand's shape: a Python number's is ()."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


def arithmetic(a: Any, b: Any, *alpha: Any, **kwargs: Any) -> torch.Tensor:
    """add, sub or mul: the operands' broadcast shape, in the dtype torch.result_type promotes them to. Bool results,
    and a float alpha of integers, which torch refuses or treats apart, are left to it."""
    operands = meta_operands((a, b), scalars=True)
    dtype = torch.result_type(a, b)
    alpha = (*alpha, *kwargs.values())
    if dtype == torch.bool or dtype.is_complex or not dtype.is_floating_point and any(isinstance(x, float) for x in alpha):
        raise Unhandled
    return pointwise(broadcast(shape_of(a), shape_of(b)), dtype, operands, dtype)


def power(x: torch.Tensor, exponent: Any) -> torch.Tensor:
    """A floating-point tensor to a number's power: its shape and dtype (integer powers, refused when negative, are torch's)."""
    operands = meta_operands((x,))
    dtype = torch.result_type(x, exponent)
    if not x.is_floating_point() or dtype != x.dtype:
        raise Unhandled
    return pointwise(tuple(x.shape), dtype, operands, dtype)


def bitwise(a: Any, b: Any) -> torch.Tensor:
    """and / or / xor of bool or integer tensors: the broadcast shape, in their promoted dtype."""
    operands = meta_operands((a, b), scalars=True)
    dtype = torch.result_type(a, b)
    if dtype.is_floating_point or dtype.is_complex:
        raise Unhandled
    return pointwise(broadcast(shape_of(a), shape_of(b)), dtype, operands, dtype)


def in_place(a: torch.Tensor, b: Any, *rest: Any, **kwargs: Any) -> torch.Tensor:
    """`a op= b`: `a` itself, when `b` broadcasts to it and the result keeps `a`'s dtype."""
    meta_operands((a, b))
    overlapping = any(stride == 0 and size > 1 for size, stride in zip(a.shape, a.stride()))
    if overlapping or not a.is_floating_point() or broadcast(tuple(a.shape), shape_of(b)) != tuple(a.shape) or torch.result_type(a, b) != a.dtype:
        raise Unhandled
    return a


def floating_unary(x: torch.Tensor, *rest: Any, **kwargs: Any) -> torch.Tensor:
    """A pointwise op on floating-point input (rsqrt, silu, neg, ...): same shape and dtype."""
    meta_operands((x,))
    if not x.is_floating_point() or kwargs.get("approximate", "none") not in ("none", "tanh"):
        raise Unhandled  # integers promote to float, bools differ per op: torch decides
    return pointwise(tuple(x.shape), x.dtype, [x], x.dtype)


def triangle(x: torch.Tensor, diagonal: int = 0) -> torch.Tensor:
    """tril/triu of a contiguous matrix (or batch of them): contiguous, same shape and dtype."""
    meta_operands((x,), contiguous=True)
    if x.dim() < 2:
        raise Unhandled
    return empty(x.shape, x.dtype)


def comparison(a: Any, b: Any) -> torch.Tensor:
    """A comparison: the broadcast shape, bool (computed in the operands' promoted dtype)."""
    operands = meta_operands((a, b), scalars=True)
    return pointwise(broadcast(shape_of(a), shape_of(b)), torch.bool, operands, torch.result_type(a, b))


def in_range(dim: int, ndim: int) -> int:
    """A dimension index counted from the front; one out of range is left to torch."""
    if not -max(ndim, 1) <= dim < max(ndim, 1):
        raise Unhandled
    return dim % max(ndim, 1)


def mean(x: torch.Tensor, dim: list[int] | None, keepdim: bool = False, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """mean over dims of floating-point input: a contiguous result, whatever the input's layout."""
    meta_operands((x,))
    if not (dtype or x.dtype).is_floating_point or not dim:
        raise Unhandled
    dims = {in_range(d, x.dim()) for d in dim}
    if len(dims) != len(dim):
        raise Unhandled
    shape = [1 if i in dims else n for i, n in enumerate(x.shape) if keepdim or i not in dims]
    return empty(shape, dtype or x.dtype)


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, k) @ (k, m)."""
    meta_operands((a, b))  # a new contiguous result, whatever the operands' strides
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0] or a.dtype != b.dtype:
        raise Unhandled
    return empty((a.shape[0], b.shape[1]), a.dtype)


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(batch, n, k) @ (batch, k, m)."""
    meta_operands((a, b))
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1] or a.dtype != b.dtype:
        raise Unhandled
    return empty((a.shape[0], a.shape[1], b.shape[2]), a.dtype)


def cat(tensors: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """Tensors of one rank joined along `dim`, in their promoted dtype: contiguous unless an input is laid out
    channels-last (torch's own kernel decides that case)."""
    meta_operands(tuple(tensors))
    if any(t.dim() in (4, 5) and channels_last_like(t) for t in tensors):
        raise Unhandled
    first = tensors[0]
    dim = in_range(dim, first.dim())
    if any(t.dim() != first.dim() or t.dim() == 1 and t.numel() == 0 for t in tensors) or first.dim() == 0:
        raise Unhandled  # legacy empty tensors (shape (0,)), skipped by torch, and scalars
    if any(t.shape[:dim] != first.shape[:dim] or t.shape[dim + 1:] != first.shape[dim + 1:] for t in tensors):
        raise Unhandled
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    return empty((*first.shape[:dim], sum(t.shape[dim] for t in tensors), *first.shape[dim + 1:]), dtype)


def channels_last_like(t: torch.Tensor) -> bool:
    """Whether a 4-D or 5-D tensor's strides put the channel dimension (1) innermost, the others in reverse order."""
    order = [1, 3, 2, 0] if t.dim() == 4 else [1, 4, 3, 2, 0]
    if t.stride(1) == 0:
        return False
    least = 0
    for dim in order:
        if t.shape[dim] == 0 or t.stride(dim) < least or (dim == 0 and least == t.stride(1)):
            return False
        least = t.stride(dim) * t.shape[dim]
    return True


def embedding(weight: torch.Tensor, indices: torch.Tensor, *rest: Any) -> torch.Tensor:
    """Rows of `weight` looked up by integer indices."""
    meta_operands((weight, indices))
    if weight.dim() != 2 or indices.dtype not in (torch.long, torch.int32):
        raise Unhandled
    return empty((*indices.shape, weight.shape[1]), weight.dtype)


def where(condition: torch.Tensor, a: Any, b: Any) -> torch.Tensor:
    """`a` where `condition`, else `b`: the three broadcast, in `a` and `b`'s promoted dtype."""
    operands = meta_operands((condition, a, b), scalars=True)
    if condition.dtype != torch.bool:
        raise Unhandled
    dtype = torch.result_type(a, b)
    return pointwise(broadcast(shape_of(condition), shape_of(a), shape_of(b)), dtype, operands, dtype)


def factory(size: list[int], *, dtype: torch.dtype | None = None, layout: Any = None, device: Any = None,
            pin_memory: Any = None) -> torch.Tensor:
    """zeros/ones on the meta device."""
    if torch.device(device or "cpu").type != "meta" or layout not in (None, torch.strided):
        raise Unhandled
    return empty(size, dtype or torch.get_default_dtype())


def new_factory(x: torch.Tensor, size: list[int], *, dtype: torch.dtype | None = None, layout: Any = None, device: Any = None,
                pin_memory: Any = None) -> torch.Tensor:
    """x.new_zeros / x.new_empty: `x`'s dtype and device unless given."""
    meta_operands((x,))
    return factory(size, dtype=dtype or x.dtype, layout=layout, device=device or x.device)


def arange(end: Any, *, dtype: torch.dtype | None = None, layout: Any = None, device: Any = None, pin_memory: Any = None) -> torch.Tensor:
    """arange(end) of a non-negative integer end: int64 unless given."""
    if not isinstance(end, int) or isinstance(end, bool) or end < 0:
        raise Unhandled
    return factory([end], dtype=dtype or torch.long, layout=layout, device=device)


def identity(n: Any, *, dtype: torch.dtype | None = None, layout: Any = None, device: Any = None, pin_memory: Any = None) -> torch.Tensor:
    """eye(n) of a non-negative integer n: (n, n), the default dtype unless given."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise Unhandled
    return factory([n, n], dtype=dtype, layout=layout, device=device)


def scalar_tensor(value: Any, *, dtype: torch.dtype | None = None, layout: Any = None, device: Any = None,
                  pin_memory: Any = None) -> torch.Tensor:
    """A 0-dim tensor of a real number (the default dtype unless given, integer or not)."""
    if not isinstance(value, (int, float)):
        raise Unhandled
    return factory([], dtype=dtype, layout=layout, device=device)


def unsafe_view(x: torch.Tensor, size: list[int]) -> torch.Tensor:
    """A contiguous tensor's data under another shape: a view of it, as torch's own meta kernel gives."""
    meta_operands((x,), contiguous=True)
    return aten.view.default(x, size)


def clone(x: torch.Tensor, *, memory_format: torch.memory_format | None = None) -> torch.Tensor:
    """A copy laid out contiguously: asked for (`.contiguous()`), or kept from a contiguous input."""
    meta_operands((x,))
    if not (memory_format == torch.contiguous_format or x.is_contiguous() and memory_format in (None, torch.preserve_format)):
        raise Unhandled
    return empty(x.shape, x.dtype)


def true_division(a: Any, b: Any) -> torch.Tensor:
    """a / b: the broadcast shape, in the promoted dtype (the default float dtype for integers)."""
    operands = meta_operands((a, b), scalars=True)
    dtype = torch.result_type(a, b)
    if dtype.is_complex:
        raise Unhandled
    dtype = dtype if dtype.is_floating_point else torch.get_default_dtype()
    return pointwise(broadcast(shape_of(a), shape_of(b)), dtype, operands, dtype)


def floor_division(a: Any, b: Any) -> torch.Tensor:
    """a // b or a % b of numbers (not bools): the broadcast shape, in the promoted dtype."""
    operands = meta_operands((a, b), scalars=True)
    dtype = torch.result_type(a, b)
    if dtype == torch.bool or dtype.is_complex:
        raise Unhandled
    return pointwise(broadcast(shape_of(a), shape_of(b)), dtype, operands, dtype)


def accumulated(x: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a sum accumulates in: the one asked for, else int64 for bools and integers, else the input's."""
    if dtype is not None:
        return dtype
    return x.dtype if x.is_floating_point() or x.is_complex() else torch.long


def total(x: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """sum of every element: a 0-dim tensor."""
    meta_operands((x,))
    return empty((), accumulated(x, dtype))


def summed(x: torch.Tensor, dim: list[int] | None, keepdim: bool = False, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """sum over dims: a contiguous result."""
    meta_operands((x,))
    if not dim:
        raise Unhandled  # None or []: every dimension, torch's case
    dims = {in_range(d, x.dim()) for d in dim}
    if len(dims) != len(dim):
        raise Unhandled
    return empty([1 if i in dims else n for i, n in enumerate(x.shape) if keepdim or i not in dims], accumulated(x, dtype))


def cumulative_sum(x: torch.Tensor, dim: int, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """cumsum along a dim: its shape, contiguous whatever the input's layout."""
    meta_operands((x,))
    in_range(dim, x.dim())
    return empty(x.shape, accumulated(x, dtype))


def softmax(x: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor:
    """softmax of a contiguous floating-point tensor along a dim: its shape, contiguous."""
    meta_operands((x,), contiguous=True)
    in_range(dim, x.dim())
    if not x.is_floating_point() or half_to_float:
        raise Unhandled
    return empty(x.shape, x.dtype)


def top(x: torch.Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest (or smallest) along a dim, and their int64 indices: contiguous."""
    meta_operands((x,))
    dim = in_range(dim, x.dim())
    if x.dim() == 0 or not 0 <= k <= x.shape[dim]:
        raise Unhandled
    shape = (*x.shape[:dim], k, *x.shape[dim + 1:])
    return empty(shape, x.dtype), empty(shape, torch.long)


def stable_sort(x: torch.Tensor, *, stable: bool | None = None, dim: int = -1, descending: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A contiguous tensor sorted along a dim, and the int64 indices: contiguous."""
    meta_operands((x,), contiguous=True)
    in_range(dim, x.dim())
    return empty(x.shape, x.dtype), empty(x.shape, torch.long)


def gather(x: torch.Tensor, dim: int, index: torch.Tensor, *, sparse_grad: bool = False) -> torch.Tensor:
    """x's values at int64 indices along a dim: the index's shape, contiguous."""
    meta_operands((x, index))
    dim = in_range(dim, x.dim())
    if index.dtype != torch.long or index.dim() != x.dim() or any(index.shape[d] > x.shape[d] for d in range(x.dim()) if d != dim):
        raise Unhandled
    return empty(index.shape, x.dtype)


def index_select(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """x's slices at int64 indices along a dim: contiguous."""
    meta_operands((x, index))
    dim = in_range(dim, x.dim())
    if index.dtype != torch.long or index.dim() > 1 or x.dim() == 0:
        raise Unhandled
    return empty((*x.shape[:dim], index.numel(), *x.shape[dim + 1:]), x.dtype)


def index_add(x: torch.Tensor, dim: int, index: torch.Tensor, source: torch.Tensor, *, alpha: Any = 1) -> torch.Tensor:
    """x with source's slices added at int64 indices along a dim, in place: x itself."""
    meta_operands((x, index, source))
    dim = in_range(dim, x.dim())
    expected = (*x.shape[:dim], index.numel(), *x.shape[dim + 1:])
    if index.dtype != torch.long or index.dim() > 1 or source.dtype != x.dtype or tuple(source.shape) != expected or not dense(x):
        raise Unhandled
    return x


def scatter_fits(x: torch.Tensor, dim: int, index: torch.Tensor, source: torch.Tensor) -> bool:
    """Whether scatter's index is within source, and within x but along `dim`, all three of one rank."""
    return index.dim() == x.dim() == source.dim() and all(
        index.shape[d] <= source.shape[d] and (d == dim or index.shape[d] <= x.shape[d]) for d in range(x.dim()))


def scatter_add(x: torch.Tensor, dim: int, index: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """x with source's values added at int64 indices along a dim, in place: x itself."""
    meta_operands((x, index, source))
    dim = in_range(dim, x.dim())
    fits = scatter_fits(x, dim, index, source)
    if index.dtype != torch.long or source.dtype != x.dtype or not fits or not dense(x):
        raise Unhandled
    return x


def filled_like(x: torch.Tensor, *, dtype: torch.dtype | None = None, layout: Any = None, device: Any = None, pin_memory: Any = None,
                memory_format: torch.memory_format | None = None) -> torch.Tensor:
    """zeros_like / ones_like of a dense tensor on meta: its shape and strides (the layout kept)."""
    meta_operands((x,))
    if not dense(x) or memory_format not in (None, torch.preserve_format) or layout not in (None, torch.strided) \
            or torch.device(device or "meta").type != "meta":
        raise Unhandled
    return torch.empty_strided(x.shape, x.stride(), dtype=dtype or x.dtype, device="meta")


def stack(tensors: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """Tensors of one shape stacked along a new dim (torch joins them unsqueezed), in their promoted dtype: contiguous
    unless one unsqueezed looks channels-last."""
    meta_operands(tuple(tensors))
    first = tensors[0]
    dim = in_range(dim, first.dim() + 1)
    if any(t.shape != first.shape for t in tensors) or any(t.dim() in (3, 4) and channels_last_like(t.unsqueeze(dim)) for t in tensors):
        raise Unhandled
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    return empty((*first.shape[:dim], len(tensors), *first.shape[dim:]), dtype)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor | None = None, bias: Any = None,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """bf16 rows (n, k) each multiplied by one of a stack of matrices (groups, k, m), groups ending at int32 offsets:
    (n, m), contiguous (a CUDA build of torch pads the rows, left to it)."""
    meta_operands((a, b, offs))
    if torch.version.cuda or offs is None or bias is not None or out_dtype not in (None, a.dtype) or a.dim() != 2 or b.dim() != 3 \
            or offs.dtype != torch.int32 or offs.dim() != 1 or offs.shape[0] != b.shape[0] or a.shape[1] != b.shape[1] \
            or a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16:
        raise Unhandled
    return empty((a.shape[0], b.shape[2]), a.dtype)


def index_rows(x: torch.Tensor, indices: list[torch.Tensor | None]) -> torch.Tensor:
    """x[rows] of a contiguous x by one int64 index tensor: the index's shape, then x's other dims, contiguous."""
    meta_operands((x,), contiguous=True)
    if len(indices) != 1 or not isinstance(indices[0], torch.Tensor) or indices[0].device.type != "meta" or indices[0].dtype != torch.long \
            or x.dim() == 0:
        raise Unhandled
    return empty((*indices[0].shape, *x.shape[1:]), x.dtype)


def logical_not(x: torch.Tensor) -> torch.Tensor:
    """bitwise_not of a bool or integer tensor: its shape and dtype."""
    meta_operands((x,))
    if x.is_floating_point() or x.is_complex():
        raise Unhandled
    return pointwise(tuple(x.shape), x.dtype, [x], x.dtype)


def masked_fill(x: torch.Tensor, mask: torch.Tensor, value: Any) -> torch.Tensor:
    """A floating-point tensor with a number where a bool mask (broadcast to it) is set: contiguous, whatever x's layout
    (torch's kernel makes it so)."""
    meta_operands((x, mask))
    if not x.is_floating_point() or mask.dtype != torch.bool or broadcast(tuple(x.shape), tuple(mask.shape)) != tuple(x.shape) \
            or not isinstance(value, (int, float)):
        raise Unhandled
    return empty(x.shape, x.dtype)


def scatter(x: torch.Tensor, dim: int, index: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """A copy of a contiguous x with source's values at int64 indices along a dim: contiguous."""
    meta_operands((x, index, source))
    dim = in_range(dim, x.dim())
    fits = scatter_fits(x, dim, index, source)
    if not x.is_contiguous() or index.dtype != torch.long or source.dtype != x.dtype or not fits:
        raise Unhandled
    return empty(x.shape, x.dtype)


def addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: Any = 1, alpha: Any = 1) -> torch.Tensor:
    """bias + a @ b, floating-point: (n, m), contiguous."""
    meta_operands((bias, a, b))
    product = mm(a, b)
    if not a.is_floating_point() or bias.dtype != a.dtype or broadcast(tuple(product.shape), tuple(bias.shape)) != tuple(product.shape):
        raise Unhandled
    return product


def clamp(x: torch.Tensor, low: Any = None, high: Any = None) -> torch.Tensor:
    """A floating-point tensor clamped between numbers: its shape and dtype."""
    meta_operands((x,))
    bounds = [bound for bound in (low, high) if bound is not None]
    if not x.is_floating_point() or not bounds or any(not isinstance(bound, (int, float)) for bound in bounds):
        raise Unhandled
    return pointwise(tuple(x.shape), x.dtype, [x], x.dtype)


def number_power(base: Any, exponent: torch.Tensor) -> torch.Tensor:
    """A number to a tensor's power, of floating-point result: the tensor's shape, in the promoted dtype."""
    operands = meta_operands((exponent,))
    dtype = torch.result_type(base, exponent)
    if not dtype.is_floating_point or not isinstance(base, (int, float)):
        raise Unhandled
    return pointwise(tuple(exponent.shape), dtype, operands, dtype)


def padded(x: torch.Tensor, pad: list[int], value: Any = 0) -> torch.Tensor:
    """x padded with a number by non-negative (before, after) pairs from the last dim back: contiguous."""
    meta_operands((x,))
    if len(pad) % 2 or len(pad) // 2 > x.dim() or any(p < 0 for p in pad) or not isinstance(value, (int, float)):
        raise Unhandled
    shape = list(x.shape)
    for i in range(len(pad) // 2):
        shape[-1 - i] += pad[2 * i] + pad[2 * i + 1]
    return empty(shape, x.dtype)


def any_along(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """Whether any of a bool tensor is set along a dim: contiguous bools."""
    meta_operands((x,))
    dim = in_range(dim, x.dim())
    if x.dtype != torch.bool or x.dim() == 0:
        raise Unhandled
    return empty([1 if i == dim else n for i, n in enumerate(x.shape) if keepdim or i != dim], torch.bool)


def safe_softmax(x: torch.Tensor, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """softmax that gives zeros on fully masked rows, of a contiguous input: its shape, in `dtype` if given."""
    meta_operands((x,), contiguous=True)
    in_range(dim, x.dim())
    if not (dtype or x.dtype).is_floating_point or not x.is_floating_point():
        raise Unhandled
    return empty(x.shape, dtype or x.dtype)


RULES: dict[Any, Rule] = {
    **{op: arithmetic for op in (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.mul.Scalar)},
    aten.pow.Tensor_Scalar: power,
    **{op: bitwise for op in (aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.bitwise_xor.Tensor)},
    **{op: comparison for op in (aten.eq.Scalar, aten.eq.Tensor, aten.ne.Scalar, aten.ne.Tensor, aten.lt.Scalar, aten.lt.Tensor,
                                  aten.le.Tensor, aten.gt.Scalar)},
    **{op: in_place for op in (aten.add_.Tensor, aten.add_.Scalar, aten.mul_.Tensor, aten.mul_.Scalar)},
    **{op: floating_unary for op in (aten.rsqrt.default, aten.silu.default, aten.sigmoid.default, aten.exp.default, aten.sqrt.default,
                                      aten.gelu.default, aten.softplus.default, aten.relu.default, aten.neg.default)},
    aten.tril.default: triangle,
    aten.triu.default: triangle,
    aten.mean.dim: mean,
    aten.mm.default: mm,
    aten.bmm.default: bmm,
    aten.cat.default: cat,
    aten.embedding.default: embedding,
    aten.where.self: where,
    aten.zeros.default: factory,
    aten.ones.default: factory,
    aten.new_zeros.default: new_factory,
    aten.new_empty.default: new_factory,
    aten.arange.default: arange,
    aten.eye.default: identity,
    aten.scalar_tensor.default: scalar_tensor,
    aten._safe_softmax.default: safe_softmax,
    aten._unsafe_view.default: unsafe_view,
    aten.div.Tensor: true_division,
    aten.floor_divide.default: floor_division,
    aten.sum.default: total,
    aten.sum.dim_IntList: summed,
    aten.cumsum.default: cumulative_sum,
    aten._softmax.default: softmax,
    aten.topk.default: top,
    aten.sort.stable: stable_sort,
    aten.gather.default: gather,
    aten.index_select.default: index_select,
    aten.index_add_.default: index_add,
    aten.scatter_add_.default: scatter_add,
    aten.zeros_like.default: filled_like,
    aten.ones_like.default: filled_like,
    aten.stack.default: stack,
    aten._grouped_mm.default: grouped_mm,
    aten.index.Tensor: index_rows,
    aten.bitwise_not.default: logical_not,
    aten.masked_fill.Scalar: masked_fill,
    aten.scatter.src: scatter,
    aten.addmm.default: addmm,
    aten.clamp.default: clamp,
    aten.clamp_min.default: clamp,
    aten.remainder.Scalar: floor_division,
    aten.remainder.Tensor: floor_division,
    aten.pow.Scalar: number_power,
    aten.constant_pad_nd.default: padded,
    aten.any.dim: any_along,
    aten.clone.default: clone,
}


class MetaShapes(TorchDispatchMode):
    """Runs the ops in RULES on meta tensors by their rules, every other op by torch's own kernel."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        """False: torch would wrap __torch_dispatch__ in _disable_dynamo, whose first call imports torch._dynamo;
        nothing compiles the analysis, so there is nothing for dynamo to skip."""
        return False

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        rule = RULES.get(func)
        if rule is not None:
            try:
                return rule(*args, **(kwargs or {}))
            except Unhandled:
                pass
        return func(*args, **(kwargs or {}))

