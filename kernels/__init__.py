"""Triton kernels of fastft, installed as ``fastft.kernels``.

Each module holds one op's ``@triton.jit`` kernels, host launchers and the backend's
rows / forward / backward functions called from ``fastft/ops/<op>.py``. Importing a
module here imports triton; ``fastft.ops`` imports them lazily.
"""
