#!/usr/bin/env bash
# What tests/server/test_openwebui.py needs, each step skipped when already there:
#   - Open WebUI, at the version the test is run with, in its own venv (a large install, CUDA torch
#     included): ${DFLASH_OWUI_VENV:-/tmp/owui/venv}; the test runs its bin/open-webui;
#   - the `playwright` Python package in the current Python environment (the one that runs pytest);
#   - Debian's chromium (Playwright's own browser downloads are not used).
# Then: DFLASH_OPENWEBUI=1 python -m pytest -m openwebui tests/server/test_openwebui.py
set -euo pipefail

OPEN_WEBUI_VERSION=0.12.4
PLAYWRIGHT_VERSION=1.65.2
venv=${DFLASH_OWUI_VENV:-/tmp/owui/venv}
python=${PYTHON:-python}

if [ "$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("open-webui"))' 2>/dev/null)" != "$OPEN_WEBUI_VERSION" ]; then
  echo "openwebui setup: open-webui==$OPEN_WEBUI_VERSION into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q "open-webui==$OPEN_WEBUI_VERSION"
fi

if ! "$python" -c 'import playwright.sync_api' 2>/dev/null; then
  echo "openwebui setup: playwright==$PLAYWRIGHT_VERSION into $("$python" -c 'import sys; print(sys.prefix)')"
  "$python" -m pip install -q "playwright==$PLAYWRIGHT_VERSION"
fi

if [ ! -x "${DFLASH_CHROMIUM:-/usr/bin/chromium}" ]; then
  echo "openwebui setup: chromium (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi
echo "openwebui setup: open-webui $OPEN_WEBUI_VERSION, playwright $("$python" -c 'import importlib.metadata as m; print(m.version("playwright"))'), $("${DFLASH_CHROMIUM:-/usr/bin/chromium}" --version 2>/dev/null)"
