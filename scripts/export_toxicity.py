#!/usr/bin/env python3
"""Export alt-profanity-check's scikit-learn toxicity model to a plain JSON file.

The toxicity reward of quark-rs is the linear TF-IDF classifier that the PyPI package
`alt-profanity-check` ships as two joblib pickles. Reading them needs Python with the
scikit-learn version that wrote them, so this script runs once at set-up and writes
everything the Rust scorer (lib/src/score/toxicity.rs) needs:

- the vectorizer's settings (checked here: only what the Rust side implements passes),
  its vocabulary (by feature index), idf and stop words;
- per calibration fold: the LinearSVC coefficients and intercept and the sigmoid
  calibration a, b (p = 1 / (1 + exp(a * f + b)), averaged over folds);
- the Unicode tables of THIS Python that the tokenizer depends on, so that Rust
  tokenizes exactly as Python's `re` and `str.lower` do (Python's `\\w` is
  `str.isalnum() or '_'`, which differs from the regex crate's `\\w` on combining marks,
  other numbers, connector punctuation and joiners; the Unicode versions differ too):
  the code points `\\w` matches, every `str.lower` mapping that is not the identity,
  and the Cased / Case_Ignorable classes that decide the final sigma.

Usage: export_toxicity.py OUT.json   (written atomically; floats as repr, which
round-trips exactly).
"""
import hashlib
import importlib.metadata
import json
import os
import re
import sys
import tempfile
import unicodedata

import joblib
import numpy as np
import profanity_check
import sklearn
from sklearn.calibration import CalibratedClassifierCV
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.svm import LinearSVC

FORMAT = "quark-toxicity-linear/1"


def ranges(pred):
    """Inclusive [lo, hi] code point ranges where pred(cp) holds (surrogates skipped)."""
    out = []
    start = None
    for cp in range(0x110000):
        ok = not (0xD800 <= cp <= 0xDFFF) and pred(cp)
        if ok and start is None:
            start = cp
        elif not ok and start is not None:
            out.append([start, cp - 1])
            start = None
    if start is not None:
        out.append([start, 0x10FFFF])
    return out


def unicode_tables(token_pattern):
    word = re.compile(r"(?u)\w")
    word_chars = ranges(lambda cp: word.fullmatch(chr(cp)) is not None)
    lower = []
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF or cp == 0x3A3:
            continue
        c = chr(cp)
        low = c.lower()
        if low != c:
            lower.append([cp, low])

    # Python lowercases U+03A3 to final sigma when it is preceded by a cased letter
    # (skipping case-ignorable ones) and not followed by one. The two classes are not
    # exposed, but str.lower reveals them (see toxicity.rs):
    #   ("A" + c + "Σ")[-1] is final  <=>  ignorable(c) or cased(c)
    #   (c + "Σ")[-1] is final        <=>  not ignorable(c) and cased(c)
    def final(s):
        return s.lower()[-1] == "\u03c2"

    ignorable = ranges(lambda cp: final("A" + chr(cp) + "\u03a3") and not final(chr(cp) + "\u03a3"))
    cased = ranges(lambda cp: final(chr(cp) + "\u03a3"))
    # The tokenizer treats the pattern as "maximal runs of two or more \w": check it.
    assert token_pattern == r"(?u)\b\w\w+\b", token_pattern
    return {
        "word_chars": word_chars,
        "lower": lower,
        "sigma_case_ignorable": ignorable,
        "sigma_cased": cased,
    }


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def floats(a):
    return [float(x) for x in np.asarray(a, dtype=np.float64).ravel()]


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: export_toxicity.py OUT.json")
    out = sys.argv[1]
    data = os.path.join(os.path.dirname(profanity_check.__file__), "data")
    vec_path = os.path.join(data, "vectorizer.joblib")
    model_path = os.path.join(data, "model.joblib")
    vec = joblib.load(vec_path)
    model = joblib.load(model_path)
    if not isinstance(vec, TfidfVectorizer) or not isinstance(model, CalibratedClassifierCV):
        sys.exit(f"{data}: unexpected model types {type(vec)}, {type(model)}")

    p = vec.get_params()
    # What the Rust scorer implements; anything else must fail here, not score wrongly.
    expected = {
        "analyzer": "word",
        "binary": False,
        "lowercase": True,
        "ngram_range": (1, 1),
        "norm": "l2",
        "preprocessor": None,
        "strip_accents": None,
        "tokenizer": None,
        "use_idf": True,
        "sublinear_tf": False,
    }
    for k, v in expected.items():
        if p[k] != v:
            sys.exit(f"{vec_path}: vectorizer {k}={p[k]!r}, the Rust scorer implements {v!r}")
    if model.method != "sigmoid" or list(model.classes_) != [0, 1]:
        sys.exit(f"{model_path}: expected sigmoid calibration of classes [0, 1]")

    vocab = [None] * len(vec.vocabulary_)
    for word, i in vec.vocabulary_.items():
        vocab[i] = word
    assert all(w is not None for w in vocab)
    stop = sorted(vec.get_stop_words() or [])

    folds = []
    for cc in model.calibrated_classifiers_:
        est = cc.estimator
        if not isinstance(est, LinearSVC) or est.coef_.shape != (1, len(vocab)):
            sys.exit(f"{model_path}: fold estimator is {type(est)} {getattr(est, 'coef_', None)}")
        (cal,) = cc.calibrators
        folds.append(
            {
                "coef": floats(est.coef_),
                "intercept": float(est.intercept_[0]),
                "a": float(cal.a_),
                "b": float(cal.b_),
            }
        )

    doc = {
        "format": FORMAT,
        "source": {
            "package": "alt-profanity-check",
            "package_version": importlib.metadata.version("alt-profanity-check"),
            "sklearn": sklearn.__version__,
            "python": sys.version.split()[0],
            "unicode": unicodedata.unidata_version,
            "vectorizer_sha256": sha256(vec_path),
            "model_sha256": sha256(model_path),
        },
        "lowercase": True,
        "token_pattern": p["token_pattern"],
        "norm": p["norm"],
        "sublinear_tf": p["sublinear_tf"],
        "stop_words": stop,
        "vocabulary": vocab,
        "idf": floats(vec.idf_),
        "folds": folds,
        "unicode": unicode_tables(p["token_pattern"]),
    }
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, separators=(",", ":"))
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    print(out)


if __name__ == "__main__":
    main()
