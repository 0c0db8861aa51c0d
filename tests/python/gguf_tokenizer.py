"""Reference token ids for a GGUF import's tokenizer (used by lib/tests/gguf.rs).

usage: gguf_tokenizer.py GGUF_FILE CONVERTED_DIR TEXTS_JSON
Prints one JSON object with, for each text:
  gguf_raw: ids from transformers' own GGUF tokenizer conversion, as it is;
  gguf_ref: the same vocabulary, merges and special tokens, with the pre-tokenizer
            the file's `tokenizer.ggml.pre` = smollm stands for (SmolLM2's
            tokenizer.json: Digits(individual_digits) then ByteLevel), which
            transformers' conversion leaves out;
  dir:      ids from transformers loading the converted folder.
"""

import json
import os
import sys

from tokenizers import pre_tokenizers
from transformers import AutoTokenizer


def main():
    gguf, converted, texts_path = sys.argv[1:4]
    with open(texts_path, encoding="utf-8") as f:
        texts = json.load(f)
    raw = AutoTokenizer.from_pretrained(
        os.path.dirname(os.path.abspath(gguf)), gguf_file=os.path.basename(gguf)
    )
    ref = AutoTokenizer.from_pretrained(
        os.path.dirname(os.path.abspath(gguf)), gguf_file=os.path.basename(gguf)
    )
    ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    ours = AutoTokenizer.from_pretrained(converted)
    enc = lambda t: [t(x, add_special_tokens=False).input_ids for x in texts]
    json.dump(
        {
            "gguf_raw": enc(raw),
            "gguf_ref": enc(ref),
            "dir": enc(ours),
            "raw_pre_tokenizer": str(raw.backend_tokenizer.pre_tokenizer),
        },
        sys.stdout,
    )
    print()


if __name__ == "__main__":
    main()
