"""Build-time model download: put PARAKEET_MODEL's .nemo file into HF_HOME inside the image, so a
cold start never downloads it. The worker finds it there (handler._cached_nemo_files) and
restores it directly, without touching the network."""

from __future__ import annotations

import os
import sys

from huggingface_hub import hf_hub_download


def main() -> None:
    repo_id = os.environ.get("PARAKEET_MODEL", "nvidia/parakeet-tdt-0.6b-v3")
    if repo_id.endswith(".nemo") or os.path.exists(repo_id):
        print(f"PARAKEET_MODEL={repo_id} is a local file: nothing to download")
        return
    filename = repo_id.rsplit("/", 1)[-1] + ".nemo"
    path = hf_hub_download(repo_id, filename)
    print(f"baked {repo_id} into {path} ({os.path.getsize(path) / 1e9:.2f} GB)")


if __name__ == "__main__":
    sys.exit(main())
