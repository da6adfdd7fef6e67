# srw: `make serve` installs everything and starts the nodes of CONFIG
# (default config.toml: `make serve CONFIG=/etc/srw/config.toml`);
# `make test` installs everything and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= config.toml
SYSTEM_DEPS := wget redis-server libseccomp2 fuse3 libfuse3-3 chromium chromium-driver wrk iproute2

.PHONY: serve test bench bench-sandbox loadtest system-deps clean cluster cluster-stop

$(STAMP): pyproject.toml
	@echo "make: installing srw and its Python dependencies (pyproject.toml, with [dev]) into $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Debian packages the tests and benches use: wget (the 2011 example),
# redis-server and its redis-cli (bench baseline; [cluster] engine = "redis-cluster"
# and its tests), libseccomp2 (sandbox), fuse3 and
# libfuse3-3 (`srw mount`: fusermount3 and the library mfusepy loads),
# chromium and chromium-driver (the status page test's headless browser),
# wrk (bench/http_bench.py's C load generator: the aiohttp client spends more
# CPU per request than the handlers it measures, so it caps their figures),
# iproute2 (ss: the mount's ranged-read test counts the bytes its TCP connections moved).
system-deps:
	@if command -v apt-get >/dev/null && { ! command -v wget >/dev/null || \
	    ! command -v redis-server >/dev/null || ! ldconfig -p | grep -q libseccomp.so.2 || \
	    ! command -v fusermount3 >/dev/null || ! ldconfig -p | grep -q libfuse3.so.3 || \
	    ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null || \
	    ! command -v wrk >/dev/null || ! command -v ss >/dev/null; }; then \
	    echo "make: installing Debian packages (apt-get): $(SYSTEM_DEPS)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	        $(SYSTEM_DEPS) >/dev/null; fi

serve: system-deps $(STAMP)
	$(VENV)/bin/srw serve --config $(CONFIG)

# Three pytest processes (pytest-xdist), a test module each at a time: most of
# the suite waits on node starts and sockets.  `$(PY) -m pytest -q` runs it serially.
test: system-deps $(STAMP)
	$(PY) -m pytest -q -n 3 --dist loadfile

bench: system-deps $(STAMP)
	$(PY) bench/exec_bench.py
	$(PY) bench/http_bench.py

# Load test: starts a node from CONFIG, runs locust headless, stops the node;
# reports in loadtest/reports/.  Exits non-zero if any request failed.
USERS      ?= 50
DURATION   ?= 60
TAGS       ?=
USER_CLASS ?= ZmqUser
KILL_EVERY ?= 0
loadtest: $(STAMP)
	$(PY) loadtest/run.py --config $(CONFIG) --users $(USERS) --duration $(DURATION) \
	    --user $(USER_CLASS) --kill-every $(KILL_EVERY) $(if $(TAGS),--tags $(TAGS))

# What the sandbox profiles cost (no sandbox, default, strict, fork baselines).
bench-sandbox: system-deps $(STAMP)
	$(PY) bench/sandbox_bench.py

# Six Redis nodes (3 masters, 3 replicas, 127.0.0.1:7000-7005) and six srw
# nodes beside them, plus the proxy (127.0.0.1:9100), in the background; data
# and logs under var/redis-cluster/.  README "Redis Cluster".
cluster: system-deps $(STAMP)
	SRW=$(VENV)/bin/srw examples/redis-cluster/cluster.sh start

cluster-stop:
	SRW=$(VENV)/bin/srw examples/redis-cluster/cluster.sh stop

clean:
	rm -rf $(VENV) var
