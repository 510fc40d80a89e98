"""Known speakers (parakeet_worker/analysis/known_speakers.py): the request's fields, the checks
of a reference, and naming the speakers diarization finds, with real espeak-ng voices, the real
VAD and the real CAM++ model (models/campplus.ts, built by `make setup`); then end to end, through
the native job, the queue's OpenAI route and the HTTP server."""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path

import numpy as np
import openai
import pytest
from conftest import DATA_ROOT, REPO, call_handler, run_job, temp_leftovers

from parakeet_worker.analysis import known_speakers as ks
from parakeet_worker.analysis import speakers, vad
from tools import synth
from tools.testkit import UvicornThread, conversation

RATE = synth.SAMPLE_RATE


@pytest.fixture(autouse=True)
def speaker_model_present():
    if not (REPO / "models" / "campplus.ts").is_file():
        pytest.fail("models/campplus.ts is missing: run `make setup` (python docker/fetch_speaker_model.py)")


class Voices:
    """The worker's own diarization parts: regions, windows, CAM++ embeddings, clustering."""

    def __init__(self):
        self.model, self.device = speakers.speaker_model()

    def windows(self, samples, regions):
        spans, feats = speakers._window_features(samples, regions)
        return np.asarray(spans).reshape(-1, 2), speakers.embed(self.model, self.device, feats, threading.Event())

    def speech_sec(self, samples) -> float:
        return sum(b - a for a, b in self.speech(samples))

    def speech(self, samples):
        frames = vad.raw_regions(vad.vad_probs(vad.reader(samples), len(samples)), len(samples))
        return [(a / RATE, b / RATE) for a, b in frames]

    def print_of(self, name, samples):
        _, emb = self.windows(samples, self.speech(samples))
        return ks.voiceprint(name, emb)

    def diarize(self, samples):
        spans, emb = self.windows(samples, speakers._energy_regions(samples))
        labels = speakers.cluster(emb, speakers.SpeakerCount())
        return spans, emb, labels


@pytest.fixture(scope="module")
def voices(worker):
    return Voices()


def reference(voice: int, words: str, speed: int = 175) -> np.ndarray:
    """Another recording of CONVERSATION_VOICES[voice]: other words, another speed."""
    from tools.testkit import CONVERSATION_VOICES

    name, pitch = CONVERSATION_VOICES[voice]
    audio = synth.trim(synth.speak(words, name, speed, pitch))
    pad = np.zeros(int(0.2 * RATE), np.float32)
    return np.concatenate([pad, audio, pad])


def cluster_of(spans, labels, truth, who: int) -> int:
    """The label most of `who`'s windows got."""
    centres = spans.mean(axis=1)
    mine = [labels[i] for i, c in enumerate(centres) if any(w == who and a <= c <= b for w, a, b in truth)]
    return int(np.bincount(mine).argmax())


def test_enrolled_voices_get_their_names_and_a_stranger_none(voices):
    audio, truth, _ = conversation([0, 1, 2] * 3, seed=7)
    spans, emb, labels = voices.diarize(audio)
    assert len(set(labels)) == 3
    prints = [voices.print_of("alice", reference(0, "seven left hello right nine up")),
              voices.print_of("bob", reference(1, "go down three world yes four stop"))]  # fmt: skip
    found = ks.centroids(emb, labels)
    names = ks.match(found, prints)
    alice, bob, stranger = (cluster_of(spans, labels, truth, who) for who in (0, 1, 2))
    assert names == {alice: "alice", bob: "bob"}, ks.similarities(found, prints)
    assert stranger not in names
    sims = ks.similarities(found, prints)
    assert sims[(alice, "alice")] >= ks.MATCH_THRESHOLD > sims[(stranger, "alice")]
    assert sims[(stranger, "bob")] < ks.MATCH_THRESHOLD
    # Labels: names where matched, the rest numbered among themselves in speaking order.
    order = [int(k) for k in dict.fromkeys(labels[np.argsort(spans.mean(axis=1))])]
    public = ks.labels_in_order(order, names)
    assert public[alice] == "alice" and public[bob] == "bob" and public[stranger] == "SPEAKER_00"


