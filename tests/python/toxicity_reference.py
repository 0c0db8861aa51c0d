#!/usr/bin/env python3
"""Reference toxicity scores for the Rust parity test (lib/tests/score_toxicity.rs).

Reads a JSON list of texts, writes a JSON object {"proba": [...], "tokens": [[...]],
"seconds": s}: sklearn's predict_proba[:, 1] of alt-profanity-check's model (the
package's own joblib files, not the exported JSON), the vectorizer's analyzer tokens
(so that a mismatch can be told apart as a tokenizer or an arithmetic one) and the
wall time of transform + predict_proba alone (for the benchmark; with --time only
that time and the probabilities are written).

Usage: toxicity_reference.py TEXTS.json OUT.json [--time]
"""
import json
import os
import sys
import time

import joblib
import profanity_check


def main():
    texts_path, out_path = sys.argv[1], sys.argv[2]
    with open(texts_path, encoding="utf-8") as f:
        texts = json.load(f)
    data = os.path.join(os.path.dirname(profanity_check.__file__), "data")
    vec = joblib.load(os.path.join(data, "vectorizer.joblib"))
    model = joblib.load(os.path.join(data, "model.joblib"))
    start = time.perf_counter()
    proba = model.predict_proba(vec.transform(texts))[:, 1]
    seconds = time.perf_counter() - start
    out = {"proba": [float(p) for p in proba], "seconds": seconds}
    if "--time" not in sys.argv[3:]:
        analyze = vec.build_analyzer()
        out["tokens"] = [analyze(t) for t in texts]
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False)


if __name__ == "__main__":
    main()
