"""Extraction: every pending item of a store embedded exactly once.

options     `ExtractOptions`: every user-facing option, validated once
messages    typed messages: everything that crosses a process (or actor) boundary
plan        what a run will do: devices, runtime, batching, fingerprint, nothing-to-do
client      `ManifestClient`: claims, leases, dedup lookups (SQLite implementation)
outbox      `Outbox`: results to the writer, reports to the supervisor (queue implementation)
loading     reading, hashing, decoding and features of claimed items
batching    grouping loaded items into batches the encoder embeds exactly
worker      the worker loop: claim -> load -> batch -> embed -> send
writer      the one writer: Zarr rows first, then done in one transaction
monitor     the run monitor: the `runs` row, rounds, progress, Ctrl-C, the outcome; drives a launcher
supervisor  the local launcher: a writer process and worker processes from a fork server
"""
