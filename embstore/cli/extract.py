"""`embstore extract`."""

from __future__ import annotations

import sys

import click

from embstore.cli.common import conclude, echo_json, exit_status_documented, json_option, library_errors, open_store, store_argument

# embstore.models.common.DTYPES, spelled out: importing embstore.models loads NumPy,
# which `embstore --help` must not (tests/test_tf32.py keeps the two equal)
DTYPE_CHOICES = ["fp32", "tf32", "bf16", "fp16"]


@click.command()
@store_argument
@click.option("--model", "model", default=None, metavar="SPEC",
              help="campplus (default; `embstore models`), resemblyzer, wespeaker:DIR, wespeaker-hub:NAME, onnx:FILE or openvino:....")
@click.option("--gpus", default=None, metavar="0,1", help="One extraction process per listed GPU.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N (ignored with --gpus).")
@click.option("--workers", type=click.IntRange(1, 256), default=None,
              help="Extraction processes (per GPU with --gpus). Default 1.")
@click.option("--batch-frames", type=click.IntRange(1), default=None,
              help="Feature frames per batch (default: from free GPU memory; tuned for CPU).")
@click.option("--loader-workers", type=click.IntRange(1, 64), default=None,
              help="Loader threads per worker (read, decode, resample, features).")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="fp32", show_default=True,
              help="tf32 (CUDA only), bf16, fp16 trade exactness for speed; stored as a separate model.")
@click.option("--max-trim-frames", type=click.IntRange(0), default=0, show_default=True,
              help="Batch lengths that differ by up to K frames by trimming their ends (0 = exact).")
@click.option("--retry-failed", is_flag=True, help="Try failed items again.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Embed at most N items in this run.")
@click.option("--threads", type=click.IntRange(1), default=None, help="Torch threads per worker.")
@click.option("--runtime", type=click.Choice(["auto", "torch", "onnx", "openvino"]), default="auto", show_default=True,
              help="auto: ONNX Runtime for WeSpeaker models on CPU at fp32 (same numbers, faster), OpenVINO for "
                   "bf16 on CPU (AMX/AVX512-BF16), torch elsewhere. openvino: CPU, fp32 or bf16.")
@click.option("--batching", type=click.Choice(["auto", "equal"]), default="auto", show_default=True,
              help="auto: the model's exact mode (masked padded batches where supported); "
                   "equal: only equal-length buckets.")
@click.option("--features", type=click.Choice(["auto", "cpu", "device"]), default="auto", show_default=True,
              help="Where fbank features are computed: in loader threads (cpu) or batched on the model's "
                   "device (auto: device on GPU for WeSpeaker models).")
@click.option("--ray", "ray_address", default=None, metavar="ADDRESS|auto",
              help="Run on a Ray cluster (host:port, or auto: RAY_ADDRESS or the cluster running here): "
                   "one worker per GPU of the cluster, or --workers N CPU workers. See docs/ray.md.")
@click.option("--path-map", "path_map", multiple=True, metavar="OLD=NEW",
              help="With --ray: nodes that lack a scan root under OLD read it under NEW (repeatable).")
@click.option("--windows", default=None, metavar="WINDOW:SHIFT",
              help="One embedding per window of WINDOW s every SHIFT s inside speech (e.g. 1.5:0.75), "
                   "stored as a model of its own; see `embstore windows` and `embstore diarize`.")
@click.option("--vad", type=click.Choice(["silero", "webrtc", "none"]), default=None,
              help="Voice activity detection: where windows fall (default silero with --windows), or "
                   "whole items of speech only (default none).")
@json_option
@library_errors
@exit_status_documented
def extract(store, model, gpus, device, workers, batch_frames, loader_workers, dtype, max_trim_frames,
            retry_failed, limit, threads, features, runtime, batching, ray_address, path_map, windows, vad,
            as_json):
    """Embed every pending item of STORE, exactly once; resumes where a run stopped.

    \b
    With --limit N the run is asked for N items: those it leaves unclaimed do
    not count as work left.

    \b
    Examples:
        embstore extract store/                          # default model, CPU
        embstore extract store/ --gpus 0,1               # one process per GPU
        embstore extract store/ --device cpu --workers 2
        embstore extract store/ --model wespeaker:models/voxceleb_resnet34
        embstore extract store/ --retry-failed
        embstore extract store/ --ray auto               # on the Ray cluster of this head
        embstore extract store/ --ray auto --path-map /data=/mnt/data
        embstore extract store/ --windows 1.5:0.75       # windows in silero's speech
        embstore extract store/ --vad silero             # whole items, speech only
    """
    with open_store(store) as st:
        summary = st.extract(
            model=model, device=device, gpus=gpus, workers=workers, batch_frames=batch_frames,
            loader_workers=loader_workers, dtype=dtype, retry_failed=retry_failed, limit=limit,
            max_trim_frames=max_trim_frames, progress=not as_json, threads=threads, features=features,
            runtime=runtime, batching=batching, ray=ray_address, path_map=tuple(path_map), windows=windows,
            vad=vad,
        )
    if as_json:
        echo_json(summary.as_dict())
    elif summary.nothing_to_do and summary.outcome.failed:  # the model's failures, earlier runs'
        click.echo(f"nothing to do: {summary.model} has every item it can embed ({summary.outcome.failed} failed;"
                   " --retry-failed to try again)")
    elif summary.nothing_to_do:
        click.echo(f"nothing to do: every item has an embedding from {summary.model}")
    else:
        click.echo(
            f"{summary.model}: {summary.done} done, {summary.failed} failed, {summary.left} left in "
            f"{summary.seconds:.1f}s ({summary.items_per_second:.1f} items/s, {summary.x_realtime:.0f}x realtime; "
            f"{summary.batching} batching, mean batch {summary.mean_batch_items}, "
            f"padding {summary.padding_overhead:.1%}) on {', '.join(sorted(set(summary.devices)))}"
        )
    conclude(summary.outcome, store)


def register(cli: click.Group) -> None:
    cli.add_command(extract)
