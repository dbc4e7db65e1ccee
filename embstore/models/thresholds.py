"""Similarity thresholds tuned per model.

A cosine threshold means nothing without its model: Resemblyzer's GE2E puts two
different LibriSpeech speakers near cosine 0.5-0.7 and one speaker's utterances near
0.8-0.9; CAM++ puts different speakers near 0.0-0.3 and one speaker near 0.5-0.8. A
threshold tuned on one and used with the other merges every speaker or splits each
one. So each clustering default is looked up here by the model's name; a model without
an entry gets Resemblyzer's values (`FALLBACK`, what every default was before models had
their own), which `tuned_for` tells apart by returning None.

How each number was tuned (benchmarks, BENCHMARKS.md):
  corpus_cluster  `embstore cluster`, average-linkage AHC over whole items: the middle
                  of the plateau of best purity + coverage on speakers 0-4 of the
                  shared data (`benchmarks/clustering.py real --model M`), reported on
                  speakers 5-9
  diarize_ahc     `embstore diarize --method ahc`, window AHC: best DER on the tuning
                  seeds of `benchmarks/diarize_der.py`, reported on other seeds
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["TunedThresholds", "TUNED", "FALLBACK", "tuned_for", "thresholds_for"]


@dataclass(frozen=True)
class TunedThresholds:
    corpus_cluster: float
    diarize_ahc: float


TUNED: dict[str, TunedThresholds] = {
    # plateaus (BENCHMARKS.md): corpus 0.675-0.775; window AHC tuned on the seeds of 0.1
    "resemblyzer-ge2e": TunedThresholds(corpus_cluster=0.725, diarize_ahc=0.6),
    # corpus: purity = coverage = 1 on speakers 0-4 from 0.325 to 0.65, the middle 0.5
    # (speakers 5-9 at 0.5: 1 and 1); window AHC: DER 3.4 %, count right 100 % from 0.25
    # to 0.35 on 60 conversations of tuning seeds 7-12 (0.4: 4.0 %, 0.45: 6.1 %)
    "campplus-zh-en-common": TunedThresholds(corpus_cluster=0.5, diarize_ahc=0.3),
}
FALLBACK = TUNED["resemblyzer-ge2e"]

# a model's name, then what a runtime and a window/VAD policy add to it (the same embedding space)
_NAME = re.compile(r"^(?P<base>.*?)(-openvino-(fp32|bf16)|-onnx)?(\+.*)?$")


def tuned_for(model_name: str) -> TunedThresholds | None:
    """The thresholds tuned for this model (its windows and runtimes share them), or None."""
    match = _NAME.match(model_name)
    return TUNED.get(match.group("base") if match else model_name)


def thresholds_for(model_name: str) -> TunedThresholds:
    """The thresholds to cluster this model's vectors with: its own, else `FALLBACK`."""
    return tuned_for(model_name) or FALLBACK
