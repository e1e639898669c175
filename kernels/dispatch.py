"""Choose how a fused kernel runs: compiled Triton, the Triton CPU interpreter, or the torch reference.

Every kernel module in ``vargen_kernels`` follows the same pattern:

* a plain-torch ``*_reference`` function that *defines* the semantics (vectorised, documented);
* a ``@triton.jit`` kernel, defined only when :data:`TRITON_AVAILABLE` (torch on Linux brings
  triton; on macOS/Windows it does not, and the package must still import);
* a public wrapper taking ``backend="auto"`` that calls :func:`backend_for` and then either the
  reference or the kernel (after :func:`check_kernel_mode`).

``backend_for`` picks, in ``"auto"`` mode:

* ``"interpret"`` when ``TRITON_INTERPRET`` is truthy: on CPU tensors this runs the Triton kernel
  with numpy, which is how the kernels are tested on machines without a GPU;
* ``"triton"`` (compiled) when every tensor is on CUDA;
* ``"torch"`` otherwise (CPU tensors without the interpreter, other devices, mixed devices, or no
  triton at all).

**Ordering caveat.** Triton reads ``TRITON_INTERPRET`` when a function is *decorated* with
``@triton.jit``, not when it is launched: a kernel decorated while the variable was unset is a
compiled ``JITFunction`` and fails on CPU tensors ("0 active drivers"). Triton's own ``@jit``
helpers (``tl.max``, ``tl.sum``, ``tl.sort``, ...) are decorated when ``triton`` is first imported, so the
variable must be set before ``triton`` is imported *at all*, not only before the kernel module is.
Set it at the top of ``conftest.py`` / the entry script. :func:`backend_for` reads the variable at
call time; :func:`check_kernel_mode` turns a mismatch into a clear error instead of the obscure one
triton raises.
"""

from __future__ import annotations

import importlib.util
import os

import torch

TRITON_AVAILABLE: bool = importlib.util.find_spec("triton") is not None
BACKENDS: tuple[str, ...] = ("triton", "interpret", "torch")

# Spellings triton's own getenv_bool accepts as true (case-insensitive).
_TRUTHY = frozenset({"1", "true", "on", "yes", "y"})


def interpret_requested() -> bool:
    """True when ``TRITON_INTERPRET`` is set to a value triton treats as true (read now)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUTHY


def backend_for(*tensors: torch.Tensor | None, backend: str = "auto") -> str:
    """Return ``"triton"``, ``"interpret"`` or ``"torch"`` for a call on ``tensors``.

    ``None`` entries (optional inputs) are ignored. ``backend`` other than ``"auto"`` forces a
    choice (tests, benchmarks); forcing a Triton backend without triton installed raises.
    """
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        if backend != "torch" and not TRITON_AVAILABLE:
            raise RuntimeError(f"backend={backend!r} needs triton, which is not installed")
        return backend
    devices = {t.device.type for t in tensors if t is not None}
    if not TRITON_AVAILABLE or len(devices) != 1:
        return "torch"
    device = devices.pop()
    if interpret_requested() and device in ("cpu", "cuda"):
        # Under TRITON_INTERPRET every @triton.jit function is an interpreter object, so even
        # CUDA tensors run interpreted (triton copies them to the host and back).
        return "interpret"
    return "triton" if device == "cuda" else "torch"


def check_kernel_mode(kernel: object, backend: str) -> None:
    """Raise a clear ``RuntimeError`` if ``kernel`` cannot run as ``backend`` in this process.

    ``kernel`` is a ``@triton.jit`` object; it and triton's own helpers must have been decorated in
    the mode ``backend`` asks for (see the module docstring for why the order of setting
    ``TRITON_INTERPRET`` and importing triton matters).
    """
    import triton.language.standard as tl_standard

    want = backend == "interpret"
    for obj in (kernel, tl_standard.max):
        if (type(obj).__name__ == "InterpretedFunction") != want:
            raise RuntimeError(
                f"backend {backend!r} needs {getattr(obj, '__name__', obj)!r} decorated with "
                f"TRITON_INTERPRET {'set' if want else 'unset'}, but it was decorated "
                f"{'without' if want else 'with'} it; the variable must be set (or not) before triton "
                "is first imported, e.g. at the top of conftest.py"
            )
