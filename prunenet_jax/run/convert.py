"""Converting a model between our orbax sliced-model checkpoint and a Hugging Face folder
(launch.convert): an orbax input becomes an HF folder, anything else `--model` accepts (HF
folder, .gguf, hub id, `default`) becomes orbax, unless `to` says otherwise. Both directions are
lossless. `to="gguf"` writes a folder with one GGUF file (formats/gguf_export.py)."""
from __future__ import annotations

import dataclasses
from typing import Optional

from absl import logging

from prunenet_jax import pruned_models, sources
from prunenet_jax.errors import UserError
from prunenet_jax.formats import gguf_export, orbax, run_dir
from prunenet_jax.files import output_folder, run_lock
from prunenet_jax.weights import dtype_by_name


@dataclasses.dataclass(frozen=True)
class ConvertJob:
    input: str
    output: str
    to: Optional[str] = None  # "hf", "orbax" or "gguf"; None: the other of hf/orbax than the input's
    revision: Optional[str] = None
    dtype: Optional[str] = None  # HF output dtype name; None: the source config's
    torch_format: bool = False
    gguf_type: str = "f16"  # to="gguf": formats/gguf_export.GGUF_TYPES
    overwrite: bool = False
    command: str = ""
    ratio: Optional[float] = None  # --ratio/--mode: which pruned model of a run folder
    mode: Optional[str] = None

    def check(self) -> None:
        """Refuses what cannot work, before anything is read (the rest once the input's format
        is known: `output_format`)."""
        if not self.input or not self.output:
            raise UserError("--input and --output are required, e.g. --input=run/ratio_0.2/orbax "
                            "--output=pruned-hf")
        gguf_export.check_type(self.gguf_type)

    def output_format(self, kind: str) -> str:
        """"hf" or "orbax" for an input of format `kind`; refuses HF-only options for orbax."""
        to = self.to or ("hf" if kind == "orbax" else "orbax")
        if self.torch_format and to != "hf":
            raise UserError("--torch_format applies to HF output only; drop it or pass --to=hf")
        if self.dtype and to != "hf":
            raise UserError("--dtype applies to HF output only (orbax keeps the source dtypes)")
        return to


def convert(job: ConvertJob) -> dict:
    """Writes `job.output` (holding its lock: one writer at a time); returns what the launcher
    prints (formats, params, width)."""
    job.check()
    pruned = pruned_models.resolve_one(job.input, job.ratio, job.mode, "--input")
    # a pruned model's orbax folder is the one that records how it was made: convert from it
    source = job.input if pruned is None else pruned.folder(prefer=run_dir.ORBAX)
    kind, path = sources.resolve_source(source, job.revision)
    to = job.output_format(kind)
    if to == "gguf":  # refused before the weights are read
        gguf_file, tokenizer_dir = sources.tokenizer_location(source, job.revision)
        gguf_export.check_exportable(sources.load_config(source, job.revision), gguf_file=gguf_file,
                                     tokenizer_dir=tokenizer_dir, source=job.input)
    dtype = None if job.dtype is None else dtype_by_name(job.dtype)
    # the folder read (a run folder's output: --output may lie elsewhere in the run folder)
    inputs = [path] if pruned else [job.input, path]
    check = lambda: output_folder.check_out_dir(
        job.output, inputs, reuse=job.overwrite, name=f"--output={job.output}", replaced=True,
        must_not_exist=True, fix="pass --overwrite to replace it, or choose a new folder")
    check()  # before the lock, which is a file beside --output: never one inside an input
    with run_lock.hold_beside(job.output, flag="--output"):
        check()  # again: another run may have written it meanwhile
        return _write(job, source, kind, path, to, dtype, pruned)


def _write(job: ConvertJob, source: str, kind: str, path: str, to: str, dtype, pruned) -> dict:
    """Loads `source` (of format `kind`, read at `path`) and writes it as `to` to job.output."""
    weights = sources.load_model(source, dtype=None, revision=job.revision)
    logging.info("loaded %s (%s): %d layers, I=%d", pruned.label if pruned else job.input, kind,
                 weights.config.num_hidden_layers, weights.config.intermediate_size)
    # what is known of how it was pruned (the run's record), for the model card or metadata
    made = {} if pruned is None or pruned.ratio is None else {
        k: v for k, v in (("source", pruned.source), ("ratio", pruned.ratio),
                          ("mode", pruned.mode), ("guard", pruned.guard or None)) if v is not None}
    if to in ("hf", "gguf"):
        meta = orbax.read_meta(path) if kind == "orbax" else {"source": job.input, **made}
        card = {**orbax.model_card_fields(meta or {}), "command": job.command}
    if to == "hf":
        from prunenet_jax.formats import hf_export

        hf_export.export_hf(weights, job.output, model_card=card, dtype=dtype,
                            torch_format=job.torch_format, overwrite=job.overwrite)
    elif to == "gguf":
        gguf_file = gguf_export.export_gguf(weights, job.output, gguf_type=job.gguf_type,
                                            model_card=card, overwrite=job.overwrite)
        return {"input": job.input, "input_format": kind, "output": gguf_file,
                "output_format": to, "gguf_type": job.gguf_type, "params": weights.num_params(),
                "intermediate_size": weights.config.intermediate_size}
    else:
        orbax.save_model(job.output, weights, {"converted_from": job.input, **made,
                                               "command": job.command}, overwrite=job.overwrite)
    return {"input": job.input, "input_format": kind, "output": job.output, "output_format": to,
            "params": weights.num_params(), "intermediate_size": weights.config.intermediate_size}
