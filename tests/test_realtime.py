"""Live transcription over OpenAI's Realtime protocol (GET /v1/realtime?intent=transcription): the
worker's own HTTP app on 127.0.0.1 (wired as handler.http_app wires it: the one scheduler, the
worker's silero model), the official `openai` client and a raw `websockets` client, espeak-ng
speech streamed in 20-40 ms frames, the real demo model.

No assertion depends on timing: where the words of the partials matter, the client waits (a
session.update round trip, then no session waiting for the model) between 500 ms blocks, so
which partials run is fixed; elsewhere only what must hold whatever the timing is asserted
(completed text, event order, each word once, which units share a batch while the model is held).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import itertools
import json
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from conftest import DATA_ROOT, hold_model, run_job, speech_file, synth, until
from fastapi import Response

from parakeet_worker import config, http_server
from parakeet_worker.realtime_ws import SessionManager
from tools.live_client import FORMATS, LiveClient, append, encode_input, frames, session_update
from tools.live_client import words_of as completed_words
from tools.testkit import REPO, UvicornThread, loopback_only_env

COMPLETED = "conversation.item.input_audio_transcription.completed"
DELTA = "conversation.item.input_audio_transcription.delta"
U1, U2, U3 = "hello world", "one two three", "yes no stop go"
PHONE = "seven eight nine"  # the demo model mishears "two" and "yes" in 8 kHz G.711 (as it does in ffmpeg's decoding)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * 16_000), np.float32)


def utterances(*texts: str, gap: float = 1.2) -> tuple[np.ndarray, list[float]]:
    """`texts` spoken one after another with `gap` s of silence between them (0.5 s before, 1 s
    after); and where each one's audio starts, in seconds."""
    parts, starts, at = [silence(0.5)], [], 0.5
    for n, text in enumerate(texts):
        speech = synth.speak(text)
        starts.append(at)
        parts += [speech, silence(gap if n < len(texts) - 1 else 1.0)]
        at += len(speech) / 16_000 + gap
    return np.concatenate(parts), starts


@contextlib.contextmanager
def serve(worker: Any, **changes: Any) -> Iterator[tuple[UvicornThread, SessionManager]]:
    """The worker's HTTP app (http_server.create_app with handler.realtime_sessions(), as
    handler.http_app builds it) on 127.0.0.1, with Config fields `changes` applied while it runs,
    and /test/drain added: what SIGTERM runs before uvicorn's own shutdown."""
    before = config.CFG
    config.CFG = dataclasses.replace(before, **changes)
    try:
        manager = worker.realtime_sessions()
        app = http_server.create_app(worker.run_job, worker.worker_health, None, manager)

        async def drain() -> Response:
            await manager.drain()
            return Response(status_code=200)

        app.add_api_route("/test/drain", drain, methods=["POST"])
        with UvicornThread(app) as api:
            yield api, manager
    finally:
        config.CFG = before


@pytest.fixture(scope="module")
def live(worker):
    with serve(worker) as running:
        yield running


@pytest.fixture(scope="module")
def server(live):
    return live[0]


def offline(worker, audio: np.ndarray, name: str) -> dict[str, Any]:
    """The worker's own file transcript of `audio` (a WAV through run_job), with word timestamps."""
    path = synth.write(DATA_ROOT / f"live-{name}.wav", audio)
    return run_job(worker, [{"source": str(path)}], timestamps=True)["results"][0]


async def stream(client: LiveClient, data: bytes, fmt: str, ms: int = 20, pace: float | None = 1.0) -> None:
    """`data` in `ms` frames, at `pace` x real time (None: as fast as the socket takes them)."""
    for chunk in frames(data, fmt, ms):
        await client.send(append(chunk))
        if pace:
            await asyncio.sleep(ms / 1000 / pace)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# --- The protocol as the official client sees it -----------------------------------------------------


