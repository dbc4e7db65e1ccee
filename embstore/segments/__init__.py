"""Segments in time: where the speech is (`vad`), which windows a model embeds
(`windows`), how a run cuts each item for its model (`policy`: speech only, or windows
inside the speech), and how a batch of windows becomes embeddings (`window_embed`, halved
when a device runs out of memory: `oom`, shared with the extraction worker)."""
