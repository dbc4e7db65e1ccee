"""Scanning: find audio files and keep the manifest's `files` and `items` in step.

sources  trees (`<dataset>/<speaker>/**`, `<speaker>/**`), Kaldi data dirs, list files
sync     header reading and the incremental sync of each folder with the manifest
"""
