"""Exports a trained or converted MTLFace checkpoint as an inference bundle.

Usage::

  python -m mtlface_jax.export --checkpoint runs/mtl --output bundles/mtl
  python -m mtlface_jax.export --checkpoint converted/tpami --output bundles/tpami \\
      --dtype bfloat16 --platforms cuda

``--checkpoint`` is a training workdir (or its ``checkpoints/``), a converted
PyTorch checkpoint (``python -m mtlface_jax.convert``) or another bundle's
``variables/``. The bundle (layout in :mod:`mtlface_jax.inference`) holds:

* ``variables/``: an orbax checkpoint of the inference variables only (encoder,
  age estimator, generator when trained; no head, discriminator or optimizer
  state) in the ``Checkpointer`` layout, so ``config.init_from``, evaluation
  and a re-export accept it too;
* ``encode.jaxexport`` / ``synthesize.jaxexport``: ``jax.export`` programs with
  a symbolic batch dimension, lowered for every platform in ``--platforms``.

The programs take the variables as an argument instead of baking them in as
constants: the weights are stored once (not once per program: an IR-50 is
about 190 MB), the programs stay a few MB, and XLA does not constant-fold
hundreds of MB at compile time. The price is that a program alone is not a
standalone model: :func:`mtlface_jax.inference.load` pairs it with
``variables/``.
"""

import argparse
import dataclasses
import datetime
import json
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mtlface_jax import checkpoint_io
from mtlface_jax import inference
from mtlface_jax import predict
from mtlface_jax.models import spec as spec_lib
from mtlface_jax.training import checkpoint as checkpoint_lib

DTYPES = ("float32", "bfloat16")  # What a bundle may compute in.
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


class ExportError(ValueError):
  """A checkpoint that cannot be exported; the message says why."""


def model_spec(meta: dict, modules: Sequence[str]) -> spec_lib.ModelSpec:
  """The spec of a bundle's inference modules, from the source checkpoint's meta.

  Args:
    meta: the checkpoint's meta (``spec.from_meta`` reads it).
    modules: modules with variables; without ``generator`` the spec has none.

  Returns:
    The spec without head and discriminator (a bundle holds neither).

  Raises:
    ExportError: if the meta describes no known kind of checkpoint.
  """
  try:
    spec = spec_lib.from_meta(meta)
  except ValueError as error:
    raise ExportError(str(error)) from error
  return dataclasses.replace(spec, num_classes=None, discriminator=None,
                             generator=spec.generator if "generator" in modules else None)


def read_checkpoint(path: str | Path, step: Optional[int] = None
                    ) -> tuple[dict, spec_lib.ModelSpec, dict]:
  """The inference variables, model spec and facts of a checkpoint.

  Args:
    path: a training workdir or ``checkpoints/``, a converted checkpoint, or a
      bundle's ``variables/``.
    step: which checkpoint; the latest if None.

  Returns:
    (module -> collections of NumPy arrays for encoder/age/generator, the
    spec of those modules (no generator when the checkpoint has none),
    ``{'checkpoint', 'step', 'kind', 'meta'}``).

  Raises:
    FileNotFoundError: if there is no checkpoint at ``path``.
    ExportError: if it lacks an encoder or age estimator, or has an unknown meta.
  """
  directory = checkpoint_io.checkpoint_dir(path)
  variables, meta, step = checkpoint_io.restore_variables(directory, step,
                                                          inference.INFERENCE_MODULES)
  variables = spec_lib.inference_variables(variables)
  missing = [name for name in ("encoder", "age") if name not in variables]
  if missing:
    raise ExportError(f"checkpoint {directory} (step {step}) has no {' or '.join(missing)} "
                      f"variables (it has {sorted(variables)}); an inference bundle needs "
                      "the encoder and the age estimator")
  spec = model_spec(meta, sorted(variables))
  return variables, spec, {"checkpoint": str(directory), "step": step,
                           "kind": spec_lib.kind_of(meta), "meta": meta}


def _abstract(tree):
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def export_programs(models: spec_lib.MTLFaceModels, variables: dict, image_size: int,
                    platforms: Sequence[str] = DEFAULT_PLATFORMS) -> dict:
  """Lowers the inference programs with a symbolic batch size ``b``.

  Args:
    models: from ``spec.build``.
    variables: the inference variables (their shapes and dtypes are used).
    image_size: S of the [b, S, S, 3] float32 inputs.
    platforms: platforms to lower for (a subset of ``KNOWN_PLATFORMS``).

  Returns:
    ``{'encode': Exported, 'synthesize': Exported (with a generator)}``.

  Raises:
    ExportError: if the variables do not fit the modules.
  """
  batch, = jax.export.symbolic_shape("b")
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
  specs = _abstract(variables)

  def encode_fn(variables, images):
    return predict.encode(models, variables, images)._asdict()

  def synthesize_fn(variables, images, groups):
    out = predict.synthesize(models, variables, images, groups)
    return out.astype(jnp.float32)

  programs = {"encode": (encode_fn, (specs, images))}
  if models.generator is not None:
    groups = jax.ShapeDtypeStruct((batch,), jnp.int32)
    programs["synthesize"] = (synthesize_fn, (specs, images, groups))
  exported = {}
  for name, (fn, args) in programs.items():
    try:
      exported[name] = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(*args)
    except flax.errors.FlaxError as error:
      raise ExportError(f"the checkpoint's variables do not fit its model ({name}): "
                        f"{error}") from error
  return exported


