# Two commands on a fresh Debian machine with Python 3.11: `make demo` and `make test`.
# Both create .venv at the repo root if missing, install the pinned dependencies, and
# install ffmpeg and espeak-ng (apt) if they are absent.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_MODEL := models/demo-tdt.nemo
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup system-deps demo test lint bench bench-long bench-memory bench-gpu gpu-check bench-cold parakeet-shaped bench-boost bench-realtime model clean

setup: system-deps $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -r requirements-dev.txt
	$(PY) -c "import nemo.collections.asr, runpod, pytest"
	test -f models/campplus.ts || $(PY) docker/fetch_speaker_model.py
	touch $@

# Debian's python3 needs python3-venv before `python3 -m venv` works.
system-deps:
	@PKGS=; command -v ffmpeg >/dev/null || PKGS="$$PKGS ffmpeg"; \
	command -v espeak-ng >/dev/null || PKGS="$$PKGS espeak-ng"; \
	test -x $(PY) || $(PYTHON) -c "import ensurepip" 2>/dev/null || PKGS="$$PKGS python3-venv"; \
	[ -z "$$PKGS" ] && exit 0; \
	SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	echo "apt-get install$$PKGS"; \
	$$SUDO apt-get update -qq && \
	DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$PKGS >/dev/null

demo: setup
	PARAKEET_MODEL=$(DEMO_MODEL) $(PY) test_local.py

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	PARAKEET_MODEL=$(DEMO_MODEL) $(PY) -m bench.throughput
	PARAKEET_MODEL=$(DEMO_MODEL) $(PY) -m bench.concurrency
	PARAKEET_MODEL=$(DEMO_MODEL) $(PY) -m bench.openai_http
	PARAKEET_MODEL=$(DEMO_MODEL) $(PY) -m bench.fairness
	PARAKEET_MODEL=$(DEMO_MODEL) MALLOC_ARENA_MAX=2 MALLOC_MMAP_THRESHOLD_=131072 $(PY) -m bench.memory
	PARAKEET_MODEL=$(DEMO_MODEL) $(PY) -m bench.vad
	$(PY) -m bench.diarize
	$(PY) -m bench.language

bench-long: setup
	PARAKEET_MODEL=$(DEMO_MODEL) $(PY) -m bench.long_audio

# The memory model: predicted against measured peak, full and local attention, 2 to 30 minutes
# (points over 6 GB predicted only), and the WER of each plan (~15 min on 2 cores).
bench-memory: setup
	PARAKEET_MODEL=$(DEMO_MODEL) $(PY) -m bench.memory_model --refit

# The worker with the Parakeet-sized model (built into bench/out on first use): on CUDA the full
# size against NeMo and the model-only floor, GPU memory and cold start; on CPU a reduced form.
bench-gpu: setup
	$(PY) -m bench.gpu

# On a GPU machine: the CUDA tests, then bench-gpu, outputs kept in bench/out/gpu-check/.
gpu-check: setup
	bench/gpu_check.sh

# Cold start of the full-size Parakeet-shaped model: .nemo (restore_from) vs the unpacked directory.
bench-cold: parakeet-shaped
	$(PY) -m bench.cold_start --nemo .cache/parakeet-shaped.nemo --unpacked .cache/parakeet-shaped

# The full-size Parakeet-shaped model (~2.5 GB, random weights), as .nemo and unpacked, in .cache/.
parakeet-shaped: setup
	test -f .cache/parakeet-shaped.nemo || $(PY) -m tools.make_parakeet_shaped --out .cache/parakeet-shaped.nemo \
		--unpacked .cache/parakeet-shaped

bench-boost: setup
	PARAKEET_MODEL=$(DEMO_MODEL) $(PY) -m bench.boosting

bench-realtime: setup
	PARAKEET_MODEL=$(DEMO_MODEL) $(PY) -m bench.realtime

# Rebuild the demo model exactly as shipped: 12 epochs from scratch, then 6 more on fresh data,
# a third of it sent through mp3/opus (about 45 minutes on 2 CPU cores), and the samples.
model: setup
	mkdir -p .cache
	$(PY) -m tools.train_demo_model --epochs 12 --eval-every 3 --out .cache/demo-stage1.nemo
	$(PY) -m tools.train_demo_model --init .cache/demo-stage1.nemo --seed 2234 --epochs 6 --lr 6e-4 \
		--codec-share 0.3 --eval-every 2 --out $(DEMO_MODEL)
	$(PY) -m tools.make_samples --out samples

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache bench/out