def test_one_name_goes_to_one_speaker_and_the_likest_wins(voices):
    audio, truth, _ = conversation([0, 1] * 4, seed=8)
    spans, emb, labels = voices.diarize(audio)
    found = ks.centroids(emb, labels)
    # Two references of the same voice under two names: only the likelier name is given.
    first = voices.print_of("first", reference(0, "one two three four five six"))
    second = voices.print_of("second", reference(0, "left right up down go stop yes no", speed=150))
    names = ks.match(found, [first, second])
    target = cluster_of(spans, labels, truth, 0)
    assert list(names) == [target], names
    sims = ks.similarities(found, [first, second])
    assert names[target] == max(("first", "second"), key=lambda n: sims[(target, n)])
    # A voiceprint of nobody in the conversation names nobody.
    assert ks.match(found, [voices.print_of("absent", reference(2, "hello world nine eight seven"))]) == {}


def test_a_reference_must_be_two_to_ten_seconds_of_speech(voices):
    speaker = ks.KnownSpeaker("alice", {"source": "x"}, "known_speaker_references[0]")
    good = reference(0, "seven left hello right nine up")
    assert 2 <= len(good) / RATE <= 10
    ks.check_reference(speaker, len(good) / RATE, voices.speech_sec(good))
    short = reference(0, "seven left")
    with pytest.raises(ks.KnownSpeakerError) as err:
        ks.check_reference(speaker, len(short) / RATE, voices.speech_sec(short))
    assert err.value.param == "known_speaker_references[0]" and "'alice'" in err.value.message
    assert "long; a reference must be 2-10 s" in err.value.message
    long = np.concatenate([good] * 5)
    assert len(long) / RATE > 10
    with pytest.raises(ks.KnownSpeakerError, match="must be 2-10 s"):
        ks.check_reference(speaker, len(long) / RATE, voices.speech_sec(long))
    # Four seconds of a hum and of noise: loud, but no voice in them.
    t = np.arange(4 * RATE) / RATE
    hum = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    noise = (0.1 * np.random.default_rng(0).standard_normal(4 * RATE)).astype(np.float32)
    for clip in (hum, noise):
        speech = voices.speech_sec(clip)
        assert speech < ks.REFERENCE_MIN_SPEECH_SEC
        with pytest.raises(ks.KnownSpeakerError, match="of speech, less than 1 s"):
            ks.check_reference(speaker, len(clip) / RATE, speech)


@pytest.mark.parametrize(
    ("names", "refs", "param", "message"),
    [
        (["alice"], [], "known_speaker_references", "give one reference per name"),
        (["a", "b", "c", "d", "e"], ["x"] * 5, "known_speaker_names", "more than 4"),
        ("alice", ["x"], "known_speaker_names", "must be a list"),
        ([""], ["x"], "known_speaker_names[0]", "is empty"),
        (["alice", "Alice"], ["x", "y"], "known_speaker_names[1]", "given twice"),
        (["SPEAKER_01"], ["x"], "known_speaker_names[0]", "unnamed speaker"),
        (["B"], ["x"], "known_speaker_names[0]", "unnamed speaker"),
        ([7], ["x"], "known_speaker_names[0]", "must be a string"),
        (["x" * 65], ["x"], "known_speaker_names[0]", "more than 64"),
        (["al\nice"], ["x"], "known_speaker_names[0]", "control characters"),
        (["alice"], [""], "known_speaker_references[0]", "non-empty string"),
        (["alice"], [{"url": "x"}], "known_speaker_references[0]", "non-empty string"),
    ],
)
def test_openai_fields_refused_with_the_field_named(names, refs, param, message):
    with pytest.raises(ks.KnownSpeakerError) as err:
        ks.from_openai(names, refs)
    assert err.value.param == param and message in err.value.message


