# Two commands on a fresh machine with Python 3.11 and pip:
#   make demo   - creates .venv, installs sid_jax, runs the embedded default job
#   make test   - creates .venv, installs the test requirements, runs the test suite
PYTHON ?= python3
VENV ?= .venv
WORKDIR ?= runs/digits_sid
DEMO_CONFIG ?= configs/digits_sid.py
# Test processes (pytest-xdist); each gets whole test files, so module fixtures are built once.
TEST_WORKERS ?= 2

.PHONY: demo test venv venv-test bench clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(VENV)/bin/pip install --quiet -r requirements-test.txt
	touch $@

venv: $(VENV)/.installed
venv-test: $(VENV)/.installed-test

demo: venv
	$(VENV)/bin/python -m sid_jax.main --config=$(DEMO_CONFIG) --workdir=$(WORKDIR)

test: venv-test
	$(VENV)/bin/python -m pytest tests -q -n $(TEST_WORKERS) --dist loadfile

bench: venv
	$(VENV)/bin/python -m sid_jax.bench --config=$(DEMO_CONFIG) --steps 5

clean:
	rm -rf $(VENV) runs
