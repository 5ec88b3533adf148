# The two commands of the README. Each creates .venv/ from requirements.lock when it is
# missing (or older than the lock file), then runs.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-from-lock

.PHONY: demo test install

demo: $(STAMP)
	$(VENV)/bin/python -m workbench demo

# WORKBENCH_QUICK=1 shrinks token counts and notebook sizes so the suite fits ~15 min on 2 cores.
# The browser test (tests/browser) drives JupyterLab in Debian's chromium: install it when missing
# and we are root; otherwise say so (that test then skips loudly, or fails under CI=true).
test: $(STAMP)
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium for the browser test (apt-get install chromium)"; \
	    ( export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq chromium ) \
	      || echo "*** apt-get install chromium failed: the browser test (tests/browser) will not run ***"; \
	  else \
	    echo "*** the browser test (tests/browser) needs chromium: run 'sudo apt-get install chromium' ***"; \
	  fi; \
	fi
	WORKBENCH_QUICK=1 $(VENV)/bin/python -m pytest tests

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "workbench needs Python >= 3.10; run make PYTHON=python3.11 ..."'
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)
