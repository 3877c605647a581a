# Two commands a new user needs: `make demo` and `make test`.
# Each creates .venv (if missing) and installs the pinned stack from constraints.txt.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: venv demo test docs docs-figures readme clean

# (re)makes $(VENV) when it is missing, unusable, stale or from a moved checkout; quick otherwise
venv:
	@PYTHON="$(PYTHON)" VENV="$(VENV)" bash tools/ensure_venv.sh

demo: venv
	$(PY) -m transferkit demo --out demo-output

readme: venv
	$(PY) -m transferkit demo --out demo-output --update-readme README.md

# in as many processes as the machine has cores, at most 4 (pytest-xdist): 2 halve the time on 2 cores
test: venv
	$(PY) -m pytest -q -n auto --maxprocesses 4

docs: venv
	$(PY) -m mkdocs build --strict --site-dir site

# the figures of the docs site, from one real run (needs ../shared/data or TRANSFERKIT_DATA; about a minute)
docs-figures: venv
	$(PY) docs/make_figures.py
	$(PY) tools/execute_notebook.py

clean:
	rm -rf $(VENV) site demo-output .pytest_cache
