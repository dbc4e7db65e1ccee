# `make demo`: set up and run the main job; `make test`: set up and run the tests
# (--dist loadgroup: the Ray tests share one local cluster, so they stay on one xdist worker).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STORE ?= demo-store

.PHONY: setup demo test test-fast test-exhaustive bench clean

setup: $(VENV)/.installed

# torch is pinned first so pip takes the CPU wheel instead of a multi-GB CUDA build;
# WeSpeaker is installed without its declared deps (s3prl, whisper, peft... never used);
# silero-vad too (its weights ship in the wheel; its deps would pull torchaudio)
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev,plot,ray,openvino]" "torch==2.13.0"
	$(BIN)/pip install -q --no-deps "wespeaker-unofficial==0.0.2" "silero-vad>=5.1"
	touch $@

demo: setup
	$(BIN)/python -m embstore.demo $(STORE)

test: setup
	@$(BIN)/python -m pytest -q -n 2 --dist loadgroup -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

# the edit loop: everything but the slow subprocess / kill / disk-full / cluster tests
test-fast: setup
	@$(BIN)/python -m pytest -q -n 2 -p no:cacheprovider -m "not slow"; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

# fidelity over every shared file on a second runtime, and the timing-heavy kill loops
# (a quiet machine; ~10 minutes): what the default suite leaves out to stay under 5
test-exhaustive: setup
	@EMBSTORE_EXHAUSTIVE=1 $(BIN)/python -m pytest -q -n 2 --dist loadgroup -p no:cacheprovider -m exhaustive

bench: setup
	$(BIN)/python benchmarks/run.py --quick --out bench-out

clean:
	rm -rf $(VENV) $(STORE) bench-out
