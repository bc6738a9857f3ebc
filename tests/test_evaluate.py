"""Perplexity: windowing, text inputs, the launcher's errors, and the real model against transformers."""
import gzip
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from prunenet_jax.formats import texts
from prunenet_jax.errors import UserError
from tests.machine import machine_skip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUTORIAL = "/usr/share/doc/python3.11/html/_sources/tutorial/*.rst.txt"


def test_windows_do_not_overlap_and_pad_the_last():
    tokens, mask = texts.windows(np.arange(1, 12), 4)
    assert tokens.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 0]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]]
    tokens, mask = texts.windows(np.arange(1, 10), 4)  # a 1-token tail scores nothing: dropped
    assert len(tokens) == 2


def test_texts_glob_concatenates_sorted_and_reads_gz(tmp_path):
    (tmp_path / "b.txt").write_text("second ")
    (tmp_path / "a.txt").write_text("first ")
    with gzip.open(tmp_path / "c.txt.gz", "wt") as f:
        f.write("zipped")
    got = texts.read_texts(f"{tmp_path}/*.txt,{tmp_path}/c.txt.gz")
    assert list(got.values()) == ["first second ", "zipped"]


@pytest.mark.parametrize("content", [None, "", "  \n"])
def test_missing_or_empty_text(tmp_path, content):
    path = tmp_path / "t.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match="t.txt"):
        texts.read_texts(str(path))


def _launch(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "launch.evaluate", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args,fragment", [
    (["--model=/no/such/model", "--eval_text={text}"], "/no/such/model"),
    (["--model=default", "--eval_text=/no/such.txt"], "/no/such.txt"),
    (["--model=default", "--eval_text={empty}"], "empty.txt"),
    (["--model=default", "--eval_text={text}", "--seq_len=abc"], "seq_len"),
    (["--model=default", "--eval_text={text}", "--dtype=int8"], "int8"),
    (["--model=default"], "--eval_text"),
])
def test_launcher_user_errors(tmp_path, args, fragment):
    (tmp_path / "text.txt").write_text("Some words to score.")
    (tmp_path / "empty.txt").write_text("")
    args = [a.format(text=tmp_path / "text.txt", empty=tmp_path / "empty.txt") for a in args]
    proc = _launch(*args, timeout=300)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and fragment in last, proc.stderr
    assert "Traceback" not in proc.stderr


def test_default_model_perplexity_matches_transformers(hf_default_model):
    """launch.evaluate on the tutorial text (4,096 tokens, windows of 512) within 0.5% of torch."""
    if not any(True for _ in __import__("glob").iglob(TUTORIAL)):
        machine_skip("Python tutorial text missing: apt-get install -y python3.11-doc")
    proc = _launch("--model=default", f"--eval_text={TUTORIAL}", "--max_tokens=4096",
                   "--seq_len=512", "--batch_size=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = json.loads(proc.stdout.strip().splitlines()[-1])

    import torch
    from prunenet_jax.formats import gguf as gguf_format
    from prunenet_jax.formats import gguf_tokenizer

    tokenizer = gguf_tokenizer.load_gguf_tokenizer(gguf_format.default_model_path())
    ids = texts.tokenize(tokenizer, "".join(texts.read_texts(TUTORIAL).values()), 4096)
    tokens, mask = texts.windows(ids, 512)
    nll, count = 0.0, 0
    with torch.no_grad():
        for t, m in zip(tokens, mask):
            n = int(m.sum())
            logits = hf_default_model(torch.tensor(t[None, :n], dtype=torch.long)).logits[0, :-1]
            logp = torch.log_softmax(logits.double(), -1)
            nll -= logp[torch.arange(n - 1), torch.tensor(t[1:n], dtype=torch.long)].sum().item()
            count += n - 1
    want = math.exp(nll / count)
    assert ours["tokens"] == count
    assert abs(ours["ppl"] / want - 1) < 0.005, (ours["ppl"], want)
    assert 5 < want < 50  # the model really is a language model on this text
