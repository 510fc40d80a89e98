"""What language detection costs, next to what the model costs for the same audio.

    python -m bench.language

Detection (parakeet_worker/language.py): a transcript's language and each segment's, as the
worker labels every item. Its input is text, so its cost is measured on transcripts built from
the fixture sentences (tests/data/language_sentences.json) at a speaking rate of 150 words a
minute, one segment per sentence: per item (one minute of speech) and per hour of transcript.
The model: the bundled demo model (models/demo-tdt.nemo) decoding synthesized speech on this CPU
with timestamps (the encoder and batched greedy TDT decoding, as the worker calls them). The
demo model is far smaller than Parakeet (a few million parameters against 600 million), so the
ratio printed is an upper bound of detection's share on the real model.

Also: the library's load time (the first detection, or language.warm_up()) and the memory it
adds. Writes bench/out/language.json. The CPU is shared: numbers are noisy; best of --repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out" / "language.json"
FIXTURES = REPO / "tests" / "data" / "language_sentences.json"
CHARS_PER_MINUTE = 900  # 150 words a minute, ~6 characters a word with its space


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def transcript(sentences: list[str], minutes: float) -> list[str]:
    """Segments (sentences, round-robin) adding up to `minutes` of speech at CHARS_PER_MINUTE."""
    out, total, i = [], 0, 0
    while total < minutes * CHARS_PER_MINUTE:
        s = sentences[i % len(sentences)]
        out.append(s)
        total += len(s) + 1
        i += 1
    return out


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def detection_cost(repeat: int) -> dict:
    from parakeet_worker.analysis import language

    before = rss_mb()
    t0 = time.perf_counter()
    language.warm_up(language.V3_LANGUAGES)
    load_s = time.perf_counter() - t0
    data = json.loads(FIXTURES.read_text(encoding="utf-8"))
    per_language = {}
    for code in ("en", "de", "uk", "el", "fi"):
        hour = transcript(data["long"][code], 60)
        minute = transcript(data["long"][code], 1)

        def label(segments):
            language.detect(" ".join(segments), language.V3_LANGUAGES)
            language.detect_many(segments, language.V3_LANGUAGES)

        hour_s = best_of(repeat, lambda seg=hour: label(seg))
        minute_s = best_of(repeat * 5, lambda seg=minute: label(seg))
        per_language[code] = {
            "hour_chars": sum(len(s) + 1 for s in hour),
            "hour_segments": len(hour),
            "per_hour_ms": round(hour_s * 1e3, 2),
            "per_item_1min_ms": round(minute_s * 1e3, 3),
            "per_segment_us": round(hour_s / len(hour) * 1e6, 1),
        }
    return {
        "load_s": round(load_s, 3),
        "rss_added_mb": round(rss_mb() - before, 1),
        "by_language": per_language,
        "per_hour_ms_max": max(v["per_hour_ms"] for v in per_language.values()),
        "per_item_1min_ms_max": max(v["per_item_1min_ms"] for v in per_language.values()),
    }


def model_cost(repeat: int, seconds: float) -> dict:
    """Seconds of model time per second of audio: the demo model, one batch of 4 rows of
    synthesized speech of `seconds` each, with timestamps."""
    import torch
    from nemo.collections.asr.models import ASRModel
    from omegaconf import open_dict

    from tools import synth

    torch.set_num_threads(2)
    model = ASRModel.restore_from(str(REPO / "models" / "demo-tdt.nemo"), map_location="cpu")
    model.eval()
    cfg = model.cfg.decoding
    with open_dict(cfg):
        cfg.strategy = "greedy_batch"
        cfg.compute_timestamps = True
    model.change_decoding_strategy(cfg, verbose=False)
    words = "hello world one two three four five six seven eight nine zero yes no stop go left right up down"
    speech = synth.speak(words)
    reps = int(np.ceil(seconds * synth.SAMPLE_RATE / len(speech)))
    clip = np.tile(speech, reps)[: int(seconds * synth.SAMPLE_RATE)].astype(np.float32)
    audio = torch.from_numpy(np.stack([clip] * 4))
    lengths = torch.tensor([clip.shape[0]] * 4)

    def run():
        with torch.inference_mode():
            enc, enc_len = model.forward(input_signal=audio, input_signal_length=lengths)
            model.decoding.rnnt_decoder_predictions_tensor(enc, enc_len, return_hypotheses=True)

    run()  # warm-up
    took = best_of(repeat, run)
    audio_s = 4 * seconds
    return {"audio_s": audio_s, "model_s": round(took, 3), "model_s_per_audio_hour": round(took / audio_s * 3600, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each of the 4 model rows")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    detection = detection_cost(args.repeat)
    model = model_cost(args.repeat, args.seconds)
    share = detection["per_hour_ms_max"] / 1e3 / model["model_s_per_audio_hour"]
    result = {
        "detection": detection,
        "model_demo_cpu": model,
        "detection_share_of_model_time": round(share, 6),
        "target_share": 0.01,
        "note": "2 shared CPU cores (other jobs running): noisy; best of --repeat. The demo model is far "
        "cheaper than Parakeet, so the share on the real model is smaller.",
        "cpu_s": round(resource.getrusage(resource.RUSAGE_SELF).ru_utime - ru0.ru_utime, 1),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(f"library load (first detection): {detection['load_s']:.2f} s, +{detection['rss_added_mb']} MB RSS")
    print("detection per hour of transcript (item + every segment), ms:")
    for code, v in detection["by_language"].items():
        print(
            f"  {code}: {v['per_hour_ms']:8.1f} ms/h ({v['hour_segments']} segments, {v['hour_chars']} chars), "
            f"{v['per_item_1min_ms']:.2f} ms per 1-min item, {v['per_segment_us']:.0f} us/segment"
        )
    print(
        f"demo model on this CPU: {model['model_s_per_audio_hour']:.1f} s per hour of audio "
        f"({model['model_s']} s for {model['audio_s']:.0f} s)"
    )
    print(f"detection / model time: {share:.4%} (target < 1%)")


if __name__ == "__main__":
    main()
