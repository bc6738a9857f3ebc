"""Prune many checkpoints at many ratios with one policy.

  python -m launch.batch_prune --checkpoints='ckpts/*' --ratios=0.1,0.2,0.3 \
      --policy=runs/smollm2/policy --out_dir=runs/batch --export_hf

Each checkpoint is loaded once, pruned at every ratio, written (orbax, and HF with --export_hf)
to `<out_dir>/<name>/ratio_<r>/`, and released before the next. `<out_dir>/manifest.json` records
every output with its status, after each one: rerunning the same command skips what is done. A
checkpoint that fails (missing, corrupt, other shapes than the policy's) is reported and skipped;
the exit code is then 1. Many VMs, one list: `--num_shards`/`--shard_index` (e.g. the worker
count and id of a TPU slice) give each VM every n-th checkpoint and its own manifest
(`manifests/shard-<i>-of-<n>.json`); each shard then merges all shard manifests it finds into
`manifest.json` (or run `--merge` once all are done).
"""
from __future__ import annotations

import gc
import glob
import json
import os
import sys
from typing import Optional

import jax
from absl import flags, logging
from tqdm import tqdm

from prunenet_jax.formats import orbax as checkpoints
from prunenet_jax import sources as hf_io
from prunenet_jax.run import atomic as outputs
from prunenet_jax.run import prune_run as pipeline
from prunenet_jax.method import trainer as training_run
from prunenet_jax.errors import UserError
from prunenet_jax.launch import common, flags as pruning_flags
from prunenet_jax.models import registry

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoints", None, "Comma-separated checkpoints (anything --model of "
                    "launch.prune accepts; a hub id may end in @<revision>), a text file with one "
                    "per line, or a glob")
flags.DEFINE_string("policy", None, "A saved policy (<out_dir>/policy of launch.prune); without it "
                    "a policy is trained on the first checkpoint and saved to <out_dir>/policy")
flags.DEFINE_string("out_dir", None, "Where outputs go: <name>/ratio_<r>/{orbax,hf}, manifest.json")
flags.DEFINE_integer("num_shards", None, "Split the checkpoint list over this many VMs (default: "
                     "jax.process_count(), 1 unless the platform starts JAX multi-host itself)")
flags.DEFINE_integer("shard_index", None, "This VM's share, 0-based (default: jax.process_index())")
flags.DEFINE_bool("merge", False, "Only merge the shard manifests in --out_dir into manifest.json")
common.define_mesh_flag()


def parse_checkpoints(spec: str) -> list[str]:
    """The checkpoint list: a text file (one per line, # comments), or a comma list whose items
    may be globs (expanded in sorted order)."""
    if os.path.isfile(spec) and not spec.endswith(".gguf") and not glob.has_magic(spec):
        with open(spec) as f:
            items = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    else:
        items = []
        for part in (p.strip() for p in spec.split(",")):
            if part and glob.has_magic(part):
                found = sorted(glob.glob(part))
                if not found:
                    raise UserError(f"--checkpoints: {part!r} matches nothing; check the pattern")
                items += found
            elif part:
                items.append(part)
    if not items:
        raise UserError(f"--checkpoints={spec!r} names no checkpoint; pass a comma list, a text "
                        "file with one per line, or a glob")
    return items


def split_revision(source: str) -> tuple[str, Optional[str]]:
    """`org/name@revision` -> (org/name, revision) for hub ids; local paths are left whole."""
    if "@" in source and not os.path.exists(source):
        name, _, revision = source.rpartition("@")
        return name, revision or None
    return source, None


def output_names(sources: list[str]) -> list[str]:
    """A folder name for each checkpoint (its base name, numbered when two share one); computed
    over the whole list so every shard agrees."""
    names, seen = [], {}
    for src in (split_revision(s)[0] for s in sources):
        base = os.path.basename(src.rstrip("/")) or "checkpoint"
        base = base[:-5] if base.endswith(".gguf") else base
        if src.count("/") == 1 and not os.path.exists(src):  # a hub id: org/name
            base = src.replace("/", "--")
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


def shard_manifest_name(index: int, count: int) -> str:
    return pipeline.MANIFEST if count == 1 else f"manifests/shard-{index:05d}-of-{count:05d}.json"


