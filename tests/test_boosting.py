"""Custom vocabulary: key-phrase boosting per job and per item, with the real demo model.

The demo model mishears two noisy, fast words in a plausible way ("seven" as "two", "yes" as
"left"; tools.synth.noisy_word). Boosting the spoken word at the default weight corrects them,
while items of the same batch that are not boosted keep, exactly, the text and timestamps they
get alone; boosting words that were not said leaves clear speech alone."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from conftest import DATA_ROOT, REPO, call_handler, run_job, run_together, speech_file, temp_leftovers, words_of

from parakeet_worker import config as settings
from parakeet_worker import model as asr
from parakeet_worker import pieces, transcript
from parakeet_worker.analysis import boosting
from tools import synth


@pytest.fixture(scope="module")
def misheard() -> dict[str, str]:
    """Noisy fast words and what the demo model hears without boosting."""
    seven = synth.write(DATA_ROOT / "noisy-seven.wav", synth.noisy_word("seven"))
    yes = synth.write(DATA_ROOT / "noisy-yes.wav", synth.noisy_word("yes", "en-gb", snr_db=10.0, seed=1))
    return {"seven": str(seven), "yes": str(yes)}


def solo(worker, source: str) -> dict:
    """One clip alone in its job and its batch, with no boosting anywhere: the reference."""
    return run_job(worker, [{"source": source}], timestamps=True)["results"][0]


def test_boosting_corrects_misheard_words_and_leaves_batch_neighbours_exact(worker, monkeypatch, misheard):
    seven, yes = misheard["seven"], misheard["yes"]
    clear = str(speech_file("four two stop", "wav"))
    alone = {name: solo(worker, source) for name, source in [("seven", seven), ("yes", yes), ("clear", clear)]}
    assert [alone[n]["text"] for n in ("seven", "yes", "clear")] == ["two", "left", "four two stop"]

    boosted = {"id": "boosted", "input": {"boost_phrases": ["seven"], "timestamps": True, "inputs": [
        {"source": seven},  # the job's list
        {"source": yes, "boost_phrases": ["yes"]},  # its own list, in place of the job's
        {"source": seven, "boost_phrases": ["yes"]},  # replaces: "seven" is not boosted here
        {"source": clear, "boost_phrases": []},  # an empty list: not boosted at all
    ]}}  # fmt: skip
    plain = {"id": "plain", "input": {"timestamps": True, "output_format": "srt",
                                      "inputs": [{"source": seven}, {"source": yes}, {"source": clear}]}}  # fmt: skip
    out_boosted, out_plain = run_together(worker, monkeypatch, [boosted, plain], ready_units=7)
    assert out_boosted["stats"]["batch_sizes"] == out_plain["stats"]["batch_sizes"] == [7]  # one batch for all

    got = out_boosted["results"]
    assert [r["text"] for r in got] == ["seven", "yes", "two", "four two stop"]
    assert [w["word"] for w in got[0]["timestamps"]["word"]] == ["seven"]
    assert got[0]["timestamps"]["word"][0]["start"] == alone["seven"]["timestamps"]["word"][0]["start"]
    for result, name in zip([got[3], *out_plain["results"]], ["clear", "seven", "yes", "clear"], strict=True):
        assert result["text"] == alone[name]["text"]  # not boosted: exactly as alone
        assert result["timestamps"] == alone[name]["timestamps"], name
    assert "two" in out_plain["results"][0]["subtitles"]


def test_word_ends_do_not_depend_on_batch_neighbours(worker, monkeypatch):
    """NeMo 3.0's stale TDT durations (patched by the worker, see _fix_tdt_durations) moved the
    end of "no" from 0.56 to 0.64 s when "four two stop" shared its batch, and "two"'s end the
    other way; with the fix each clip's timestamps are the same alone and batched."""
    assert asr.state().durations_fixed is True
    assert getattr(type(asr.loaded_model().decoding.decoding.decoding_computer).torch_impl, "_durations_fixed", False)
    a, b = str(speech_file("yes no", "wav")), str(speech_file("four two stop", "wav"))
    alone = [solo(worker, a), solo(worker, b)]
    jobs = [{"id": f"j{n}", "input": {"inputs": [{"source": s}], "timestamps": True}} for n, s in enumerate((a, b))]
    together = [out["results"][0] for out in run_together(worker, monkeypatch, jobs, ready_units=2)]
    assert together == alone


