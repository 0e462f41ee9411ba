# vfiod developer entry points. `make deps` once (root, Debian/Ubuntu), then `make demo` / `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := dbus polkitd pkexec pci.ids pkg-config gcc libsystemd-dev libdbus-1-dev libglib2.0-dev \
	systemd util-linux procps python3-systemd \
	dpkg-dev debhelper lintian libglib2.0-bin man-db \
	qemu-system-x86 busybox-static kmod mmdebstrap e2fsprogs make gcc-12 xz-utils \
	golang-go golang-dbus-dev prometheus-node-exporter prometheus pciutils \
	flex bison libelf-dev bc libssl-dev

.PHONY: deps venv test lint typecheck unit test-e2e e2e-kernel demo check deb bench clean

deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "make deps: missing Debian packages; run as root:"; \
	    echo "  apt-get update && apt-get install -y --no-install-recommends $$missing"; exit 1; \
	  fi; \
	  echo "make deps: installing $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@$(MAKE) --no-print-directory venv

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

lint:
	$(VENV)/bin/ruff check vfiod vfiod_sim tests bench packaging/stage.py tools/demo_replies.py
	$(VENV)/bin/ruff format --check vfiod vfiod_sim tests bench packaging/stage.py tools/demo_replies.py

typecheck:
	$(VENV)/bin/mypy

unit:
	$(VENV)/bin/pytest -q

# The real-kernel suite boots Debian's kernel in QEMU (TCG); its downloads and builds are cached outside the
# clone, in ~/.cache/vfiod/e2e (keyed by version: every clone on the machine reuses them).
test-e2e:
	VFIOD_E2E=1 $(VENV)/bin/pytest -q tests/e2e

test: lint typecheck unit test-e2e

# The guest kernel with iommufd, VFIO cdevs and vfio variant drivers (no Debian kernel has them): built from
# Debian's linux-source-6.12 (about 25 minutes on 2 cores), cached by source version outside the clone.
# test-e2e builds it when VFIOD_E2E_KERNEL_TARBALL does not name one; this builds it ahead and says where.
e2e-kernel: venv
	$(PY) -m tests.e2e.kernel_build

check:
	$(VENV)/bin/vfiod check --simulate workstation-l4

demo: venv
	tools/demo.sh

DIST ?= bookworm
deb:
	bash packaging/build-deb.sh --dist $(DIST)

bench:
	$(PY) bench/bench_core.py
	$(PY) bench/bench_compare.py
	@if [ "$$(id -u)" = 0 ]; then $(PY) bench/bench_flood.py; else echo "bench_flood.py skipped: it needs root"; fi

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build _build dist *.egg-info
