"""llama.cpp's own tokenizer on GGUF files exported from sentencepiece-style HF tokenizers
(issue 24; bench, not CI: llama-cpp-python lives in its own venv, see bench/llama_cpp_gguf.py).

  # 1. in the project's venv: a tiny pruned LLaMA per tokenizer form (Metaspace, LLaMA-2's legacy
  #    normalizer, Gemma's no-prefix normalizer), each exported to GGUF, and the HF tokenizer's ids
  .venv/bin/python bench/llama_cpp_tokenizer.py ours --dir=/tmp/spm_tok
  # 2. in a venv with llama-cpp-python: llama.cpp tokenizes the same text from each file
  python bench/llama_cpp_tokenizer.py llama --dir=/tmp/spm_tok

The text is the whole tutorial (about 200,000 characters: unicode, digits, code, runs of spaces),
plus a line of mixed scripts and an emoji, tokenized without special tokens.
"""
import argparse
import glob
import json
import os
import sys

TUTORIAL = "/usr/share/doc/python3.11/html/_sources/tutorial/*.rst.txt"
EXTRA = "Hello wörld! 12345 naïve café — π ≈ 3.14159, 日本語 🙂 tabs\tand   spaces\n\n  x\n"


def _text():
    return EXTRA + "".join(open(f, encoding="utf-8").read() for f in sorted(glob.glob(TUTORIAL)))


def ours(args):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from prunenet_jax.formats import gguf_export
    from tests import tiny_models
    from tests.test_gguf_export import SPM_VARIANTS, add_sentencepiece_tokenizer, pruned_of

    text, result = _text(), {}
    for variant in SPM_VARIANTS:
        root = os.path.join(args.dir, variant)
        hf = tiny_models.make_hf_model("llama_tied", vocab_size=640, bos_token_id=1, eos_token_id=2)
        folder = tiny_models.save_hf_model(hf, os.path.join(root, "hf"))
        want = add_sentencepiece_tokenizer(folder, variant)
        path = gguf_export.export_gguf(pruned_of(folder), os.path.join(root, "gguf"), gguf_type="f32")
        result[variant] = {"file": path, "ids": want(text, add_special_tokens=False)["input_ids"]}
        print(variant, path, len(result[variant]["ids"]), "tokens", flush=True)
    with open(os.path.join(args.dir, "ids.json"), "w") as f:
        json.dump(result, f)


def llama(args):
    from llama_cpp import Llama

    text = _text().encode("utf-8")
    with open(os.path.join(args.dir, "ids.json")) as f:
        result = json.load(f)
    for variant, entry in result.items():
        model = Llama(model_path=entry["file"], vocab_only=True, verbose=False)
        got, want = model.tokenize(text, add_bos=False, special=False), entry["ids"]
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b),
                     None if len(got) == len(want) else min(len(got), len(want)))
        print(f"{variant}: llama.cpp {len(got)} tokens, HF {len(want)}, "
              + ("identical" if first is None else
                 f"first difference at {first}: llama.cpp {got[first:first + 5]} HF {want[first:first + 5]}"),
              flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("half", choices=["ours", "llama"])
    parser.add_argument("--dir", required=True)
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    {"ours": ours, "llama": llama}[args.half](args)


if __name__ == "__main__":
    main()