def test_halves_of_a_failed_batch_keep_each_rows_boosting(worker, config, monkeypatch, misheard):
    """A failing batch is retried in halves: each row keeps its own list (or none) on the way."""
    config(batch_overhead_sec=1000)  # everything in one batch first
    bad = str(speech_file("nine zero nine", "wav"))
    poison = sf.info(bad).frames
    real = asr.loaded_model().forward
    calls: list[int] = []

    def forward(*, input_signal, input_signal_length):
        calls.append(len(input_signal_length))
        if poison in input_signal_length.tolist():
            raise RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED")
        return real(input_signal=input_signal, input_signal_length=input_signal_length)

    monkeypatch.setattr(asr.loaded_model(), "forward", forward)
    seven, yes = misheard["seven"], misheard["yes"]
    boosted = {"id": "b", "input": {"boost_phrases": ["seven"], "inputs": [{"source": seven}, {"source": bad}]}}
    own = {"source": yes, "boost_phrases": ["yes"]}
    plain = {"id": "p", "input": {"inputs": [{"source": seven}, {"source": yes}, own]}}
    out_boosted, out_plain = run_together(worker, monkeypatch, [boosted, plain], ready_units=5)
    assert calls[1] == 5 and len(calls) > 3  # the shared batch failed, then its halves ran
    assert out_boosted["results"][0]["text"] == "seven"
    assert out_boosted["results"][1]["code"] == "transcription_failed"
    assert [r["text"] for r in out_plain["results"]] == ["two", "left", "yes"]


def test_unspoken_phrases_are_not_inserted_into_clear_speech(worker):
    texts = ["one two three four five six seven eight nine zero", "hello world", "stop go left right up down",
             "yes no yes", "three two one go"]  # fmt: skip
    inputs = [{"source": str(speech_file(t, "wav", voice=v))} for t in texts for v in ("en-us", "en-gb")]
    unboosted = [r["text"] for r in run_job(worker, inputs)["results"]]
    assert [words_of(t) for t in unboosted] == [t.split() for t in texts for _ in range(2)]
    # every word the model knows, then per item every word that was not said, at the default weight
    everything = run_job(worker, inputs, boost_phrases=list(synth.VOCAB))["results"]
    unspoken = [{**item, "boost_phrases": sorted(set(synth.VOCAB) - set(t.split()))}
                for item, t in zip(inputs, [t for t in texts for _ in range(2)], strict=True)]  # fmt: skip
    others = run_job(worker, unspoken)["results"]
    assert [r["text"] for r in everything] == [r["text"] for r in others] == unboosted


def test_split_item_is_boosted_piece_by_piece_with_timestamps_and_srt(worker, config):
    """Audio over MAX_SINGLE_PASS_SEC is cut at pauses, and every piece carries the item's list:
    the split item reads exactly as its pieces do, each alone with the same list, and the list
    changes pieces after the first one too. (The demo model mishears "go five six yes" spoken
    this fast in ever-changing ways, so the pieces, not a fixed text, are the reference.)"""
    fast, pause = synth.speak("go five six yes", "en-us", 320), np.zeros(synth.SAMPLE_RATE, np.float32)
    parts = []
    for pair in ["one hello", "stop three", "world nine", "left up", "eight no", "two go"]:
        parts += [synth.speak(pair, "en-us", 150), pause, fast, pause, pause]
    audio = np.concatenate(parts)
    path = synth.write(DATA_ROOT / "fast-phrases.wav", audio)
    config(max_single_pass_sec=6.0)
    cuts = [*pieces.split_points(transcript.Prepared(0, str(path), path, len(audio)), 6.0), len(audio)]
    phrases = ["go five six yes"]
    whole = run_job(worker, [{"source": str(path)}], timestamps=True, output_format="srt", boost_phrases=phrases)
    result = whole["results"][0]
    assert whole["stats"]["batches"] == len(cuts) - 1 >= 4  # one batch per piece

    boosted, plain, words = [], [], []
    for k, (lo, hi) in enumerate(itertools.pairwise(cuts)):
        piece = str(synth.write(DATA_ROOT / f"fast-phrases-{k}.wav", audio[lo:hi]))
        alone = run_job(worker, [{"source": piece}], timestamps=True, boost_phrases=phrases)["results"][0]
        boosted.append(alone["text"])
        plain.append(run_job(worker, [{"source": piece}])["results"][0]["text"])
        words += [(w["word"], w["start"] + lo / synth.SAMPLE_RATE) for w in alone["timestamps"]["word"]]
    assert result["text"] == " ".join(t for t in boosted if t)
    assert [w["word"] for w in result["timestamps"]["word"]] == [w for w, _ in words]
    starts = [w["start"] for w in result["timestamps"]["word"]]
    assert all(abs(got - want) < 0.002 for got, (_, want) in zip(starts, words, strict=True))
    changed = [k for k, (b, p) in enumerate(zip(boosted, plain, strict=True)) if b != p]
    assert len(changed) >= 2 and max(changed) > 0, (boosted, plain)
    cue_lines = [line for line in result["subtitles"].splitlines() if line and not line.isdigit() and "-->" not in line]
    assert " ".join(cue_lines) == result["text"]


