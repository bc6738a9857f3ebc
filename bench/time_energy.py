"""Time of energy's default calibration (self-generation of 16 x 128 tokens + statistics) on the
default model against 20 PruneNet episodes, in one process: `python bench/time_energy.py`."""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prunenet_jax import sources
from prunenet_jax.method import calibration, episode, scores, trainer
from prunenet_jax.models import registry
w = sources.load_model("default")
out = {}
for seed in (0, 1):
    s = scores.measure(w, calibration.Calibration(seed=seed), lambda: None)
    out[f"energy_seed{seed}"] = s.meta["seconds"]
    print(out, flush=True)
t = time.time()
trainer.train(w.layers[registry.scored(w.config)], episode.TrainConfig(ratio=0.3), seed=42, num_episodes=20)
out["train_20_episodes_s"] = time.time() - t
print(json.dumps(out))
