"""Devices and the model's arithmetic: the names a config uses, as torch sees them.

A model runs its forward (and the derivatives through it) in one of

* ``float64``: the reference; the default of every analysis stage on a CPU;
* ``float32``: IEEE single precision, also for matrix products (TensorFloat-32 off);
* ``tf32``: float32 storage with TensorFloat-32 matrix products and convolutions on CUDA
  (10-bit mantissa inputs, float32 accumulation); the same as ``float32`` on a CPU;
* ``bfloat16``: bfloat16 parameters and activations.

Projections (δ = ⟨b, Δθ⟩) and the decomposition terms accumulate in float64 whatever the
model runs in; :func:`arithmetic` sets the TensorFloat-32 switches for the code inside it and
restores them after, so a worker process gets the same arithmetic as the driver.

Example:
    >>> model_dtype("tf32"), model_dtype("bfloat16")
    (torch.float32, torch.bfloat16)
    >>> resolve_device("cpu")
    device(type='cpu')
    >>> with arithmetic("tf32"):
    ...     pass
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

ARITHMETIC = {"float64": torch.float64, "float32": torch.float32, "tf32": torch.float32,
              "bfloat16": torch.bfloat16}


def model_dtype(name: str) -> torch.dtype:
    """The parameter dtype of an arithmetic name (``"tf32"`` stores float32)."""
    if name not in ARITHMETIC:
        raise ValueError(f"unknown arithmetic {name!r}; known: {sorted(ARITHMETIC)}")
    return ARITHMETIC[name]


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``"auto"`` (or None) is CUDA when a CUDA device is available, else the CPU; a CUDA
    device asked for on a machine without one is an error naming the fix."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(name)!r} was asked for, but torch sees no CUDA device "
                         f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}); use "
                         "--device cpu, or install a CUDA build of torch")
    return device


@contextmanager
def arithmetic(name: str) -> Iterator[None]:
    """TensorFloat-32 on for ``"tf32"`` and off otherwise, inside the block."""
    model_dtype(name)
    tf32 = name == "tf32"
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


__all__ = ["ARITHMETIC", "arithmetic", "model_dtype", "resolve_device"]