def test_official_client_parses_every_event_and_completed_is_the_offline_transcript(server, worker):
    from openai import AsyncOpenAI
    from openai.types.realtime import (
        ConversationItemInputAudioTranscriptionCompletedEvent,
        ConversationItemInputAudioTranscriptionDeltaEvent,
        InputAudioBufferCommittedEvent,
        InputAudioBufferSpeechStartedEvent,
        InputAudioBufferSpeechStoppedEvent,
        SessionCreatedEvent,
        SessionUpdatedEvent,
    )

    classes = {"session.created": SessionCreatedEvent, "session.updated": SessionUpdatedEvent,
               "input_audio_buffer.speech_started": InputAudioBufferSpeechStartedEvent,
               "input_audio_buffer.speech_stopped": InputAudioBufferSpeechStoppedEvent,
               "input_audio_buffer.committed": InputAudioBufferCommittedEvent,
               DELTA: ConversationItemInputAudioTranscriptionDeltaEvent,
               COMPLETED: ConversationItemInputAudioTranscriptionCompletedEvent}  # fmt: skip
    audio, starts = utterances(U1, U2)
    data = encode_input(audio, "pcm24")

    async def main() -> list[Any]:
        client = AsyncOpenAI(api_key="unused", websocket_base_url=server.url.replace("http", "ws") + "/v1")
        got: list[Any] = []
        async with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
            await conn.session.update(session={"type": "transcription", "audio": {"input": {
                "format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": {"type": "server_vad"}}}})  # fmt: skip

            async def send() -> None:
                for chunk in frames(data, "pcm24", 20):
                    await conn.input_audio_buffer.append(audio=base64.b64encode(chunk).decode())
                    await asyncio.sleep(0.02)

            sender = asyncio.ensure_future(send())
            async for ev in conn:
                got.append(ev)
                if sum(e.type == COMPLETED for e in got) == 2:
                    break
            await sender
        return got

    events = run(main())
    for ev in events:
        assert isinstance(ev, classes[ev.type]), ev
    assert [e.type for e in events[:2]] == ["session.created", "session.updated"]
    assert events[0].session.id.startswith("sess_")
    items = [e.item_id for e in events if e.type == "input_audio_buffer.committed"]
    assert len(items) == 2 and len(set(items)) == 2
    committed = [e for e in events if e.type == "input_audio_buffer.committed"]
    assert [c.previous_item_id for c in committed] == [None, items[0]]
    for item, text, start in zip(items, [U1, U2], starts, strict=True):
        mine = [e for e in events if getattr(e, "item_id", None) == item]
        kinds = [e.type for e in mine if e.type != DELTA]
        assert kinds == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                         "input_audio_buffer.committed", COMPLETED]  # fmt: skip
        order = [e.type for e in mine]
        assert all(order.index("input_audio_buffer.speech_started") < i < order.index("input_audio_buffer.speech_stopped")
                   for i, t in enumerate(order) if t == DELTA)  # fmt: skip
        done = mine[-1]
        said = "".join(e.delta for e in mine if e.type == DELTA).split()
        assert said == done.transcript.split()[: len(said)]  # deltas only append, and the final agrees
        speech = audio[int(start * 16_000) : int(start * 16_000) + len(synth.speak(text))]
        reference = offline(worker, speech, text.replace(" ", "-"))
        assert done.transcript == reference["text"] == text
        assert done.usage.type == "duration"
        assert done.usage.seconds == pytest.approx(done.end - done.start, abs=0.002)
        # word timestamps on the session's timeline: the file's, moved to where the utterance was
        live_words = done.words  # this worker's extra field, kept by the client's model
        file_words = reference["timestamps"]["word"]
        assert [w["word"] for w in live_words] == [w["word"] for w in file_words]
        for live, ref in zip(live_words, file_words, strict=True):
            assert live["start"] == pytest.approx(ref["start"] + start, abs=0.17)
            assert done.start <= live["start"] <= live["end"] <= done.end + 0.01


