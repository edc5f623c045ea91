"""Every evaluation protocol, on any embedding function or a loaded model.

:func:`score_pair_list` / :func:`score_bin` score any ``images -> embeddings``
function (e.g. ``runner.embed_fn``). On a :class:`runner.ModelRunner` (each
returns the library's result object):
  * :func:`verify_pairs` / :func:`verify_bin` / :func:`verify_synthetic`:
    the 10-fold verification protocol (``verification.evaluate_verification``);
  * :func:`identify_set` (leave-one-image-out :func:`identify_leave_one_out`
    or leave-one-person-out :func:`identify_leave_one_person_out`) and
    :func:`identify_gallery_probe`: rank-k;
  * :func:`estimate_age`: MAE, group accuracy, CS(5);
  * :func:`face_age_synthesis`: every input synthesized into every age group,
    scored for age accuracy and identity preservation, with PNG grids.

The file-based protocols take an optional :class:`EmbeddingCache`: one cache
shared by every protocol and set of a run decodes and embeds each distinct
``(image file, crop)`` once.

:func:`as_loaded` opens a model from a path, a ``LoadedModel`` or a training
run's in-process variables. The recipes' held-out evaluation (the demo's
too) is ``mtlface_jax.recipes.heldout``.
"""

import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import jax
import numpy as np
from tqdm import tqdm

from mtlface_jax import ages as ages_lib
from mtlface_jax import predict
from mtlface_jax.evaluation import age as age_lib
from mtlface_jax.evaluation import datasets
from mtlface_jax.evaluation import fas as fas_lib
from mtlface_jax.evaluation import identification
from mtlface_jax.evaluation import runner
from mtlface_jax.evaluation import verification
from mtlface_jax.formats import binset
from mtlface_jax.formats import images as images_lib
from mtlface_jax.formats import lists

# --------------------------------------------------------------------------- #
# Embedding each image file once per run.
# --------------------------------------------------------------------------- #


class EmbeddingCache:
  """Embeds (and age-estimates) each distinct image file once per run.

  Several pair lists, a folder scored for identification and for age, and a
  gallery/probe split of one folder often share images; a run that scores
  them all decodes and embeds each ``(file, crop)`` once. Entries are keyed
  by the absolute path and :func:`datasets.crop_key`, so the same file under
  two crops is two entries.

  Args:
    model: the runner.
    with_age: also keep age estimates (one pass through the encoder and the
      age estimator; use it when the run estimates ages), else embeddings
      only (the encoder alone).
  """

  def __init__(self, model: runner.ModelRunner, with_age: bool = False):
    self.model = model
    self.with_age = with_age
    self._rows: dict[tuple[str, str], int] = {}
    self._shapes: dict[tuple[str, str], Optional[tuple[int, int]]] = {}
    self._parts: list[dict[str, np.ndarray]] = []
    self._joined: Optional[dict[str, np.ndarray]] = None
    self.num_requested = 0

  def stats(self) -> dict[str, int]:
    """``{'images_embedded', 'images_requested'}``: distinct vs. asked for."""
    return {"images_embedded": len(self._rows), "images_requested": self.num_requested}

  def encode(self, paths: Sequence[str], lfw_style: bool = False,
             crop: Optional[images_lib.CropBox] = None, need_age: bool = False,
             description: str = "embedding") -> dict[str, np.ndarray]:
    """Embeddings (and ages) of image files, computing only the new ones.

    Args:
      paths: image files (repeats allowed).
      lfw_style: the fixed LFW crop.
      crop: a face box cut out first.
      need_age: also return ``'age'`` and ``'group'`` (needs ``with_age``).
      description: progress bar label.

    Returns:
      ``{'embedding': [N, D]}`` plus ``'age'`` [N] and ``'group'`` [N] with
      ``need_age``, rows in the order of ``paths``.

    Raises:
      ImageDecodeError / ValueError: naming a missing or corrupt file, or a
        crop that does not fit it.
    """
    if need_age and not self.with_age:
      raise ValueError("this cache keeps no ages; make it with with_age=True")
    if not len(paths):
      raise ValueError("no image files to embed")
    cut = datasets.crop_key(lfw_style, crop)
    keys = [(os.path.abspath(p), cut) for p in paths]
    self.num_requested += len(keys)
    new = list(dict.fromkeys(k for k in keys if k not in self._rows))
    if new:
      self._compute(new, lfw_style, crop, description)
    rows = np.asarray([self._rows[k] for k in keys], np.int64)
    return {name: values[rows] for name, values in self._arrays().items()
            if need_age or name == "embedding"}

  def shape_tally(self, paths: Sequence[str], lfw_style: bool = False,
                  crop: Optional[images_lib.CropBox] = None) -> images_lib.ShapeTally:
    """Counts the cached files that were not square or not 112x112 before the resize."""
    cut = datasets.crop_key(lfw_style, crop)
    return datasets.shape_tally((p, self._shapes.get((os.path.abspath(p), cut)))
                                for p in paths)

  def _compute(self, keys, lfw_style, crop, description) -> None:
    """Decodes and runs the model over ``keys`` (new entries), in batches."""
    def faces():
      for key in keys:
        face, shape = datasets.decode_face(key[0], lfw_style, crop)
        self._shapes[key] = shape
        yield datasets.to_model_input(images_lib.resize_image(face, self.model.image_size))

    if self.with_age:
      out = self.model.estimate_ages(faces(), total=len(keys), description=description)
    else:
      out = {"embedding": self.model.embed(faces(), total=len(keys),
                                           description=description)}
    start = len(self._rows)
    self._rows.update((key, start + i) for i, key in enumerate(keys))
    self._parts.append(out)
    self._joined = None

  def _arrays(self) -> dict[str, np.ndarray]:
    if self._joined is None:
      self._joined = {name: np.concatenate([p[name] for p in self._parts])
                      for name in self._parts[0]}
    return self._joined