def test_openai_and_native_fields_accepted():
    got = ks.from_openai([" alice ", "Bob"], ["data:audio/wav;base64,AAAA", "/runpod-volume/bob.wav"])
    assert [(s.name, s.item, s.param) for s in got] == [
        ("alice", {"source": "data:audio/wav;base64,AAAA"}, "known_speaker_references[0]"),
        ("Bob", {"source": "/runpod-volume/bob.wav"}, "known_speaker_references[1]"),
    ]
    assert ks.from_openai(None, None) == [] and ks.from_native(None) == []
    got = ks.from_native([{"name": "alice", "audio_base64": "AAAA"}, {"name": "bob", "source": "https://x/b.wav"}])
    assert [(s.name, s.item, s.param) for s in got] == [
        ("alice", {"audio_base64": "AAAA"}, "known_speakers[0].audio_base64"),
        ("bob", {"source": "https://x/b.wav"}, "known_speakers[1].source"),
    ]


@pytest.mark.parametrize(
    ("value", "param", "message"),
    [
        ({"name": "a"}, "known_speakers", "must be a list"),
        (["alice"], "known_speakers[0]", "must be an object"),
        ([{"name": "alice"}], "known_speakers[0]", "exactly one of 'source' or 'audio_base64'"),
        ([{"name": "alice", "source": "x", "audio_base64": "y"}], "known_speakers[0]", "exactly one"),
        ([{"name": "alice", "source": "x", "voice": 1}], "known_speakers[0]", "unknown field(s) ['voice']"),
        ([{"name": "alice", "source": 3}], "known_speakers[0].source", "non-empty string"),
        ([{"source": "x"}], "known_speakers[0].name", "must be a string"),
        ([{"name": "ann", "source": "x"}, {"name": "Ann ", "source": "y"}], "known_speakers[1]", "given twice"),
        ([{"name": f"n{i}", "source": "x"} for i in range(5)], "known_speakers", "more than 4"),
    ],
)
def test_native_field_refused_with_the_field_named(value, param, message):
    with pytest.raises(ks.KnownSpeakerError) as err:
        ks.from_native(value)
    assert err.value.param == param and message in err.value.message


def test_unnamed_speakers_are_numbered_among_themselves():
    assert ks.labels_in_order([2, 0, 1, 0], {0: "alice"}) == {2: "SPEAKER_00", 0: "alice", 1: "SPEAKER_01"}
    assert ks.labels_in_order([1, 0], {}) == {1: "SPEAKER_00", 0: "SPEAKER_01"}


# --- End to end: the native job, the queue's OpenAI route, the HTTP server ----------------------

ALICE_SAYS, BOB_SAYS = "seven left hello right nine up", "go down three world yes four stop"


@pytest.fixture(scope="module")
def meeting():
    """A conversation of three voices (the first two enrolled, the third a stranger), its truth,
    and the two references as files under DATA_ROOT (an allowed root)."""
    audio, truth, said = conversation([0, 1, 2] * 3, seed=7)
    path = synth.write(DATA_ROOT / "known-meeting.wav", audio)
    alice = synth.write(DATA_ROOT / "known-alice.wav", reference(0, ALICE_SAYS))
    bob = synth.write(DATA_ROOT / "known-bob.wav", reference(1, BOB_SAYS))
    return {"path": str(path), "truth": truth, "said": said, "alice": alice, "bob": bob}


def data_url(path) -> str:
    return "data:audio/wav;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def named_attribution(truth, turns, names=("alice", "bob")) -> float:
    """The share of each enrolled voice's speech labelled with its own name (the truth's 0 and 1)."""
    right = total = 0.0
    for who, a, b in truth:
        if who >= len(names):
            continue
        total += b - a
        right += sum(max(0.0, min(b, t["end"]) - max(a, t["start"])) for t in turns if t["speaker"] == names[who])
    return right / total


