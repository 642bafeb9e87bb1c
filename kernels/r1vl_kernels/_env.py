"""What every kernel module shares: whether Triton runs through its CPU interpreter, and
the constants of the base-2 exponentials (exp(x) = 2**(x * LOG2E), ln(x) = log2(x) * LN2).
Plain Python, no triton import: the package imports it on CPU-only installs too."""
import math
import os

LN2 = math.log(2.0)
LOG2E = 1.0 / LN2


def interpreting() -> bool:
    """TRITON_INTERPRET is set: Triton kernels run on CPU through the interpreter. Read at
    call time (triton.jit reads it when a kernel module is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