def face_set_outputs(cache: EmbeddingCache, faces: datasets.FaceSet,
                     need_age: bool = False) -> dict[str, np.ndarray]:
  """A FaceSet's embeddings (and ages): files through the cache, arrays directly."""
  faces.check_files()
  if faces.paths is not None:
    return cache.encode(faces.paths, faces.lfw_style, faces.crop, need_age, faces.name)
  model = cache.model
  if need_age:
    return model.estimate_ages(faces.faces(model.image_size), total=len(faces),
                               description=faces.name)
  return {"embedding": model.embed(faces.faces(model.image_size), total=len(faces),
                                   description=faces.name)}


# --------------------------------------------------------------------------- #
# Scoring any embedding function.
# --------------------------------------------------------------------------- #


def embed_image_files(embed_fn: runner.EmbedFn,
                      paths: Sequence[str],
                      batch_size: int = 64,
                      lfw_style: bool = False,
                      sharding: Optional[jax.sharding.Sharding] = None,
                      progress: bool = True,
                      description: str = "embedding",
                      image_size: int = images_lib.FACE_SIZE) -> np.ndarray:
  """Decodes, crops/resizes to 112x112, scales and embeds image files.

  Args:
    embed_fn: images -> embeddings (e.g. ``runner.embed_fn``).
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
  faces = (datasets.load_face(p, lfw_style, image_size) for p in paths)
  return runner.extract_embeddings(embed_fn, faces, batch_size, sharding=sharding,
                                   progress=progress, description=description,
                                   total=len(paths))


def score_pair_list(embed_fn: runner.EmbedFn,
                     pairs: Sequence[lists.FacePair],
                     batch_size: int = 64,
                     lfw_style: bool = False,
                     eval_folds: Optional[Sequence[int]] = None,
                     sharding: Optional[jax.sharding.Sharding] = None,
                     progress: bool = True,
                     image_size: int = images_lib.FACE_SIZE) -> verification.VerificationResult:
  """Embeds the images of parsed pairs and runs the verification protocol.

  Args:
    embed_fn: images -> embeddings (e.g. ``runner.embed_fn``).
    pairs: from ``formats.lists.parse_lfw_pairs``, ``parse_pair_list`` or
      ``parse_numbered_pairs`` (for ``.bin`` sets use :func:`score_bin`).
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
  datasets.check_pair_files(pairs)
  folds = datasets.pair_folds(pairs)
  unique_paths = sorted({p.path1 for p in pairs} | {p.path2 for p in pairs})
  row = {path: i for i, path in enumerate(unique_paths)}
  embeddings = embed_image_files(embed_fn, unique_paths, batch_size, lfw_style,
                                 sharding, progress, image_size=image_size)
  first = embeddings[[row[p.path1] for p in pairs]]
  second = embeddings[[row[p.path2] for p in pairs]]
  issame = np.asarray([p.issame for p in pairs], bool)
  return verification.evaluate_verification(issame, first, second, folds=folds,
                                            eval_folds=eval_folds)


