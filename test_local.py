"""Run the worker once, in-process, on the bundled samples and print the JSON response.

    SKIP_MODEL_LOAD=1 python test_local.py          # dry run: fetch, decode, batch; no model
    PARAKEET_MODEL=models/demo-tdt.nemo python test_local.py
    python test_local.py path/or/url ...            # your own sources (paths under ALLOWED_LOCAL_ROOTS)

Exits non-zero when the job or any item reports an error.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

SAMPLES = Path(__file__).resolve().parent / "samples"


def main(argv: list[str]) -> int:
    import handler

    handler.ensure_model()  # unless SKIP_MODEL_LOAD=1

    sources = argv or sorted(str(p) for p in SAMPLES.iterdir() if p.suffix in {".wav", ".mp3", ".ogg", ".flac", ".m4a"})
    job = {"id": "local-test", "input": {"timestamps": True, "inputs": [{"source": s} for s in sources]}}
    output = asyncio.run(handler.handler(job))
    print(json.dumps(output, indent=2))
    failed = "error" in output or any("error" in r for r in output.get("results", []))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
