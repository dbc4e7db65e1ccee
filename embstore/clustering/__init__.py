"""Clustering vectors, once for every use: k-means (`kmeans`), average-linkage AHC
(`ahc`), label bookkeeping (`labels`), the corpus engine that scales AHC to millions of
items in bounded memory (`corpus`), and the store-backed `embstore cluster` (`stored`).
Diarization (`embstore.diarize`) builds on the algorithms here."""
