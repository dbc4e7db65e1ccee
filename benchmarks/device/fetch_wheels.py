"""Stage what the GPU check needs on the offline CUDA machine: wheels and real speech.

Run here, on a machine that reaches the package registries, from the repository root:

    python benchmarks/device/fetch_wheels.py            # .whl/ and .gpu-data/
    python benchmarks/device/fetch_wheels.py --check    # only check what is staged

It downloads into `.whl/` (git-ignored) the Python 3.12 manylinux x86_64 wheels, each
named with its version and fetched with `--no-deps`, of every package embstore needs that
the stock CUDA image lacks (/work/.library/device/KINDS.md lists what that image holds),
and copies ../shared/data/librispeech-test-other (15 MB of real speech, when present)
into `.gpu-data/` (git-ignored) so the corpus there is made from real utterances: the
`shared/` folder beside a checkout does not travel to the device machine.

Then it checks, from each wheel's own METADATA, that every requirement is either staged
or in the image (IMAGE_HAS), or deliberately left out (NOT_NEEDED, with the reason), and
that wheels + data + the working tree stay under the device tool's 64 MiB per call.

Left out: openvino (59 MB for cp312 alone, over the limit with the rest; it is embstore's
CPU bf16 runtime and has no part in a GPU check) and openvino-telemetry.
The versions are the ones the project's test suite passes with (/work/main/.venv).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WHEELS_DIR = REPO / ".whl"
DATA_DIR = REPO / ".gpu-data"
SHARED_SPEECH = REPO.parent / "shared" / "data" / "librispeech-test-other"
LIMIT_BYTES = 64 * 1024 * 1024

# name==version -> why embstore needs it on the device
WHEELS: dict[str, str] = {
    "soundfile==0.14.0": "audio I/O (bundles libsndfile)",
    "cffi==2.1.1": "soundfile's C binding",
    "pycparser==3.12": "cffi's parser",
    "zarr==3.1.6": "the store's arrays",
    "numcodecs==0.16.6": "zarr's codecs",
    "donfig==0.8.1.post1": "zarr's configuration",
    "google-crc32c==1.9.0": "zarr 3's crc32c codec (the package zarr 3 requires)",
    "sqlite-utils==4.2.1": "the manifest",
    "sqlite-fts4==1.0.3": "sqlite-utils",
    "click-default-group==1.2.4": "sqlite-utils",
    "kaldi-native-fbank==1.23.0": "Kaldi fbank on the CPU (the reference features)",
    "soxr==1.1.0": "resampling",
    "resemblyzer==0.1.4": "the default model (its wheel carries the GE2E weights)",
    "webrtcvad-wheels==2.0.14.post1": "resemblyzer's VAD; a binary wheel of the `webrtcvad` module",
    "librosa==0.11.0": "resemblyzer's mel frontend",
    "audioread==3.1.0": "librosa",
    "pooch==1.9.0": "librosa",
    "platformdirs==4.14.9": "pooch",
    "decorator==5.3.1": "librosa",
    "kaldiio==2.18.1": "Kaldi ark/scp export",
    "wespeaker-unofficial==0.0.2": "WeSpeaker's model zoo (pure Python)",
}

# in the stock CUDA image (KINDS.md, "Python packages already there"); read from that file
# when it is here, this copy otherwise (the names that matter for the wheels above)
IMAGE_HAS_FALLBACK = {
    "numpy", "scipy", "pyyaml", "click", "tqdm", "rich", "onnx", "onnxruntime", "matplotlib", "pytest",
    "pytest-xdist", "torch", "torchaudio", "numba", "llvmlite", "joblib", "msgpack", "lazy-loader",
    "scikit-learn", "packaging", "typing-extensions", "requests", "tabulate", "python-dateutil", "pluggy",
    "pip", "setuptools", "accelerate", "peft", "hypothesis",
}
KINDS_MD = Path("/work/.library/device/KINDS.md")

# requirements of the wheels above that embstore never imports, or that Python provides
NOT_NEEDED = {
    "typing": "the standard library's module (the PyPI backport would shadow it)",
    "hdbscan": "WeSpeaker's diarization CLI; embstore imports only the model zoo",
    "umap-learn": "WeSpeaker's diarization CLI",
    "silero-vad": "WeSpeaker's CLI",
    "s3prl": "WeSpeaker's SSL frontends (embstore supports fbank models only)",
    "openai-whisper": "WeSpeaker's SSL frontends",
    "standard-aifc": "Python >= 3.13 only",
    "standard-sunau": "Python >= 3.13 only",
}

# modules a staged wheel of another name provides
PROVIDED_BY = {"webrtcvad": "webrtcvad-wheels"}

PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages() -> set[str]:
    """Package names the CUDA image holds: KINDS.md's list when readable, else the fallback."""
    try:
        text = KINDS_MD.read_text(encoding="utf-8")
    except OSError:
        return set(IMAGE_HAS_FALLBACK)
    match = re.search(r"Packages: (.+?)\.\s*$", text, flags=re.M)
    if not match:
        return set(IMAGE_HAS_FALLBACK)
    return {canonical(n.strip()) for n in match.group(1).split(",") if n.strip()}


