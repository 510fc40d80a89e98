"""A fresh worker process for tests that need their own environment (model, dtype, limits):

    python tests/worker_process.py REQUEST.json

REQUEST: {"jobs": [job input, ...], "result": path}. The process imports handler (which reads the
environment and loads the model as the deployed worker does), runs each job through handler(),
and writes {"outputs": [...], "gpu_peak_mb": [...], "rss_peak_mb": ..., "load": LOAD_TIMINGS, "device": ...} to
`result`. GPU peaks are per job (torch.cuda.reset_peak_memory_stats before each)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(request_file: str) -> None:
    request = json.loads(Path(request_file).read_text())
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import torch

    from parakeet_worker import memory
    from parakeet_worker import model as asr
    from tools.testkit import answer, load_worker

    handler = load_worker()
    cuda = torch.cuda.is_available()
    outputs, peaks = [], []
    for i, job_input in enumerate(request["jobs"]):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        outputs.append(answer(handler, {"id": f"worker-process-{i}", "input": job_input}))
        peaks.append(torch.cuda.max_memory_allocated() / 2**20 if cuda else None)
    result = {
        "outputs": outputs,
        "gpu_peak_mb": peaks,
        "model_gpu_mb": None,
        "load": dict(getattr(handler, "LOAD_TIMINGS", {})),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "autocast": str(asr.state().autocast),
        "rss_peak_mb": memory.process_rss(key="VmHWM:") / 2**20,  # this process's resident peak, load included
    }
    if cuda:
        result["model_gpu_mb"] = sum(p.numel() * p.element_size() for p in asr.loaded_model().parameters()) / 2**20
    Path(request["result"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