def test_same_list_is_built_once(worker):
    clip = {"source": str(speech_file("left right go", "wav"))}
    before = boosting.trees().info()
    first = run_job(worker, [clip], boost_phrases=["left", "right  go", "up"])
    mid = boosting.trees().info()
    inputs = [clip, {**clip, "boost_phrases": [" up", "left", "right go"]}]
    again = run_job(worker, inputs, boost_phrases=["up", "right go", "left"])
    after = boosting.trees().info()
    assert mid["misses"] == before["misses"] + 1  # built once
    assert after["misses"] == mid["misses"] and after["hits"] == mid["hits"] + 2  # any order or spacing: a hit
    shared = [{**clip, "boost_phrases": ["stop", "hello"]}] * 3  # three items ask for one new list at once
    run_job(worker, shared)
    assert boosting.trees().info()["misses"] == after["misses"] + 1
    assert first["results"][0]["text"] == again["results"][0]["text"] == "left right go"


def test_weight_zero_turns_boosting_off(worker, misheard):
    out = run_job(worker, [{"source": misheard["seven"]}], boost_phrases=["seven"], boost_weight=0)
    assert out["results"][0]["text"] == "two"
    out = run_job(worker, [{"source": misheard["seven"]}], boost_phrases=["seven"], boost_weight=2)  # int is fine
    assert out["results"][0]["text"] == "seven"


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"boost_phrases": "seven"}, "boost_phrases must be a list of strings, not a string"),  # JSON's words
        ({"boost_phrases": ["seven", 7]}, "boost_phrases[1] must be a string, not an integer"),
        ({"boost_phrases": ["seven", ""]}, "boost_phrases[1] is empty or only whitespace"),
        ({"boost_phrases": [" \t "]}, "boost_phrases[0] is empty or only whitespace"),
        ({"boost_phrases": ["se\x00ven"]}, "boost_phrases[0] 'se\\x00ven' holds control characters"),
        ({"boost_phrases": ["\ud800"]}, "lone surrogates"),
        ({"boost_phrases": ["nine", "NINE"]}, "'NINE' holds characters the model's tokenizer does not know: 'EIN'"),
        ({"boost_phrases": ["zéro"]}, "does not know: 'é'"),
        ({"boost_phrases": ["\u200b"]}, "has no tokens the model can emit"),
        ({"boost_weight": -0.5}, "boost_weight must be a number from 0 to 10"),
        ({"boost_weight": 10.5}, "boost_weight must be a number from 0 to 10"),
        ({"boost_weight": float("nan")}, "boost_weight must be a number from 0 to 10"),
        ({"boost_weight": "high"}, 'boost_weight must be a number from 0 to 10, not "high"'),
        ({"boost_weight": True}, "boost_weight must be a number from 0 to 10, not true"),
        (json.loads('{"boost_weight": 1' + "0" * 400 + "}"), "boost_weight must be a number from 0 to 10, not an integer of more than 24 digits"),  # valid JSON
    ],
)
def test_malformed_job_fields_get_a_clear_job_error(worker, fields, says):
    out = call_handler(worker, {"id": "bad", "input": {"inputs": [{"source": "samples/digits.wav"}], **fields}})
    assert set(out) == {"error"}, out
    assert out["error"].startswith("invalid input: ") and says in out["error"], out["error"]
    assert temp_leftovers() == []


def test_caps_and_the_off_switch(worker, config):
    job = {"inputs": [{"source": "samples/digits.wav"}], "boost_phrases": ["one", "two", "three"]}
    config(boost_max_phrases=2)
    assert "3 phrases, more than BOOST_MAX_PHRASES=2" in call_handler(worker, {"id": "x", "input": job})["error"]
    config(boost_max_phrases=1000, boost_max_phrase_chars=4)
    assert "boost_phrases[2] has 5 characters, more than BOOST_MAX_PHRASE_CHARS=4" in call_handler(
        worker, {"id": "x", "input": job}
    )["error"]
    config(boost_max_phrase_chars=100, boosting=False)
    assert "boosting is off on this worker (BOOSTING=off)" in call_handler(worker, {"id": "x", "input": job})["error"]
    assert "error" not in call_handler(worker, {"id": "x", "input": {**job, "boost_phrases": []}})


