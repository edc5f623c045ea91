"""Glue from a Flax module + variables to verification reports.

Builds a jitted (optionally flip-summed) embedding function, embeds the images
of a pair list (LFW ``pairs.txt``, a generic or CACD-VS list parsed by
``mtlface_jax.formats.lists``) or of an insightface ``.bin`` set, and scores
them with :func:`~mtlface_jax.evaluation.verification.evaluate_verification`.
Each distinct image file is embedded once however many pairs use it.
"""

import os
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtlface_jax.evaluation import report
from mtlface_jax.evaluation import verification
from mtlface_jax.formats import binset
from mtlface_jax.formats import images as images_lib
from mtlface_jax.formats import lists

EmbedFn = Callable[[Any], Any]


def data_parallel_sharding(devices: Optional[Sequence[jax.Device]] = None):
  """A sharding that splits the batch axis over ``devices`` (default: all).

  Args:
    devices: devices to use.

  Returns:
    ``NamedSharding(Mesh(devices, ("data",)), P("data"))``.
  """
  mesh = jax.sharding.Mesh(np.asarray(devices or jax.devices()), ("data",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def make_embed_fn(module,
                  variables,
                  flip: bool = True,
                  sharding: Optional[jax.sharding.NamedSharding] = None,
                  select: Optional[Callable[[Any], jax.Array]] = None) -> EmbedFn:
  """Builds a jitted images -> float32 embeddings function from a Flax module.

  Args:
    module: a Flax module called as ``module.apply(variables, images,
      train=False)``, e.g. ``mtlface_jax.models.Encoder`` (whose ``dtype``
      attribute sets the compute dtype, e.g. bfloat16).
    variables: its variables (params and batch_stats).
    flip: sum the embeddings of each image and of its horizontal mirror.
    sharding: the data-parallel sharding batches will be placed with; the
      variables are then replicated over its mesh once, here.
    select: picks the embedding from the module's output. Default: the
      output's ``embedding`` attribute when it has one (``EncoderOutputs``),
      else the output itself.

  Returns:
    ``embed(images [B, H, W, C] in [-1, 1]) -> [B, D] float32``. Variables are
    an argument of the jitted function rather than baked-in constants, so a
    large model compiles quickly.
  """
  if select is None:
    select = lambda outputs: getattr(outputs, "embedding", outputs)

  def single(params, images):
    return select(module.apply(params, images, train=False)).astype(jnp.float32)

  @jax.jit
  def embed(params, images):
    if flip:
      return report.flip_sum_embeddings(lambda x: single(params, x), images)
    return single(params, images)

  if sharding is not None:
    replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    variables = jax.device_put(variables, replicated)
  return lambda images: embed(variables, images)


def to_model_input(image: np.ndarray) -> np.ndarray:
  """RGB uint8 [H, W, 3] -> float32 in [-1, 1], as the batch contract scales."""
  return (np.asarray(image, np.float32) / 255.0 - 0.5) / 0.5


def load_face(path, lfw_style: bool = False,
              image_size: int = images_lib.FACE_SIZE) -> np.ndarray:
  """Decodes an image file to a model input: float32 [S, S, 3] in [-1, 1].

  Args:
    path: image file.
    lfw_style: apply the fixed LFW crop instead of a plain resize.
    image_size: side S of the model's input; the 112x112 face is resized to
      it (e.g. 48 for the tiny test models).

  Returns:
    The scaled face.

  Raises:
    ImageDecodeError: naming the file, if it is missing or corrupt.
  """
  face = images_lib.to_face(images_lib.load_image(path), lfw_style)
  return to_model_input(images_lib.resize_image(face, image_size))


def embed_image_files(embed_fn: EmbedFn,
                      paths: Sequence[str],
                      batch_size: int = 64,
                      lfw_style: bool = False,
                      sharding: Optional[jax.sharding.Sharding] = None,
                      progress: bool = True,
                      description: str = "embedding",
                      image_size: int = images_lib.FACE_SIZE) -> np.ndarray:
  """Decodes, crops/resizes to 112x112, scales and embeds image files.

  Args:
    embed_fn: images -> embeddings (e.g. from :func:`make_embed_fn`).
    paths: image files.
    batch_size: images per call (see ``report.extract_embeddings``).
    lfw_style: apply the fixed LFW crop (raw deep-funneled LFW images) instead
      of a plain resize (already aligned faces).
    sharding: optional data-parallel sharding for the batches.
    progress: show a progress bar.
    description: progress bar label.
    image_size: side the 112x112 faces are then resized to (the model's input).

  Returns:
    [len(paths), D] float32 embeddings.

  Raises:
    ImageDecodeError: naming the file, if one is missing or corrupt.
  """
  faces = (load_face(p, lfw_style, image_size) for p in paths)
  return report.extract_embeddings(embed_fn, faces, batch_size, sharding=sharding,
                                   progress=progress, description=description,
                                   total=len(paths))


def pair_folds(pairs: Sequence[lists.FacePair]) -> Optional[np.ndarray]:
  """Fold labels of parsed pairs, or None when the list defines none.

  Args:
    pairs: parsed pairs; ``fold == -1`` means "no fold given".

  Returns:
    int64 [N] labels, or None if every pair has -1 (contiguous folds are then
    used by the protocol).

  Raises:
    ValueError: if only some pairs have a fold (naming the first without).
  """
  folds = np.asarray([p.fold for p in pairs], np.int64)
  if (folds < 0).all():
    return None
  if (folds < 0).any():
    first = pairs[int(np.argmax(folds < 0))]
    raise ValueError(f"{first.source}: pair has no fold while others do; give "
                     "every pair a fold or none")
  return folds


def check_pair_files(pairs: Sequence[lists.FacePair]) -> None:
  """Fails before any compute if an image of the pair list is missing.

  Args:
    pairs: parsed pairs.

  Raises:
    FileNotFoundError: naming the count and the first missing files with the
      list lines that reference them.
  """
  missing = []
  for pair in pairs:
    missing += [(path, pair.source) for path in (pair.path1, pair.path2)
                if not os.path.isfile(path)]
  if missing:
    listed = "; ".join(f"{path} (pair at {source})" for path, source in missing[:5])
    raise FileNotFoundError(f"{len(missing)} image file(s) of the pair list are "
                            f"missing: {listed}")


def verify_pair_list(embed_fn: EmbedFn,
                     pairs: Sequence[lists.FacePair],
                     batch_size: int = 64,
                     lfw_style: bool = False,
                     eval_folds: Optional[Sequence[int]] = None,
                     sharding: Optional[jax.sharding.Sharding] = None,
                     progress: bool = True,
                     image_size: int = images_lib.FACE_SIZE) -> verification.VerificationResult:
  """Embeds the images of parsed pairs and runs the verification protocol.

  Args:
    embed_fn: images -> embeddings (e.g. from :func:`make_embed_fn`).
    pairs: from ``formats.lists.parse_lfw_pairs``, ``parse_pair_list`` or
      ``parse_numbered_pairs`` (for ``.bin`` sets use :func:`verify_bin`).
    batch_size: images per embedding call.
    lfw_style: apply the fixed LFW crop to each image.
    eval_folds: optional fold labels to evaluate (see ``evaluate_verification``).
    sharding: optional data-parallel sharding for the batches.
    progress: show a progress bar.
    image_size: the model's input side (faces are resized to it).

  Returns:
    The :class:`~mtlface_jax.evaluation.verification.VerificationResult`.

  Raises:
    FileNotFoundError: if any image is missing (before embedding anything).
    ValueError: on an empty list or the protocol's errors (e.g. a fold
      without positive pairs).
  """
  if not pairs:
    raise ValueError("the pair list is empty")
  check_pair_files(pairs)
  folds = pair_folds(pairs)
  unique_paths = sorted({p.path1 for p in pairs} | {p.path2 for p in pairs})
  row = {path: i for i, path in enumerate(unique_paths)}
  embeddings = embed_image_files(embed_fn, unique_paths, batch_size, lfw_style,
                                 sharding, progress, image_size=image_size)
  first = embeddings[[row[p.path1] for p in pairs]]
  second = embeddings[[row[p.path2] for p in pairs]]
  issame = np.asarray([p.issame for p in pairs], bool)
  return verification.evaluate_verification(issame, first, second, folds=folds,
                                            eval_folds=eval_folds)


def verify_bin(embed_fn: EmbedFn,
               bin_path,
               batch_size: int = 64,
               num_folds: int = 10,
               eval_folds: Optional[Sequence[int]] = None,
               sharding: Optional[jax.sharding.Sharding] = None,
               progress: bool = True,
               image_size: int = images_lib.FACE_SIZE) -> verification.VerificationResult:
  """Embeds an insightface ``.bin`` set (AgeDB-30, CALFW, CPLFW, ...) and scores it.

  The images are decoded lazily while embedding; folds are ``num_folds``
  contiguous blocks of pairs, as insightface evaluates these sets.

  Args:
    embed_fn: images -> embeddings.
    bin_path: the ``.bin`` file (read with a restricted unpickler).
    batch_size: images per embedding call.
    num_folds: contiguous folds.
    eval_folds: optional fold labels (0-based) to evaluate.
    sharding: optional data-parallel sharding for the batches.
    progress: show a progress bar.
    image_size: the model's input side (faces are resized to it).

  Returns:
    The verification result.

  Raises:
    ValueError / ImageDecodeError: naming the file and pair for a corrupt set
      or image.
  """
  issame, folds = [], []

  def faces() -> Iterator[np.ndarray]:
    for _, image1, image2, same, fold in binset.iter_bin_pairs(bin_path, num_folds):
      issame.append(same)
      folds.append(fold)
      for image in (image1, image2):
        face = images_lib.resize_image(images_lib.to_face(image), image_size)
        yield to_model_input(face)

  embeddings = report.extract_embeddings(embed_fn, faces(), batch_size, sharding=sharding,
                                         progress=progress,
                                         description=os.path.basename(str(bin_path)))
  return verification.evaluate_verification(
      np.asarray(issame, bool), embeddings[0::2], embeddings[1::2],
      folds=np.asarray(folds, np.int64), eval_folds=eval_folds)


def write_verification_report(results: dict[str, verification.VerificationResult],
                              out_dir,
                              extra: Optional[dict[str, Any]] = None) -> dict[str, str]:
  """Writes ``report.json``, ``report.txt`` and ``roc.png`` into ``out_dir``.

  Args:
    results: dataset name -> result.
    out_dir: destination folder (created).
    extra: more top-level JSON fields (checkpoint, options, timings...).

  Returns:
    Paths of the written files by kind ("json", "table", "roc").
  """
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  payload = {"verification": results, **(extra or {})}
  json_path = report.write_json_report(payload, os.path.join(out_dir, "report.json"))
  table = report.verification_table(results)
  table_path = os.path.join(out_dir, "report.txt")
  with open(table_path, "w", encoding="utf-8") as handle:
    handle.write(table + "\n")
  roc_path = report.plot_roc_curves(results, os.path.join(out_dir, "roc.png"))
  return {"json": str(json_path), "table": table_path, "roc": str(roc_path)}
