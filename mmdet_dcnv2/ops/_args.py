"""Argument normalisation shared by the functional ops: errors name the argument and what was expected."""

from typing import List, Sequence, Union

import torch
from torch import Tensor


def check_tensor(value, name: str, floating: bool = False) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    return value


def pair(value: Union[int, Sequence[int]], name: str) -> List[int]:
    """An int or a pair of ints as [height, width]."""
    if isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool):
        return [value, value]
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool) for v in value)
    ):
        return list(value)
    raise ValueError(f"{name} must be an int or a pair of ints (height, width), got {value!r}")


def forbid_double_backward(backward_op_name: str) -> None:
    """Registers autograd for a backward op that says plainly that it has no derivative (without it,
    create_graph=True would run the kernel under autograd and fail obscurely or return zeros)."""

    def refuse(ctx, *grads):
        raise NotImplementedError(f"double backward through {backward_op_name} is not supported")

    torch.library.register_autograd(backward_op_name, refuse)
