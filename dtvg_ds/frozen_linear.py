"""The frozen backbone's linear layers: save the weight itself, return only the input gradient.

Prompt tuning back-propagates through a frozen backbone to reach the prompt, so every linear
layer needs its weight again in backward (dL/dx = dL/dy W) but never a weight gradient. Two
things matter at Flan-T5-XL size and are handled here, for plain `nn.Linear` layers whose weight
is frozen (bitsandbytes layers keep their own forward):

1. Under ZeRO-3 the weight of a layer is gathered for its forward and released after it. The
   autograd function saves the *parameter* (not a view such as `weight.t()`, which would keep
   the gathered storage alive until backward: DeepSpeed issue #7670's pattern), so ZeRO-3's
   release really frees the gathered copy; ZeRO re-gathers it before the layer's backward. This
   is what DeepSpeed's `zero3_linear_wrap` does too, but only while its monkeypatch of
   `torch.nn.functional.linear` is in place; owning it makes it independent of that global.
2. On a CPU without native bf16 matrix units (no AVX512-BF16/AMX, e.g. this project's CI
   machines) a bf16 matmul takes a slow path, and `grad @ W` (W not transposed) a far slower
   one: 3.3 s vs 36 ms in fp32 for one 2816 x 1024 layer at 236 tokens (measured here). There
   the two products run in fp32 on fp32 copies of one layer's operands and are rounded back to
   bf16: bf16 x bf16 products are exact in fp32 and the slow path accumulates in fp32 anyway,
   so this changes no value beyond summation order. GPUs (and CPUs with AMX) compute in bf16.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from dtvg_ds import dist

_NATIVE_CPU_BF16 = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for bf16 on a CPU without native bf16 matmul, else the tensor's own dtype."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not _NATIVE_CPU_BF16:
        return torch.float32
    return x.dtype


def _matmul(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    ct = _compute_dtype(a)
    return a.to(ct).matmul(b.to(ct)).to(out_dtype)


class FrozenLinearFunction(torch.autograd.Function):
    """y = x W^T + b with W, b frozen: saves W itself, returns dL/dx only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        y = _matmul(x, weight.t(), out_dtype)
        if bias is not None:
            y = y + bias
        # The parameter itself: ZeRO-3 may swap its .data for an empty tensor after this
        # layer's forward (freeing the gathered copy) and gathers it back before backward.
        ctx.save_for_backward(weight)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        (weight,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        with dist.available(weight):  # normally already gathered by ZeRO-3's backward hook
            gx = _matmul(grad, weight, ctx.x_dtype)
        return gx, None, None


def _frozen_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad):
        return nn.Linear.forward(self, x)  # not frozen (never the case for the backbone)
    return FrozenLinearFunction.apply(x, self.weight, self.bias)


def install(module: nn.Module) -> int:
    """Route every plain `nn.Linear` of `module` through `FrozenLinearFunction`; returns how
    many. Subclasses (bitsandbytes' quantized layers) are left alone. Idempotent."""
    n = 0
    for m in module.modules():
        if type(m) is nn.Linear:
            m.forward = types.MethodType(_frozen_forward, m)
            n += 1
    return n
