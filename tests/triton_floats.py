"""Imported first by the tests that run Triton kernels under its interpreter (TRITON_INTERPRET=1):
compiled Triton passes a Python float argument to a kernel as an fp32 scalar, the interpreter
(3.x) as the Python float itself, so a kernel that calls ``.to`` on one (liger's RMSNorm casts its
``eps``) fails there. This converts such arguments as the compiler does."""

import numpy as np
import triton.language as tl
from triton.runtime import interpreter

_convert = interpreter._implicit_cvt


def _with_floats(arg):
    if isinstance(arg, float):
        return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
    return _convert(arg)


interpreter._implicit_cvt = _with_floats

# liger's RMSNorm takes rsqrt from CUDA's libdevice, which the interpreter does not provide: here
# 1 / sqrt (the same to rounding), looked up when the kernel runs, as the interpreter needs
try:
    import liger_kernel.ops.rms_norm as _rms_norm

    _rms_norm.rsqrt = lambda x: 1.0 / tl.sqrt(x)
except ImportError:
    pass
