"""Face age synthesis (FAS) metrics and age-progression grids.

The metrics work on arrays that the caller computed with whatever models it
chooses (the AIFR checkpoint or separately given estimators/recognisers):
  * age accuracy: fraction of synthesized faces whose ESTIMATED age group
    equals the TARGET group they were synthesized for;
  * identity preservation: mean cosine similarity between the embedding of the
    input face and that of the face synthesized from it;
each overall and per target group.
"""

import dataclasses
import pathlib
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mtlface_jax.ages import group_ranges
from mtlface_jax.evaluation.verification import cosine_similarity

HEADER_HEIGHT = 16  # Pixels above the grid for column labels.


@dataclasses.dataclass
class FasResult:
  """FAS metrics; ``to_dict()`` is JSON-ready.

  Attributes:
    age_accuracy: fraction with estimated group == target group.
    identity_preservation: mean input/synthesized cosine similarity.
    num_samples: number of synthesized faces scored.
    per_group: one dict per target group g in 0..G-1 with "group", "label"
      (age range), "count", "age_accuracy", "identity_preservation" and, when
      estimated ages were given, "mean_estimated_age" (None when count is 0).
  """
  age_accuracy: float
  identity_preservation: float
  num_samples: int
  per_group: list[dict[str, Any]]

  def to_dict(self) -> dict[str, Any]:
    """Returns the fields as plain Python types."""
    return dataclasses.asdict(self)


def fas_metrics(target_groups,
                estimated_groups,
                input_embeddings,
                synthesized_embeddings,
                num_groups: int = 7,
                estimated_ages=None) -> FasResult:
  """Scores synthesized faces, one row per (input, target group) sample.

  Args:
    target_groups: [M] group each face was synthesized for.
    estimated_groups: [M] group an age estimator assigns to each synthesized face.
    input_embeddings: [M, D] embedding of each sample's INPUT face.
    synthesized_embeddings: [M, D] embedding of each synthesized face.
    num_groups: number of age groups G.
    estimated_ages: optional [M] estimated ages of the synthesized faces.

  Returns:
    A :class:`FasResult`.

  Raises:
    ValueError: on unequal lengths, target groups outside [0, G), or invalid
      embeddings.
  """
  targets = np.asarray(target_groups).reshape(-1)
  estimated = np.asarray(estimated_groups).reshape(-1)
  lengths = {"target_groups": targets.size, "estimated_groups": estimated.size,
             "input_embeddings": np.shape(input_embeddings)[0],
             "synthesized_embeddings": np.shape(synthesized_embeddings)[0]}
  if estimated_ages is not None:
    estimated_ages = np.asarray(estimated_ages, np.float64).reshape(-1)
    lengths["estimated_ages"] = estimated_ages.size
  if len(set(lengths.values())) != 1:
    raise ValueError(f"unequal lengths: {lengths}")
  out_of_range = np.flatnonzero((targets < 0) | (targets >= num_groups))
  if out_of_range.size:
    raise ValueError(f"target group {targets[out_of_range[0]]} at index "
                     f"{out_of_range[0]} is outside [0, {num_groups})")
  similarity = cosine_similarity(input_embeddings, synthesized_embeddings)
  correct = estimated == targets
  labels = group_ranges(num_groups)
  per_group = []
  for group in range(num_groups):
    mask = targets == group
    count = int(mask.sum())
    entry = {"group": group, "label": labels[group], "count": count,
             "age_accuracy": float(correct[mask].mean()) if count else None,
             "identity_preservation": float(similarity[mask].mean()) if count else None}
    if estimated_ages is not None:
      entry["mean_estimated_age"] = float(estimated_ages[mask].mean()) if count else None
    per_group.append(entry)
  return FasResult(age_accuracy=float(correct.mean()),
                   identity_preservation=float(similarity.mean()),
                   num_samples=int(targets.size),
                   per_group=per_group)


