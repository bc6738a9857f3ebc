"""Peak memory of the GGUF export against the HF export on a large random model (issue 24:
"7B-sized exports must fit where the HF export fits").

A LLaMA-shaped model of random bfloat16 weights (default: TinyLlama-1.1B's shape with the
default model's 49,152-token vocabulary, so its GGUF tokenizer can be copied in) is built in
memory, then exported as an HF folder (bfloat16 safetensors) and as GGUF files of each type.
Before each export the process's peak RSS (VmHWM) is reset to its RSS (/proc/self/clear_refs),
so "peak above the model" is what the export itself added. The largest tensor's float32 size is
printed beside it: the writer casts one tensor at a time to float32 and encodes it.

    python bench/gguf_export_memory.py --out=/tmp/gguf_mem [--layers=22 --hidden=2048 ...]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_batch import reset_peak, status_mib  # noqa: E402  (VmRSS/VmHWM, clear_refs)


def random_model(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int):
    """A LLaMA model of random bfloat16 weights with the default model's vocabulary and its
    GGUF file as the tokenizer source."""
    import ml_dtypes

    from prunenet_jax import sources
    from prunenet_jax.models.config import ModelConfig
    from prunenet_jax.models import registry
    from prunenet_jax.weights import ModelWeights

    default = sources.load_config("default")
    hf_config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                 "vocab_size": default.vocab_size, "hidden_size": hidden,
                 "intermediate_size": intermediate, "num_hidden_layers": layers,
                 "num_attention_heads": heads, "num_key_value_heads": kv_heads,
                 "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                 "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "bfloat16"}
    config = ModelConfig.from_hf(hf_config, source="bench")
    rng = np.random.default_rng(0)
    arrays = {}
    for name, shape in registry.expected_shapes(config).items():
        arr = np.empty(shape, dtype=ml_dtypes.bfloat16)
        flat = arr.reshape(shape[0], -1) if len(shape) > 1 else arr.reshape(1, -1)
        for row in flat:  # filled a row at a time: no float32 copy of the whole tensor
            row[...] = rng.standard_normal(row.shape[0], dtype=np.float32) * 0.02
        arrays[name] = arr
    layer_names = set(registry.layer_tensor_names(config))
    _, gguf_file = sources.resolve_source("default")
    return ModelWeights(config=config, hf_config=hf_config,
                        globals={k: v for k, v in arrays.items() if k not in layer_names},
                        layers={k: v for k, v in arrays.items() if k in layer_names},
                        source="random-llama", gguf_file=gguf_file)


def measure(label: str, export, out_dir: str) -> dict:
    shutil.rmtree(out_dir, ignore_errors=True)
    rss = status_mib("VmRSS")
    reset_peak()
    start = time.perf_counter()
    path = export(out_dir)
    seconds = time.perf_counter() - start
    peak = status_mib("VmHWM")
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out_dir) for f in fs)
    row = {"export": label, "seconds": round(seconds, 1), "rss_before_mib": round(rss),
           "peak_mib": round(peak), "peak_above_model_mib": round(peak - rss),
           "written_mib": round(size / 2**20), "path": path}
    print(json.dumps(row), flush=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="scratch folder (deleted after each export)")
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv_heads", type=int, default=4)
    ap.add_argument("--types", default="f16,q8_0,f32")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()

    from prunenet_jax.formats import gguf_export, hf_export

    weights = random_model(args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads)
    model_mib = sum(a.nbytes for _, a in weights.named_arrays()) / 2**20
    largest = max(int(np.prod(a.shape)) for a in [*weights.globals.values(),
                                                  *(s[0] for s in weights.layers.values())])
    print(json.dumps({"params": weights.num_params(), "model_bf16_mib": round(model_mib),
                      "largest_tensor_f32_mib": round(largest * 4 / 2**20),
                      "rss_with_model_mib": round(status_mib("VmRSS"))}), flush=True)
    rows = [measure("hf bf16", lambda d: hf_export.export_hf(weights, d, dtype="bfloat16"),
                    os.path.join(args.out, "hf"))]
    for kind in args.types.split(","):
        rows.append(measure(f"gguf {kind}", lambda d, k=kind: gguf_export.export_gguf(
            weights, d, gguf_type=k), os.path.join(args.out, f"gguf_{kind}")))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model_bf16_mib": round(model_mib), "params": weights.num_params(),
                       "largest_tensor_f32_mib": round(largest * 4 / 2**20), "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
