"""A memory-faithful training path for gptqmodel's quantized linears.

gptqmodel's TORCH layers compute `x @ dequantize(W)` in plain autograd, so the dequantized 16-bit
weight of every layer is saved for backward and training holds the whole model at 16 bits (docs/measurements.md).
Here the matmul runs inside an autograd Function that saves nothing: the base weight is frozen, so
backward needs only `grad @ Wᵀ`, and it dequantizes W again from the packed tensors the module already
holds (bitsandbytes' 4-bit matmul does the same). Peak extra memory is one module's dequantized weight,
for the duration of one matmul. No library offers this for gptqmodel's GPTQ format, hence written here.
"""

import torch
from torch import nn


class _DequantizeInBackward(torch.autograd.Function):
    """y = x · dequantize(W) (+ b), with ∂L/∂x = ∂L/∂y · dequantize(W)ᵀ recomputed in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        ctx.module = module
        with torch.no_grad():
            weight = module.dequantize_weight(num_itr=1).to(x.dtype)  # [in, out]
            return x @ weight

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        with torch.no_grad():
            weight = ctx.module.dequantize_weight(num_itr=1).to(grad_output.dtype)
            return grad_output @ weight.t(), None


def _memory_faithful_forward(module: nn.Module, original_forward):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return original_forward(x)
        shape = x.shape[:-1] + (module.out_features,)
        out = _DequantizeInBackward.apply(x.reshape(-1, x.shape[-1]), module).reshape(shape)
        if module.bias is not None:
            out = out + module.bias.to(out.dtype)
        return out

    return forward


def is_gptq_linear(module: nn.Module) -> bool:
    return hasattr(module, "qweight") and hasattr(module, "dequantize_weight")


def enable_dequantize_in_backward(model: nn.Module) -> int:
    """Route every gptqmodel GPTQ linear of `model` through the memory-faithful path; returns how many."""
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    count = 0
    for name, module in model.named_modules():
        if not is_gptq_linear(module):
            continue
        if not isinstance(module, TorchLinear):
            raise TypeError(f"{name} is a {type(module).__name__}; qra trains through gptqmodel's TORCH backend only")
        if getattr(module, "_qra_dequantize_in_backward", False):
            continue
        module.forward = _memory_faithful_forward(module, module.forward)
        module._qra_dequantize_in_backward = True
        count += 1
    return count
