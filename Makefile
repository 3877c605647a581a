# Two commands a new user needs: `make demo` and `make test`.
# Each creates .venv (if missing) and installs the pinned stack from constraints.txt.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.transferkit-installed

.PHONY: demo test docs docs-figures readme bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev,docs,onnx,tensorboard,plots,parquet,hf]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/transferkit demo --out demo-output

readme: $(STAMP)
	$(VENV)/bin/transferkit demo --out demo-output --update-readme README.md

test: $(STAMP)
	$(PY) -m pytest -q

docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir site

# the figures of the docs site, from one real run (needs ../shared/data or TRANSFERKIT_DATA; about a minute)
docs-figures: $(STAMP)
	$(PY) docs/make_figures.py
	$(PY) tools/execute_notebook.py

clean:
	rm -rf $(VENV) site demo-output .pytest_cache
