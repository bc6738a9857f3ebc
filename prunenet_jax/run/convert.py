"""Converting a model between our orbax sliced-model checkpoint and a Hugging Face folder
(launch.convert): an orbax input becomes an HF folder, anything else `--model` accepts (HF
folder, .gguf, hub id, `default`) becomes orbax, unless `to` says otherwise. Both directions are
lossless."""
from __future__ import annotations

import dataclasses
from typing import Optional

from absl import logging

from prunenet_jax import sources
from prunenet_jax.errors import UserError
from prunenet_jax.formats import orbax
from prunenet_jax.files import output_folder
from prunenet_jax.weights import dtype_by_name


@dataclasses.dataclass(frozen=True)
class ConvertJob:
    input: str
    output: str
    to: Optional[str] = None  # "hf" or "orbax"; None: the other format than the input's
    revision: Optional[str] = None
    dtype: Optional[str] = None  # HF output dtype name; None: the source config's
    torch_format: bool = False
    overwrite: bool = False
    command: str = ""

    def check(self) -> None:
        """Refuses what cannot work, before anything is read (the rest once the input's format
        is known: `output_format`)."""
        if not self.input or not self.output:
            raise UserError("--input and --output are required, e.g. --input=run/ratio_0.2/orbax "
                            "--output=pruned-hf")

    def output_format(self, kind: str) -> str:
        """"hf" or "orbax" for an input of format `kind`; refuses HF-only options for orbax."""
        to = self.to or ("hf" if kind == "orbax" else "orbax")
        if self.torch_format and to != "hf":
            raise UserError("--torch_format applies to HF output only; drop it or pass --to=hf")
        if self.dtype and to != "hf":
            raise UserError("--dtype applies to HF output only (orbax keeps the source dtypes)")
        return to


def convert(job: ConvertJob) -> dict:
    """Writes `job.output`; returns what the launcher prints (formats, params, width)."""
    job.check()
    kind, path = sources.resolve_source(job.input, job.revision)
    to = job.output_format(kind)
    dtype = None if job.dtype is None else dtype_by_name(job.dtype)
    output_folder.check_out_dir(job.output, [job.input, path], reuse=job.overwrite,
                         name=f"--output={job.output}", replaced=True, must_not_exist=True,
                         fix="pass --overwrite to replace it, or choose a new folder")

    weights = sources.load_model(job.input, dtype=None, revision=job.revision)
    logging.info("loaded %s (%s): %d layers, I=%d", job.input, kind,
                 weights.config.num_hidden_layers, weights.config.intermediate_size)
    if to == "hf":

        from prunenet_jax.formats import hf_export
        meta = orbax.read_meta(path) if kind == "orbax" else {"source": job.input}
        card = {**orbax.model_card_fields(meta or {}), "command": job.command}
        hf_export.export_hf(weights, job.output, model_card=card, dtype=dtype,
                     torch_format=job.torch_format, overwrite=job.overwrite)
    else:
        orbax.save_model(job.output, weights, {"converted_from": job.input, "command": job.command},
                         overwrite=job.overwrite)
    return {"input": job.input, "input_format": kind, "output": job.output, "output_format": to,
            "params": weights.num_params(), "intermediate_size": weights.config.intermediate_size}
