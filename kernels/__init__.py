"""Triton kernels of fastft, installed as ``fastft.kernels``.

Each module holds one op's ``@triton.jit`` kernels, host launchers and the backend's
rows / forward / backward functions called from ``fastft/ops/<op>.py``. Importing one of
them imports triton; ``fastft.ops`` imports them lazily. ``_common`` (no triton) holds
what the kernels share with the other backends. Nothing here imports ``fastft.ops``.
"""
