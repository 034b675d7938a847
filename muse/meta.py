"""Building modules on the meta device without importing torch's compiler.

On a meta tensor, `normal_` (and every `nn.init.*normal_` built on it) runs through a Python
reference that imports `torch._dynamo` the first time: about a second on a fast CPU, and more on
a busy one, in every process that loads a component (tokenizer actors, Serve replicas). Random
values on a meta tensor are nothing, so `meta_device()` skips those calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode


class _SkipNormalOnMeta(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")  # nn.init passes the tensor by keyword
        if getattr(func, "__name__", "").endswith("normal_") and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_device() -> Iterator[None]:
    """`with torch.device("meta")`, minus the compiler import that random init on meta costs."""
    with torch.device("meta"), _SkipNormalOnMeta():
        yield
