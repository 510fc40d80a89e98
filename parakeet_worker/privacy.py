"""No telemetry: the switches that keep the worker's libraries from recording or sending anything
about the machine, set before those libraries are imported.

A speech worker handles people's recordings; nothing may leave it but what a request names (its
audio URLs), the model download its configuration names, and the Runpod SDK's own job traffic.
What the libraries the worker imports do by themselves (checked in their source, versions of
requirements.txt / constraints.txt):

- onnxruntime 1.31 (silero VAD) at import writes a device id and a SQLite queue of events (OS,
  CPU model, container type, the Python path) under ~/.cache/Microsoft/DeveloperTools/.onnxruntime/
  and a `.ses` file into $TMPDIR, and is built to upload them to mobile.events.data.microsoft.com.
  ORT_DISABLE_TELEMETRY=1, read by its C++ core when its environment starts, stops all of it.
- huggingface_hub: `send_telemetry` pings the Hub unless HF_HUB_DISABLE_TELEMETRY (or
  DO_NOT_TRACK) is set; the worker never calls it itself, a library might (transformers, which
  NeMo imports, checks the same switch).
- NeMo 3.0 records OneLogger events on model restores; with no exporter package installed
  (nv-one-logger-wandb and the like, none is) they go nowhere, and no variable turns it off.
- wandb (a NeMo dependency, imported by its experiment manager, not by inference): WANDB_MODE=
  disabled makes any `wandb.init` a no-op, so nothing can start a run by accident.
- PyTorch Lightning, torch, FastAPI, uvicorn, runpod: nothing on by default. FastAPI's
  OpenTelemetry export needs FASTAPI_OTEL_AUTO_CONFIGURE=true; it is left to the operator.
- The Runpod SDK's start-up fitness checks open one TCP connection to 8.8.8.8:53 (nothing is
  sent) on a real Runpod worker; RUNPOD_SKIP_AUTO_SYSTEM_CHECKS=true skips them, and its memory,
  disk and GPU checks with them, so it is not set here.

Each switch is set only where the operator has not set the variable: an explicit value wins.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

# variable -> the value that turns its library's telemetry off
TELEMETRY_SWITCHES: dict[str, str] = {
    "ORT_DISABLE_TELEMETRY": "1",  # onnxruntime (its C++ core reads it)
    "HF_HUB_DISABLE_TELEMETRY": "1",  # huggingface_hub
    "DO_NOT_TRACK": "1",  # the cross-tool convention (https://donottrack.sh); huggingface_hub reads it too
    "WANDB_MODE": "disabled",  # wandb, should anything start a run
}


def telemetry_off(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set each of TELEMETRY_SWITCHES in `environ` (os.environ by default, which is what native
    code's getenv sees) where it is unset or empty; the variables it set. Cheap and idempotent:
    main() calls it first, and so does every function that imports one of these libraries, so a
    worker started any other way (tests, an HTTP server embedded elsewhere) is covered too."""
    env = os.environ if environ is None else environ
    changed: dict[str, str] = {}
    for name, value in TELEMETRY_SWITCHES.items():
        if not env.get(name):
            env[name] = value
            changed[name] = value
    return changed