def test_native_job_names_known_speakers_everywhere(worker, meeting):
    known = [{"name": "alice", "source": f"file://{meeting['alice']}"},
             {"name": "bob", "audio_base64": base64.b64encode(meeting["bob"].read_bytes()).decode()}]  # fmt: skip
    (result,) = run_job(worker, [{"source": meeting["path"]}], diarize=True, timestamps=True,
                        known_speakers=known)["results"]  # fmt: skip
    assert "warning" not in result, result
    turns = result["turns"]
    assert {t["speaker"] for t in turns} == {"alice", "bob", "SPEAKER_00"}, turns  # the stranger stays anonymous
    assert named_attribution(meeting["truth"], turns) >= 0.9, turns
    stranger = [(a, b) for who, a, b in meeting["truth"] if who == 2]
    mid = [(t["start"] + t["end"]) / 2 for t in turns if t["speaker"] == "SPEAKER_00"]
    assert mid and all(any(a - 0.3 <= m <= b + 0.3 for a, b in stranger) for m in mid), turns
    words, segments = result["timestamps"]["word"], result["timestamps"]["segment"]
    assert {w["speaker"] for w in words} == {"alice", "bob", "SPEAKER_00"}
    assert {s["speaker"] for s in segments} == {"alice", "bob", "SPEAKER_00"}
    for fmt, mark in (("srt", "[alice] "), ("vtt", "<v bob>"), ("text", "alice: ")):
        (out,) = run_job(worker, [{"source": meeting["path"]}], diarize=True, output_format=fmt,
                         known_speakers=known)["results"]  # fmt: skip
        shown = out["subtitles"] if fmt != "text" else out["text"]
        assert mark in shown and ("SPEAKER_00" in shown), shown


def test_queue_openai_route_diarized_json_with_known_speakers(worker, meeting):
    body = {"file": data_url(meeting["path"]), "model": "gpt-4o-transcribe-diarize", "response_format": "diarized_json",
            "known_speaker_names": ["alice", "bob"],
            "known_speaker_references": [data_url(meeting["alice"]), str(meeting["bob"])]}  # fmt: skip
    out = call_handler(worker, {"id": "q", "input": {"openai_route": "/v1/audio/transcriptions", "openai_input": body}})
    assert "error" not in out, out
    speakers_seen = {s["speaker"] for s in out["segments"]}
    assert speakers_seen == {"alice", "bob", "A"}, out["segments"]  # the stranger is OpenAI's first anonymous letter
    turns = [{"speaker": s["speaker"], "start": s["start"], "end": s["end"]} for s in out["segments"]]
    assert named_attribution(meeting["truth"], turns) >= 0.85, turns


def test_http_server_takes_references_as_openai_sends_them(worker, meeting):
    """The official client sends known_speaker_names[] and known_speaker_references[] (data: URLs,
    here over 64 KiB each) as form fields."""
    with UvicornThread(worker.http_app()) as api, open(meeting["path"], "rb") as f:
        client = openai.OpenAI(base_url=f"{api.url}/v1", api_key="x", max_retries=0, timeout=120)
        refs = [data_url(meeting["alice"]), data_url(meeting["bob"])]
        assert min(map(len, refs)) > 64 * 1024
        out = client.audio.transcriptions.create(
            model="gpt-4o-transcribe-diarize", file=f, response_format="diarized_json",
            known_speaker_names=["alice", "bob"], known_speaker_references=refs,
        )  # fmt: skip
        body = out.model_dump() if hasattr(out, "model_dump") else out
        assert {s["speaker"] for s in body["segments"]} == {"alice", "bob", "A"}, body["segments"]
        f.seek(0)
        vtt = client.audio.transcriptions.create(
            model="m", file=f, response_format="vtt", known_speaker_names=["bob"], known_speaker_references=refs[1:],
            extra_body={"diarize": "true"},
        )  # fmt: skip
        assert "<v bob>" in vtt and "<v SPEAKER_00>" in vtt and "alice" not in vtt, vtt
        f.seek(0)
        with pytest.raises(openai.BadRequestError) as bad:
            client.audio.transcriptions.create(model="m", file=f, known_speaker_names=["bob"],
                                               known_speaker_references=refs[1:])  # fmt: skip
        assert bad.value.body["param"] == "known_speaker_names" and "diariz" in bad.value.body["message"]
    assert temp_leftovers() == []


