"""resumable.py, the loop shared by policy training and recovery: Ctrl-C stops after the running
unit with a checkpoint and says how to continue; a recovery stopped so and resumed ends with the
uninterrupted run's weights, bit for bit."""
import os
import signal

import numpy as np
import pytest

from prunenet_jax import prune, sources
from prunenet_jax.errors import Interrupted
from prunenet_jax.recovery import fine_tune
from prunenet_jax.recovery.config import RecoverConfig
from prunenet_jax.recovery.recover import RecoverSpec, recover_weights
from prunenet_jax.resumable import Resumable
from tests import tiny_models


def _count_to(loop: Resumable, total: int, ctrl_c_at=None) -> int:
    done = 0
    if loop.resuming:
        _, _, done = loop.restore(None, lambda n: {"x": np.zeros((n,), np.int32)})
    loop.start(done)
    for i in range(done, total):
        if i + 1 == ctrl_c_at:
            os.kill(os.getpid(), signal.SIGINT)  # arrives while unit i runs
        loop.advance()
        loop.finished(i + 1, lambda: ({"w": np.float32(i)}, {"x": np.arange(i + 1, dtype=np.int32)}))
    return done


def test_ctrl_c_stops_after_the_unit_saves_and_says_how_to_resume(tmp_path):
    state = str(tmp_path / "state")
    with pytest.raises(Interrupted, match=r"after step 3 of 10; the training state is saved in "
                                          r".*--resume to continue"):
        with Resumable(state, {"run": 1}, resume=False, total=10, every=0, unit="step",
                       desc="t") as loop:
            _count_to(loop, 10, ctrl_c_at=3)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the guard is gone
    with Resumable(state, {"run": 1}, resume=True, total=10, every=0, unit="step", desc="t") as loop:
        assert loop.resuming and _count_to(loop, 10) == 3
    with Resumable(None, {}, resume=False, total=4, every=1, unit="episode", desc="t") as loop:
        with pytest.raises(Interrupted, match=r"^interrupted \(Ctrl-C\) after episode 2 of 4$"):
            _count_to(loop, 4, ctrl_c_at=2)  # nothing saved: nothing to resume


def test_recovery_stopped_by_ctrl_c_resumes_bit_for_bit(tmp_path, monkeypatch):
    dense_dir = tiny_models.save_hf_model(tiny_models.make_hf_model("llama_gqa_untied"), tmp_path / "d")
    dense = sources.load_model(dense_dir)
    pruned = prune.slice_weights(dense, np.stack([np.arange(0, 48, 2)] * 3))
    spec = RecoverSpec(RecoverConfig(steps=6, seq_len=16, lora_rank=4, pool_rows=8), checkpoint_every=4)
    whole, whole_info = recover_weights(pruned, dense, spec, tokenizer=None,
                                        state_dir=str(tmp_path / "whole"))

    step, calls = fine_tune.Recovery.step, []

    def step_then_ctrl_c(self, *args):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return step(self, *args)

    monkeypatch.setattr(fine_tune.Recovery, "step", step_then_ctrl_c)
    with pytest.raises(Interrupted, match="after step 3 of 6.*--resume"):
        recover_weights(pruned, dense, spec, tokenizer=None, state_dir=str(tmp_path / "split"))
    monkeypatch.setattr(fine_tune.Recovery, "step", step)
    resumed, info = recover_weights(pruned, dense, RecoverSpec(spec.config, checkpoint_every=4, resume=True),
                                    tokenizer=None, state_dir=str(tmp_path / "split"))
    assert info["recovery"]["resumed_after"] == 3
    assert info["recovery"]["losses"] == whole_info["recovery"]["losses"]  # the history too
    for (name, a), (_, b) in zip(whole.named_arrays(), resumed.named_arrays()):
        assert np.array_equal(a, b), name
