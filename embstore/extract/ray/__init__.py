"""Extraction on a Ray cluster (`embstore extract STORE --ray ADDRESS|auto`).

coordinator  the one process that touches the store: claims, leases, dedup, the writer
actors       the worker actor (the local worker loop with remote client and outbox)
nodes        what a worker checks on its node: scan roots, --path-map, naming nodes
driver       `RayLauncher`, the run monitor's launcher here: placement, watching actors,
             lost nodes, replacements

Ray Core actors, not Ray Data: embstore keeps its own scheduler (length-aware claims,
leases, dedup) and its exactly-once commit. Nothing in this package imports Ray at
module level; the CLI never imports it at load.
"""
