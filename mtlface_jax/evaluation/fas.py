"""Face age synthesis (FAS) metrics and age-progression grids.

The metrics work on arrays that the caller computed with whatever models it
chooses (the AIFR checkpoint or separately given estimators/recognisers):
  * age accuracy: fraction of synthesized faces whose ESTIMATED age group
    equals the TARGET group they were synthesized for;
  * identity preservation: mean cosine similarity between the embedding of the
    input face and that of the face synthesized from it;
each overall and per target group.

Where the true aged face is known (the procedural faces of
``mtlface_jax.synthetic`` redrawn at each group's centre age with the same
identity, pose, light and background), :func:`truth_fas_metrics` scores the
synthesized faces against it:
  * truth gain: ``1 - L1(synthesized, truth) / L1(input, truth)`` over every
    (input, target) pair whose target is not the input's own group (0 = the
    input returned unchanged, 1 = the truth exactly, < 0 = further from the
    truth than the input, e.g. patches), on the face and hair region and on
    the whole image;
  * colour progress: how far the mean hair and skin colours moved from the
    input's toward the truth's (1 = all the way, 0 = not at all);
  * identity: cosine between the embeddings of synthesized and truth faces.
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


# Per-sample L1 and colour statistics need this much mask weight (pixels) to count.
MIN_MASK_PIXELS = 4.0


@dataclasses.dataclass
class TruthFasResult:
  """Synthesized faces scored against the true aged faces; ``to_dict()`` is JSON-ready.

  Ratios are ratios of sums over the scored (input, target) pairs, i.e. the
  fraction of the total L1 distance (or colour change) between input and
  truth that the synthesis removed; pairs far from the truth weigh more, and
  pairs where the truth hardly differs from the input (e.g. ages 20-30 on
  the procedural faces) cannot blow the mean up.

  Attributes:
    truth_gain_region: truth gain on the face and hair region.
    truth_gain_image: truth gain on the whole image.
    hair_colour_progress: progress of the mean hair colour toward the truth's
      (None when no pair shows hair in both input and truth).
    skin_colour_progress: the same for the skin (face outside the hair).
    identity_to_truth: mean cosine of synthesized and truth embeddings (None
      without embeddings).
    identity_input_to_truth: the same for the unchanged input (the baseline).
    num_inputs: input faces.
    num_samples: scored (input, target) pairs (own group excluded).
    per_group: one dict per target group with "group", "label", "count" and
      the fields above (None when the group has no scored pair).
  """
  truth_gain_region: float
  truth_gain_image: float
  hair_colour_progress: Optional[float]
  skin_colour_progress: Optional[float]
  identity_to_truth: Optional[float]
  identity_input_to_truth: Optional[float]
  num_inputs: int
  num_samples: int
  per_group: list[dict[str, Any]]

  def to_dict(self) -> dict[str, Any]:
    """Returns the fields as plain Python types."""
    return dataclasses.asdict(self)


def comparison_masks(input_face, input_hair, truth_face, truth_hair) -> dict[str, np.ndarray]:
  """The weights under which :func:`truth_fas_metrics` compares faces.

  Args:
    input_face, input_hair: [N, H, W] face alpha and hair coverage of the
      inputs, in [0, 1].
    truth_face, truth_hair: [N, G, H, W] the same for the truths.

  Returns:
    ``region`` (face or hair in the input OR the truth: everything ageing may
    change, e.g. a receding hairline), ``hair`` (hair in both) and ``skin``
    (face not under hair, in both), each float32 [N, G, H, W].
  """
  in_face, in_hair = (np.asarray(a, np.float32)[:, None] for a in (input_face, input_hair))
  tr_face, tr_hair = np.asarray(truth_face, np.float32), np.asarray(truth_hair, np.float32)
  if in_face.shape != in_hair.shape or tr_face.shape != tr_hair.shape or (
      in_face.shape[0] != tr_face.shape[0] or in_face.shape[2:] != tr_face.shape[2:]):
    raise ValueError(f"masks disagree: input {in_face.shape[:1] + in_face.shape[2:]}, "
                     f"{in_hair.shape[:1] + in_hair.shape[2:]}; truth {tr_face.shape}, "
                     f"{tr_hair.shape}")
  region = np.maximum(np.maximum(in_face, in_hair), np.maximum(tr_face, tr_hair))
  hair = np.minimum(in_hair, tr_hair)
  skin = np.minimum(in_face * (1 - in_hair), tr_face * (1 - tr_hair))
  return {"region": region, "hair": np.broadcast_to(hair, region.shape),
          "skin": np.broadcast_to(skin, region.shape)}


def _weighted_l1(a, b, weights=None) -> np.ndarray:
  """Mean |a - b| per sample over pixels (weighted) and channels: [N, G, H, W, C] -> [N, G]."""
  diff = np.abs(a - b).mean(axis=-1)
  if weights is None:
    return diff.mean(axis=(-2, -1))
  total = weights.sum(axis=(-2, -1))
  return (diff * weights).sum(axis=(-2, -1)) / np.maximum(total, 1e-12)


def _mean_colours(images, weights) -> tuple[np.ndarray, np.ndarray]:
  """Weighted mean colour per sample ([N, G, C]) and whether it has enough weight."""
  total = weights.sum(axis=(-2, -1))
  colours = np.einsum("nghwc,nghw->ngc", images, weights) / np.maximum(total, 1e-12)[..., None]
  return colours, total >= MIN_MASK_PIXELS


def _colour_terms(inputs, synthesized, truth, weights):
  """(Δsynth · Δtruth, |Δtruth|^2, valid) per sample, Δ measured from the input's colour."""
  c_in, ok = _mean_colours(inputs, weights)
  c_syn, _ = _mean_colours(synthesized, weights)
  c_tr, _ = _mean_colours(truth, weights)
  needed = c_tr - c_in
  return np.sum((c_syn - c_in) * needed, -1), np.sum(needed * needed, -1), ok


