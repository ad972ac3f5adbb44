# retouch — developer commands. `make install` once, then `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1

.PHONY: install test test-fast lint format demo app clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python
	# CPU build of torch first (a plain `pip install torch` pulls a multi-GB CUDA build)
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[dev,app]"

lint:
	$(BIN)/ruff check src tests training
	$(BIN)/ruff format --check src tests training

format:
	$(BIN)/ruff format src tests training
	$(BIN)/ruff check --fix src tests training

test: lint
	$(BIN)/python -m pytest -q

test-fast: lint  ## the tests not marked slow: no embedded-model runs (see pyproject's slow marker)
	$(BIN)/python -m pytest -q -m "not slow"

demo:  ## one edit of an example image on the default embedded model (offline, ~1 min on 2 CPU cores)
	$(BIN)/retouch edit examples/colour.png \
		--source "$$(cat examples/colour.source.txt)" --target "$$(cat examples/colour.target.txt)" \
		--method direct+p2p --option blend_words="diamond diamond" -o out/colour_edited.png

app:  ## the web editor on the embedded default model, at http://127.0.0.1:7860 (Ctrl+C to stop)
	$(BIN)/retouch app

clean:
	rm -rf .pytest_cache .ruff_cache build dist src/*.egg-info