def requirements(metadata: str, python: tuple[int, int] = (3, 12)) -> list[str]:
    """Canonical names a wheel's METADATA requires on Linux CPython `python`, extras aside."""
    from packaging.requirements import Requirement

    env = {"python_version": f"{python[0]}.{python[1]}", "python_full_version": f"{python[0]}.{python[1]}.0",
           "sys_platform": "linux", "platform_system": "Linux", "implementation_name": "cpython",
           "platform_machine": "x86_64", "platform_python_implementation": "CPython", "os_name": "posix",
           "extra": ""}
    out = []
    for line in metadata.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate(env):
            continue  # an extra, another Python, another platform
        out.append(canonical(req.name))
    return out


def wheel_metadata(path: Path) -> tuple[str, str]:
    """(canonical project name, METADATA text) of a wheel file."""
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(name).decode("utf-8", errors="replace")
    project = re.search(r"^Name: (.+)$", text, flags=re.M)
    return canonical(project.group(1).strip() if project else path.name.split("-")[0]), text


def unmet(staged: dict[str, str], image: set[str]) -> list[str]:
    """'wheel needs X' for each requirement neither staged, in the image, nor NOT_NEEDED."""
    problems = []
    for project, metadata in sorted(staged.items()):
        for need in requirements(metadata):
            need = PROVIDED_BY.get(need, need)
            if need not in staged and need not in image and need not in NOT_NEEDED:
                problems.append(f"{project} needs {need}")
    return problems


def download(specs: list[str]) -> None:
    WHEELS_DIR.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "-d", str(WHEELS_DIR)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd + specs, check=True)


def stale_wheels(specs: list[str]) -> list[Path]:
    """Wheels in .whl/ that are not the pinned version of a listed package: two versions
    of one package stop the whole install there."""
    wanted = {canonical(s.split("==")[0]): s.split("==")[1] for s in specs}
    out = []
    for path in sorted(WHEELS_DIR.glob("*.whl")):
        project, text = wheel_metadata(path)
        version = re.search(r"^Version: (.+)$", text, flags=re.M)
        if wanted.get(project) != (version.group(1).strip() if version else None):
            out.append(path)
    return out


def tree_bytes() -> int:
    """What travels anyway: tracked and untracked-not-ignored files of the checkout."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")
    return sum((REPO / p).stat().st_size for p in listed if p and (REPO / p).is_file())


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def stage_speech() -> None:
    target = DATA_DIR / SHARED_SPEECH.name
    if target.exists() or not SHARED_SPEECH.exists():
        return
    shutil.copytree(SHARED_SPEECH, target, ignore=shutil.ignore_patterns("*.md"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="download nothing; check what is staged")
    ap.add_argument("--no-data", action="store_true", help="do not copy ../shared/data into .gpu-data/")
    args = ap.parse_args()
    specs = list(WHEELS)
    if not args.check:
        for path in stale_wheels(specs) if WHEELS_DIR.exists() else []:
            print(f"removing {path.name} (not a pinned version)")
            path.unlink()
        have = {wheel_metadata(p)[0] for p in WHEELS_DIR.glob("*.whl")} if WHEELS_DIR.exists() else set()
        missing = [s for s in specs if canonical(s.split("==")[0]) not in have]
        if missing:
            download(missing)
        if not args.no_data:
            stage_speech()
    staged = {}
    for path in sorted(WHEELS_DIR.glob("*.whl")):
        project, metadata = wheel_metadata(path)
        staged[project] = metadata
        print(f"{path.stat().st_size / 2**20:7.2f} MiB  {path.name}")
    problems = [f"missing wheel: {s}" for s in specs if canonical(s.split("==")[0]) not in staged]
    problems += [f"extra or stale wheel: {p.name}" for p in stale_wheels(specs)]
    problems += unmet(staged, image_packages())
    wheels, data, tree = folder_bytes(WHEELS_DIR), folder_bytes(DATA_DIR), tree_bytes()
    total = wheels + data + tree
    print(f"wheels {wheels / 2**20:.1f} MiB ({len(staged)} files) + speech data {data / 2**20:.1f} MiB "
          f"+ working tree {tree / 2**20:.1f} MiB = {total / 2**20:.1f} MiB of the 64 MiB a call carries")
    if total > LIMIT_BYTES:
        problems.append(f"{total / 2**20:.1f} MiB is over the device tool's 64 MiB per call")
    for problem in problems:
        print("PROBLEM:", problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
