# Everything runs from a project-local virtual environment that this Makefile makes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# Every package at the version the tests last passed with (make lock writes it): a fresh
# clone installs what was tested, not whatever a registry published since. pyproject.toml
# keeps the ranges a user's own install resolves within.
CONSTRAINTS := constraints.txt

.PHONY: install install-dev native browser postgres demo test lint format bench clean lock

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PIP) install -c $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PIP) install -c $(CONSTRAINTS) -e '.[dev]'
	touch $@

# The newest versions pyproject.toml allows, resolved in a virtual environment of their own
# and written to constraints.txt; then `make test` installs and tests exactly those.
lock:
	rm -rf $(VENV)-lock && $(PYTHON) -m venv $(VENV)-lock
	$(VENV)-lock/bin/python -m pip --disable-pip-version-check -q install -e '.[dev]'
	{ echo "# make lock: what make install/install-dev install (pip -c), resolved $$(date -u +%F)"; \
	  echo "# from pyproject.toml's ranges with $$($(VENV)-lock/bin/python -V)."; \
	  $(VENV)-lock/bin/python -m pip freeze --exclude prefect-kluster; } > $(CONSTRAINTS).tmp
	mv $(CONSTRAINTS).tmp $(CONSTRAINTS)
	rm -rf $(VENV)-lock

# Debian packages, as root or through sudo (the package list follows it).
APT_INSTALL = if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq

install: $(VENV)/.installed native

install-dev: $(VENV)/.installed-dev native browser

# The compiled request check (native/, Rust): built offline from the crates Debian packages
# (these machines reach no crate registry), into tasks/ beside the Python check it speeds up.
# `make NATIVE=0 ...` skips it (and turns it off for the tests); everything then runs on the
# Python code.
NATIVE ?= 1
NATIVE_CRATES := librust-pyo3-dev librust-serde-json-dev librust-memchr-dev librust-simdutf8-dev
NATIVE_SOURCES := native/Cargo.toml native/.cargo/config.toml native/serde_json-swar.patch \
	$(wildcard native/src/*.rs)

native: $(VENV)/.native-$(NATIVE)

$(VENV)/.native-0: | $(PY)
	rm -f tasks/_native.*.so $(VENV)/.native-1
	touch $@

# The module is copied in as a new file and moved into place: a running process keeps the
# one it loaded.
$(VENV)/.native-1: $(NATIVE_SOURCES) | $(PY)
	@cd /usr/share/cargo/registry 2>/dev/null && ls -d pyo3-0.17* serde_json-1* memchr-2* simdutf8-0* >/dev/null 2>&1 || { \
	  echo "installing Debian's Rust crates for the compiled check"; \
	  $(APT_INSTALL) $(NATIVE_CRATES) >/dev/null; }
	@command -v cargo >/dev/null 2>&1 || [ -x "$$HOME/.cargo/bin/cargo" ] || { \
	  echo "installing Debian's cargo for the compiled check"; \
	  $(APT_INSTALL) cargo >/dev/null; }
	@# serde_json as Debian packages it, with its string scan taking 8 bytes a step (as
	@# serde_json 1.0.118+ does; 20-30% more MB/s per core for both passes). Should the
	@# patch not apply, it is built as packaged: slower, the same answers.
	@src=$$(ls -d /usr/share/cargo/registry/serde_json-1* | sort -V | tail -1); \
	  rm -rf native/target/serde_json && mkdir -p native/target && cp -r "$$src" native/target/serde_json; \
	  (cd native/target/serde_json && patch -p1 -s -N -r - < ../../serde_json-swar.patch) || { \
	    echo "note: native/serde_json-swar.patch does not apply to $$src: built as packaged"; \
	    rm -rf native/target/serde_json && cp -r "$$src" native/target/serde_json; }
	cd native && PATH="$$PATH:$$HOME/.cargo/bin" PYO3_PYTHON="$(abspath $(PY))" cargo build --release --quiet
	so="tasks/_native$$($(PY) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"; \
	  cp native/target/release/lib_native.so "$$so.tmp" && mv -f "$$so.tmp" "$$so"
	rm -f $(VENV)/.native-0
	touch $@

# Debian's chromium for the UI test (Playwright cannot download browsers here).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser test"; \
	  $(APT_INSTALL) chromium >/dev/null; }

# Debian's PostgreSQL for the production-shape tests (the tests start their own server as an
# unprivileged user on a free port; nothing runs as a system service). `make demo` uses SQLite.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  echo "installing Debian's postgresql for the production-shape tests"; \
	  $(APT_INSTALL) postgresql >/dev/null; }

demo: install
	$(PY) -m flows.batch_inference deployments/sample-requests.jsonl --emulator \
	  --output out/demo-results.jsonl --overwrite

# Prefect's database schema, migrated once per virtual environment (again when it is
# reinstalled): the tests' Prefect servers start on copies instead of each migrating a new
# SQLite file (about 14 s of a 24 s start here).
PREFECT_TEMPLATE := $(VENV)/prefect-migrated-template.db

$(PREFECT_TEMPLATE): $(VENV)/.installed-dev
	$(PY) -m tests.server template

# Two pytest processes, each taking whole modules (module-scoped servers start once), the
# slowest modules first (tests/conftest.py). `make test PYTEST_ARGS=` runs them in one process.
PYTEST_ARGS ?= -n 2 --dist loadfile --no-loadscope-reorder

test: install-dev postgres $(PREFECT_TEMPLATE)
	PREFECT_KLUSTER_NATIVE=$(NATIVE) $(PY) -m pytest $(PYTEST_ARGS)

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@if (cd native && PATH="$$PATH:$$HOME/.cargo/bin" cargo fmt --version) >/dev/null 2>&1; then \
	  cd native && PATH="$$PATH:$$HOME/.cargo/bin" cargo fmt --check; \
	else echo "rustfmt not installed: native/ not checked"; fi

format: install-dev
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install-dev
	$(PY) benchmarks/bench.py

clean:
	rm -rf $(VENV) out .pytest_cache native/target tasks/_native.*.so