def test_malformed_item_lists_cost_that_item_only(worker, http_server):
    good = str(speech_file("one two three", "wav"))
    url = http_server.add(speech_file("stop go", "wav"), "boost-never-fetched.wav")
    inputs = [
        {"source": url, "boost_phrases": "seven"},
        {"source": good, "boost_phrases": ["Seven"]},
        {"source": good, "boost_phrases": ["seven", None]},
        {"source": good, "boost_phrases": ["two", "three"]},
        {"source": good, "boost": ["two"]},
    ]
    results = run_job(worker, inputs, boost_phrases=["one"])["results"]
    expected = [
        "boost_phrases must be a list of strings, not a string",
        "'Seven' holds characters the model's tokenizer does not know: 'S'",
        "boost_phrases[1] must be a string, not null",
    ]
    for result, says in zip(results, expected, strict=False):
        assert result["code"] == "invalid_boost" and says in result["error"], result
        assert "text" not in result
    assert results[0]["source"] == url and http_server.hits.get("/files/boost-never-fetched.wav") is None
    assert results[3]["text"] == "one two three"
    assert results[4]["code"] == "invalid_source" and "'boost_phrases'" in results[4]["error"]


def test_dry_run_checks_lists_without_nemo(tmp_path):
    """SKIP_MODEL_LOAD=1: lists are checked lexically (no tokenizer to ask), nothing heavy imported."""
    clip = str(speech_file("yes", "wav"))
    jobs = [
        {"inputs": [{"source": clip}, {"source": clip, "boost_phrases": [""]}, {"source": clip, "boost_phrases": []}],
         "boost_phrases": ["Parakeet", "Runpod"], "boost_weight": 1.5},
        {"inputs": [{"source": clip}], "boost_weight": 11},
    ]  # fmt: skip
    env = {**os.environ, "SKIP_MODEL_LOAD": "1", "PARAKEET_MODEL": "nvidia/parakeet-tdt-0.6b-v3"}
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run(
        [sys.executable, "tests/workers.py", "dry", str(tmp_path / "jobs.json"), str(tmp_path / "report.json")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["heavy"] == []
    first, second = report["outs"]
    assert ["dry run" in r.get("text", "") for r in first["results"]] == [True, False, True]
    assert first["results"][1]["code"] == "invalid_boost"
    assert "boost_weight must be a number from 0 to 10" in second["error"]


def test_boosting_work_per_job_is_capped(worker, config):
    """BOOST_MAX_JOB_PHRASES caps the phrases a job's lists hold in all (the job's list and each
    different item list, a list repeated on many items counted once), before any work is done."""
    clip = "samples/digits.wav"
    four = ["one", "two", "three", "four"]
    config(boost_max_job_phrases=6)
    many = {"inputs": [{"source": clip, "boost_phrases": four}, {"source": clip, "boost_phrases": ["five", "six", "go"]}]}
    out = call_handler(worker, {"id": "x", "input": many})
    assert out == {"error": "invalid input: the job's boost_phrases lists hold 7 phrases in all (each different list "
                            "counted once), more than BOOST_MAX_JOB_PHRASES=6"}, out  # fmt: skip
    assert temp_leftovers() == []
    repeated = {"inputs": [{"source": clip, "boost_phrases": four} for _ in range(5)], "boost_phrases": ["yes", "no"]}
    out = run_job(worker, repeated["inputs"], boost_phrases=repeated["boost_phrases"])
    assert all("text" in r for r in out["results"]), out


def test_tree_cache_is_bounded_by_bytes(worker, config):
    """Past BOOST_CACHE_BYTES the least recently used trees go, whatever BOOST_CACHE_SIZE allows;
    the bytes counted are the tree's tensors, as measured on the built tree."""
    trees = boosting.TreeCache()
    tokenizer = asr.loaded_model().tokenizer
    lists = [("one two",), ("three four", "five"), ("six seven eight",)]
    one = boosting.tree_bytes(trees.get(tokenizer, lists[0]))
    assert one > 0 and trees.info()["bytes"] == one
    config(boost_cache_size=64, boost_cache_bytes=one * 2 + boosting.tree_bytes(boosting.build_tree(tokenizer, lists[1])) - 1)
    for phrases in lists[1:]:
        trees.get(tokenizer, phrases)
    info = trees.info()
    assert info["size"] < 3 and info["bytes"] <= settings.CFG.boost_cache_bytes, info
    assert (id(tokenizer), lists[2]) in trees.entries  # the newest stays
    assert (id(tokenizer), lists[0]) not in trees.entries  # the oldest went first
    with pytest.raises(ValueError, match="tokenizer does not know"):
        trees.get(tokenizer, ("caf\u00e9 \u4e2d",))  # a failed build raises in the thread that asked
    assert trees.info()["misses"] == 4 and (id(tokenizer), ("caf\u00e9 \u4e2d",)) not in trees.entries