def _manifest(spec: spec_lib.ModelSpec, source: dict, dtype: str, platforms: Sequence[str],
              programs: dict) -> dict:
  functions = {"encode": {
      "file": inference.ENCODE_FILE,
      "inputs": ["variables", f"images float32[b,{spec.image_size},{spec.image_size},3] "
                 "in [-1,1]"],
      "outputs": {"embedding": "float32[b,D] L2-normalised e(x)+e(mirror x)",
                  "age": "float32[b] mean expected age", "group_logits": "float32[b,G]"}}}
  if "synthesize" in programs:
    functions["synthesize"] = {
        "file": inference.SYNTHESIZE_FILE,
        "inputs": ["variables", "images float32[b,S,S,3] in [-1,1]", "groups int32[b]"],
        "outputs": "float32[b,S,S,3] synthesised faces"}
  outputs = jax.tree_util.tree_unflatten(programs["encode"].out_tree,
                                         programs["encode"].out_avals)
  return {"format": inference.BUNDLE_FORMAT, "version": inference.BUNDLE_VERSION,
          "image_size": spec.image_size, "num_groups": spec.age_group, "family": spec.family,
          "embedding_size": int(outputs["embedding"].shape[-1]), "dtype": dtype,
          "platforms": list(platforms), "functions": functions, "model": spec.to_dict(),
          "source": {k: source[k] for k in ("checkpoint", "step", "kind")},
          "jax_version": jax.__version__,
          "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _write_variables(directory: Path, variables: dict, meta: dict) -> None:
  saver = checkpoint_lib.Checkpointer(directory, keep=1, async_save=False)
  try:
    saver.save(0, {"variables": variables}, meta)
    saver.wait()
  finally:
    saver.close()


def export_bundle(checkpoint: str | Path, output: str | Path, dtype: str = "float32",
                  platforms: Sequence[str] = DEFAULT_PLATFORMS,
                  step: Optional[int] = None) -> dict:
  """Writes an inference bundle for a checkpoint.

  The bundle is assembled in a sibling temporary directory and renamed into
  place, so ``output`` is either complete or absent.

  Args:
    checkpoint: see :func:`read_checkpoint`.
    output: new (or empty) bundle directory.
    dtype: compute dtype of the encoder and generator ("float32"/"bfloat16").
    platforms: platforms the programs are lowered for.
    step: checkpoint step; the latest if None.

  Returns:
    The manifest written to ``bundle.json``.

  Raises:
    FileExistsError: if ``output`` exists and is not empty.
    FileNotFoundError, ExportError: see :func:`read_checkpoint`.
  """
  output = Path(output).absolute()
  if output.exists() and (not output.is_dir() or any(output.iterdir())):
    raise FileExistsError(f"output {output} exists and is not an empty directory")
  unknown = sorted(set(platforms) - set(KNOWN_PLATFORMS))
  if unknown or not platforms:
    raise ValueError(f"platforms must be a non-empty subset of {KNOWN_PLATFORMS}, "
                     f"got {list(platforms)}")
  variables, spec, source = read_checkpoint(checkpoint, step)
  models = spec_lib.build(spec, dtype)
  programs = export_programs(models, variables, spec.image_size, platforms)
  manifest = _manifest(spec, source, dtype, platforms, programs)
  partial = output.parent / f".{output.name}.partial"
  shutil.rmtree(partial, ignore_errors=True)
  partial.mkdir(parents=True)
  try:
    # The source meta is kept so that whatever accepted the source accepts this.
    _write_variables(partial / inference.VARIABLES_DIR, variables,
                     {**source["meta"], "model": spec.to_dict(),
                      "exported_from": source["checkpoint"]})
    for name, program in programs.items():
      (partial / manifest["functions"][name]["file"]).write_bytes(program.serialize())
    (partial / inference.CONFIG_FILE).write_text(json.dumps(_source_config(source["meta"]),
                                                            indent=2, sort_keys=True))
    (partial / inference.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    if output.exists():
      output.rmdir()
    partial.rename(output)
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  return manifest


def _source_config(meta: dict) -> dict:
  """The training config as a JSON object, or the conversion metadata."""
  if isinstance(meta.get("config"), str):
    return json.loads(meta["config"])
  return {k: v for k, v in meta.items() if k not in ("model", "exported_from")}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m mtlface_jax.export",
      description="Export an MTLFace checkpoint as an inference bundle (orbax variables + "
      "serialized jax.export programs).")
  parser.add_argument("--checkpoint", required=True,
                      help="training workdir or checkpoints/, converted checkpoint, or a "
                      "bundle's variables/")
  parser.add_argument("--output", required=True, help="new bundle directory")
  parser.add_argument("--dtype", choices=DTYPES, default="float32",
                      help="compute dtype of encoder and generator (parameters stay float32)")
  parser.add_argument("--platforms", default=",".join(DEFAULT_PLATFORMS),
                      help=f"comma-separated subset of {','.join(KNOWN_PLATFORMS)} to lower "
                      "for (lowering needs no such device)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Command-line entry point; returns the process exit status."""
  args = build_parser().parse_args(argv)
  platforms = tuple(p.strip() for p in args.platforms.split(",") if p.strip())
  try:
    manifest = export_bundle(args.checkpoint, args.output, args.dtype, platforms, args.step)
  except (ExportError, FileNotFoundError, FileExistsError, ValueError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  sizes = {path.name: path.stat().st_size for path in Path(args.output).iterdir()
           if path.is_file()}
  print(f"wrote {args.output}: {', '.join(manifest['functions'])} for "
        f"{','.join(manifest['platforms'])} ({args.dtype}, {manifest['image_size']}px, "
        f"from {manifest['source']['kind']} step {manifest['source']['step']}); "
        f"files: {json.dumps(sizes)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
