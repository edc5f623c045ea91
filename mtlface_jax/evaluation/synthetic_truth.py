"""Ground truth for face age synthesis on the procedural faces.

A held-out face of ``mtlface_jax.synthetic`` is redrawn at the centre age of
every age group with its own identity, pose, expression, light, background
and sensor noise: the face the generator should have produced. This module
builds those truths (and the renderer's masks) at the model's input size and
scores synthesized faces against them with
:func:`mtlface_jax.evaluation.fas.truth_fas_metrics`; it knows nothing about
checkpoints or models (the caller synthesizes and embeds).

Typical use (``synthesize`` / ``embed`` from whatever runs the model)::

  truth = build_truth_set(data.test, datasets.spread_indices(len(data.test), 64),
                          image_size=64)
  synthesized = synthesize(truth.inputs)             # [N, G, S, S, 3]
  result = score(truth, synthesized, embed=embed)    # TruthFasResult
"""

import dataclasses
import pathlib
from typing import Callable, Optional

import numpy as np
from PIL import Image

from mtlface_jax import ages as ages_lib
from mtlface_jax import synthetic
from mtlface_jax.evaluation import datasets
from mtlface_jax.evaluation import fas as fas_lib
from mtlface_jax.formats import images as images_lib


@dataclasses.dataclass(frozen=True)
class TruthSet:
  """Inputs, their true faces at every group's centre age, and masks.

  Attributes:
    indices: [N] images of the split used as inputs.
    input_ages: [N] their ages.
    input_groups: [N] their age groups (not scored as targets).
    target_ages: [G] the age each group's truth is drawn at.
    inputs: float32 [N, S, S, 3] in [-1, 1] (the model's input).
    truth: float32 [N, G, S, S, 3] in [-1, 1].
    masks: ``fas.comparison_masks`` at size S (``region``, ``hair``,
      ``skin``: float32 [N, G, S, S]).
  """
  indices: np.ndarray
  input_ages: np.ndarray
  input_groups: np.ndarray
  target_ages: np.ndarray
  inputs: np.ndarray
  truth: np.ndarray
  masks: dict


def _to_model_input(images: np.ndarray, size: int) -> np.ndarray:
  """uint8 [..., 112, 112, 3] -> float32 [..., S, S, 3] in [-1, 1], as evaluation preprocesses."""
  flat = images.reshape((-1,) + images.shape[-3:])
  out = np.stack([datasets.to_model_input(images_lib.resize_image(im, size)) for im in flat])
  return out.reshape(images.shape[:-3] + out.shape[1:])


def _resize_masks(masks: np.ndarray, size: int) -> np.ndarray:
  """float32 [..., 112, 112] in [0, 1] -> [..., S, S] (bilinear, antialiased)."""
  flat = masks.reshape((-1,) + masks.shape[-2:]).astype(np.float32)
  if flat.shape[1:] != (size, size):
    flat = np.stack([np.asarray(Image.fromarray(m, "F").resize((size, size), Image.BILINEAR))
                     for m in flat])
  return np.clip(flat, 0, 1).reshape(masks.shape[:-2] + (size, size))


def build_truth_set(split: synthetic.SplitArrays, indices, image_size: int,
                    num_groups: int = 7, max_age: int = synthetic.MAX_AGE,
                    num_threads: Optional[int] = None) -> TruthSet:
  """Renders the truths of ``split[indices]`` at every group's centre age.

  Args:
    split: a split from ``synthetic.make_dataset`` (it carries its factors).
    indices: [N] input images of the split.
    image_size: the model's input side S.
    num_groups: age groups G.
    max_age: the oldest age of the data (the last group's centre lies halfway
      between its threshold and this).
    num_threads: rendering threads.

  Returns:
    The :class:`TruthSet`.
  """
  indices = np.asarray(indices, np.int64).reshape(-1)
  target_ages = synthetic.group_centre_ages(num_groups, max_age)
  input_ages = split.ages[indices].astype(np.float32)
  # Column 0: each input at its own age (reproduces the split's image; gives
  # the input's masks); columns 1..G: the group centres.
  ages = np.concatenate([input_ages[:, None],
                         np.broadcast_to(target_ages, (len(indices), num_groups))], axis=1)
  drawn = synthetic.render_truth(split, indices, ages, num_threads)
  face = _resize_masks(drawn.face, image_size)
  hair = _resize_masks(drawn.hair, image_size)
  images = _to_model_input(drawn.images, image_size)
  return TruthSet(
      indices=indices, input_ages=input_ages,
      input_groups=np.asarray(ages_lib.age_to_group(input_ages, num_groups), np.int32),
      target_ages=target_ages, inputs=images[:, 0], truth=images[:, 1:],
      masks=fas_lib.comparison_masks(face[:, 0], hair[:, 0], face[:, 1:], hair[:, 1:]))


