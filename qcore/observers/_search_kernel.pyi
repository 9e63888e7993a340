"""Types of the compiled estimated range search (``_search_kernel.c``)."""

from typing import Any, Optional

def search(
    counts: Any,
    total: float,
    bin_width: float,
    dst_nbins: int,
    alphas: Any,
    betas: Any,
    bound_margin: float,
    sum_tolerance: float,
    coarse_tolerance: float,
    /,
) -> Optional[tuple[int, int]]:
    """(start_bin, end_bin), or None for a near tie or a non-finite estimate; the arrays are
    C-contiguous float32 buffers."""
