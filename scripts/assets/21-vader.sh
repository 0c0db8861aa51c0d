#!/usr/bin/env bash
# The sentiment reward's lexicons: copy vader_lexicon.txt and emoji_utf8_lexicon.txt
# of PyPI vaderSentiment 3.3.2 (installed into the venv by setup.sh, MIT licence) to
# data/rewards/vader/, which the Rust port reads. Skipped once they are there.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=${QUARK_VENV:-$PWD/.venv}
out=data/rewards/vader
if [ -s "$out/vader_lexicon.txt" ] && [ -s "$out/emoji_utf8_lexicon.txt" ] && [ "$out/vader_lexicon.txt" -nt "$0" ]; then
  exit 0
fi
echo "setup: copying the VADER lexicons to $out" >&2
src=$(cd / && "$venv/bin/python" -c 'import os, vaderSentiment.vaderSentiment as v; print(os.path.dirname(v.__file__))')
mkdir -p "$out"
for f in vader_lexicon.txt emoji_utf8_lexicon.txt; do
  cp "$src/$f" "$out/.tmp-$f"
  mv "$out/.tmp-$f" "$out/$f"
done