def score(truth: TruthSet, synthesized,
          embed: Optional[Callable[[np.ndarray], np.ndarray]] = None
          ) -> fas_lib.TruthFasResult:
  """Scores ``synthesized`` [N, G, S, S, 3] (in [-1, 1]) against the truths.

  Args:
    truth: from :func:`build_truth_set`.
    synthesized: the generator's outputs for ``truth.inputs`` at every group.
    embed: optional ``images [B, S, S, 3] -> embeddings [B, D]`` (e.g. the
      checkpoint's encoder); without it the identity fields are None.

  Returns:
    The :class:`~mtlface_jax.evaluation.fas.TruthFasResult`.
  """
  synthesized = np.asarray(synthesized, np.float32)
  embeddings = {}
  if embed is not None:
    n, g = synthesized.shape[:2]
    flat = lambda x: x.reshape((n * g,) + x.shape[2:])
    embeddings = {
        "synthesized_embeddings": np.asarray(embed(flat(synthesized))).reshape(n, g, -1),
        "truth_embeddings": np.asarray(embed(flat(truth.truth))).reshape(n, g, -1),
        "input_embeddings": np.asarray(embed(truth.inputs))}
  return fas_lib.truth_fas_metrics(truth.inputs, synthesized, truth.truth, truth.input_groups,
                                   truth.masks, **embeddings)


def evaluate_truth(runner, split: synthetic.SplitArrays, output_dir=None, *,
                   num_inputs: int = 64, grid_rows: int = 8,
                   name: str = "synthetic_test") -> dict:
  """The ground-truth FAS protocol: synthesize held-out faces, score, draw the grid.

  Args:
    runner: anything with ``image_size``, ``num_groups``, ``synthesize(images)
      -> [N, G, S, S, 3]`` and ``embed(images) -> [N, D]`` (e.g.
      ``evaluation.runner.ModelRunner``).
    split: the held-out split of ``synthetic.make_dataset`` (e.g. ``data.test``).
    output_dir: where ``fas_truth_grid_{name}.png`` goes (None: no grid).
    num_inputs: inputs spread over the split.
    grid_rows: inputs in the grid (spread over the inputs), each as a
      synthesized row over a truth row.
    name: the dataset's name in the file name.

  Returns:
    ``{'result': TruthFasResult, 'grid': PNG path or None, 'indices': [N]}``.
  """
  truth = build_truth_set(split, datasets.spread_indices(len(split), num_inputs),
                          runner.image_size, runner.num_groups)
  synthesized = np.asarray(runner.synthesize(truth.inputs), np.float32)
  result = score(truth, synthesized, embed=runner.embed)
  grid = None
  if output_dir is not None and grid_rows > 0:
    rows = datasets.spread_indices(len(truth.inputs), grid_rows)
    grid = str(fas_lib.save_age_progression_grid(
        truth.inputs[rows], synthesized[rows],
        pathlib.Path(output_dir) / f"fas_truth_grid_{name}.png",
        ages_lib.group_ranges(runner.num_groups), truth=truth.truth[rows]))
  return {"result": result, "grid": grid, "indices": truth.indices}
