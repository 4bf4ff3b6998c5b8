# skinray: `make demo` runs the main job on the built-in synthetic data; `make test` runs the tests.
# Both create .venv when it is missing and install the project with the pinned versions.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.skinray-installed
RUN_STAMP := $(VENV)/.skinray-installed-run
DEMO_DIR ?= demo
START := $(shell date +%s)
export HF_HUB_OFFLINE ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0
export PYTHONUNBUFFERED := 1

.PHONY: install demo demo-stop test test-all bench bench-gpu ui clean help

help:
	@echo "make demo       set up .venv, run the main job on synthetic lesions, print where results are"
	@echo "make test       set up .venv (with test extras) and run the test suite (target < 20 min on 2 cores)"
	@echo "make test-all   the suite plus slow full-size runs"
	@echo "make bench      every benchmark under benchmarks/ (prints the figures)"
	@echo "make bench-gpu  the GPU figures in one table (benchmarks/gpu.py; needs a GPU)"
	@echo "make demo-stop  stop what the demo started"
	@echo "make ui         the Streamlit page on 127.0.0.1:8501 (API at \$$SKINRAY_API_URL)"

# The installed packages' bytecode, compiled on every core (pip compiles on one: 27 s of a 76 s install here).
# Without it a machine with PYTHONDONTWRITEBYTECODE would compile torch at every import. The few files written
# in a newer Python's syntax (torch's py312 test helpers) stay uncompiled, as pip leaves them.
COMPILE = $(PY) -m compileall -q -j 0 $(VENV)/lib >>$(VENV)/install.log 2>&1 || true

# What running the system needs (make demo); the tests' extras come on top (make test).
# pip's own output goes to .venv/install.log (its last lines shown if it fails).
$(RUN_STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "setting up .venv (the first time 1–2 minutes; pip's output: $(VENV)/install.log)"
	@$(PIP) install -q --upgrade pip >$(VENV)/install.log 2>&1 || { tail -n 30 $(VENV)/install.log; exit 1; }
	@# torch/torchvision pinned exactly (constraints.txt): other combinations download gigabytes
	@$(PIP) install -q --no-compile -c constraints.txt -e '.[ray,ui]' >>$(VENV)/install.log 2>&1 || { tail -n 30 $(VENV)/install.log; exit 1; }
	@$(COMPILE)
	@touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	@echo "adding the test extras to .venv (pip's output: $(VENV)/install.log)"
	@$(PIP) install -q --no-compile -c constraints.txt -e '.[test]' >>$(VENV)/install.log 2>&1 || { tail -n 30 $(VENV)/install.log; exit 1; }
	@$(COMPILE)
	@touch $(STAMP)

# Browser for the end-to-end page test: Debian's chromium (Playwright drives it; nothing downloads a browser).
# The stamp is written only once chromium is there: a failed install fails `make test` loudly (tried twice)
# instead of skipping the browser test for good. SKINRAY_NO_BROWSER=1 skips the install and the test, said aloud.
CHROMIUM_STAMP := $(VENV)/.chromium
$(CHROMIUM_STAMP):
	@if [ "$${SKINRAY_NO_BROWSER:-0}" = 1 ]; then echo "SKINRAY_NO_BROWSER=1: the browser test will be skipped"; exit 0; fi; \
	command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser test"; \
	  for try in 1 2; do \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 && break; \
	    sleep 5; done; }; \
	command -v chromium >/dev/null 2>&1 || { \
	  echo "error: could not install Debian's chromium (apt-get install chromium) for the browser test;" \
	       "install it, or run with SKINRAY_NO_BROWSER=1 to skip that test" >&2; exit 1; }; \
	touch $(CHROMIUM_STAMP)

install: $(STAMP)

demo: $(RUN_STAMP)
	@bash cluster/demo.sh $(DEMO_DIR)
	@echo "make demo: $$(( $$(date +%s) - $(START) )) s in all, setting up .venv included"

demo-stop:
	bash cluster/demo.sh --stop $(DEMO_DIR)

test: $(STAMP) $(CHROMIUM_STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not slow" --durations=15 tests

test-all: $(STAMP) $(CHROMIUM_STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

bench: $(STAMP)
	$(PY) benchmarks/data_throughput.py
	$(PY) benchmarks/gradcam_cost.py
	$(PY) benchmarks/explanations.py frontier --skip-quality
	$(PY) benchmarks/train_overhead.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/weight_search.py
	$(PY) benchmarks/serve_latency.py
	$(PY) benchmarks/load_faults.py
	$(PY) benchmarks/multinode.py
	$(PY) benchmarks/serve_multinode.py
	$(PY) benchmarks/head_stop.py
	@if command -v hey >/dev/null; then $(PY) benchmarks/admission.py; else echo "benchmarks/admission.py needs hey (apt-get install hey): skipped"; fi
	@if [ "$$(id -u)" = 0 ]; then $(PY) benchmarks/hosts.py; else echo "benchmarks/hosts.py needs root (network namespaces): skipped"; fi
	@if [ -f $(DEMO_DIR)/train/bundle-tuned/bundle.json ]; then \
	  d="--data $(DEMO_DIR)/data --synth $(DEMO_DIR)/synth"; \
	  $(PY) benchmarks/explanations.py frontier --bundle $(DEMO_DIR)/train/bundle-tuned-t --skip-cost $$d && \
	  $(PY) benchmarks/explanations.py faithfulness --bundle $(DEMO_DIR)/train/bundle-tuned --flips $$d && \
	  $(PY) benchmarks/explanations.py search --bundle $(DEMO_DIR)/train/bundle-tuned-t --smooth flips $$d && \
	  $(PY) benchmarks/explanations.py distractors --bundle $(DEMO_DIR)/train/bundle-tuned $$d && \
	  $(PY) benchmarks/explanations.py lesion-removed --bundle $(DEMO_DIR)/train/bundle-tuned $$d && \
	  $(PY) benchmarks/explanations.py border --bundle $(DEMO_DIR)/train/bundle-tuned-t $$d; \
	else echo "the explanation-quality benchmarks need the demo bundle: run make demo first"; fi

bench-gpu: $(STAMP)
	$(PY) benchmarks/gpu.py

ui: $(RUN_STAMP)
	SKINRAY_API_URL=$${SKINRAY_API_URL:-http://127.0.0.1:8000} $(VENV)/bin/streamlit run ui/app.py \
	  --server.address 127.0.0.1 --server.port $${SKINRAY_UI_PORT:-8501} --server.headless true \
	  --browser.gatherUsageStats false --client.toolbarMode viewer

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
