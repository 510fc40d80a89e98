"""parakeet-worker's parts, one module per concern, in layers whose imports point down only.

handler.py (the Runpod entry, above every layer) wires them together; docs/architecture.md draws
them. LAYERS is the order, written once: a module may import modules of its own layer or of
layers before it, never of a later one, and never in a cycle (tests/test_layers.py checks both).
Modules a helper adds join the layer of their concern here.
"""

LAYERS: tuple[tuple[str, ...], ...] = (
    # base: settings, telemetry switches, the error-code table, field checks, safe logging, the shared shapes,
    # fair sharing, state
    ("state", "config", "privacy", "logsafe", "errors", "checks", "transcript", "fairshare", "patches"),
    # audio in: every source to a 16 kHz mono WAV (a live stream to 16 kHz samples)
    ("audio.headers", "audio.jobdirs", "audio.disk", "audio.ffmpeg", "audio.sources", "audio.download", "audio.decoder", "audio.uploads",
     "audio.live"),
    # analysis: each a model got once, and pure functions around it
    ("analysis.vad", "analysis.confidence", "analysis.live_vad", "analysis.known_speakers", "analysis.speakers",
     "analysis.boosting", "analysis.language", "analysis.script_mask"),
    # the model and the scheduler that runs it
    ("memory", "model", "engine", "scheduler", "pieces"),
    # one job: its request, its state, its answer; one live session, the same for a WebSocket
    ("request", "job", "output", "realtime_events", "realtime_engine", "realtime_session"),
    # transports: OpenAI's shapes, the HTTP limits and shutdown, the live WebSocket, the HTTP server
    ("openai_api", "limits", "drain", "realtime_ws", "http_server"),
)
