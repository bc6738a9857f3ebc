import os
import sys

# Tests run from the repository root against the source tree.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def hf_default_model():
    """transformers' own PyTorch model from the default GGUF file (fp32), loaded once per session."""
    import torch
    from transformers import AutoModelForCausalLM

    from prunenet_jax.formats import gguf as gguf_format

    folder, name = os.path.split(gguf_format.default_model_path())
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
