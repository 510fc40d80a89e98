"""Build-time model fetch: put PARAKEET_MODEL into the image *unpacked*, so a cold start neither
downloads it nor unpacks it.

A .nemo is a tar of model_config.yaml, model_weights.ckpt and the tokenizer files. NeMo's
`restore_from(path.nemo)` extracts the whole archive (2.5 GB for Parakeet 0.6B) to a temp dir on
every start; given the extracted directory instead, NeMo restores in place (its
SaveRestoreConnector.model_extracted_dir). So the image downloads the .nemo once, unpacks it with
NeMo's own unpacker into <HF_HOME>/nemo-unpacked/<repo id>/, and drops the archive. The worker
looks there first (handler._unpacked_dir).

    python docker/fetch_model.py                       # PARAKEET_MODEL (a hub id), as the Dockerfile runs it
    python docker/fetch_model.py --unpack x.nemo DIR   # unpack any local .nemo into DIR
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path


def unpacked_dir(repo_id: str) -> Path:
    """Where the unpacked model of a hub id lives (handler._unpacked_dir looks in the same place)."""
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "nemo-unpacked" / repo_id


def unpack(nemo_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Extract a .nemo into `out_dir` with NeMo's own unpacker (the one restore_from runs on every
    start), through a sibling temp dir, so a half-written directory is never taken for a model."""
    from nemo.core.connectors.save_restore_connector import SaveRestoreConnector

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=out.name + ".partial-", dir=out.parent))
    try:
        SaveRestoreConnector._unpack_nemo_file(str(nemo_path), str(partial))
        if not (partial / "model_config.yaml").is_file() or not (partial / "model_weights.ckpt").is_file():
            raise SystemExit(f"{nemo_path} holds no model_config.yaml and model_weights.ckpt")
        partial.chmod(0o755)  # mkdtemp makes it private; the worker may run as another user
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def main(argv: list[str]) -> None:
    if argv[:1] == ["--unpack"] and len(argv) == 3:
        print(f"unpacked {argv[1]} into {unpack(argv[1], argv[2])}")
        return
    repo_id = os.environ.get("PARAKEET_MODEL", "nvidia/parakeet-tdt-0.6b-v3")
    if repo_id.endswith(".nemo") or os.path.exists(repo_id):
        print(f"PARAKEET_MODEL={repo_id} is a local path: nothing to download")
        return
    from huggingface_hub import hf_hub_download

    filename = repo_id.rsplit("/", 1)[-1] + ".nemo"
    with tempfile.TemporaryDirectory() as cache:  # the archive is not kept in the image
        path = hf_hub_download(repo_id, filename, cache_dir=cache)
        size = os.path.getsize(path)
        out = unpack(path, unpacked_dir(repo_id))
    print(f"baked {repo_id} ({size / 1e9:.2f} GB) unpacked into {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
