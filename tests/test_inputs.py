"""Bad input costs one clear error on that item and nothing else: real server on 127.0.0.1, real
ffmpeg, real files. Every job also checks (run_job) one result per input, in order, and an
empty temp root afterwards."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import DATA_ROOT, call_handler, encode, run_job, run_together, speech_file, temp_leftovers, words_of

from parakeet_worker import errors
from parakeet_worker import model as asr
from parakeet_worker.audio import decoder as decoding
from parakeet_worker.audio import download, ffmpeg, sources

GOOD_TEXT = "one two three"


@pytest.fixture(scope="module")
def good():
    """A good clip (mp3) every job carries, to show the bad items cost nothing else."""
    return speech_file(GOOD_TEXT, "mp3")


def assert_good(result: dict) -> None:
    assert "error" not in result, result
    assert words_of(result["text"]) == GOOD_TEXT.split()


def assert_code(result: dict, code: str, *, contains: str = "") -> None:
    assert result.get("code") == code, result
    assert result["error"] and contains.lower() in result["error"].lower(), result
    assert "text" not in result


def make_file(name: str, data: bytes) -> str:
    path = DATA_ROOT / name
    path.write_bytes(data)
    return str(path)


# --- URLs ---------------------------------------------------------------------------------


def test_url_failures(worker, config, http_server, refused_url, good):
    config(download_retries=2, download_read_timeout=1.0, max_download_bytes=2_000_000)
    flaky = f"{http_server.url}/flaky/{os.path.basename(http_server.add(speech_file('seven eight', 'wav')))}"
    redirected = f"{http_server.url}/redirect/{os.path.basename(http_server.add(good, 'good-redirect.mp3'))}"
    inputs = [
        {"source": http_server.add(good)},
        {"source": f"{http_server.url}/missing.mp3"},
        {"source": flaky},
        {"source": f"{http_server.url}/always500/a.mp3"},
        {"source": refused_url},
        {"source": f"{http_server.url}/stall/a.mp3"},
        {"source": f"{http_server.url}/big/a.wav"},
        {"source": f"{http_server.url}/big-nolength/a.wav"},
        {"source": f"{http_server.url}/loop"},
        {"source": redirected},
        {"source": f"{http_server.url}/html/page.mp3"},
    ]
    started = time.monotonic()
    results = run_job(worker, inputs)["results"]
    elapsed = time.monotonic() - started
    assert_good(results[0])
    assert_code(results[1], "download_failed", contains="HTTP 404")
    assert words_of(results[2]["text"]) == ["seven", "eight"]  # 500 first, then retried
    assert http_server.hits[flaky.removeprefix(http_server.url)] == 2
    assert_code(results[3], "download_failed", contains="3 attempts")
    assert http_server.hits["/always500/a.mp3"] == 3
    assert_code(results[4], "download_failed", contains="connect")
    assert_code(results[5], "download_timeout")
    assert_code(results[6], "too_large")
    assert_code(results[7], "too_large")
    assert_code(results[8], "download_failed", contains="redirects")
    assert_good(results[9])
    assert_code(results[10], "not_audio")
    # the stalled server sleeps 8 s; the job does not wait for it (read timeout 1 s)
    assert elapsed < 7.5, elapsed


def test_download_deadline_and_unknown_host(worker, config, http_server, good, loopback_only):
    """DOWNLOAD_TOTAL_SEC bounds the whole download, even when every read is quick: a server
    trickling a byte every 0.2 s (30 s in all) is cut off at the deadline. The unknown host is
    answered by the tests' loopback guard, never by the machine's DNS resolver."""
    config(download_total_sec=2.0, download_read_timeout=1.0)
    inputs = [
        {"source": f"{http_server.url}/trickle/a.mp3"},
        {"source": http_server.add(good)},
        {"source": "http://no-such-host.invalid/a.mp3"},
    ]
    started = time.monotonic()
    results = run_job(worker, inputs)["results"]
    elapsed = time.monotonic() - started
    assert_code(results[0], "download_timeout", contains="over 2 s")
    assert_good(results[1])
    assert_code(results[2], "download_failed", contains="resolve")
    assert "no-such-host.invalid" in loopback_only.refused  # the guard answered: no DNS query left
    assert elapsed < 6, elapsed


def test_download_deadline_covers_trickled_headers(worker, config, http_server, good):
    """A server that sends its response headers a byte every 0.3 s (each read is quick) is cut
    off at DOWNLOAD_TOTAL_SEC too: the clock covers connect and headers, not just the body."""
    config(download_total_sec=2.0, download_read_timeout=1.0, download_retries=0)
    results = run_job(worker, [{"source": f"{http_server.url}/trickle-headers/a.mp3"}, {"source": http_server.add(good)}])
    assert_code(results["results"][0], "download_timeout", contains="over 2 s")
    assert_good(results["results"][1])


def test_the_download_clock_starts_with_the_download_not_the_wait_for_a_slot(worker, config, http_server, good,
                                                                              monkeypatch):  # fmt: skip
    """Two download slots, a 3 s limit, two trickling URLs and three good ones in one job: the
    good ones wait for a slot, then get their own full 3 s, and keep their text."""
    config(download_workers=2, download_total_sec=3.0, download_read_timeout=1.0)
    monkeypatch.setattr(download.shared_slots, "value", None)  # made again, for DOWNLOAD_WORKERS=2
    trickle = [{"source": f"{http_server.url}/trickle/slot{n}.mp3"} for n in range(2)]
    fine = [{"source": http_server.add(good, f"slot-good{n}.mp3")} for n in range(3)]
    results = run_job(worker, trickle + fine)["results"]
    for result in results[:2]:
        assert_code(result, "download_timeout", contains="over 3 s")
    for result in results[2:]:
        assert_good(result)


def test_private_address_refused_without_opt_in(worker, monkeypatch, http_server, good):
    monkeypatch.delenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS")
    results = run_job(worker, [{"source": http_server.add(good)}, {"source": str(good)}])["results"]
    assert_code(results[0], "forbidden_url", contains="127.0.0.1")
    assert_good(results[1])


# --- files ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_files(good):
    mp3 = good.read_bytes()
    silent_video = DATA_ROOT / "silent.mp4"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc=duration=1:size=64x64:rate=10",
         "-c:v", "mpeg4", str(silent_video)], check=True,
    )  # fmt: skip
    zero_wav = DATA_ROOT / "zero.wav"
    sf.write(zero_wav, np.zeros(0, np.float32), 16000)
    longer = speech_file("one two three four five six seven eight nine zero", "wav", name="longer")
    return {
        "text_as_mp3": make_file("notes.mp3", b"this is a text file, not audio\n" * 20),
        "truncated": make_file("truncated.mp3", mp3[: int(len(mp3) * 0.6)]),
        "garbled": make_file("garbled.mp3", mp3[: len(mp3) // 2] + bytes(range(256)) * 8 + mp3[len(mp3) // 2 :]),
        "empty": make_file("empty.wav", b""),
        "silent_video": str(silent_video),
        "zero_wav": str(zero_wav),
        "longer": str(longer),
    }


def test_file_failures(worker, config, good, bad_files):
    config(max_audio_sec=2.5)
    names = ["text_as_mp3", "truncated", "empty", "silent_video", "zero_wav", "longer", "garbled"]
    results = run_job(worker, [{"source": str(good)}] + [{"source": bad_files[n]} for n in names])["results"]
    assert_good(results[0])
    by_name = dict(zip(names, results[1:], strict=True))
    assert_code(by_name["text_as_mp3"], "not_audio", contains="ffmpeg")
    assert_code(by_name["empty"], "empty_audio")
    assert_code(by_name["silent_video"], "no_audio")
    assert_code(by_name["zero_wav"], "empty_audio")
    assert_code(by_name["longer"], "too_long", contains="MAX_AUDIO_SEC")
    assert by_name["longer"]["duration"] > 2.5
    truncated = by_name["truncated"]  # what decodes is transcribed
    assert "error" not in truncated, truncated
    assert 0 < truncated["duration"] < results[0]["duration"]
    assert words_of(truncated["text"]) == GOOD_TEXT.split()[: len(words_of(truncated["text"]))]
    assert words_of(truncated["text"]), "the first words decode"
    garbled = by_name["garbled"]  # ffmpeg skips the junk and says so: text plus a warning
    assert "error" not in garbled and words_of(garbled["text"]), garbled
    assert garbled["warning"].startswith("decoder reported errors"), garbled


# --- local paths -----------------------------------------------------------------------------


def test_path_rules(worker, good):
    escape = DATA_ROOT / "escape-link.wav"
    if not escape.is_symlink():
        escape.symlink_to("/etc/hostname")
    inner = DATA_ROOT / "inner-link.mp3"
    if not inner.is_symlink():
        inner.symlink_to(good)
    inputs = [
        {"source": "/etc/hostname"},
        {"source": str(escape)},
        {"source": f"{DATA_ROOT}/../../etc/passwd"},
        {"source": "../etc/passwd"},
        {"source": str(DATA_ROOT / "no-such-file.wav")},
        {"source": f"file://{good}"},
        {"source": str(inner)},
        {"source": "samples/hello.mp3"},
    ]
    results = run_job(worker, inputs)["results"]
    for result in results[:4]:
        assert_code(result, "forbidden_path", contains="outside the allowed roots")
    assert_code(results[4], "not_found")
    assert_good(results[5])
    assert_good(results[6])  # a symlink that stays inside the roots is fine
    assert words_of(results[7]["text"]) == ["hello", "world"]


# --- ffmpeg tricks ---------------------------------------------------------------------------


def test_ffmpeg_never_reads_other_files(worker, http_server, good):
    secret = DATA_ROOT / "secret.wav"
    sf.write(secret, np.zeros(16000, np.float32), 16000)
    playlist = f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n#EXTINF:10,\n{secret}\n#EXT-X-ENDLIST\n"
    m3u8 = make_file("evil.m3u8", playlist.encode())
    concat = make_file("evil.txt", f"ffconcat version 1.0\nfile /etc/passwd\nfile {secret}\n".encode())
    inputs = [
        {"source": m3u8},
        {"source": http_server.add(DATA_ROOT / "evil.m3u8", "playlist.m3u8")},
        {"source": concat},
        {"source": f"concat:/etc/passwd|{secret}"},
        {"source": str(good)},
    ]
    results = run_job(worker, inputs)["results"]
    assert_code(results[0], "not_audio")
    assert_code(results[1], "not_audio")
    assert_code(results[2], "not_audio")
    assert_code(results[3], "invalid_source", contains="concat")
    assert_good(results[4])


# --- base64 ----------------------------------------------------------------------------------


def test_base64_items(worker, config, good):
    config(max_base64_bytes=200_000)
    wav = speech_file(GOOD_TEXT, "wav")
    encoded = base64.b64encode(wav.read_bytes()).decode()
    too_big = base64.b64encode(b"\0" * 300_000).decode()
    inputs = [
        {"audio_base64": encoded},
        {"audio_base64": "data:audio/wav;base64," + encoded},
        {"source": "data:audio/mpeg;base64," + base64.b64encode(good.read_bytes()).decode()},
        {"audio_base64": "this is !!! not base64"},
        {"audio_base64": too_big},
        {"audio_base64": "data:audio/wav,not-base64-marked"},
    ]
    results = run_job(worker, inputs)["results"]
    for result in results[:3]:
        assert_good(result)
        assert result["source"] == "base64"
    assert_code(results[3], "invalid_source", contains="base64")
    assert_code(results[4], "too_large")
    assert_code(results[5], "invalid_source", contains="base64")


# --- item shapes -----------------------------------------------------------------------------


def test_item_shapes(worker, good):
    inputs = [
        {},
        {"source": ""},
        {"source": "   "},
        {"source": 5},
        {"source": str(good), "audio_base64": "AAAA"},
        {"source": str(good), "colour": "blue"},  # (language and languages are item keys: hints)
        "just a string",
        {"source": "ftp://example.com/a.mp3"},
        {"source": "s3://bucket/a.mp3"},
        {"source": str(good)},
    ]
    results = run_job(worker, inputs)["results"]
    for result in results[:-1]:
        assert_code(result, "invalid_source")
    assert "colour" in results[5]["error"]
    assert "ftp" in results[7]["error"]
    assert_good(results[-1])


# --- job shapes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("job_input", "names"),
    [
        ({}, "inputs"),
        ({"inputs": "a.mp3"}, "inputs"),
        ({"inputs": []}, "inputs"),
        ({"inputs": [{"source": "a"}], "speed": 2}, "speed"),
        ({"inputs": [{"source": "a"}], "timestamps": "yes"}, "timestamps"),
        ({"inputs": [{"source": "a"}], "timestamps": 1}, "timestamps"),
        ({"inputs": [{"source": "a"}], "output_format": "docx"}, "output_format"),
        ({"inputs": [{"source": "a"}], "output_format": 3}, "output_format"),
        ("inputs", "input"),
        (None, "input"),
    ],
)
def test_invalid_jobs_name_the_field(worker, job_input, names):
    out = call_handler(worker, {"id": "bad", "input": job_input})
    assert set(out) == {"error"}, out
    assert names in out["error"]
    assert temp_leftovers() == []


def test_too_many_inputs(worker, config):
    config(max_inputs=3)
    out = call_handler(worker, {"id": "bad", "input": {"inputs": [{"source": "a"}] * 4}})
    assert set(out) == {"error"} and "MAX_INPUTS=3" in out["error"]


# --- the model fails -----------------------------------------------------------------------


def failing_forward(worker, monkeypatch, poison_frames: int, exc: Exception) -> list[int]:
    """Wrap the real model's forward: fail any batch that holds the poisoned item."""
    real = asr.loaded_model().forward
    calls: list[int] = []

    def forward(*, input_signal, input_signal_length):
        calls.append(len(input_signal_length))
        if poison_frames in input_signal_length.tolist():
            raise exc
        return real(input_signal=input_signal, input_signal_length=input_signal_length)

    monkeypatch.setattr(asr.loaded_model(), "forward", forward)
    return calls


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"), "transcription_failed"),
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), "out_of_memory"),
    ],
)
def test_failing_batch_is_retried_in_halves(worker, config, monkeypatch, exc, code):
    config(batch_max_items=8, batch_overhead_sec=1000)  # everything in one batch first
    texts = ["one", "two three", "four five six", "seven eight", "nine zero", "yes no stop"]
    paths = [speech_file(t, "wav") for t in texts]
    poison = sf.info(str(paths[3])).frames
    calls = failing_forward(worker, monkeypatch, poison, exc)
    job = {"id": "halves", "input": {"inputs": [{"source": str(p)} for p in paths]}}
    (out,) = run_together(worker, monkeypatch, [job], ready_units=6)
    for i, (text, result) in enumerate(zip(texts, out["results"], strict=True)):
        if i == 3:
            assert_code(result, code, contains=str(exc)[:20])
        else:
            assert words_of(result["text"]) == text.split(), result
    assert calls[:2] == [1, 6] and 1 in calls[2:] and len(calls) > 4  # one batch of 6, then halves down to 1
    assert out["stats"]["batch_sizes"] == [6] and "refresh_worker" not in out  # a failed item is not a sick GPU
    assert temp_leftovers() == []


