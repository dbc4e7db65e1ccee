"""Vector search over a store's rows: the per-model ANN index (`index`: which index, its
build in bounded memory, incremental adds, the drift bound, atomic publishing), top-k and
range search with an exact re-rank (`knn`, used by `embstore.query.similar`), the same
voices across two datasets (`overlap`) and near-duplicate items (`duplicates`).

FAISS (`pip install 'embstore[search]'`) is imported inside the functions that use it."""
