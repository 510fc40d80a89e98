"""Language detection and hints (parakeet_worker/language.py) on transcripts written for the test
(tests/data/language_sentences.json): 10 sentences of 20+ characters in each of Parakeet v3's 25
languages, 2 shorter ones each, and a few texts of mixed or no language."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from conftest import REPO

from parakeet_worker.analysis import language as lang

DATA = json.loads((REPO / "tests" / "data" / "language_sentences.json").read_text(encoding="utf-8"))


def test_fixtures_cover_every_v3_language():
    assert sorted(DATA["long"]) == sorted(lang.V3_LANGUAGES)
    assert sorted(DATA["short"]) == sorted(lang.V3_LANGUAGES)
    assert all(len(s) >= lang.MIN_CHARS for texts in DATA["long"].values() for s in texts)
    assert all(len(s) < lang.MIN_CHARS for texts in DATA["short"].values() for s in texts)


def test_at_least_97_percent_right_on_20_characters_or_more():
    results = [(code, lang.detect(s, lang.V3_LANGUAGES)) for code, texts in DATA["long"].items() for s in texts]
    right = sum(d.code == code for code, d in results)
    wrong = [(code, d.code) for code, d in results if d.code not in (code, None)]
    assert right / len(results) >= 0.97, wrong
    assert len(wrong) <= 2, wrong  # a wrong answer is worse than none: few may be given
    per_language = Counter(code for code, d in results if d.code == code)
    assert min(per_language[c] for c in lang.V3_LANGUAGES) >= 8  # no language left behind


def test_probability_is_reported_with_the_language():
    d = lang.detect(DATA["long"]["de"][0], lang.V3_LANGUAGES)
    assert d.code == "de"
    assert lang.MIN_PROBABILITY <= d.probability <= 1.0


def test_null_under_the_threshold():
    for texts in DATA["short"].values():
        for text in texts:
            assert lang.detect(text, lang.V3_LANGUAGES) == lang.UNKNOWN


def test_null_for_mixed_or_languageless_text():
    for text in DATA["mixed"]:
        assert lang.detect(text, lang.V3_LANGUAGES) == lang.UNKNOWN, text
    assert lang.detect("", lang.V3_LANGUAGES) == lang.UNKNOWN


def test_detection_is_restricted_to_the_model_languages():
    # Norwegian Bokmål is not a v3 language: among v3's it reads as Danish, its nearest.
    text = "Jeg skal reise til Bergen i morgen tidlig med toget."
    assert lang.detect(text, lang.V3_LANGUAGES).code == "da"
    # A one-language model: any text long enough is that language.
    assert lang.detect(DATA["long"]["de"][0], ("en",)) == lang.Detection("en", 1.0)
    # A model of unknown languages: nothing is detected.
    assert lang.detect(DATA["long"]["de"][0], ()) == lang.UNKNOWN


def test_segments_each_get_their_language():
    texts = [DATA["long"]["en"][0], DATA["long"]["de"][0], "Ja.", DATA["long"]["uk"][0]]
    codes = [d.code for d in lang.detect_many(texts, lang.V3_LANGUAGES)]
    assert codes == ["en", "de", None, "uk"]
    summary = lang.summarize(lang.detect_many([*texts, DATA["long"]["de"][1]], lang.V3_LANGUAGES))
    assert summary == [{"code": "de"}, {"code": "en"}, {"code": "uk"}]
    assert lang.summarize([lang.UNKNOWN]) == []


def test_model_languages():
    assert lang.model_languages("nvidia/parakeet-tdt-0.6b-v3") == lang.V3_LANGUAGES
    assert lang.model_languages("/models/parakeet-tdt-0.6b-v3.nemo") == lang.V3_LANGUAGES
    assert lang.model_languages("nvidia/parakeet-tdt-0.6b-v2") == ("en",)
    assert lang.model_languages(str(REPO / "models" / "demo-tdt.nemo")) == ("en",)
    assert lang.model_languages("someone/other-model") == ()
    assert lang.model_languages("models/demo-tdt.nemo", "en, DE") == ("en", "de")
    with pytest.raises(ValueError, match="MODEL_LANGUAGES"):
        lang.model_languages("x", "en,german-ish")


def test_hints():
    v3 = lang.V3_LANGUAGES
    assert lang.check_hint(None, None, v3) is None
    assert lang.check_hint("", [], v3) is None
    assert lang.check_hint("UK", None, v3) == ("uk",)
    assert lang.check_hint("en-US", None, v3) == ("en",)
    assert lang.check_hint("german", None, v3) == ("de",)
    assert lang.check_hint(None, ["de", "fr", "de"], v3) == ("de", "fr")
    assert lang.check_hint(None, "de,fr", v3) == ("de", "fr")
    assert lang.check_hint("ja", None, ()) == ("ja",)  # unknown model languages: any code


@pytest.mark.parametrize(
    ("language", "languages", "spoken", "param", "words"),
    [
        ("ja", None, lang.V3_LANGUAGES, "language", "it transcribes: bg, cs"),
        (None, ["en", "zh"], lang.V3_LANGUAGES, "languages", "'zh'"),
        ("de", None, ("en",), "language", "it transcribes: en"),
        ("en", ["de"], lang.V3_LANGUAGES, "languages", "cannot both"),
        ("en,de", None, lang.V3_LANGUAGES, "language", "use 'languages'"),
        ("Klingon!", None, lang.V3_LANGUAGES, "language", "not an ISO 639-1"),
        (5, None, lang.V3_LANGUAGES, "language", "language code"),
        (None, {"en": 1}, lang.V3_LANGUAGES, "languages", "list of language codes"),
    ],
)
def test_bad_hints(language, languages, spoken, param, words):
    with pytest.raises(lang.HintError, match=words) as caught:
        lang.check_hint(language, languages, spoken)
    assert caught.value.param == param


def test_mismatch_and_fields():
    assert lang.language_mismatch("en", ("de",)) is True
    assert lang.language_mismatch("de", ("de", "fr")) is False
    assert lang.language_mismatch(None, ("de",)) is False
    d = lang.Detection("en", 0.9)
    assert d.as_fields() == {"language": "en", "language_probability": 0.9}
    assert d.as_fields(("de",)) == {"language": "en", "language_probability": 0.9, "language_mismatch": True}
    assert lang.UNKNOWN.as_fields() == {"language": None, "language_probability": None}


def test_names_as_whisper_writes_them():
    assert [lang.language_name(c) for c in ("en", "de", "uk", "el", "mt")] == [
        "english",
        "german",
        "ukrainian",
        "greek",
        "maltese",
    ]
    assert all(lang.language_name(c) != c for c in lang.V3_LANGUAGES)
    assert lang.language_name(None) is None