def score_bin(embed_fn: runner.EmbedFn,
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
        yield datasets.to_model_input(face)

  embeddings = runner.extract_embeddings(embed_fn, faces(), batch_size, sharding=sharding,
                                         progress=progress,
                                         description=os.path.basename(str(bin_path)))
  return verification.evaluate_verification(
      np.asarray(issame, bool), embeddings[0::2], embeddings[1::2],
      folds=np.asarray(folds, np.int64), eval_folds=eval_folds)


# --------------------------------------------------------------------------- #
# Protocols on a loaded model.
# --------------------------------------------------------------------------- #


def verify_pairs(model: runner.ModelRunner, pairs, lfw_style: bool = False,
                 eval_folds=None, crop: Optional[images_lib.CropBox] = None,
                 cache: Optional[EmbeddingCache] = None) -> verification.VerificationResult:
  """Verification on parsed pairs (LFW, generic or numbered lists).

  Args:
    model: the runner of the recognition model.
    pairs: ``formats.lists.FacePair`` entries.
    lfw_style: apply the fixed LFW crop (raw deep-funneled LFW images).
    eval_folds: fold LABELS to evaluate (see ``datasets.resolve_eval_folds``).
    crop: a face box cut out of every image first.
    cache: embeds each image once per run (default: a cache of this call).

  Returns:
    The verification result.
  """
  if eval_folds is not None and all(p.fold >= 0 for p in pairs):
    # Unselected folds play no part in the protocol: do not embed their images.
    wanted = set(int(f) for f in eval_folds)
    pairs = [p for p in pairs if p.fold in wanted] or pairs  # Empty: let the protocol say why.
  if not pairs:
    raise ValueError("the pair list is empty")
  datasets.check_pair_files(pairs)
  cache = cache or EmbeddingCache(model)
  paths = [p.path1 for p in pairs] + [p.path2 for p in pairs]
  embeddings = cache.encode(paths, lfw_style, crop, description="pairs")["embedding"]
  issame = np.asarray([p.issame for p in pairs], bool)
  return verification.evaluate_verification(
      issame, embeddings[:len(pairs)], embeddings[len(pairs):],
      folds=datasets.pair_folds(pairs), eval_folds=eval_folds)


def verify_bin(model: runner.ModelRunner, path, num_folds: int = 10,
               eval_folds=None) -> verification.VerificationResult:
  """Verification on an insightface ``.bin`` set (AgeDB-30, CALFW, CPLFW...)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f".bin set not found: {path}")
  return score_bin(model.embed_fn(), path, model.batch_size, num_folds, eval_folds,
                           model.sharding, model.progress, image_size=model.image_size)


def verify_synthetic(model: runner.ModelRunner, data, eval_folds=None,
                     max_pairs_per_fold: Optional[int] = None
                     ) -> verification.VerificationResult:
  """Verification on a synthetic dataset's held-out test pairs.

  Args:
    model: the runner of the recognition model.
    data: ``mtlface_jax.synthetic.SyntheticFaces`` (``test`` and ``pairs``).
    eval_folds: fold labels to evaluate (None: all).
    max_pairs_per_fold: keep only this many matched/mismatched pairs per fold.

  Returns:
    The verification result.
  """
  pairs, used, row = synthetic_pair_rows(data, max_pairs_per_fold, eval_folds)
  if not len(pairs):
    raise ValueError("the synthetic dataset has no verification pairs (test_fraction=0?)")
  embeddings = model.embed(datasets.array_faces(data.test.images[used], model.image_size),
                           total=len(used), description="synthetic pairs")
  return verification.evaluate_verification(pairs[:, 2].astype(bool), embeddings[row[:, 0]],
                                            embeddings[row[:, 1]], folds=pairs[:, 3],
                                            eval_folds=eval_folds)


def synthetic_pair_rows(data, max_pairs_per_fold: Optional[int] = None, eval_folds=None
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The test pairs of a synthetic dataset and the test images they use, each once.

  Args:
    data: ``mtlface_jax.synthetic.SyntheticFaces``.
    max_pairs_per_fold: keep only this many matched/mismatched pairs per fold.
    eval_folds: fold labels to keep (None: all; none matching: all, so the
      protocol says why).

  Returns:
    ``(pairs, used, rows)``: pair rows ``(a, b, issame, fold)`` [P, 4] (empty
    when the dataset has none), the test images they use [U] and, per pair,
    the positions of its two images in ``used`` [P, 2].
  """
  pairs = datasets.limit_pair_rows(np.asarray(data.pairs), max_pairs_per_fold)
  if eval_folds is not None and len(pairs):
    selected = pairs[np.isin(pairs[:, 3], np.asarray(list(eval_folds)))]
    pairs = selected if len(selected) else pairs
  used = np.unique(pairs[:, :2])
  return pairs, used, np.searchsorted(used, pairs[:, :2])


IDENTIFICATION_METHODS = ("loio", "lopo")


def identify_leave_one_out(model: runner.ModelRunner, faces: datasets.FaceSet,
                           cache: Optional[EmbeddingCache] = None
                           ) -> identification.IdentificationResult:
  """Leave-one-image-out rank-1/rank-5 (the FG-NET protocol) on a labelled set."""
  embeddings = face_set_outputs(cache or EmbeddingCache(model), faces)["embedding"]
  return identification.leave_one_out_identification(embeddings, faces.ids)


def identify_leave_one_person_out(model: runner.ModelRunner, faces: datasets.FaceSet,
                                  cache: Optional[EmbeddingCache] = None
                                  ) -> identification.PersonFoldResult:
  """Leave-one-person-out rank-k on a labelled set (one fold per person).

  The embedding model is fixed (trained on other people), so the pooled
  accuracies equal leave-one-image-out's; the result adds each person's
  accuracy averaged over persons (``mean_person_accuracies``), so a person
  with many photos counts once (see
  ``identification.leave_one_person_out_identification``).
  """
  embeddings = face_set_outputs(cache or EmbeddingCache(model), faces)["embedding"]
  return identification.leave_one_person_out_identification(embeddings, faces.ids)


def identify_set(model: runner.ModelRunner, faces: datasets.FaceSet, method: str = "loio",
                 cache: Optional[EmbeddingCache] = None):
  """Identification within one labelled set: "loio" (per image) or "lopo" (per person)."""
  if method not in IDENTIFICATION_METHODS:
    raise ValueError(f"identification must be one of {IDENTIFICATION_METHODS}, got "
                     f"{method!r}")
  if method == "lopo":
    return identify_leave_one_person_out(model, faces, cache)
  return identify_leave_one_out(model, faces, cache)


def identify_gallery_probe(model: runner.ModelRunner, gallery: datasets.FaceSet,
                           probe: datasets.FaceSet,
                           cache: Optional[EmbeddingCache] = None
                           ) -> identification.IdentificationResult:
  """Rank-1/rank-5 of every probe face against the gallery."""
  cache = cache or EmbeddingCache(model)
  gallery.check_files()
  probe.check_files()
  gallery_embeddings = face_set_outputs(cache, gallery)["embedding"]
  probe_embeddings = face_set_outputs(cache, probe)["embedding"]
  return identification.gallery_probe_identification(gallery_embeddings, gallery.ids,
                                                     probe_embeddings, probe.ids)


def estimate_age(model: runner.ModelRunner, faces: datasets.FaceSet,
                 group_from: str = "head", cs_years: float = 5.0,
                 cache: Optional[EmbeddingCache] = None) -> age_lib.AgeResult:
  """Age estimation metrics (MAE, group accuracy, CS) on faces with known ages.

  Args:
    model: the runner of a model with an age estimator.
    faces: the labelled faces (unknown ages, -1, are ignored and counted).
    group_from: group prediction: "head" (the group classifier) or "age"
      (the group of the expected age).
    cs_years: the cumulative score's tolerance.
    cache: an age-keeping :class:`EmbeddingCache` to share (else one of
      this call).

  Returns:
    The age result.
  """
  if not (faces.ages >= 0).any():
    raise ValueError(f"{faces.name} ({faces.source}) has no face with a known age")
  if cache is None or not cache.with_age:
    cache = EmbeddingCache(model, with_age=True)
  estimates = face_set_outputs(cache, faces, need_age=True)
  groups = runner.estimated_groups(estimates, model.num_groups, group_from)
  return age_lib.age_metrics(estimates["age"], faces.ages, model.num_groups,
                             predicted_groups=groups, cs_years=cs_years)


def face_age_synthesis(generator: runner.ModelRunner, faces: datasets.FaceSet,
                       age_model: runner.ModelRunner, id_model: runner.ModelRunner,
                       output_dir=None, group_from: str = "head", grid_rows: int = 8,
                       grid_faces: int = 16) -> dict[str, Any]:
  """Synthesizes every age group for each face and scores the results.

  The inputs are brought to the generator's input size once; the identity
  model embeds the input at that same size as the synthesized faces, so the
  resolution does not bias identity preservation.

  Args:
    generator: runner of a model with encoder + generator.
    faces: the input faces (labels unused).
    age_model: runner whose age estimator judges the synthesized ages; it must
      use the generator's number of age groups.
    id_model: runner whose encoder embeds inputs and synthesized faces.
    output_dir: where the grid PNGs go (None: no grids).
    group_from: see :func:`estimate_age`.
    grid_rows: inputs per grid image.
    grid_faces: inputs shown in grids in total (the first ones).

  Returns:
    ``{'result': FasResult, 'grids': [PNG paths]}``.
  """
  if age_model.num_groups != generator.num_groups:
    raise ValueError(f"the age estimator has {age_model.num_groups} age groups but the "
                     f"generator {generator.num_groups}; they must match")
  faces.check_files()
  size, chunk = generator.image_size, generator.batch_size
  parts, shown = {"groups": [], "ages": [], "inputs": [], "synthesized": []}, []
  stream = faces.faces(size)
  with tqdm(total=len(faces), desc="face age synthesis", unit="img",
            disable=not generator.progress) as bar:
    while True:
      batch = [face for _, face in zip(range(chunk), stream)]
      if not batch:
        break
      batch = np.stack(batch)
      out = _synthesize_and_score(generator, age_model, id_model, batch, group_from)
      for key in parts:
        parts[key].append(out[key])
      keep = max(0, min(len(batch), grid_faces - sum(len(b) for b, _ in shown)))
      if keep:
        shown.append((batch[:keep], out["images"][:keep]))
      bar.update(len(batch))
  joined = {key: np.concatenate(value) for key, value in parts.items()}
  result = fas_lib.fas_metrics_all_groups(joined["groups"], joined["inputs"],
                                          joined["synthesized"], joined["ages"])
  grids = _write_grids(shown, output_dir, faces.name, generator.num_groups, grid_rows)
  return {"result": result, "grids": grids}


def _synthesize_and_score(generator, age_model, id_model, batch, group_from) -> dict:
  """One chunk of inputs: synthesized images, their groups/ages and embeddings."""
  synthesized = generator.synthesize(batch, progress=False)  # [b, G, S, S, 3]
  count, num_groups = synthesized.shape[:2]
  flat = synthesized.reshape((-1,) + synthesized.shape[2:])
  estimates = age_model.estimate_ages(flat, progress=False)
  groups = runner.estimated_groups(estimates, age_model.num_groups, group_from)
  embedded = id_model.embed(flat, progress=False)
  return {"images": synthesized,
          "groups": groups.reshape(count, num_groups),
          "ages": np.asarray(estimates["age"]).reshape(count, num_groups),
          "inputs": id_model.embed(batch, progress=False),
          "synthesized": embedded.reshape(count, num_groups, -1)}


def _write_grids(shown, output_dir, name: str, num_groups: int, grid_rows: int) -> list[str]:
  """Writes age-progression grids of ``grid_rows`` inputs each."""
  if output_dir is None or not shown:
    return []
  if grid_rows < 1:
    raise ValueError(f"grid_rows must be >= 1, got {grid_rows}")
  inputs = np.concatenate([b for b, _ in shown])
  synthesized = np.concatenate([s for _, s in shown])
  paths = []
  for page, start in enumerate(range(0, len(inputs), grid_rows)):
    path = Path(output_dir) / f"fas_grid_{_slug(name)}_{page:02d}.png"
    fas_lib.save_age_progression_grid(inputs[start:start + grid_rows],
                                      synthesized[start:start + grid_rows], path,
                                      group_labels=ages_lib.group_ranges(num_groups))
    paths.append(str(path))
  return paths


def _slug(name: str) -> str:
  return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "faces"


def as_loaded(model, variables=None, config=None, dtype: Optional[str] = None
              ) -> predict.LoadedModel:
  """A LoadedModel from a path, a LoadedModel, or in-process variables + config."""
  if isinstance(model, predict.LoadedModel):
    return model
  if isinstance(model, (str, os.PathLike)):
    return predict.load(model, dtype or "float32")
  if variables is None or config is None:
    raise ValueError("in-process models need both variables and config")
  return predict.from_variables(variables, config, dtype)
