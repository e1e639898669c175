"""A CUDA graph's replay semantics on CPU, for the tests of the captured samplers
(``tests/test_ar_graph.py``, ``tests/test_jacobi_graph.py``)."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class GraphEmulator(TorchDispatchMode):
    """A CUDA graph's semantics on CPU: records the aten ops of one call (refusing host reads, as
    capture does) and :meth:`replay` re-runs them on the same tensors, writing each fresh result
    into the recorded output (fixed addresses; views and in-place ops alias by themselves).
    Python code is not re-run: state kept in Python instead of device tensors would go stale."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise RuntimeError("a host read (.item(), int(t), ...) inside a captured step")
        out = func(*args, **(kwargs or {}))
        self.ops.append((func, args, kwargs or {}, out))
        return out

    def replay(self):
        for func, args, kwargs, out in self.ops:
            fresh = func(*args, **kwargs)
            for rec, new in zip(tree_flatten(out)[0], tree_flatten(fresh)[0]):
                if (
                    torch.is_tensor(rec)
                    and rec.untyped_storage().data_ptr() != new.untyped_storage().data_ptr()
                ):
                    rec.copy_(new)
