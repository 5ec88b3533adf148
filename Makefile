# The two commands of the README. Each creates .venv/ from requirements.lock when it is
# missing (or older than the lock file), then runs.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-from-lock

.PHONY: demo test install

demo: $(STAMP)
	$(VENV)/bin/python -m workbench demo

# WORKBENCH_QUICK=1 shrinks token counts and notebook sizes so the suite fits ~15 min on 2 cores.
test: $(STAMP)
	WORKBENCH_QUICK=1 $(VENV)/bin/python -m pytest tests

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "workbench needs Python >= 3.10; run make PYTHON=python3.11 ..."'
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)
