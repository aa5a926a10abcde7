"""Public functional ops. Each file holds one op: its reference (``<op>_ref``), its
public entry (``<op>(..., backend="auto")``) and its backend dispatch."""

from fastft.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref

__all__ = ["linear_cross_entropy", "linear_cross_entropy_ref"]
