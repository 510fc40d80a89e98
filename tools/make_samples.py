"""Write the bundled sample clips (samples/) and their transcripts, deterministically.

    python -m tools.make_samples --out samples
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from tools import synth
from tools.testkit import encode

# file name -> (text, voice, speed, ffmpeg codec arguments)
SAMPLES = {
    "digits.wav": ("one two three four five six seven eight nine zero", "en-us", 160, ["-c:a", "pcm_s16le"]),
    "hello.mp3": ("hello world", "en-gb", 150, ["-c:a", "libmp3lame", "-b:a", "48k"]),
    "commands.ogg": ("stop go left right up down", "en-us+f3", 170, ["-c:a", "libopus", "-b:a", "32k"]),
    "yes-no.flac": ("yes no yes", "en-gb-x-rp+f2", 140, ["-c:a", "flac"]),
    "countdown.m4a": ("three two one go", "en-us+m3", 180, ["-c:a", "aac", "-b:a", "48k"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="samples")
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (text, voice, speed, codec) in SAMPLES.items():
            wav = synth.write(Path(tmp) / "s.wav", synth.speak(text, voice, speed))
            encode(wav, out / name, "-map_metadata", "-1", "-fflags", "+bitexact", codec=codec)
    transcripts = {name: text for name, (text, *_rest) in SAMPLES.items()}
    (out / "TRANSCRIPTS.json").write_text(json.dumps(transcripts, indent=2) + "\n")
    print(f"wrote {len(SAMPLES)} samples to {out}")


if __name__ == "__main__":
    main()