def fas_metrics_all_groups(estimated_groups,
                           input_embeddings,
                           synthesized_embeddings,
                           estimated_ages=None) -> FasResult:
  """:func:`fas_metrics` when every input was synthesized into every group.

  Args:
    estimated_groups: [N, G] estimated group of input n synthesized to group g.
    input_embeddings: [N, D] embeddings of the inputs.
    synthesized_embeddings: [N, G, D] embeddings of the synthesized faces.
    estimated_ages: optional [N, G] estimated ages of the synthesized faces.

  Returns:
    A :class:`FasResult` over the N * G synthesized faces.
  """
  synthesized = np.asarray(synthesized_embeddings)
  if synthesized.ndim != 3:
    raise ValueError(f"synthesized_embeddings must be [N, G, D], got {synthesized.shape}")
  num_inputs, num_groups, dim = synthesized.shape
  inputs = np.asarray(input_embeddings)
  if inputs.shape != (num_inputs, dim):
    raise ValueError(f"input_embeddings shape {inputs.shape} does not match "
                     f"synthesized_embeddings {synthesized.shape}")
  targets = np.tile(np.arange(num_groups), num_inputs)
  repeated_inputs = np.repeat(inputs, num_groups, axis=0)
  ages = None if estimated_ages is None else np.asarray(estimated_ages).reshape(-1)
  return fas_metrics(targets, np.asarray(estimated_groups).reshape(-1), repeated_inputs,
                     synthesized.reshape(-1, dim), num_groups, ages)


def to_uint8_images(images) -> np.ndarray:
  """Maps images in [-1, 1] to uint8 [0, 255] (values outside are clipped)."""
  images = np.asarray(images, np.float32)
  if not np.all(np.isfinite(images)):
    raise ValueError("images contain NaN/inf values")
  return np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def save_age_progression_grid(inputs,
                              synthesized,
                              path,
                              group_labels: Optional[Sequence[str]] = None) -> pathlib.Path:
  """Writes a PNG grid: each row is an input face then its G synthesized faces.

  Args:
    inputs: [N, H, W, C] input images in [-1, 1] (C = 1 or 3).
    synthesized: [N, G, H, W, C] synthesized images in [-1, 1].
    path: output PNG path (parent folders are created).
    group_labels: optional G column titles (e.g. ``ages.group_ranges(G)``);
      when given, a header strip of ``HEADER_HEIGHT`` pixels holds "input" and
      these labels.

  Returns:
    The written path. The image is ((G + 1) * W) wide and N * H tall (plus the
    header).

  Raises:
    ValueError: on mismatched shapes or label count.
  """
  inputs, synthesized = np.asarray(inputs), np.asarray(synthesized)
  if inputs.ndim != 4 or synthesized.ndim != 5 or inputs.shape[-1] not in (1, 3):
    raise ValueError(f"expected inputs [N,H,W,C] and synthesized [N,G,H,W,C] with "
                     f"C in (1, 3), got {inputs.shape} and {synthesized.shape}")
  num_rows, num_groups = synthesized.shape[:2]
  if synthesized.shape[0] != inputs.shape[0] or synthesized.shape[2:] != inputs.shape[1:]:
    raise ValueError(f"synthesized {synthesized.shape} does not match inputs {inputs.shape}")
  if group_labels is not None and len(group_labels) != num_groups:
    raise ValueError(f"{len(group_labels)} group labels for {num_groups} groups")
  # [N, 1 + G, H, W, C] -> rows of tiles -> one [N*H, (1+G)*W, C] canvas.
  tiles = to_uint8_images(np.concatenate([inputs[:, None], synthesized], axis=1))
  _, columns, height, width, channels = tiles.shape
  canvas = tiles.transpose(0, 2, 1, 3, 4).reshape(num_rows * height, columns * width, channels)
  if channels == 1:
    canvas = np.repeat(canvas, 3, axis=2)
  grid = Image.fromarray(canvas, "RGB")
  if group_labels is not None:
    grid = _with_header(grid, ["input", *group_labels], width)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  grid.save(path, format="PNG")
  return path


def _with_header(grid: Image.Image, titles: Sequence[str], cell_width: int) -> Image.Image:
  """Returns ``grid`` below a white strip holding one title per column."""
  out = Image.new("RGB", (grid.width, grid.height + HEADER_HEIGHT), "white")
  out.paste(grid, (0, HEADER_HEIGHT))
  draw = ImageDraw.Draw(out)
  font = ImageFont.load_default()
  for column, title in enumerate(titles):
    draw.text((column * cell_width + 2, 2), str(title), fill="black", font=font)
  return out