def _ratio(num: np.ndarray, den: np.ndarray, keep: np.ndarray) -> Optional[float]:
  """sum(num) / sum(den) over ``keep`` (None when nothing is kept or den is 0)."""
  den_sum = float(den[keep].sum())
  return float(num[keep].sum()) / den_sum if keep.any() and den_sum > 0 else None


def _ratio_gain(num: np.ndarray, den: np.ndarray, keep: np.ndarray) -> Optional[float]:
  """1 - :func:`_ratio` (None where it is None)."""
  ratio = _ratio(num, den, keep)
  return None if ratio is None else 1.0 - ratio


def _mean(values: Optional[np.ndarray], keep: np.ndarray) -> Optional[float]:
  return float(values[keep].mean()) if values is not None and keep.any() else None


def _pair_cosines(a, b, shape) -> Optional[np.ndarray]:
  """Cosines of [N, G, D] (or [N, D], broadcast over G) embeddings -> [N, G]."""
  if a is None or b is None:
    return None
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.ndim == 2:
    a = np.broadcast_to(a[:, None], b.shape)
  if a.shape[:2] != shape or b.shape[:2] != shape:
    raise ValueError(f"embeddings {a.shape} and {b.shape} must be [N, G, D] with "
                     f"[N, G] = {shape}")
  return cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])).reshape(shape)


def truth_fas_metrics(inputs, synthesized, truth, input_groups, masks=None, *,
                      synthesized_embeddings=None, truth_embeddings=None,
                      input_embeddings=None) -> TruthFasResult:
  """Scores synthesized faces against the true faces at the target ages.

  Args:
    inputs: [N, H, W, C] input faces (any fixed scale, e.g. [-1, 1]).
    synthesized: [N, G, H, W, C] input n synthesized for target group g.
    truth: [N, G, H, W, C] the true face of input n at group g's age.
    input_groups: [N] each input's own age group (its pairs are not scored).
    masks: :func:`comparison_masks` output (``region``, ``hair``, ``skin``,
      each [N, G, H, W]); None scores the whole image only.
    synthesized_embeddings: optional [N, G, D] embeddings of ``synthesized``.
    truth_embeddings: optional [N, G, D] embeddings of ``truth``.
    input_embeddings: optional [N, D] embeddings of ``inputs`` (the baseline
      identity_input_to_truth).

  Returns:
    A :class:`TruthFasResult`.

  Raises:
    ValueError: on mismatched shapes or groups outside [0, G).
  """
  synthesized = np.asarray(synthesized, np.float64)
  truth = np.asarray(truth, np.float64)
  inputs = np.asarray(inputs, np.float64)
  if synthesized.ndim != 5 or truth.shape != synthesized.shape or (
      inputs.shape != synthesized.shape[:1] + synthesized.shape[2:]):
    raise ValueError(f"expected inputs [N,H,W,C] and synthesized/truth [N,G,H,W,C] alike, got "
                     f"{inputs.shape}, {synthesized.shape}, {truth.shape}")
  shape = synthesized.shape[:2]
  groups = np.asarray(input_groups).reshape(-1)
  if groups.shape != shape[:1] or groups.min(initial=0) < 0 or groups.max(initial=0) >= shape[1]:
    raise ValueError(f"input_groups must be [N={shape[0]}] in [0, {shape[1]}), got {groups}")
  scored = np.arange(shape[1])[None, :] != groups[:, None]  # [N, G]
  expanded = np.broadcast_to(inputs[:, None], synthesized.shape)
  terms = {"image": (_weighted_l1(synthesized, truth), _weighted_l1(expanded, truth))}
  colour = {}
  if masks is not None:
    weights = {k: np.asarray(masks[k], np.float64) for k in ("region", "hair", "skin")}
    for k, w in weights.items():
      if w.shape != shape + synthesized.shape[2:4]:
        raise ValueError(f"mask {k!r} has shape {w.shape}, expected {shape + synthesized.shape[2:4]}")
    terms["region"] = (_weighted_l1(synthesized, truth, weights["region"]),
                       _weighted_l1(expanded, truth, weights["region"]))
    for part in ("hair", "skin"):
      colour[part] = _colour_terms(expanded, synthesized, truth, weights[part])
  cosines = {"identity_to_truth": _pair_cosines(synthesized_embeddings, truth_embeddings, shape),
             "identity_input_to_truth": _pair_cosines(input_embeddings, truth_embeddings, shape)}
  summary = lambda keep: _truth_summary(terms, colour, cosines, keep)
  labels = group_ranges(shape[1])
  per_group = [{"group": g, "label": labels[g], "count": int(scored[:, g].sum()),
                **summary(scored & (np.arange(shape[1]) == g)[None, :])}
               for g in range(shape[1])]
  overall = summary(scored)
  return TruthFasResult(
      truth_gain_region=overall["truth_gain_region"],
      truth_gain_image=overall["truth_gain_image"],
      hair_colour_progress=overall["hair_colour_progress"],
      skin_colour_progress=overall["skin_colour_progress"],
      identity_to_truth=overall["identity_to_truth"],
      identity_input_to_truth=overall["identity_input_to_truth"],
      num_inputs=int(shape[0]), num_samples=int(scored.sum()), per_group=per_group)


