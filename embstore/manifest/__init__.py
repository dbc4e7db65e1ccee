"""The manifest: SQLite, the truth about every file, item, model, task and run.

connection  connect, transactions, time stamps, locks, chunked IN lists, the live-item predicate
schema      migrations (sqlite-utils), applied when a store opens
registry    the `models` table: `ModelRecord` (a row typed, its frontend parsed once), naming
database    `Manifest`: one store's open manifest, the model registry
tasks       extraction's statements on `tasks`: refresh, claim, renew, release, commit, dedup
reads       what queries, verify and evaluation read of `tasks` (no SQL on tasks outside manifest/)
runs        the `runs` table: a run's start and end, crashed runs
selection   which items a query or export reads (one WHERE builder)
reports     status and error reports
"""