def test_partials_send_the_words_two_decodes_agree_on(live):
    """Paced so that every partial runs (no timing): each item gets deltas, which only append,
    and which the final transcript begins with."""
    server, manager = live
    audio, _ = utterances(U1, U2)
    data = encode_input(audio, "pcm24")

    async def main() -> list[dict[str, Any]]:
        async with LiveClient(server.url) as c:
            await c.send(session_update("pcm24"))
            for n, chunk in enumerate(frames(data, "pcm24", 20)):
                await c.send(append(chunk))
                if n % 25 == 24:
                    await c.barrier()
                    await until(manager.engine.idle, "the partials")
            await c.wait_for(COMPLETED, 2)
            return c.events

    events = run(main())
    for done in [e for e in events if e["type"] == COMPLETED]:
        deltas = [e["delta"] for e in events if e["type"] == DELTA and e["item_id"] == done["item_id"]]
        assert deltas, "no delta for " + done["transcript"]
        assert not deltas[0].startswith(" ") and all(d.startswith(" ") for d in deltas[1:])
        said = "".join(deltas).split()
        assert said == done["transcript"].split()[: len(said)]


@pytest.mark.parametrize("pace", [1.0, None], ids=["real-time", "fast"])
def test_four_formats_give_the_same_words(server, pace):
    """24 kHz and 16 kHz PCM16, mu-law and A-law: four sessions at once, 40 ms frames."""
    audio, _ = utterances(U1, PHONE)

    async def one(fmt: str) -> list[str]:
        async with LiveClient(server.url) as c:
            await c.send(session_update(fmt))
            await stream(c, encode_input(audio, fmt), fmt, ms=40, pace=pace)
            return [e["transcript"] for e in await c.wait_for(COMPLETED, 2)]

    async def main() -> list[list[str]]:
        return list(await asyncio.gather(*(one(f) for f in FORMATS)))

    assert run(main()) == [[U1, PHONE]] * len(FORMATS)


def test_a_turn_that_never_pauses_is_cut_between_words(worker):
    """A turn that never pauses for REALTIME_MAX_TURN_SEC is committed at its quietest frame: nine
    digits spoken without a pause come back in more than one item, each word once, in order."""
    digits = "one two three four five six seven eight nine"
    audio = np.concatenate([silence(0.5), synth.speak(digits), silence(1.0)])
    with serve(worker, realtime_max_turn_sec=2.0) as (api, _):

        async def main() -> list[dict[str, Any]]:
            async with LiveClient(api.url) as c:
                await c.send(session_update("pcm16"))
                await stream(c, encode_input(audio, "pcm16"), "pcm16", pace=None)
                await c.barrier()  # every append handled: every commit made
                await c.wait_for(COMPLETED, c.types().count("input_audio_buffer.committed"))
                return c.events

        events = run(main())
    done = [e for e in events if e["type"] == COMPLETED]
    assert len(done) >= 2, [(e["type"], e.get("transcript")) for e in events]
    assert completed_words(events) == digits.split(), [(e["transcript"], e["start"], e["end"]) for e in done]
    assert all(a["end"] <= b["start"] + 1e-6 for a, b in itertools.pairwise(done))


# --- Manual commits, clear ----------------------------------------------------------------------------


def test_manual_commit_and_clear(server):
    one, two = encode_input(synth.speak(U1), "pcm24"), encode_input(synth.speak(U2), "pcm24")

    async def main() -> list[dict[str, Any]]:
        async with LiveClient(server.url) as c:
            await c.send(session_update("pcm24", turn_detection=None))
            await c.send({"type": "input_audio_buffer.commit", "event_id": "empty"})
            await stream(c, two, "pcm24", pace=None)
            await c.send({"type": "input_audio_buffer.clear"})  # "one two three" is dropped
            await stream(c, one, "pcm24", pace=None)
            await c.send({"type": "input_audio_buffer.commit"})
            await stream(c, two, "pcm24", pace=None)
            await c.send({"type": "input_audio_buffer.commit"})
            await c.wait_for(COMPLETED, 2)
            return c.events

    events = run(main())
    kinds = [e["type"] for e in events if e["type"] != DELTA]
    assert kinds == ["session.created", "session.updated", "error", "input_audio_buffer.cleared",
                     "input_audio_buffer.committed", "input_audio_buffer.committed", COMPLETED, COMPLETED]  # fmt: skip
    error = events[2]["error"]
    assert error["code"] == "input_audio_buffer_commit_empty" and error["event_id"] == "empty"
    assert [e["transcript"] for e in events if e["type"] == COMPLETED] == [U1, U2]
    first, second = [e for e in events if e["type"] == "input_audio_buffer.committed"]
    assert second["previous_item_id"] == first["item_id"]