def test_encode_helper_containers_exist():
    """The formats the suite feeds the worker really are what their names say."""
    wav = speech_file("go", "wav")
    for fmt, codec in [("mp3", "mp3"), ("ogg", "opus"), ("m4a", "aac"), ("flac", "flac")]:
        out = encode(wav, DATA_ROOT / f"probe.{fmt}")
        probe = subprocess.run(
            ["ffprobe", "-v", "error", "-show_entries", "stream=codec_name", "-of", "csv=p=0", str(out)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert probe.stdout.strip() == codec


# --- several files to one ffmpeg process ------------------------------------------------------


def test_grouped_decode_keeps_each_files_result(worker, tmp_path, good, bad_files):
    """Small files share an ffmpeg process; a bad one among them still gets its own error, and
    the good ones the same samples as when decoded alone."""
    sources = [good, bad_files["text_as_mp3"], bad_files["longer"], bad_files["silent_video"], bad_files["truncated"]]
    sources += [speech_file(text, fmt) for text, fmt in (("yes no", "ogg"), ("stop go", "flac"), ("left", "m4a"))]
    pairs = [(src, tmp_path / f"group-{i}.wav") for i, src in enumerate(map(Path, sources))]
    grouped = ffmpeg.to_wavs(pairs)
    assert len(grouped) == len(pairs)
    assert isinstance(grouped[1], errors.ItemError) and grouped[1].code == "not_audio"
    assert isinstance(grouped[3], errors.ItemError) and grouped[3].code == "no_audio"
    for i in (0, 2, 4, 5, 6, 7):  # 4: a truncated mp3, transcribed as far as it decodes
        grouped_audio = sf.read(pairs[i][1], dtype="int16")[0]
        alone = ffmpeg.to_wav(pairs[i][0], tmp_path / "alone.wav")
        assert grouped[i] == alone and alone[0] > 0
        assert np.array_equal(grouped_audio, sf.read(tmp_path / "alone.wav", dtype="int16")[0])
    clean = ffmpeg.to_wavs([pairs[i] for i in (0, 2, 5, 6, 7)])  # all good: one process
    assert clean == [grouped[i] for i in (0, 2, 5, 6, 7)]


def test_decoder_shared_by_many_threads(worker, tmp_path, good, bad_files):
    """One ffmpeg slot, 12 threads asking at once (big and small files, good and bad): every
    thread gets its own file's answer."""
    import concurrent.futures as cf

    decoder = decoding.Decoder(slots=1)
    sources = [good, bad_files["text_as_mp3"], bad_files["longer"]] * 4
    expect = {0: None, 1: "not_audio", 2: None}

    def one(i: int):
        try:
            return decoder.decode(Path(sources[i]), tmp_path / f"{i}.wav")
        except errors.ItemError as exc:
            return exc.code

    with cf.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(one, range(12)))
    alone = {k: ffmpeg.to_wav(Path(sources[k]), tmp_path / "alone.wav")[0] for k in (0, 2)}
    for i, answer in enumerate(answers):
        if expect[i % 3]:
            assert answer == expect[i % 3], (i, answer)
        else:
            assert answer == (alone[i % 3], None), (i, answer)
    assert decoder.running == 0 and decoder.pending == []


# --- hostile sources -------------------------------------------------------------------------


def test_hostile_sources_cost_nothing_else(worker, http_server, good, data_dir):
    """One job: two good items among sources built to break the worker. Each hostile item gets a
    specific code (never internal_error), both good items come back right, what is echoed is
    bounded, and the whole response can be posted as UTF-8 JSON."""
    fifo = data_dir / "hostile.fifo"
    if not fifo.exists():
        os.mkfifo(fifo)
    bad_redirect = f"{http_server.url}/goto?to=" + quote("http://127.0.0.1:99999/a.wav", safe="")
    bad_host_redirect = f"{http_server.url}/goto?to=" + quote("http://" + "a" * 70 + ".example/a.wav", safe="")
    hostile = {  # source or item -> the code it must get
        "http://[::1": "invalid_source",
        "http://exa\u2100mple.com/a.wav": "invalid_source",  # NFKC-unsafe host: urlparse raises
        "\ud800": "invalid_source",  # a lone surrogate, as JSON's "\ud800" escape carries it
        f"{data_dir}/\udcff.wav": "invalid_source",
        "data:audio/wav;base64": "invalid_source",  # no comma
        f"{data_dir}/a\x00b.wav": "invalid_source",
        f"file://{data_dir}/a%00b.wav": "invalid_source",
        f"{data_dir}/" + "a" * 5000: "invalid_source",  # ENAMETOOLONG
        f"{data_dir}/" + "a" * 300 + ".wav": "invalid_source",  # one name over 255 bytes
        "/" + "x" * 1_000_000: "invalid_source",  # a 1 MB path
        "http://127.0.0.1:99999/a.wav": "invalid_source",
        "http://127.0.0.1:abc/a.wav": "invalid_source",
        "http://" + "a" * 70 + ".example/a.wav": "invalid_source",  # a DNS label over 63 (idna)
        "http:///a.wav": "invalid_source",  # no host
        "http://127.0.0.1:1/a.wav\nFAKE 12:00:00 ERROR forged log line": "invalid_source",
        bad_redirect: "download_failed",  # the server redirects to a malformed URL
        bad_host_redirect: "download_failed",
        str(fifo): "not_found",  # not a regular file: it would hold ffmpeg for ever
        "a\x85b\u2028c": "forbidden_path",  # C1 control and line separator: escaped when echoed
    }
    items = [{"source": s} for s in hostile]
    item_codes = [
        ({"audio_base64": "\ud800AAAA"}, "invalid_source"),
        ({"source": str(good), "\ud800": 1}, "invalid_source"),
        ({"source": str(good), "k" * 100_000: 1}, "invalid_source"),
        ({"source": {"nested": ["\ud800"]}}, "invalid_source"),
    ]
    items += [item for item, _ in item_codes]
    codes = list(hostile.values()) + [code for _, code in item_codes]
    wav = speech_file("seven eight", "wav")
    inputs = [{"source": str(good)}, *items, {"audio_base64": base64.b64encode(wav.read_bytes()).decode()}]
    out = run_job(worker, inputs)
    json.dumps(out, ensure_ascii=False).encode("utf-8")  # no lone surrogate anywhere
    results = out["results"]
    assert_good(results[0])
    assert words_of(results[-1]["text"]) == ["seven", "eight"], results[-1]
    for result, code in zip(results[1:-1], codes, strict=True):
        assert result.get("code") == code, result
        assert "text" not in result
        assert len(result["error"]) <= 1003 and len(result["source"]) <= 1003, (len(result["error"]), result["source"])
    assert out["stats"]["failed"] == len(items)
    by_source = dict(zip(hostile, results[1:], strict=False))
    assert by_source["a\x85b\u2028c"]["source"] == "a\\x85b\\u2028c"  # escaped, not a line break
    assert by_source["\ud800"]["source"] == "\\ud800"
    assert by_source["/" + "x" * 1_000_000]["source"].endswith("x...")


def test_base64_alphabets_padding_and_exact_cap(worker, config):
    """URL-safe base64, base64 without its padding, and a payload of exactly MAX_BASE64_BYTES
    are all fine; one byte more is too_large."""
    wav = speech_file(GOOD_TEXT, "wav", name="b64-exact")
    data = wav.read_bytes()
    assert len(data) % 3, "a length that is a multiple of 3 would need no padding"
    standard = base64.b64encode(data).decode()
    urlsafe = base64.urlsafe_b64encode(data).decode()
    assert urlsafe != standard  # the file's bytes do hit the characters the alphabets differ in
    config(max_base64_bytes=len(data))
    inputs = [
        {"audio_base64": urlsafe},
        {"audio_base64": standard.rstrip("=")},
        {"audio_base64": standard},  # exactly the cap
        {"source": "data:audio/wav;base64," + urlsafe.rstrip("=")},
        {"audio_base64": base64.b64encode(data + b"\0").decode()},  # one byte over
    ]
    results = run_job(worker, inputs)["results"]
    for result in results[:4]:
        assert_good(result)
    assert_code(results[4], "too_large")


def test_logs_keep_no_url_secrets_and_no_forged_lines(worker, config, http_server, caplog):
    """A URL's userinfo and query string (credentials, signatures) never reach the log, and a
    message cannot start a line of its own."""
    config(download_retries=1)
    port = http_server.url.rsplit(":", 1)[1]
    url = f"http://alice:hunter2@127.0.0.1:{port}/always500/a.mp3?X-Amz-Signature=s3cr3t&X-Amz-Credential=AKIA"
    with caplog.at_level(logging.INFO, logger="parakeet-worker"):
        results = run_job(worker, [{"source": url}])["results"]
        worker.log.warning("an item said %s", "x\nFAKE 12:00:00 ERROR forged\r\x1b[31m")
    assert_code(results[0], "download_failed", contains="2 attempts")
    messages = [r.getMessage() for r in caplog.records if r.name == "parakeet-worker"]
    retry = [m for m in messages if "download attempt" in m]
    assert retry, messages
    assert "127.0.0.1" in retry[0] and "always500/a.mp3?***" in retry[0], retry
    for secret in ("alice", "hunter2", "s3cr3t", "AKIA"):
        assert not any(secret in m for m in messages), (secret, messages)
    forged = messages[-1]
    assert forged == "an item said x\\nFAKE 12:00:00 ERROR forged\\r\\x1b[31m", forged


def test_base64_decoded_in_chunks(worker, config, monkeypatch):
    """The payload is decoded a chunk at a time: whitespace, a quadruple, the padding or the cap
    falling across a chunk boundary change nothing (chunks of 7 characters here, so every
    boundary case occurs), and an invalid character in a later chunk still fails the item and
    leaves no partial file behind."""
    monkeypatch.setattr(sources, "BASE64_CHUNK_CHARS", 7)
    data = speech_file(GOOD_TEXT, "wav", name="b64-exact").read_bytes()
    text = base64.b64encode(data).decode()
    mime = "\n".join(text[i : i + 76] for i in range(0, len(text), 76)) + "\n"  # as `base64` prints it
    spaced = " ".join(text[i : i + 5] for i in range(0, len(text), 5))
    config(max_base64_bytes=len(data))
    inputs = [
        {"audio_base64": mime},
        {"audio_base64": spaced + " \n"},
        {"source": "data:audio/wav;base64," + mime.replace("+", "-").replace("/", "_")},
        {"audio_base64": text[: len(text) // 2] + "*" + text[len(text) // 2 :]},  # bad in the middle
        {"audio_base64": base64.b64encode(data + b"\0").decode()},  # one byte over, found in the last chunk
    ]
    results = run_job(worker, inputs)["results"]
    for result in results[:3]:
        assert_good(result)
    assert_code(results[3], "invalid_source")
    assert_code(results[4], "too_large")
