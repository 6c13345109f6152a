"""m3rt's own post-processing kernels (CPU, vectorised NumPy)."""

from m3rt.kernels.colbert import colbert_counts, split_colbert
from m3rt.kernels.sparse import SparseRows, aggregate_sparse

__all__ = ["SparseRows", "aggregate_sparse", "colbert_counts", "split_colbert"]