def test_clear_during_speech_drops_the_turn(server):
    """server_vad: speech, clear before it ends: no item for it; the next utterance is one item."""
    half = synth.speak(U2)[:12_000]
    first = encode_input(np.concatenate([silence(0.3), half]), "pcm24")
    second = encode_input(utterances(U1)[0], "pcm24")

    async def main() -> list[dict[str, Any]]:
        async with LiveClient(server.url) as c:
            await c.send(session_update("pcm24"))
            await stream(c, first, "pcm24", pace=None)
            await c.send({"type": "input_audio_buffer.clear"})
            await stream(c, second, "pcm24", pace=None)
            await c.wait_for(COMPLETED, 1)
            await c.barrier()
            return c.events

    events = run(main())
    assert events[2]["type"] == "input_audio_buffer.speech_started"
    assert [e["type"] for e in events].count("input_audio_buffer.committed") == 1
    assert completed_words(events) == U1.split()


def test_keywords_boost_the_session(server):
    """A word the demo model mishears in noise ("seven" heard as "two") comes out right when the
    session lists it as a keyword, or in its prompt."""
    noisy = encode_input(synth.noisy_word("seven"), "pcm16")

    async def one(**transcription: Any) -> str:
        async with LiveClient(server.url) as c:
            await c.send(session_update("pcm16", turn_detection=None, **transcription))
            await stream(c, noisy, "pcm16", pace=None)
            await c.send({"type": "input_audio_buffer.commit"})
            return (await c.wait_for(COMPLETED))[0]["transcript"]

    async def main() -> list[str]:
        return list(await asyncio.gather(one(), one(keywords=["seven"]), one(prompt="seven, nine"),
                                         one(keywords=["seven"], language="en")))  # fmt: skip

    assert run(main()) == ["two", "seven", "seven", "seven"]


# --- Auth ----------------------------------------------------------------------------------------------


def test_auth_by_bearer_header_and_by_browser_subprotocol(worker):
    from openai import AsyncOpenAI
    from websockets.exceptions import InvalidStatus

    speech = encode_input(synth.speak(U1), "pcm16")
    with serve(worker, worker_api_key="sekrit") as (api, manager):
        base = api.url.replace("http", "ws") + "/v1"

        async def refused(**connect: Any) -> tuple[int, str]:
            with pytest.raises(InvalidStatus) as info:
                async with LiveClient(api.url, **connect):
                    pass
            return info.value.response.status_code, json.loads(info.value.response.body)["error"]["code"]

        async def main() -> tuple[Any, ...]:
            client = AsyncOpenAI(api_key="sekrit", websocket_base_url=base)  # Authorization: Bearer sekrit
            async with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
                first = await conn.recv()
            with pytest.raises(InvalidStatus) as wrong:
                async with AsyncOpenAI(api_key="wrong", websocket_base_url=base).realtime.connect(
                        extra_query={"intent": "transcription"}) as conn:  # fmt: skip
                    await conn.recv()
            no = [await refused(), await refused(additional_headers={"Authorization": "Bearer wrong"}),
                  await refused(subprotocols=["realtime", "openai-insecure-api-key.wrong"])]  # fmt: skip
            async with LiveClient(api.url, subprotocols=["realtime", "openai-insecure-api-key.sekrit"]) as c:
                chosen = c.ws.subprotocol
                await c.send(session_update("pcm16", turn_detection=None))
                await stream(c, speech, "pcm16", pace=None)
                await c.send({"type": "input_audio_buffer.commit"})
                text = (await c.wait_for(COMPLETED))[0]["transcript"]
            return first.type, wrong.value.response.status_code, no, chosen, text

        first, wrong, no, chosen, text = run(main())
        assert first == "session.created"
        assert wrong == 401
        assert no == [(401, "invalid_api_key")] * 3
        assert chosen == "realtime"  # a browser needs one of its offered subprotocols back
        assert text == U1
        assert len(manager.sessions) <= 2  # refused connections never made a session


