"""`wespeaker-hub:NAME`: WeSpeaker's pretrained models, fetched by WeSpeaker's own hub code.

`wespeaker.cli.hub.Hub.get_model(NAME)` downloads into `$WESPEAKER_HOME/NAME` (default
`~/.wespeaker/NAME`) unless `config.yaml` and `avg_model.pt` are already there; the
directory is then loaded as `wespeaker:DIR`. Without network access this fails with a
one-line `ModelError`: download on a connected machine (or copy the directory) and use
`wespeaker:DIR`.

As in WeSpeaker's CLI, `campplus` and `eres2net` (3D-Speaker conversions) get a povey
window on normalised waveforms; the others hamming on int16-scaled samples.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from typing import Any

from embstore.errors import ModelError
from embstore.models.base import Encoder
from embstore.models.common import short_error
from embstore.models.wespeaker import WeSpeakerEncoder, import_wespeaker

# hub models whose frontend is a pretrained SSL network, which embstore does not run
_UNSUPPORTED = {"w2vbert2_mfa": "a w2v-BERT frontend"}
_NORMALISED = {"campplus", "eres2net"}


def hub_names() -> list[str]:
    return sorted(import_wespeaker("cli.hub").Hub.Assets)


def download(name: str) -> str:
    """The local directory of hub model `name`, downloading it if needed."""
    hub = import_wespeaker("cli.hub")
    if name not in hub.Hub.Assets:
        raise ModelError(f"wespeaker-hub:{name}: unknown name; known: {', '.join(sorted(hub.Hub.Assets))}")
    if name in _UNSUPPORTED:
        raise ModelError(f"wespeaker-hub:{name}: uses {_UNSUPPORTED[name]}, which embstore does not support")
    try:
        # the hub prints progress on stdout; keep stdout for the command's own output
        with contextlib.redirect_stdout(sys.stderr):
            return str(hub.Hub.get_model(name))
    except SystemExit:
        raise ModelError(f"wespeaker-hub:{name}: WeSpeaker's hub refused the name") from None
    except StopIteration:
        raise ModelError(f"wespeaker-hub:{name}: the hub's index has no file for this model") from None
    except Exception as exc:
        # requests' connection errors are OSErrors whose text is a long retry report
        reason = "cannot reach the hub server" if isinstance(exc, OSError) else short_error(exc, 120)
        raise ModelError(
            f"wespeaker-hub:{name}: download failed ({type(exc).__name__}: {reason}); "
            "without network access, fetch the model elsewhere and use wespeaker:DIR"
        ) from None


def load_hub(name: str, device: str = "cpu", dtype: str = "fp32", **options: Any) -> Encoder:
    overrides = {"window_type": "povey", "waveform_norm": True} if name in _NORMALISED else {}
    overrides.update(options.pop("config_overrides", None) or {})
    try:  # reject a bad option before a download, not after
        inspect.signature(WeSpeakerEncoder).bind(name, device=device, dtype=dtype, **options)
    except TypeError as exc:
        raise ModelError(f"wespeaker-hub:{name}: bad option ({exc})") from None
    model_dir = download(name)
    return WeSpeakerEncoder(
        model_dir,
        device=device,
        dtype=dtype,
        name=f"wespeaker-hub-{name}",
        spec=f"wespeaker-hub:{name}",
        config_overrides=overrides,
        **options,
    )
