"""SIGKILL during an HF export (the real default model, ~540 MB of safetensors): afterwards the
export folder is absent or the previous complete one, never partial; the next run tidies up."""
import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _convert(out, *extra):
    return [sys.executable, "-m", "launch.convert", "--input=default", f"--output={out}",
            "--to=hf", *extra]


def _kill_when_staging(args, parent, name):
    """Starts `args`, SIGKILLs it once its temporary export folder has some safetensors bytes."""
    proc = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        staged = glob.glob(os.path.join(parent, f".{name}.tmp-*", "*.safetensors*"))
        staged += glob.glob(os.path.join(parent, f".{name}.tmp-*", ".*safetensors*"))
        if any(os.path.getsize(p) > 1 << 20 for p in staged if os.path.exists(p)):
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the export finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _loads(folder):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    return model


@pytest.mark.parametrize("existing", [False, True])
def test_sigkill_during_export_leaves_no_partial_folder(tmp_path, existing):
    out = tmp_path / "hf"
    if existing:
        proc = subprocess.run(_convert(out, "--dtype=bfloat16"), cwd=ROOT, env=ENV,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        before = sorted(os.listdir(out))
    _kill_when_staging(_convert(out, "--overwrite") if existing else _convert(out), tmp_path, "hf")
    if existing:  # the previous complete export, untouched
        assert sorted(os.listdir(out)) == before
        assert _loads(out).dtype.__str__() == "torch.bfloat16"
    else:
        assert not out.exists()
    assert glob.glob(str(tmp_path / ".hf.tmp-*"))  # the killed writer's leftovers, hidden

    proc = subprocess.run(_convert(out, "--overwrite"), cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _loads(out).config.intermediate_size == 1536
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # leftovers removed by the next write
