"""Speaker diarization of one item's windows: clustering, segments, RTTM, DER.

Light to import (no torch): the pipeline's heavy parts load when first used.

    from embstore.diarize.pipeline import diarize_audio, diarize_windows
    from embstore.diarize.speakers import cluster_windows
    from embstore.diarize.rttm import Segment, windows_to_segments, write_rttm, read_rttm
    from embstore.diarize.der import diarization_error, corpus_der
"""