def merge_manifests(out_dir: str, count: int) -> dict:
    """manifest.json listing the outputs of every shard manifest present, and which are missing."""
    merged, present, missing = None, [], []
    for i in range(count):
        data = pipeline.read_manifest(os.path.join(out_dir, shard_manifest_name(i, count)))
        if data is None:
            missing.append(i)
            continue
        present.append(i)
        if merged is None:
            merged = {k: v for k, v in data.items() if k not in ("shard_index", "outputs")}
            merged["outputs"] = []
        merged["outputs"] += data["outputs"]
    if merged is None:
        raise UserError(f"--merge: no shard manifests in {out_dir}/manifests; run the shards first")
    merged["shards"] = {"present": present, "missing": missing}
    outputs.write_json(os.path.join(out_dir, pipeline.MANIFEST), merged)
    return merged


def check_flags(ratios: list[float], sources: list[str], num_shards: int, shard_index: int) -> None:
    pruning_flags.check(ratios)
    if not FLAGS.out_dir:
        raise UserError("--out_dir is required (where the pruned checkpoints and manifest go)")
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise UserError(f"--shard_index={shard_index} must be in [0, --num_shards={num_shards})")
    if num_shards > 1 and not FLAGS.policy:
        raise UserError("several shards need one shared --policy: train it once with "
                        "launch.prune --out_dir=... and pass --policy=<that out_dir>/policy")
    # Rerunning into the same --out_dir resumes, so an existing folder is fine.
    outputs.check_out_dir(FLAGS.out_dir, sources + ([FLAGS.policy] if FLAGS.policy else []))


def get_policy(first_source: str, ratios: list[float]) -> tuple[dict, dict, str]:
    """(params, training summary, policy dir): --policy, or one trained on the first checkpoint
    (resumable, in <out_dir>/policy)."""
    if FLAGS.policy:
        params, meta = checkpoints.load_policy(FLAGS.policy)
        return params, {"policy": os.path.abspath(FLAGS.policy)}, os.path.abspath(FLAGS.policy)
    cfg = pruning_flags.train_config(ratios)
    path, revision = split_revision(first_source)
    weights = hf_io.load_model(path, revision=revision)  # a failure here stops the batch: no policy
    pruning_flags.check_ratios_fit(weights.config.intermediate_size, ratios + [cfg.ratio],
                                   first_source)
    params, summary = training_run.train_policy(
        weights.layers[registry.GATE], weights.config, cfg, seed=FLAGS.seed,
        episodes=FLAGS.episodes, mesh=common.make_mesh(), out_dir=FLAGS.out_dir, resume=True,
        source=first_source, checkpoint_every=FLAGS.checkpoint_every)
    return params, summary, training_run.POLICY


def prune_one(name, source, params, policy_meta, manifest, recipe, ratios, texts, bar) -> None:
    """Load, prune at every ratio, write, release; a failure marks this checkpoint's remaining
    outputs failed and returns."""
    key = {"checkpoint": name}
    if not FLAGS.overwrite and all(manifest.is_done({**key, "ratio": r}, recipe) for r in ratios):
        bar.update(len(ratios))  # finished by an earlier run
        return
    weights = None
    path, revision = split_revision(source)
    try:
        config = hf_io.load_config(path, revision)  # shape errors before the weights are read
        if policy_meta is not None:
            checkpoints.check_policy_fits(policy_meta, config, source, FLAGS.policy)
        pruning_flags.check_ratios_fit(config.intermediate_size, ratios, source)
        weights = hf_io.load_model(path, revision=revision)
        ppl = pruning_flags.ppl_fn(weights, texts)
        dense_ppl = ppl(weights)
        pipeline.prune_at_ratios(
            weights, params, ratios, mode=FLAGS.mode, seed=FLAGS.seed,
            out_dir=os.path.join(FLAGS.out_dir, name), manifest=manifest,
            export_hf=FLAGS.export_hf, torch_format=FLAGS.torch_format, ppl_fn=ppl,
            card={"source": source, "command": common.command_line()},
            key=key, extra={"source": source, "dense_ppl": dense_ppl},
            on_output=lambda e: bar.update(1))
    except Exception as e:  # one bad checkpoint must not stop the batch
        message = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        if not isinstance(e, UserError):
            logging.exception("unexpected error on %s", source)
        tqdm.write(f"error: {name}: {message}", file=sys.stderr)  # above the progress bar
        for r in ratios:
            if not manifest.is_done({**key, "ratio": r}, recipe):
                manifest.record({**key, "source": source, "ratio": r, "kept": None, "params": None,
                                 "ppl": None, "orbax_dir": None, "hf_dir": None,
                                 "status": pipeline.FAILED, "error": message, **recipe},
                                {**key, "ratio": r})
                bar.update(1)
    finally:
        del weights
        gc.collect()


