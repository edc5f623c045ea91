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
import datetime
import json
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtlface_jax import inference
from mtlface_jax import synthesis
from mtlface_jax.models import generator as generator_lib
from mtlface_jax.models import heads
from mtlface_jax.models import iresnet
from mtlface_jax.models import mtlface
from mtlface_jax.training import checkpoint as checkpoint_lib

DTYPES = ("float32", "bfloat16")
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
CONVERTED_IMAGE_SIZE = 112  # The PyTorch models are defined on 112x112 faces.


class ExportError(ValueError):
  """A checkpoint that cannot be exported; the message says why."""


def model_spec(meta: dict, modules: Sequence[str]) -> dict:
  """The JSON description of the inference modules a checkpoint's variables fit.

  Args:
    meta: the checkpoint's meta: a training run's (``config`` JSON), a
      conversion's (``converted_from``) or a bundle's (``model``).
    modules: module names that have variables (``generator`` decides whether
      the spec has one).

  Returns:
    ``{'image_size', 'age_group', 'encoder': Encoder fields,
    'generator': Generator fields or None}``.

  Raises:
    ExportError: if the meta describes no known kind of checkpoint.
  """
  if isinstance(meta.get("model"), dict):
    spec = dict(meta["model"])
  elif isinstance(meta.get("config"), str):
    spec = _spec_from_training_config(ml_collections.ConfigDict(json.loads(meta["config"])))
  elif meta.get("converted_from") == "pytorch":
    spec = _spec_from_conversion(meta)
  else:
    raise ExportError("cannot tell which model the checkpoint holds: its meta has no "
                      f"'config', 'converted_from' or 'model' (keys: {sorted(meta)})")
  if "generator" not in modules:
    spec["generator"] = None
  return spec


def _spec_from_training_config(config) -> dict:
  # Read the fields off the modules training builds, so the two cannot drift.
  models = mtlface.build_models(config)
  return {"image_size": int(config.image_size), "age_group": int(config.age_group),
          "encoder": _encoder_fields(models.encoder),
          "generator": {"unit_count": models.generator.unit_count,
                        "decoder_features": list(models.generator.decoder_features)}}


def _spec_from_conversion(meta: dict) -> dict:
  if "num_layers" not in meta:
    raise ExportError("the converted checkpoint has no encoder (its meta lacks 'num_layers')")
  encoder = iresnet.Encoder(int(meta["num_layers"]),
                            attention_version=int(meta.get("attention_version", 1)),
                            dropout_rate=float(meta.get("dropout_rate", 0.5)),
                            normalize_embedding=bool(meta.get("normalize_embedding", False)))
  default = generator_lib.Generator()
  return {"image_size": CONVERTED_IMAGE_SIZE, "age_group": int(meta.get("age_group", 7)),
          "encoder": _encoder_fields(encoder),
          "generator": {"unit_count": default.unit_count,
                        "decoder_features": list(default.decoder_features)}}


def _encoder_fields(encoder: iresnet.Encoder) -> dict:
  return {"num_layers": encoder.num_layers,
          "units": list(encoder.units) if encoder.units else None,
          "depths": list(encoder.depths), "attention_version": encoder.attention_version,
          "dropout_rate": encoder.dropout_rate,
          "normalize_embedding": encoder.normalize_embedding}


def build_inference_models(spec: dict, dtype: str = "float32") -> inference.InferenceModels:
  """Flax modules from a :func:`model_spec`, computing in ``dtype``.

  As in training, the age estimator computes in float32 and all parameters
  are float32.
  """
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
  compute = mtlface.compute_dtype(dtype)
  fields = dict(spec["encoder"])
  encoder = iresnet.Encoder(
      fields["num_layers"], units=tuple(fields["units"]) if fields.get("units") else None,
      depths=tuple(fields["depths"]), attention_version=fields["attention_version"],
      dropout_rate=fields["dropout_rate"], normalize_embedding=fields["normalize_embedding"],
      dtype=compute)
  age = heads.AgeEstimator(spec["age_group"], dtype=jnp.float32)
  generator = None
  if spec.get("generator"):
    generator = generator_lib.Generator(
        spec["age_group"], unit_count=spec["generator"]["unit_count"],
        decoder_features=tuple(spec["generator"]["decoder_features"]), dtype=compute)
  return inference.InferenceModels(encoder, age, generator)


def read_checkpoint(path: str | Path, step: Optional[int] = None) -> tuple[dict, dict, dict]:
  """The inference variables, model spec and facts of a checkpoint.

  Args:
    path: a training workdir or ``checkpoints/``, a converted checkpoint, or a
      bundle's ``variables/``.
    step: which checkpoint; the latest if None.

  Returns:
    (module -> collections of NumPy arrays for encoder/age/generator, the
    :func:`model_spec`, ``{'checkpoint', 'step', 'kind', 'meta'}``).

  Raises:
    FileNotFoundError: if there is no checkpoint at ``path``.
    ExportError: if it lacks an encoder or age estimator, or has an unknown meta.
  """
  directory = checkpoint_lib.checkpoint_dir(path).absolute()
  variables, meta, step = inference.restore_variables(directory, step,
                                                      inference.INFERENCE_MODULES)
  missing = [name for name in ("encoder", "age") if name not in variables]
  if missing:
    raise ExportError(f"checkpoint {directory} (step {step}) has no {' or '.join(missing)} "
                      f"variables (it has {sorted(variables)}); an inference bundle needs "
                      "the encoder and the age estimator")
  spec = model_spec(meta, sorted(variables))
  kind = ("bundle" if "model" in meta else "converted" if meta.get("converted_from")
          else "training")
  return variables, spec, {"checkpoint": str(directory), "step": step, "kind": kind,
                           "meta": meta}


def _abstract(tree):
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def export_programs(models: inference.InferenceModels, variables: dict, image_size: int,
                    platforms: Sequence[str] = DEFAULT_PLATFORMS) -> dict:
  """Lowers the inference programs with a symbolic batch size ``b``.

  Args:
    models: from :func:`build_inference_models`.
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
    return inference.encode(models, variables, images)._asdict()

  def synthesize_fn(variables, images, groups):
    out = synthesis.synthesize(models, variables, images, groups)
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


def _manifest(spec: dict, source: dict, dtype: str, platforms: Sequence[str],
              programs: dict) -> dict:
  functions = {"encode": {
      "file": inference.ENCODE_FILE,
      "inputs": ["variables", f"images float32[b,{spec['image_size']},{spec['image_size']},3] "
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
          "image_size": spec["image_size"], "num_groups": spec["age_group"],
          "embedding_size": int(outputs["embedding"].shape[-1]), "dtype": dtype,
          "platforms": list(platforms), "functions": functions, "model": spec,
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
  models = build_inference_models(spec, dtype)
  programs = export_programs(models, variables, spec["image_size"], platforms)
  manifest = _manifest(spec, source, dtype, platforms, programs)
  partial = output.parent / f".{output.name}.partial"
  shutil.rmtree(partial, ignore_errors=True)
  partial.mkdir(parents=True)
  try:
    # The source meta is kept so that whatever accepted the source accepts this.
    _write_variables(partial / inference.VARIABLES_DIR, variables,
                     {**source["meta"], "model": spec, "exported_from": source["checkpoint"]})
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
