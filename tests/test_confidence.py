"""Confidence (parakeet_worker/confidence.py) with the real demo model: token log-probabilities
recomputed after decoding agree with NeMo's own in-loop measure, word and segment confidences are
probabilities and drop on degraded audio, avg_logprob is negative and finite, OpenAI's client
types take the logprobs, and no_speech_prob from real silero VAD separates noise from speech."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest

from bench import confidence as bench
from parakeet_worker.analysis import confidence as conf
from tools import synth


@pytest.fixture(scope="module")
def model(worker):
    """The worker's own model (the benchmark's decoders are built beside its own, which stay)."""
    from parakeet_worker import model as asr

    return asr.loaded_model()


def sentences(count: int, seed: int) -> list[bench.Clip]:
    rng = np.random.default_rng(seed)
    out = []
    for n in range(count):
        words, audio = bench.sentence(rng)
        out.append(bench.Clip(n, "clean", words, audio))
    return out


def decoded(model, clips, method=None, timestamps=True):
    """(hypotheses, token log-probabilities by the worker's after-decoding pass) per clip."""
    import torch

    from parakeet_worker import model as asr

    hyps, logprobs = [None] * len(clips), [None] * len(clips)
    with asr.state().model_lock:  # the worker's model: one call at a time
        decoder = bench.decoder_for(model, method, timestamps)
        for rows, enc, enc_len, _, _ in bench.batches(model, clips):
            with torch.inference_mode():
                out = decoder.rnnt_decoder_predictions_tensor(enc, enc_len, return_hypotheses=True)
                lps = conf.token_logprobs(model, enc, enc_len, out)
            for r, i in enumerate(rows):
                hyps[i], logprobs[i] = out[r], lps[r]
    return hyps, logprobs


def test_after_decoding_pass_agrees_with_nemos_in_loop_probabilities(model):
    clips = sentences(6, 1) + [bench.Clip(9, "snr0", c.words, bench.with_noise(c.audio, 0, np.random.default_rng(2)))
                               for c in sentences(6, 1)]  # fmt: skip
    for timestamps in (True, False):
        hyps, mine = decoded(model, clips, conf.STEP_METHOD, timestamps)
        classes = int(model.decoding.blank_id) + 1
        for h, lps in zip(hyps, mine, strict=True):
            nemo = conf.step_logprobs(h.non_blank_step_confidence_precomputed, classes)
            assert len(nemo) == len(lps) == len(h.y_sequence)
            assert max((abs(a - b) for a, b in zip(nemo, lps, strict=True)), default=0.0) < 1e-5


def test_confidence_changes_no_text_and_no_timestamp(model):
    clips = sentences(8, 3)
    noisy = [
        bench.Clip(c.sentence, "snr5", c.words, bench.with_noise(c.audio, 5, np.random.default_rng(4))) for c in clips
    ]
    off, _ = decoded(model, clips + noisy, None)
    on, _ = decoded(model, clips + noisy, conf.STEP_METHOD)
    assert [h.text for h in off] == [h.text for h in on]
    assert [h.timestamp["word"] for h in off] == [h.timestamp["word"] for h in on]
    assert [h.timestamp["segment"] for h in off] == [h.timestamp["segment"] for h in on]


def test_word_and_segment_confidences_are_probabilities_and_avg_logprob_is_negative(model):
    rng = np.random.default_rng(5)
    clips = sentences(8, 5)
    clips += [
        bench.Clip(c.sentence, v, c.words, bench.degrade(c.audio, v, rng))
        for c in clips[:4]
        for v in bench.VARIANTS[1:]
    ]
    calibration = conf.calibration_for("models/demo-tdt.nemo")
    assert calibration.calibrated
    hyps, logprobs = decoded(model, clips)
    worded = 0
    for h, lps in zip(hyps, logprobs, strict=True):
        tokens = conf.tokens_of(h, model.tokenizer, lps)
        words = conf.word_confidences(tokens, calibration)
        assert len(words) == len(h.text.split()) == len(h.timestamp["word"])
        assert all(0.0 <= c <= 1.0 for c in words)
        if words:
            worded += 1
            assert 0.0 <= conf.segment_confidence([lp for lp, _ in conf.word_scores(tokens)], calibration) <= 1.0
            avg = conf.avg_logprob(tokens.logprobs)
            assert math.isfinite(avg) and avg < 0.0
    assert worded >= len(clips) - 2


def test_degraded_copies_get_lower_confidence(model):
    clips = sentences(12, 7)
    rng = np.random.default_rng(8)
    worse = [bench.Clip(c.sentence, "snr0", c.words, bench.with_noise(c.audio, 0, rng)) for c in clips]
    calibration = conf.calibration_for("demo-tdt")

    def medians(group):
        hyps, logprobs = decoded(model, group)
        words, segments = [], []
        for h, lps in zip(hyps, logprobs, strict=True):
            tokens = conf.tokens_of(h, model.tokenizer, lps)
            words += conf.word_confidences(tokens, calibration)
            if tokens.pieces:
                segments.append(conf.segment_confidence([lp for lp, _ in conf.word_scores(tokens)], calibration))
        return statistics.median(words), statistics.median(segments)

    clean_word, clean_segment = medians(clips)
    noisy_word, noisy_segment = medians(worse)
    assert noisy_word < clean_word - 0.1
    assert noisy_segment < clean_segment - 0.1


def test_logprobs_take_openais_shape_and_read_as_the_text(model):
    from openai.types.audio import TranscriptionTextDeltaEvent, TranscriptionTextDoneEvent
    from openai.types.audio.transcription import Transcription

    hyps, logprobs = decoded(model, sentences(3, 9))
    parts = [conf.tokens_of(h, model.tokenizer, lps) for h, lps in zip(hyps, logprobs, strict=True)]
    for h, tokens in zip(hyps, parts, strict=True):
        entries = conf.openai_logprobs(tokens)
        assert "".join(e["token"] for e in entries) == h.text
        parsed = Transcription.model_validate({"text": h.text, "logprobs": entries})
        assert [p.token for p in parsed.logprobs] == [e["token"] for e in entries]
        assert all(p.logprob < 0 and bytes(int(b) for b in p.bytes) == p.token.encode() for p in parsed.logprobs)
    delta = conf.openai_logprobs(parts[1], leading_space=True)
    event = TranscriptionTextDeltaEvent.model_validate({"type": "transcript.text.delta", "delta": " " + hyps[1].text,
                                                        "logprobs": delta})  # fmt: skip
    assert "".join(p.token for p in event.logprobs) == event.delta
    whole = parts[0] + parts[1]
    done = TranscriptionTextDoneEvent.model_validate({"type": "transcript.text.done", "text": f"{hyps[0].text} {hyps[1].text}",
                                                      "logprobs": conf.openai_logprobs(whole)})  # fmt: skip
    assert "".join(p.token for p in done.logprobs) == done.text


def test_no_speech_prob_from_vad_separates_noise_from_speech():
    rng = np.random.default_rng(10)
    for _ in range(4):
        _, speech = bench.sentence(rng)
        seconds = len(speech) / synth.SAMPLE_RATE
        assert (
            conf.no_speech_from_vad(bench.vad_probs(speech).tolist(), bench.VAD_FRAME_SEC, [], (0.1, seconds - 0.1))
            < 0.1
        )
    for noise in bench.noise_clips(8, 11):
        seconds = len(noise.audio) / synth.SAMPLE_RATE
        assert (
            conf.no_speech_from_vad(bench.vad_probs(noise.audio).tolist(), bench.VAD_FRAME_SEC, [], (0.0, seconds))
            > 0.9
        )


def test_word_groups_follow_sentencepiece_word_marks():
    assert conf.word_groups(["▁he", "llo", "▁world"]) == [[0, 1], [2]]
    assert conf.word_groups(["▁", "e", "ight", "▁t", "wo"]) == [[0, 1, 2], [3, 4]]
    assert conf.word_groups(["lo", "▁up"]) == [[0], [1]]
    assert conf.word_groups([]) == []


def test_calibration_tables_are_monotone_and_load_from_a_file(tmp_path):
    demo = conf.calibration_for("models/demo-tdt.nemo")
    for table in (demo.word, demo.segment):
        assert list(table.xs) == sorted(table.xs) and list(table.ys) == sorted(table.ys)
        assert table(-1e-9) >= table(-0.1) >= table(-1.0) >= table(-10.0)
    unknown = conf.calibration_for("nvidia/some-other-model")
    assert not unknown.calibrated and unknown.word(math.log(0.8)) == pytest.approx(0.8)
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(demo.as_dict()))
    assert conf.calibration_for("anything", path) == demo
    with pytest.raises(ValueError):
        conf.Calibration.from_dict({"word": {"xs": [2, 1], "ys": [0.1, 0.2]}})
    with pytest.raises(ValueError):
        conf.Calibration.from_dict({"word": {"xs": [1, 2], "ys": [0.1, 1.5]}})


def test_fitted_table_is_isotonic_and_tracks_the_rate():
    rng = np.random.default_rng(12)
    p = rng.uniform(0.01, 0.999, 4000)
    right = rng.uniform(size=4000) < p
    table = conf.fit_table(np.log(p).tolist(), right.tolist())
    assert list(table.ys) == sorted(table.ys)
    predicted = np.array([table(math.log(x)) for x in p])
    assert bench.ece(predicted, right) < 0.03
