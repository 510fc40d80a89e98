"""parakeet-worker's parts, one module per concern, in layers whose imports point down only.

handler.py (the Runpod entry, above every layer) wires them together; docs/architecture.md draws
them. LAYERS is the order, written once: a module may import modules of its own layer or of
layers before it, never of a later one, and never in a cycle (tests/test_layers.py checks both).
Modules a helper adds join the layer of their concern here.
"""

LAYERS: tuple[tuple[str, ...], ...] = (
    # base: settings, the error-code table, safe logging, the shared shapes, fair sharing, state
    ("state", "config", "logsafe", "errors", "checks", "transcript", "fairshare", "patches"),
    # audio in: every source to a 16 kHz mono WAV
    ("audio.headers", "audio.disk", "audio.ffmpeg", "audio.sources", "audio.download", "audio.decoder", "audio.uploads"),
    # analysis: each a model got once, and pure functions around it
    ("analysis.vad", "analysis.speakers", "analysis.boosting"),
    # the model and the scheduler that runs it
    ("model", "engine", "scheduler", "pieces"),
    # one job: its request, its state, its answer
    ("request", "job", "output"),
    # transports: OpenAI's shapes, the HTTP limits and shutdown, the HTTP server
    ("openai_api", "limits", "drain", "http_server"),
)
