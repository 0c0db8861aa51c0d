#!/usr/bin/env python3
"""Reference VADER compound scores for the Rust port's parity test
(lib/tests/score_scorers.rs): PyPI vaderSentiment 3.3.2's polarity_scores with its
rounding to 4 decimals switched off, so that the comparison can be tight.

Usage: vader_reference.py TEXTS.json OUT.json   (OUT: a JSON list of compounds)
With --lexicon-dir: prints the folder of the installed package's lexicons.
"""
import json
import os
import sys

import vaderSentiment.vaderSentiment as vs


def main():
    if sys.argv[1:] == ["--lexicon-dir"]:
        print(os.path.dirname(vs.__file__))
        return
    # score_valence rounds with the builtin `round`; a module global shadows it.
    vs.round = lambda x, n=None: x
    analyzer = vs.SentimentIntensityAnalyzer()
    with open(sys.argv[1], encoding="utf-8") as f:
        texts = json.load(f)
    out = [analyzer.polarity_scores(t)["compound"] for t in texts]
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
