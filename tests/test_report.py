"""The report (spectra, KS per layer, files and plots) and the lm-eval runner, on tiny models."""
import copy
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from prunenet_jax import prune, pruned_models
from prunenet_jax.files import json_files
from prunenet_jax import sources
from prunenet_jax.evaluation import lm_eval
from prunenet_jax.evaluation import measures, plots, report, tables
from prunenet_jax.method import spectral
from prunenet_jax.errors import UserError
from prunenet_jax.models import registry
from tests import tiny_models
from tests.machine import require_module

TOKENIZER_TEXT = ["The quick brown fox jumps over the lazy dog. Pruning keeps the spectrum. " * 20]


def save_tokenizer(folder) -> None:
    """A 97-token byte-level BPE tokenizer (the tiny models' vocabulary size), trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = sorted(set("".join(TOKENIZER_TEXT).replace(" ", "Ġ")))
    tok.train_from_iterator(TOKENIZER_TEXT, trainers.BpeTrainer(
        vocab_size=97, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=alphabet,
        show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(str(folder))


def save_sliced(model, indices: np.ndarray, folder) -> str:
    """`model` with layer l keeping FFN channels indices[l], as an HF folder (with tokenizer),
    sliced in PyTorch: an independent check of our own slicing and loading."""
    import transformers

    cfg = copy.deepcopy(model.config)
    cfg.intermediate_size = indices.shape[1]
    small = transformers.AutoModelForCausalLM.from_config(cfg)
    state = dict(model.state_dict())
    for l, idx in enumerate(indices):
        p, idx = f"model.layers.{l}.mlp.", list(map(int, idx))
        for name in ("gate_proj", "up_proj"):
            state[p + name + ".weight"] = state[p + name + ".weight"][idx]
        state[p + "down_proj.weight"] = state[p + "down_proj.weight"][:, idx]
    small.load_state_dict(state)
    tiny_models.save_hf_model(small, folder)
    save_tokenizer(folder)
    return str(folder)


def kept_indices(L: int, I: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(np.stack([rng.choice(I, k, replace=False) for _ in range(L)]), axis=1)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    folder = tiny_models.save_hf_model(tiny_models.make_hf_model("llama_tied"),
                                       tmp_path_factory.mktemp("dense") / "tiny")
    return sources.load_model(folder)


def test_identical_model_has_zero_ks_and_ratio(dense):
    spectra, ks = measures.compare(dense, [copy.deepcopy(dense)])
    L, I, H = dense.layers[registry.GATE].shape
    assert spectra[0].shape == (L, min(I, H))
    assert (np.diff(spectra[0], axis=1) <= 0).all()  # descending
    assert ks[0].tolist() == [0.0] * L and ks[1].tolist() == [0.0] * L
    assert pruned_models.weights_ratio(None, dense.config.intermediate_size, I, 'dense') == 0.0


def test_sliced_model_ks_equals_direct_computation(dense):
    L, I, _ = dense.layers[registry.GATE].shape
    keep = kept_indices(L, I, 20)
    sliced = prune.slice_weights(dense, keep)
    spectra, ks = measures.compare(dense, [sliced])
    W = dense.layers[registry.GATE]
    want = [float(spectral.ks_statistic(spectral.singular_values(jnp.asarray(W[l])),
                                        spectral.singular_values(jnp.asarray(W[l][keep[l]]))))
            for l in range(L)]
    np.testing.assert_allclose(ks[1], want, rtol=1e-6)
    assert (ks[1] > 0).all()
    assert spectra[1].shape == (L, 20)
    assert pruned_models.weights_ratio(None, sliced.config.intermediate_size, I, 'sliced') == pytest.approx(1 - 20 / 48)


def test_plotted_layers():
    assert measures.plotted_layers(30) == [0, 15, 29]
    assert measures.plotted_layers(2) == [0, 1]
    assert measures.plotted_layers(1) == [0]


def _summary(dense, with_ppl=True):
    L, I, _ = dense.layers[registry.GATE].shape
    keep = kept_indices(L, I, 36)
    pruned = prune.slice_weights(dense, keep)
    spectra, ks = measures.compare(dense, [pruned])
    layers = measures.plotted_layers(L)
    ppl = lambda v: {"ppl": v, "tokens": 100, "files": {"t.txt": {"ppl": v, "tokens": 100}}} if with_ppl else None
    models = [measures.model_record("dense", "dense-src", dense, 0.0, ks[0], ppl(12.5)),
              measures.model_record("r25", "pruned-src", pruned, pruned_models.weights_ratio(None, pruned.config.intermediate_size, I, 'pruned'), ks[1],
                                  ppl(float("inf")))]  # an overflowing ppl must not break anything
    summary = {"eval_text": "t.txt" if with_ppl else None, "tokens": 100, "max_tokens": 0,
               "seq_len": 16, "spectra_layers": layers, "lm_eval": None, "models": models}
    return summary, [s[layers] for s in spectra]


def _assert_png(path):
    assert os.path.getsize(path) > 1000
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200


def test_write_report_files_and_numbers(dense, tmp_path):
    summary, spectra = _summary(dense)
    out = tmp_path / "report"
    written = report.write_report(str(out), summary, spectra)
    assert sorted(os.listdir(out)) == sorted([report.JSON, report.MARKDOWN, report.SPECTRA_PNG,
                                              report.KS_PNG, report.PPL_PNG])
    for png in (report.SPECTRA_PNG, report.KS_PNG, report.PPL_PNG):
        _assert_png(out / png)
    data = json.loads((out / report.JSON).read_text())
    assert data == json_files.finite(written)
    d, p = data["models"]
    assert d["ks"] == [0.0] * 3 and d["mean_ks"] == 0.0 and d["ppl"] == 12.5 and d["ratio"] == 0.0
    assert p["kept"] == 36 and p["ratio"] == pytest.approx(0.25) and p["ppl"] is None  # inf -> null
    assert p["mean_ks"] == pytest.approx(np.mean(p["ks"])) and min(p["ks"]) > 0
    assert p["params"] == d["params"] - 3 * 3 * 12 * 32  # 12 channels of gate, up, down, 3 layers
    md = (out / report.MARKDOWN).read_text()
    assert "| dense | 0 | 48 |" in md and "| r25 | 0.25 | 36 |" in md  # run_dir.format_ratio
    for png in (report.SPECTRA_PNG, report.KS_PNG, report.PPL_PNG):
        assert f"]({png})" in md
    assert [n for n in os.listdir(tmp_path) if n != "report"] == []  # no temp folder left


def test_report_without_perplexity_has_no_ppl_plot(dense, tmp_path):
    summary, spectra = _summary(dense, with_ppl=False)
    report.write_report(str(tmp_path / "r"), summary, spectra)
    assert not (tmp_path / "r" / report.PPL_PNG).exists()
    assert "not measured" in (tmp_path / "r" / report.MARKDOWN).read_text()


def test_report_folder_is_replaced_whole_or_not_at_all(dense, tmp_path, monkeypatch):
    summary, spectra = _summary(dense)
    out = tmp_path / "report"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(UserError, match="--overwrite"):
        report.write_report(str(out), summary, spectra)
    monkeypatch.setattr(plots, "plot_ppl", lambda *a: 1 / 0)  # a crash halfway through
    with pytest.raises(ZeroDivisionError):
        report.write_report(str(out), summary, spectra, overwrite=True)
    assert os.listdir(out) == ["old.txt"] and sorted(os.listdir(tmp_path)) == ["report"]
    monkeypatch.undo()
    report.write_report(str(out), summary, spectra, overwrite=True)
    assert "old.txt" not in os.listdir(out) and sorted(os.listdir(tmp_path)) == ["report"]


def test_check_report_dir(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    gguf = tmp_path / "m.gguf"
    gguf.write_text("x")
    inputs = [str(model), str(gguf), "org/hub-id"]
    for bad, fragment in [(model / "report", "inside the input"), (model, "inside the input"),
                          (gguf, "inside the input"), (tmp_path, "holds the input")]:
        with pytest.raises(UserError, match=fragment):
            report.check_report_dir(str(bad), inputs, overwrite=True)
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    with pytest.raises(UserError, match="not empty; pass --overwrite"):
        report.check_report_dir(str(full), inputs, overwrite=False)
    report.check_report_dir(str(full), inputs, overwrite=True)
    report.check_report_dir(str(tmp_path / "new" / "deeper"), inputs, overwrite=False)
    assert not (tmp_path / "new").exists()  # checking creates nothing
    plain = tmp_path / "plain.txt"
    plain.write_text("")
    with pytest.raises(UserError, match="not a folder"):
        report.check_report_dir(str(plain), inputs, overwrite=True)


def test_table_formats_missing_values(dense):
    summary, _ = _summary(dense)
    summary["models"][0]["lm_eval"] = {"average": 0.6123}
    text = tables.format_table(summary["models"])
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["model", "ratio", "kept"]
    assert lines[1].split()[-1] == "61.23" and lines[2].split()[-3] == "inf"


# ----------------------------------------------------------------------------- lm-eval runner

def test_parse_tasks_and_paper_metrics():
    assert lm_eval.parse_tasks("") == []
    assert lm_eval.parse_tasks("paper") == list(lm_eval.PAPER_TASKS)
    assert lm_eval.parse_tasks(" piqa, paper ,boolq") == [*lm_eval.PAPER_TASKS, "boolq"]
    results = {"acc,none": 0.5, "acc_norm,none": 0.75}
    assert lm_eval.task_metric("piqa", results) == ("acc_norm", 0.75)
    assert lm_eval.task_metric("winogrande", results) == ("acc", 0.5)
    assert lm_eval.task_metric("arc_easy", {"acc,none": 0.25}) == ("acc", 0.25)


def test_not_installed_names_the_pip_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "lm_eval" else real(n, *a))
    with pytest.raises(UserError, match=f"pip install lm-eval=={lm_eval.LM_EVAL_VERSION}"):
        lm_eval.check_installed()
    assert lm_eval.prepare("") is None  # no task: nothing to check


def test_is_hf_folder(dense, tmp_path):
    assert lm_eval.is_hf_folder(dense.tokenizer_dir)
    (tmp_path / "config.json").write_text("{}")
    assert not lm_eval.is_hf_folder(str(tmp_path))  # no weights
    assert not lm_eval.is_hf_folder(None)


@pytest.fixture
def isolated_hub(tmp_path, monkeypatch):
    """An unreachable hub and an empty cache; the offline switches prepare() flips are undone."""
    import huggingface_hub

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_home" / "datasets"))
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", huggingface_hub.constants.HF_HUB_OFFLINE)
    datasets = require_module("datasets")
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_DATASETS_CACHE"):
        monkeypatch.setattr(datasets.config, name, getattr(datasets.config, name))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_home" / "datasets")
    return tmp_path


def test_offline_tasks_are_unavailable_with_one_clear_line(isolated_hub):
    require_module("lm_eval")
    tasks = lm_eval.prepare("paper")
    assert set(tasks.unavailable) == set(lm_eval.PAPER_TASKS)
    line = tasks.message()
    assert "\n" not in line
    assert line.startswith("lm-eval: cannot load the datasets of piqa, winogrande, hellaswag, "
                           "arc_easy, arc_challenge: the Hugging Face dataset hub (http://127.0.0.1:9) "
                           "is unreachable")
    result = lm_eval.evaluate(tasks, "/not/used")  # nothing to run: no model is loaded
    assert result["available"] is False and result["average"] is None
    assert "unreachable" in result["reason"]
    assert all(t["value"] is None for t in result["tasks"].values())
    with pytest.raises(UserError, match="no_such_task"):
        lm_eval.prepare("piqa,no_such_task")


def test_lm_eval_runs_a_local_task_on_an_hf_folder(isolated_hub, tmp_path):
    """The real lm-eval path on a tiny model: a multiple-choice task from a local JSON file."""
    require_module("lm_eval")
    model = tiny_models.save_hf_model(tiny_models.make_hf_model("llama_tied"), tmp_path / "model")
    save_tokenizer(model)
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    data = task_dir / "data.jsonl"
    data.write_text("".join(json.dumps({"q": f"the fox {i}", "choices": ["quick", "lazy dog"],
                                        "label": i % 2}) + "\n" for i in range(6)))
    (task_dir / "tiny_choice.yaml").write_text(
        f"task: tiny_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    tasks = lm_eval.prepare("tiny_choice", include_path=str(task_dir))
    assert tasks.unavailable == {} and tasks.message() is None
    result = lm_eval.evaluate(tasks, model, limit=4, batch_size=2)
    assert result["available"] and result["reason"] is None
    got = result["tasks"]["tiny_choice"]
    assert got["metric"] == "acc_norm" and got["value"] in (0.0, 0.25, 0.5, 0.75, 1.0)  # 4 examples
    assert result["average"] == got["value"]
    assert lm_eval.metrics(tasks, [None, result]) == {"tiny_choice": "acc_norm"}
    # A folder lm-eval cannot run (no tokenizer) is recorded as unavailable, not raised.
    bare = tiny_models.save_hf_model(tiny_models.make_hf_model("llama_tied"), tmp_path / "bare")
    failed = lm_eval.evaluate(tasks, bare, limit=4)
    assert failed["available"] is False and failed["average"] is None
    assert failed["reason"].startswith("lm-eval failed (")
