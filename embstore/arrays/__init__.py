"""Embedding rows on disk: Zarr arrays per model, and the rebuildable normalised-row cache.

zarr_arrays  `ModelArrays`: one model's `vectors` and `item_ids` arrays in embeddings.zarr
unit_cache   `UnitRows`: the committed rows L2-normalised, memory-mapped from STORE/cache
"""