# --- Bad input -----------------------------------------------------------------------------------------


def test_bad_input_gets_an_error_event_and_the_session_goes_on(server):
    from openai.types.realtime import ConversationItemInputAudioTranscriptionCompletedEvent, RealtimeErrorEvent

    def update(input_: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {"type": "session.update", **extra, "session": {"type": "transcription", "audio": {"input": input_}}}

    async def main() -> list[dict[str, Any]]:
        async with LiveClient(server.url) as c:
            await c.send({**append(b"\0\0" * 160), "event_id": "early"})  # before session.update
            await c.send("this is not JSON")
            await c.send("[1, 2]")
            await c.send({"type": "response.create", "event_id": "unknown"})
            await c.send(update({"format": {"type": "audio/opus"}}, event_id="opus"))
            await c.send(update({"format": {"type": "audio/pcm", "rate": 44100}}))
            await c.send(update({"turn_detection": {"type": "semantic_vad"}}))
            await c.send(update({"turn_detection": {"type": "server_vad", "threshold": 3}}))
            await c.send({"type": "session.update", "session": {"type": "realtime"}})
            await c.send(update({"transcription": {"keywords": "not a list"}}))
            await c.send(update({"transcription": {"keywords": ["h\u00e9llo \u4e16\u754c"]}}))  # the model cannot spell it
            await c.send(update({"transcription": {"language": "not a language"}}))
            await c.send(update({"transcription": {"language": "en", "languages": ["en"]}}))
            await c.send(session_update("pcm16", turn_detection=None))
            await c.send({"type": "input_audio_buffer.append", "audio": "not base64!", "event_id": "b64"})
            await c.send({"type": "input_audio_buffer.append"})
            await stream(c, encode_input(synth.speak(U1), "pcm16"), "pcm16", pace=None)
            await c.send({"type": "input_audio_buffer.commit"})
            await c.wait_for(COMPLETED)
            return c.events

    events = run(main())
    errors = [e for e in events if e["type"] == "error"]
    for e in errors:
        RealtimeErrorEvent.model_validate(e)
    assert [(e["error"]["code"], e["error"]["event_id"], e["error"]["param"]) for e in errors] == [
        ("session_not_configured", "early", None),
        ("invalid_json", None, None),
        ("invalid_event", None, None),
        ("unknown_event", "unknown", "type"),
        ("invalid_value", "opus", "session.audio.input.format"),
        ("invalid_value", None, "session.audio.input.format"),
        ("invalid_value", None, "session.audio.input.turn_detection.type"),
        ("invalid_value", None, "session.audio.input.turn_detection.threshold"),
        ("invalid_request", None, "session.type"),
        ("invalid_value", None, "session.audio.input.transcription.keywords"),
        ("invalid_value", None, "session.audio.input.transcription.keywords"),
        ("invalid_value", None, "session.audio.input.transcription.language"),
        ("invalid_value", None, "session.audio.input.transcription.languages"),
        ("invalid_base64", "b64", "audio"),
        ("invalid_value", None, "audio"),
    ]
    updated = [e for e in events if e["type"] == "session.updated"]
    assert len(updated) == 1  # a refused update changes nothing
    assert updated[0]["session"]["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 16000}
    assert updated[0]["session"]["audio"]["input"]["turn_detection"] is None
    done = ConversationItemInputAudioTranscriptionCompletedEvent.model_validate(next(e for e in events if e["type"] == COMPLETED))
    assert done.transcript == U1


def test_frames_the_protocol_does_not_allow_close_the_socket_with_a_clear_code(worker):
    from websockets.exceptions import InvalidStatus

    speech = encode_input(np.concatenate([synth.speak(U2)] * 3), "pcm16")
    with serve(worker, realtime_max_buffer_sec=2.0) as (api, _):

        async def closed_by(*messages: Any, manual: bool = False) -> tuple[int | None, str]:
            async with LiveClient(api.url) as c:
                await c.send(session_update("pcm16", turn_detection=None) if manual else session_update("pcm16"))
                for message in messages:
                    await c.send(message)
                await c.wait_closed()
                return c.close_code, c.close_reason

        async def refused(query: str) -> tuple[int, str]:
            with pytest.raises(InvalidStatus) as info:
                async with LiveClient(api.url, query):
                    pass
            return info.value.response.status_code, json.loads(info.value.response.body)["error"]["code"]

        async def main() -> list[Any]:
            return [
                await closed_by(b"\x00\x01binary"),
                await closed_by("x" * ((1 << 20) + 1)),
                await closed_by(*[append(c) for c in frames(speech, "pcm16", 40)], manual=True),
                await refused("intent=conversation"),
                await refused("intent=transcription&session_id=sess_nope"),
            ]

        binary, big, buffer, intent, unknown = run(main())
    assert binary[0] == 1003 and "binary" in binary[1]
    assert big[0] == 1009 and "1048576" in big[1]
    assert buffer[0] == 1008 and "REALTIME_MAX_BUFFER_SEC=2" in buffer[1]
    assert intent == (400, "invalid_intent")
    assert unknown == (404, "session_not_found")


def test_session_limit_and_idle_close(worker):
    from websockets.exceptions import InvalidStatus

    with serve(worker, realtime_max_sessions=1, realtime_idle_sec=1.0, realtime_resume_sec=0.2) as (api, manager):

        async def main() -> tuple[Any, ...]:
            async with LiveClient(api.url) as first:
                await first.wait_for("session.created")
                with pytest.raises(InvalidStatus) as full:
                    async with LiveClient(api.url):
                        pass
                await first.ws.close()
            await until(lambda: not manager.sessions, "the closed session to end")
            async with LiveClient(api.url) as idle:
                await idle.wait_for("session.created")
                await idle.wait_closed()  # it sends nothing
            return full.value.response.status_code, json.loads(full.value.response.body)["error"]["code"], idle

        status, code, idle = run(main())
    assert (status, code) == (429, "too_many_sessions")
    assert idle.close_code == 1000 and "REALTIME_IDLE_SEC=1" in idle.close_reason


def test_a_client_that_reads_nothing_is_cut_off_and_blocks_nobody(worker):
    """The session's outgoing queue is bounded: a client that sends but never reads is closed
    (1008) once REALTIME_SEND_QUEUE events wait, and meanwhile the server answers others."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    big = {"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "transcription": {"keywords": [" ".join(w) for w in itertools.islice(itertools.permutations(synth.VOCAB, 3), 200)]}}}}}  # fmt: skip
    with serve(worker, realtime_send_queue=16, realtime_idle_sec=30) as (api, _):

        async def main() -> tuple[Any, ...]:
            url = api.url.replace("http", "ws") + "/v1/realtime?intent=transcription"
            sock = socket.socket()  # a small receive buffer, so that the kernel does not hold it all
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", api.port))
            sock.setblocking(False)
            async with connect(url, sock=sock, proxy=None, max_queue=1, max_size=None, compression=None) as ws:
                for _ in range(3000):  # each answered by a session.updated of ~4 KB: ~12 MB unread
                    try:
                        await ws.send(json.dumps(big))
                    except ConnectionClosed:
                        break
                ping = await asyncio.to_thread(lambda: urllib.request.urlopen(f"{api.url}/ping", timeout=30).status)
                async with LiveClient(api.url) as other:  # another session works meanwhile
                    await other.send(session_update("pcm16"))
                    await other.wait_for("session.updated")
                with contextlib.suppress(ConnectionClosed):
                    async for _ in ws:
                        pass
                return ping, ws.close_code, ws.close_reason

        ping, code, reason = run(main())
    assert ping == 200
    assert code == 1008 and "did not read" in reason


# --- Resume, shutdown ------------------------------------------------------------------------------------


async def stream_resuming(url: str, data: bytes, fmt: str, items: int) -> tuple[list[dict[str, Any]], list[Any]]:
    """Stream `data` at real-time pace in 20 ms frames through connections the server cuts
    (REALTIME_MAX_CONNECTION_SEC), resuming each time with &session_id= and going on from the
    audio the server says it has; until `items` completed events came. Returns every event of
    every connection, and each connection's (close code, reason)."""
    from websockets.exceptions import ConnectionClosed

    session_id, events, closes = None, [], []
    while sum(e["type"] == COMPLETED for e in events) < items:
        query = "intent=transcription" + (f"&session_id={session_id}" if session_id else "")
        async with LiveClient(url, query) as c:
            created = (await c.wait_for("session.created"))[0]
            session_id = created["session"]["id"]
            pos = created.get("resumed", {}).get("audio_bytes_received", 0)
            if "resumed" not in created:
                await c.send(session_update(fmt))
            try:
                step = FORMATS[fmt][1] * 20 // 1000 * FORMATS[fmt][3]
                while pos < len(data):
                    await c.send(append(data[pos : pos + step]))
                    pos += step
                    await asyncio.sleep(0.02)
                left = items - sum(e["type"] == COMPLETED for e in events)
                async with c.arrived:  # all sent: wait for the rest, or for the cut
                    await c.arrived.wait_for(lambda c=c, left=left: c.closed or c.types().count(COMPLETED) >= left)
            except ConnectionClosed:
                pass
            await c.ws.close()
            await c.wait_closed()
            events += c.events
            closes.append((c.close_code, c.close_reason))
    return events, closes


def test_resume_after_forced_cuts_gives_each_word_exactly_once(worker):
    audio, _ = utterances(U1, U2, U3, gap=0.8)
    data = encode_input(audio, "pcm24")
    with serve(worker, realtime_max_connection_sec=1.5) as (api, manager):
        events, closes = run(stream_resuming(api.url, data, "pcm24", items=3))
        await_end = until(lambda: not manager.sessions, "the session to end with the client's own close")
        run(await_end)
    assert len(closes) >= 2  # ~5 s of audio at real-time pace through 1.5 s connections
    for code, reason in closes[:-1]:
        assert code == 1001 and "session_id=" in reason
    assert completed_words(events) == f"{U1} {U2} {U3}".split()
    created = [e for e in events if e["type"] == "session.created"]
    assert len({e["session"]["id"] for e in created}) == 1
    assert all("resumed" in e for e in created[1:])
    committed = [e["item_id"] for e in events if e["type"] == "input_audio_buffer.committed"]
    assert len(committed) == len(set(committed)) == 3


def test_drain_answers_every_buffered_turn_then_closes(worker):
    """What SIGTERM runs: a server_vad turn still being spoken and a manual buffer never committed
    both get their `completed`, then the socket closes with 1001; new sessions are refused (503)."""
    from websockets.exceptions import InvalidStatus

    speaking = encode_input(np.concatenate([silence(0.4), synth.speak(U2)[:-1600]]), "pcm24")  # no pause after
    held = encode_input(synth.speak(U1), "pcm16")
    with serve(worker) as (api, _):

        async def main() -> tuple[Any, ...]:
            async with LiveClient(api.url) as vad, LiveClient(api.url) as manual:
                await vad.send(session_update("pcm24"))
                await manual.send(session_update("pcm16", turn_detection=None))
                await stream(vad, speaking, "pcm24", pace=None)
                await stream(manual, held, "pcm16", pace=None)
                await vad.barrier()
                await manual.barrier()
                status = await asyncio.to_thread(
                    lambda: urllib.request.urlopen(urllib.request.Request(f"{api.url}/test/drain", method="POST"),
                                                   timeout=120).status)  # fmt: skip
                await vad.wait_closed()
                await manual.wait_closed()
                with pytest.raises(InvalidStatus) as late:
                    async with LiveClient(api.url):
                        pass
                return status, vad, manual, late.value.response.status_code

        status, vad, manual, late = run(main())
    assert status == 200 and late == 503
    assert vad.types()[-3:] == ["input_audio_buffer.speech_stopped", "input_audio_buffer.committed", COMPLETED]
    assert manual.types()[-2:] == ["input_audio_buffer.committed", COMPLETED]
    assert completed_words(vad.events) == U2.split() and completed_words(manual.events) == U1.split()
    assert (vad.close_code, manual.close_code) == (1001, 1001)


# --- One model for everyone --------------------------------------------------------------------------------


def test_eight_sessions_and_a_file_job_share_one_model_batch(worker, live, monkeypatch):
    """While the model is busy, 8 sessions commit a turn each and a file job arrives: the next
    batch holds all nine (live turns go through the same scheduler as files); the partials that
    waited behind the busy model were dropped when each turn's final superseded them."""
    server, manager = live
    wav = speech_file(U1)
    samples, _ = sf.read(str(wav), dtype="float32")
    data = encode_input(samples, "pcm16")  # the same audio, the same length, as the file
    scheduler = worker.model_thread()
    entered, release = hold_model(worker, monkeypatch)

    async def main() -> tuple[Any, ...]:
        blocker = asyncio.ensure_future(worker.handler({"id": "blocker", "input": {"inputs": [{"source": str(wav)}]}}))
        await until(entered.is_set, "the model to be busy")
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(LiveClient(server.url)) for _ in range(8)]
            for c in clients:
                await c.send(session_update("pcm16", turn_detection=None))
                await stream(c, data, "pcm16", pace=None)  # partials are asked for on the way
                await c.send({"type": "input_audio_buffer.commit"})
            file_job = asyncio.ensure_future(worker.handler({"id": "file", "input": {"inputs": [{"source": str(wav)}]}}))
            try:
                await until(lambda: len(scheduler.ready) >= 9, "8 turns and the file's clip to wait for the model")
                waiting = list(scheduler.ready)
            finally:
                release.set()
            texts = [(await c.wait_for(COMPLETED))[0]["transcript"] for c in clients]
            return await blocker, await file_job, texts, waiting, list(manager.engine.batches)[-8:]

    blocked, out, texts, waiting, live_batches = run(main())
    assert "error" not in blocked and out["results"][0]["text"] == U1
    assert sum(u.live_final for u in waiting) == 8 and not any(u.partial for u in waiting)
    assert texts == [U1] * 8
    assert out["stats"]["batch_sizes"] == [9]  # the file's clip ran with the 8 turns
    assert len({batch for batch, _ in live_batches}) == 1 and live_batches[0][1] == 9


def test_sigterm_mid_turn_answers_the_turn_then_closes(tmp_path):
    """`WORKER_MODE=http python handler.py`, a session speaking (no pause yet) when SIGTERM comes:
    it gets speech_stopped, committed and the `completed` of its turn, then a 1001 close; the
    process exits 0 and leaves no temp files."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = loopback_only_env()
    env.update(WORKER_MODE="http", HOST="127.0.0.1", PORT=str(port), WORKER_TMP_DIR=str(tmp_path / "tmp"))
    log = tmp_path / "server.log"
    speaking = encode_input(np.concatenate([silence(0.4), synth.speak(U2)[:-1600]]), "pcm24")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "handler.py"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:

        def ready() -> bool:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5).status == 200
            except OSError:
                return False

        async def main() -> LiveClient:
            await until(lambda: ready() or proc.poll() is not None, "the worker's model", 180)
            assert proc.poll() is None, log.read_text()
            async with LiveClient(f"http://127.0.0.1:{port}") as c:
                await c.send(session_update("pcm24"))
                await stream(c, speaking, "pcm24", pace=None)
                await c.barrier()
                assert "input_audio_buffer.speech_started" in c.types()
                proc.send_signal(signal.SIGTERM)
                await c.wait_closed()
                return c

        c = run(main())
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert c.types()[-3:] == ["input_audio_buffer.speech_stopped", "input_audio_buffer.committed", COMPLETED]
    assert completed_words(c.events) == U2.split()
    assert c.close_code == 1001
    assert list((tmp_path / "tmp").rglob("*")) == []