def print_summary(entries: list[dict]) -> None:
    width = max([len("checkpoint")] + [len(e["checkpoint"]) for e in entries])
    fmt = lambda v, f: "-" if v is None else format(v, f)
    print(f"{'checkpoint':<{width}}  {'ratio':>6}  {'kept':>6}  {'params':>13}  {'ppl':>10}  status")
    for e in entries:
        print(f"{e['checkpoint']:<{width}}  {e['ratio']:>6}  {fmt(e['kept'], ''):>6}  "
              f"{fmt(e['params'], ','):>13}  {fmt(e['ppl'], '.3f'):>10}  {e['status']}")


def main(argv) -> int:
    if FLAGS.merge:
        if not FLAGS.out_dir or FLAGS.num_shards is None:
            raise UserError("--merge needs --out_dir and --num_shards")
        merged = merge_manifests(FLAGS.out_dir, FLAGS.num_shards)
        print(json.dumps(merged))
        return 0
    if not FLAGS.checkpoints:
        raise UserError("--checkpoints is required: a comma list, a text file or a glob")
    ratios = pruning_flags.parse_ratios(FLAGS.ratios)
    sources = parse_checkpoints(FLAGS.checkpoints)
    # No jax.distributed here: shards never talk to each other (and orbax saves made by several
    # processes of one distributed run at once interfere), so each VM runs on its own.
    num_shards = jax.process_count() if FLAGS.num_shards is None else FLAGS.num_shards
    shard_index = jax.process_index() if FLAGS.shard_index is None else FLAGS.shard_index
    check_flags(ratios, sources, num_shards, shard_index)
    texts = pruning_flags.eval_texts()
    policy_meta = checkpoints.load_policy(FLAGS.policy)[1] if FLAGS.policy else None

    params, training, policy_dir = get_policy(sources[0], ratios)
    names = output_names(sources)
    mine = list(zip(names, sources))[shard_index::num_shards]
    recipe = pipeline.output_recipe(params, FLAGS.mode, FLAGS.seed, FLAGS.export_hf,
                                    FLAGS.torch_format)
    header = {"checkpoints": dict(zip(names, sources)), "ratios": ratios, "policy_dir": policy_dir,
              "policy_fingerprint": recipe["policy_fingerprint"], "seed": FLAGS.seed,
              "mode": FLAGS.mode, "training": training, "num_shards": num_shards,
              "shard_index": shard_index, "command": common.command_line()}
    manifest = pipeline.Manifest(FLAGS.out_dir, header, resume=not FLAGS.overwrite,
                                 name=shard_manifest_name(shard_index, num_shards))
    manifest.save()
    bar = tqdm(total=len(mine) * len(ratios), desc="outputs")
    for name, source in mine:
        bar.set_postfix(checkpoint=name)
        prune_one(name, source, params, policy_meta, manifest, recipe, ratios, texts, bar)
    bar.close()
    entries = [manifest.find({"checkpoint": n, "ratio": r}) for n, _ in mine for r in ratios]
    if num_shards > 1:
        merge_manifests(FLAGS.out_dir, num_shards)
    print_summary(entries)
    failed = sorted({e["checkpoint"] for e in entries if e["status"] != pipeline.DONE})
    print(json.dumps({"outputs": entries, "failed": failed, "manifest": manifest.path}))
    if failed:
        print(f"error: {len(failed)} of {len(mine)} checkpoints failed: {', '.join(failed)} "
              f"(details in {manifest.path})", file=sys.stderr)
        return 1
    return 0


def run():
    common.run(main)


if __name__ == "__main__":
    run()