def bad_references(tmp_dir):
    """(file, what the error says) for references that must be refused."""
    t = np.arange(4 * RATE) / RATE
    hum = synth.write(tmp_dir / "ref-hum.wav", (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32))
    short = synth.write(tmp_dir / "ref-short.wav", reference(0, "seven left"))
    long = synth.write(tmp_dir / "ref-long.wav", np.concatenate([reference(0, ALICE_SAYS)] * 5))
    junk = tmp_dir / "ref-junk.wav"
    junk.write_bytes(np.random.default_rng(5).bytes(40_000))
    return [(hum, "s of speech, less than 1 s"), (short, "s long; a reference must be 2-10 s"),
            (long, "s long; a reference must be 2-10 s"), (junk, "the reference for 'carol'")]  # fmt: skip


def test_bad_references_are_refused_naming_them(worker, meeting):
    for path, says in bad_references(DATA_ROOT):
        known = [{"name": "alice", "source": str(meeting["alice"])}, {"name": "carol", "source": str(path)}]
        out = call_handler(worker, {"id": "bad", "input": {"inputs": [{"source": meeting["path"]}], "diarize": True,
                                                           "known_speakers": known}})  # fmt: skip
        assert out["error"].startswith("invalid input: known_speakers[1].source: ") and says in out["error"], out
        assert "'carol'" in out["error"] and "results" not in out
        body = {"file": meeting["path"], "response_format": "diarized_json", "known_speaker_names": ["alice", "carol"],
                "known_speaker_references": [str(meeting["alice"]), data_url(path)]}  # fmt: skip
        answer = call_handler(worker, {"id": "q", "input": {"openai_route": "/v1/audio/transcriptions",
                                                            "openai_input": body}})  # fmt: skip
        error = json.loads(answer["error"])["error"]
        assert error["param"] == "known_speaker_references[1]" and says in error["message"], error
        assert error["type"] == "invalid_request_error"
    outside = call_handler(worker, {"id": "o", "input": {"inputs": [{"source": meeting["path"]}], "diarize": True,
                                                         "known_speakers": [{"name": "x", "source": "/etc/hostname"}]}})  # fmt: skip
    assert outside["error"].startswith("invalid input: known_speakers[0].source: ") and "outside" in outside["error"]
    without = call_handler(worker, {"id": "w", "input": {"inputs": [{"source": meeting["path"]}],
                                                         "known_speakers": [{"name": "x", "source": "/a.wav"}]}})  # fmt: skip
    assert without["error"] == "invalid input: known_speakers needs diarize: true"
    assert temp_leftovers() == []


def test_a_speaker_model_that_cannot_load_costs_the_names_not_the_job(worker, config, monkeypatch, meeting):
    for name, value in (("value", None), ("error", None), ("loaded", False)):  # loaded again, from the path below
        monkeypatch.setattr(speakers.CAMPPLUS, name, value)
    config(speaker_model=str(DATA_ROOT / "no-such-model.ts"))
    known = [{"name": "alice", "source": str(meeting["alice"])}]
    (result,) = run_job(worker, [{"source": meeting["path"]}], diarize=True, known_speakers=known)["results"]
    assert result["text"] and "turns" not in result, result
    assert result["warning"].startswith("no speaker labels: speaker model"), result
