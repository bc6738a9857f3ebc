"""Zero-shot accuracy with lm-evaluation-harness (the paper's evaluation) on Hugging Face folders.

The paper reports acc_norm for PIQA, HellaSwag, ARC-e and ARC-c and acc for WinoGrande, and their
average. lm-eval is an optional dependency, imported on use. Everything that can fail cheaply
(installation, task names, whether the datasets can be loaded) is checked by `prepare`, before
any model is loaded; datasets that cannot be loaded make those tasks unavailable (with a reason)
instead of failing the whole evaluation.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import os
import urllib.error
import urllib.request
from typing import Any, Optional

from prunenet_jax.errors import UserError

log = logging.getLogger(__name__)

LM_EVAL_VERSION = "0.4.13"  # the version this module is tested with
PAPER_TASKS = ("piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge")
METRIC = {"winogrande": "acc"}  # the paper's metric where it is not acc_norm
DEFAULT_ENDPOINT = "https://huggingface.co"


def parse_tasks(spec: str) -> list[str]:
    """Comma list of lm-eval task names; `paper` stands for the paper's five. Order kept, no repeats."""
    names = []
    for t in (t.strip() for t in (spec or "").split(",")):
        for name in PAPER_TASKS if t == "paper" else [t] if t else []:
            if name not in names:
                names.append(name)
    return names


def check_installed() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError("--lm_eval_tasks needs lm-evaluation-harness, which is not installed; "
                        f"pip install lm-eval=={LM_EVAL_VERSION}")
    if importlib.util.find_spec("accelerate") is None:  # lm-eval's HF backend imports it
        raise UserError("--lm_eval_tasks runs lm-eval's Hugging Face backend, which needs "
                        "accelerate; pip install accelerate")


def is_hf_folder(path: Optional[str]) -> bool:
    """A folder transformers can load: config.json and safetensors weights."""
    return bool(path) and os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.isfile(os.path.join(path, f)) for f in ("model.safetensors", "model.safetensors.index.json"))


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def hub_reachable(timeout: float = 5.0) -> bool:
    """One quick request to the hub (through any configured proxy); any HTTP answer counts."""
    try:
        urllib.request.urlopen(urllib.request.Request(hub_endpoint(), method="HEAD"), timeout=timeout)
        return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):  # URLError, timeouts, refused connections, bad HF_ENDPOINT
        return False


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@dataclasses.dataclass
class Tasks:
    names: list[str]
    manager: Any  # lm_eval.tasks.TaskManager
    unavailable: dict[str, str]  # task -> why its dataset cannot be loaded (with the error)
    cause: Optional[str] = None  # why, in words, when any task is unavailable

    def message(self) -> Optional[str]:
        """One line naming the tasks whose datasets cannot be loaded, and why."""
        if not self.unavailable:
            return None
        return (f"lm-eval: cannot load the datasets of {', '.join(self.unavailable)}: {self.cause}; "
                "their zero-shot accuracy is reported as unavailable (perplexity and spectra are not "
                "affected)")


