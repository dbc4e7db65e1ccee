"""Process start to model ready (and to the first embedding), cold vs with the user cache.

    python benchmarks/openvino_startup.py --out startup-out            # ~2 min on 2 cores

Each case is a fresh `python -c` process timed from the parent (interpreter start and
imports included, as a user waits for them): load the model, then embed one 3 s clip.
  torch                wespeaker:DIR, eager torch (no cache involved)
  ort_cached_export    onnx:FILE of an export already in the user cache
  openvino_cold        openvino:DIR on an empty user cache (torch load + ONNX export +
                       compile + blob write)
  openvino_warm        openvino:DIR again: index hit (no torch), compiled blob imported
  openvino_no_blob     export cached but OpenVINO's blob cache off (compile every time)
for fp32 and bf16; median of --repeats (cold: a new empty cache each time).
Writes results.json and results.md into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data" / "librispeech-test-other"

CHILD = """
import time, sys
t0 = time.perf_counter()
from embstore.models import load
encoder = load(sys.argv[1], dtype=sys.argv[2], **eval(sys.argv[4]))
t1 = time.perf_counter()
encoder.embed_file(sys.argv[3], 0, 3)
t2 = time.perf_counter()
print(t1 - t0, t2 - t0, 'torch' in sys.modules)
"""


def timed(spec: str, dtype: str, clip: str, options: str, cache: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "EMBSTORE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, spec, dtype, clip, options], env=env, check=True,
                         capture_output=True, text=True)
    total = time.perf_counter() - started
    in_load, in_first, torch_loaded = out.stdout.split()
    startup = total - float(in_first)  # interpreter start before the child's first line
    return {"ready_s": startup + float(in_load), "first_embedding_s": total, "torch_imported": torch_loaded == "True"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", default="fp32,bf16")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from benchmarks.runtimes import describe_cpu
    from embstore.models.openvino import cpu_bf16_support
    from tests.wespeaker_dirs import make_wespeaker_dir

    model_dir = args.out / "models" / "resnet34-0"
    if not (model_dir / "avg_model.pt").exists():
        make_wespeaker_dir(args.out / "models", arch="resnet34")
    clip = str(min(SHARED.glob("*/*.flac")))
    warm = args.out / "cache-warm"
    results: dict = {"machine": describe_cpu(), "cases": {}}
    for dtype in args.dtypes.split(","):
        if dtype == "bf16" and not cpu_bf16_support()[0]:
            continue
        cases: dict[str, list[dict]] = {}
        for r in range(args.repeats):
            cold = args.out / f"cache-cold-{r}"
            shutil.rmtree(cold, ignore_errors=True)
            plan = [("torch", f"wespeaker:{model_dir}", "{}", warm),
                    ("openvino_cold", f"openvino:{model_dir}", "{'threads': 1}", cold),
                    ("openvino_warm", f"openvino:{model_dir}", "{'threads': 1}", cold),
                    ("openvino_no_blob", f"openvino:{model_dir}", "{'threads': 1, 'compiled_cache': False}", cold)]
            if dtype == "fp32":
                from embstore.models.openvino import _export

                os.environ["EMBSTORE_CACHE"] = str(warm)
                plan.insert(1, ("ort_cached_export", "onnx:" + _export(str(model_dir), None, None)["onnx"],
                                "{'threads': 1}", warm))
            for name, spec, options, cache in plan:
                cases.setdefault(name, []).append(timed(spec, dtype, clip, options, cache))
                print(dtype, name, cases[name][-1], flush=True)
        for name, runs in cases.items():
            results["cases"][f"{name}@{dtype}"] = {
                "ready_s": round(statistics.median(x["ready_s"] for x in runs), 3),
                "first_embedding_s": round(statistics.median(x["first_embedding_s"] for x in runs), 3),
                "torch_imported": runs[-1]["torch_imported"], "all_ready_s": [round(x["ready_s"], 3) for x in runs],
            }
    lines = [f"Machine: {results['machine']} (shared with other jobs while measured)", "",
             "| case | dtype | process start to model ready (s) | to first embedding (s) | torch imported |",
             "|---|---|---|---|---|"]
    for key, e in results["cases"].items():
        name, dtype = key.rsplit("@", 1)
        lines.append(f"| {name} | {dtype} | {e['ready_s']} | {e['first_embedding_s']} | {e['torch_imported']} |")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