def _truth_summary(terms, colour, cosines, keep) -> dict[str, Optional[float]]:
  """The TruthFasResult fields over the pairs in ``keep`` ([N, G] bool)."""
  out = {f"truth_gain_{k}": None for k in ("region", "image")}
  for k, (synth_l1, input_l1) in terms.items():
    out[f"truth_gain_{k}"] = _ratio_gain(synth_l1, input_l1, keep)
  for part in ("hair", "skin"):
    out[f"{part}_colour_progress"] = None
    if part in colour:
      num, den, ok = colour[part]
      out[f"{part}_colour_progress"] = _ratio(num, den, keep & ok)
  for name, values in cosines.items():
    out[name] = _mean(values, keep)
  return out


def to_uint8_images(images) -> np.ndarray:
  """Maps images in [-1, 1] to uint8 [0, 255] (values outside are clipped)."""
  images = np.asarray(images, np.float32)
  if not np.all(np.isfinite(images)):
    raise ValueError("images contain NaN/inf values")
  return np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def save_age_progression_grid(inputs,
                              synthesized,
                              path,
                              group_labels: Optional[Sequence[str]] = None,
                              truth=None) -> pathlib.Path:
  """Writes a PNG grid: each row is an input face then its G synthesized faces.

  Args:
    inputs: [N, H, W, C] input images in [-1, 1] (C = 1 or 3).
    synthesized: [N, G, H, W, C] synthesized images in [-1, 1].
    path: output PNG path (parent folders are created).
    group_labels: optional G column titles (e.g. ``ages.group_ranges(G)``);
      when given, a header strip of ``HEADER_HEIGHT`` pixels holds "input" and
      these labels.
    truth: optional [N, G, H, W, C] true faces at each group's age in
      [-1, 1]; each synthesized row is then followed by a truth row (its first
      cell white, titled "truth") so the two can be compared column by column.

  Returns:
    The written path. The image is ((G + 1) * W) wide and N * H tall (2 N * H
    with ``truth``; plus the header).

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
  if truth is not None:
    truth = np.asarray(truth)
    if truth.shape != synthesized.shape:
      raise ValueError(f"truth {truth.shape} does not match synthesized {synthesized.shape}")
    blank = np.full_like(tiles[:, :1], 255)
    truth_tiles = np.concatenate([blank, to_uint8_images(truth)], axis=1)
    tiles = np.stack([tiles, truth_tiles], axis=1).reshape((-1,) + tiles.shape[1:])
  rows, columns, height, width, channels = tiles.shape
  canvas = tiles.transpose(0, 2, 1, 3, 4).reshape(rows * height, columns * width, channels)
  if channels == 1:
    canvas = np.repeat(canvas, 3, axis=2)
  grid = Image.fromarray(canvas, "RGB")
  if truth is not None:
    draw = ImageDraw.Draw(grid)
    for row in range(1, rows, 2):
      draw.text((2, row * height + 2), "truth", fill="black", font=ImageFont.load_default())
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