def prepare(spec: str, include_path: Optional[str] = None) -> Optional[Tasks]:
    """Checks lm-eval, the task names and the datasets; None when `spec` names no task.

    When the hub cannot be reached, offline mode is switched on so that `datasets` uses its local
    cache at once instead of retrying every request for half a minute. `include_path`: a folder
    of extra task YAML files (lm-eval's --include_path).
    """
    names = parse_tasks(spec)
    if not names:
        return None
    check_installed()
    user_offline = _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE")
    reachable = not user_offline and hub_reachable()
    if not reachable:
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
        _set_offline_constants()
    manager = _task_manager(include_path)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise UserError(f"--lm_eval_tasks: unknown lm-eval task(s) {', '.join(unknown)}; use task "
                        f"names of `lm-eval ls tasks`, or `paper` for {','.join(PAPER_TASKS)}")
    if user_offline:
        offline = "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set and they are not in the local datasets cache"
    elif not reachable:
        offline = (f"the Hugging Face dataset hub ({hub_endpoint()}) is unreachable and they are not "
                   "in the local datasets cache")
    else:
        offline = None  # the hub answered: the error itself is the reason
    unavailable, cause = {}, offline
    for name in names:
        try:
            manager.load([name])  # downloads or finds the dataset, so evaluation reuses it
        except Exception as e:  # datasets raises many types: offline, missing, bad config
            error = f"{type(e).__name__}: {_first_line(e)}"
            unavailable[name] = f"{offline} ({error})" if offline else error
            cause = cause or error
    return Tasks(names, manager, unavailable, cause if unavailable else None)


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: Optional[str]):
    """lm-eval's task index (it reads thousands of YAML files: seconds, so built once)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def _set_offline_constants() -> None:
    """The offline switches are read at import; update them in modules already imported."""
    import sys

    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True
        sys.modules["datasets"].config.HF_DATASETS_OFFLINE = True


def task_metric(name: str, results: dict) -> tuple[str, float]:
    """The paper's metric of one task's lm-eval results: acc for WinoGrande, else acc_norm
    (acc when a task has no acc_norm)."""
    wanted = METRIC.get(name, "acc_norm")
    for metric in (wanted, "acc"):
        if f"{metric},none" in results:
            return metric, float(results[f"{metric},none"])
    raise KeyError(f"lm-eval reported no acc/acc_norm for {name}: {sorted(results)}")


def not_hf(source: str) -> dict:
    return {"available": False, "tasks": {}, "average": None,
            "reason": f"{source} is not a Hugging Face folder, which lm-eval needs: export it as "
                      "one (pruned models: `python -m launch.prune ... --export_hf`; any weights: "
                      "prunenet_jax.formats.hf_export.export_hf) and pass that folder"}


def evaluate(tasks: Tasks, hf_dir: str, limit: int = 0, batch_size: int = 1) -> dict:
    """{"available", "tasks": {name: {"metric", "value"[, "reason"]}}, "average", "reason"} for
    one HF folder. The average is over all requested tasks: None when any is unavailable."""
    per_task = {n: {"metric": None, "value": None, "reason": tasks.unavailable.get(n)}
                for n in tasks.names}
    reasons = [f"datasets of {', '.join(tasks.unavailable)} cannot be loaded: {tasks.cause}"
               ] if tasks.unavailable else []
    runnable = [n for n in tasks.names if n not in tasks.unavailable]
    if runnable:
        import torch
        from lm_eval import evaluator

        # lm-eval's HF backend assumes CUDA unless told otherwise.
        device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            out = evaluator.simple_evaluate(
                model="hf", model_args={"pretrained": hf_dir, "device": device}, tasks=runnable,
                task_manager=tasks.manager, limit=limit or None, batch_size=batch_size,
                log_samples=False)
            for name in runnable:
                metric, value = task_metric(name, out["results"][name])
                per_task[name] = {"metric": metric, "value": value}
        except Exception as e:  # a model lm-eval cannot run must not lose the rest of the report
            log.warning("lm-eval failed on %s: %s: %s", hf_dir, type(e).__name__, _first_line(e))
            reasons.append(f"lm-eval failed ({type(e).__name__}: {_first_line(e)})")
    values = [per_task[n]["value"] for n in tasks.names]
    return {"available": any(v is not None for v in values), "tasks": per_task,
            "average": sum(values) / len(values) if None not in values else None,
            "reason": "; ".join(reasons) or None}


def metrics(tasks: Tasks, results: list[dict]) -> dict[str, str]:
    """The metric reported for each task: as found in `results` (evaluate's), else the paper's."""
    found = {}
    for r in results:
        for name, t in ((r or {}).get("tasks") or {}).items():
            if t.get("metric"):
                found.setdefault(name, t["metric"])
    return {n: found.get(n, METRIC.get(n, "acc_norm")) for n in tasks.names}
