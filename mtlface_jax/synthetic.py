"""Procedural 112x112 RGB faces: the embedded default dataset.

Faces are drawn with vectorised NumPy from a handful of per-identity factors
(face shape, skin tone, eye spacing/size/colour, brows, nose, mouth, hair colour
and style, moles, freckles, beard, greying and balding tendencies) and age
factors (childhood proportions - big eyes and forehead, short lower face, round
cheeks - then skin texture, wrinkles, sagging, greying and receding hair), plus
per-image nuisance (sub-pixel shift, scale, yaw/pitch of the inner features,
gaze, smile, directional light, exposure, colour cast, background, clothes,
sensor noise). The layout follows the standard 112x112 aligned crop: eyes at
row ~50, mouth at row ~85 for an adult. Measured speed: ~1,700-2,200 images/s
on 2 unloaded cores (``make_dataset(1000, 20)`` in ~12 s).

Everything is a deterministic function of the seed: random draws happen up
front in the calling thread, then chunks of images are rendered in parallel
threads (NumPy releases the GIL inside its array loops).

Typical use::

  data = make_dataset(num_identities=1000, images_per_identity=20, seed=0)
  data.train.images  # uint8 [N, 112, 112, 3]; data.train.ids / ages / genders
  data.pairs         # verification pairs over data.test (10 folds, LFW style)
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import functools
import os

import numpy as np

from mtlface_jax import ages as ages_lib

IMAGE_SIZE = 112
MAX_AGE = 80
_F32 = np.float32
# Pixel position of the canonical face frame's origin (between the cheeks).
_ORIGIN_X, _ORIGIN_Y = 55.5, 57.5
# Aligned crops fix the eyes, so the eyes' canonical height does not change.
_EYE_V = -8.0
_CHUNK = 48  # images per rendering task: large enough to amortise NumPy calls.

_SKIN_PALETTE = np.array([
    [0.98, 0.87, 0.78], [0.93, 0.77, 0.65], [0.84, 0.64, 0.49],
    [0.68, 0.48, 0.34], [0.49, 0.33, 0.23], [0.34, 0.23, 0.16]], _F32)
_HAIR_PALETTE = np.array([
    [0.07, 0.06, 0.06], [0.20, 0.13, 0.08], [0.36, 0.23, 0.13],
    [0.55, 0.40, 0.24], [0.84, 0.70, 0.43], [0.56, 0.23, 0.10]], _F32)
# Hair colour probabilities for the lightest and darkest skin (interpolated).
_HAIR_PROBS_LIGHT = np.array([0.12, 0.24, 0.24, 0.16, 0.15, 0.09])
_HAIR_PROBS_DARK = np.array([0.70, 0.25, 0.05, 0.0, 0.0, 0.0])
_IRIS_PALETTE = np.array([
    [0.22, 0.12, 0.06], [0.40, 0.24, 0.10], [0.45, 0.37, 0.15],
    [0.28, 0.45, 0.24], [0.28, 0.46, 0.72], [0.50, 0.55, 0.60]], _F32)
_IRIS_PROBS_LIGHT = np.array([0.15, 0.2, 0.15, 0.15, 0.25, 0.10])
_IRIS_PROBS_DARK = np.array([0.75, 0.25, 0.0, 0.0, 0.0, 0.0])

# Hair styles. Columns: hairline (canonical v of the fringe), side_len (how far
# down the side hair falls in front of the face), back_len (hair behind the
# neck; -99 = none), alpha (coverage), curl (boundary waviness), extra volume.
SHORT, SIDE_PART, LONG, BANGS, BUZZ, CURLY = range(6)
_STYLE_TABLE = np.array([
    [-29.0, -6.0, -99.0, 1.00, 0.0, 0.0],
    [-31.0, 0.0, -99.0, 1.00, 0.0, 2.0],
    [-30.0, 48.0, 52.0, 1.00, 0.0, 2.0],
    [-17.0, 22.0, 30.0, 1.00, 0.0, 2.0],
    [-31.0, -6.0, -99.0, 0.45, 0.0, -2.0],
    [-30.0, 6.0, 10.0, 1.00, 1.0, 6.0]], _F32)
_STYLE_PROBS_MALE = np.array([0.36, 0.30, 0.04, 0.05, 0.15, 0.10])
_STYLE_PROBS_FEMALE = np.array([0.05, 0.15, 0.45, 0.20, 0.0, 0.15])


@dataclasses.dataclass(frozen=True)
class IdentityParams:
  """Per-identity appearance factors, one row per identity (struct of arrays).

  Lengths are in pixels of the 112x112 canonical frame for an adult face;
  colours are RGB in [0, 1]. ``take`` gathers rows, e.g. one per image.
  """
  gender: np.ndarray          # int32, 1 male, 0 female.
  face_width: np.ndarray      # Half-width of the face.
  face_top: np.ndarray        # Cranium half-height above the face centre.
  face_bottom: np.ndarray     # Chin distance below the face centre.
  jaw_taper: np.ndarray       # 0 = round/square jaw, 0.6 = pointed chin.
  skin: np.ndarray            # [N, 3].
  eye_spacing: np.ndarray     # Distance between the eye centres.
  eye_width: np.ndarray       # Half-width of an eye.
  eye_openness: np.ndarray    # Eye half-height / half-width.
  iris: np.ndarray            # [N, 3].
  brow_gap: np.ndarray        # Brow height above the top of the eye.
  brow_thickness: np.ndarray
  brow_arch: np.ndarray
  brow_slant: np.ndarray
  nose_length: np.ndarray     # Eye line to nose tip.
  nose_width: np.ndarray
  mouth_gap: np.ndarray       # Nose tip to mouth line.
  mouth_width: np.ndarray     # Half-width of the mouth.
  lip_thickness: np.ndarray
  lips: np.ndarray            # [N, 3].
  hair: np.ndarray            # [N, 3].
  hair_style: np.ndarray      # int32 index into the style table.
  hair_volume: np.ndarray
  hairline_shift: np.ndarray
  hair_part: np.ndarray       # Fringe slope: side parting direction/strength.
  hair_arch: np.ndarray       # How much the hairline drops towards the sides.
  hair_length: np.ndarray     # Extra length of long styles.
  grey_onset: np.ndarray      # Age at which hair starts greying.
  grey_span: np.ndarray       # Years from onset to fully grey.
  balding: np.ndarray         # 0..1 tendency of the hairline to recede.
  beard: np.ndarray           # 0..1 beard density (adult men only).
  mole: np.ndarray            # [N, 3]: u, v, radius (radius 0 = no mole).
  freckles: np.ndarray        # 0..1 freckle strength.
  freckle_offset: np.ndarray  # [N, 2] int32: where in the texture bank.
  wrinkle_rate: np.ndarray    # Multiplies the age-driven wrinkle depth.
  cheek_fat: np.ndarray       # Cheek roundness.

  def __len__(self) -> int:
    return len(self.gender)

  def take(self, index) -> "IdentityParams":
    """Returns the rows ``index`` (an integer array) of every field."""
    return IdentityParams(**{
        f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)})


@dataclasses.dataclass(frozen=True)
class RenderFactors:
  """Everything but the age that decides each image of a split.

  ``render_with_nuisance(identities.take(i), age, take_nuisance(nuisance, i))``
  redraws image ``i`` at any age with the same identity, pose, light,
  background and noise (see :func:`render_truth`).
  """
  identities: IdentityParams       # One row per image.
  nuisance: dict[str, np.ndarray]  # From sample_nuisance, one row per image.

  def __len__(self) -> int:
    return len(self.identities)


@dataclasses.dataclass(frozen=True)
class SplitArrays:
  """One split of rendered faces with labels (and the factors behind them)."""
  images: np.ndarray   # uint8 [N, 112, 112, 3].
  ids: np.ndarray      # int32 [N].
  ages: np.ndarray     # float32 [N], whole years in [0, max_age].
  genders: np.ndarray  # int32 [N], 1 male, 0 female.
  factors: RenderFactors | None = None  # None for splits built by hand.

  def __len__(self) -> int:
    return len(self.ids)


@dataclasses.dataclass(frozen=True)
class SyntheticFaces:
  """A rendered dataset: train/test splits with disjoint identities + pairs.

  ``pairs`` is int32 [P, 4]: (index_a, index_b, issame, fold) with indices into
  ``test``; ``num_train_identities`` is the CosFace class count (train ids are
  0..num_train_identities-1, test ids follow).
  """
  train: SplitArrays
  test: SplitArrays
  pairs: np.ndarray
  num_train_identities: int
  seed: int


def growth(ages) -> np.ndarray:
  """Childhood development in [0, 1]: 0 at birth, ~0.75 at 10, 1 from 20."""
  ages = np.asarray(ages, _F32)
  return np.clip((1 - np.exp(-ages / 6.5)) / (1 - np.exp(-20 / 6.5)), 0, 1)


def senescence(ages) -> np.ndarray:
  """Ageing in [0, 1]: 0 up to 30, then linear to 1 at 80."""
  return np.clip((np.asarray(ages, _F32) - 30) / 50, 0, 1)


def _categorical(rng, probs_light, probs_dark, mix) -> np.ndarray:
  """Draws one category per row from probabilities interpolated by ``mix``."""
  probs = (1 - mix[:, None]) * probs_light + mix[:, None] * probs_dark
  cdf = np.cumsum(probs / probs.sum(1, keepdims=True), axis=1)
  draws = rng.uniform(size=len(mix))
  return np.minimum((draws[:, None] > cdf).sum(1), probs.shape[1] - 1)


def _interp_palette(palette, t) -> np.ndarray:
  """Piecewise-linear colour ramp through ``palette`` at t in [0, 1]."""
  pos = np.clip(t, 0, 1) * (len(palette) - 1)
  lo = np.minimum(pos.astype(int), len(palette) - 2)
  frac = (pos - lo)[:, None]
  return palette[lo] * (1 - frac) + palette[lo + 1] * frac


def _sample_colours(rng: np.random.Generator, male: np.ndarray
                    ) -> dict[str, np.ndarray]:
  """Skin, hair, iris and lip colours and freckles, correlated like people's:
  darker skin comes with darker hair and eyes, freckles with lighter skin."""
  n = len(male)
  skin_t = rng.beta(1.3, 1.5, n)
  skin = np.clip(_interp_palette(_SKIN_PALETTE, skin_t)
                 + rng.normal(0, 0.02, (n, 3)), 0, 1)
  darkness = np.clip(skin_t * 1.6 - 0.4, 0, 1)
  hair = _HAIR_PALETTE[_categorical(rng, _HAIR_PROBS_LIGHT, _HAIR_PROBS_DARK,
                                    darkness)]
  hair = np.clip(hair * rng.uniform(0.85, 1.15, (n, 1)), 0, 1)
  iris = _IRIS_PALETTE[_categorical(rng, _IRIS_PROBS_LIGHT, _IRIS_PROBS_DARK,
                                    darkness)]
  lipstick = (rng.uniform(size=n) < 0.35 * (1 - male))[:, None]
  lips = np.where(lipstick, np.array([0.70, 0.14, 0.20]),
                  skin * np.array([0.86, 0.58, 0.58]))
  freckles = np.where((rng.uniform(size=n) < 0.25) & (skin_t < 0.45),
                      rng.uniform(0.3, 1.0, n), 0)
  return {k: v.astype(_F32) for k, v in (
      ('skin', skin), ('hair', hair), ('iris', iris), ('lips', lips),
      ('freckles', freckles))}


def sample_identities(num_identities: int,
                      rng: np.random.Generator) -> IdentityParams:
  """Draws ``num_identities`` random identities.

  Args:
    num_identities: how many identities.
    rng: NumPy generator; the result is a deterministic function of its state.

  Returns:
    IdentityParams with one row per identity.
  """
  n = num_identities
  gender = rng.integers(0, 2, n).astype(np.int32)
  male = gender.astype(_F32)

  def unif(lo, hi, shape=None):
    return rng.uniform(lo, hi, n if shape is None else shape).astype(_F32)

  def sometimes(probability, lo, hi):
    return np.where(rng.uniform(size=n) < probability, unif(lo, hi), 0)

  colours = _sample_colours(rng, male)
  style = np.where(
      male > 0, _categorical(rng, _STYLE_PROBS_MALE, _STYLE_PROBS_MALE, male),
      _categorical(rng, _STYLE_PROBS_FEMALE, _STYLE_PROBS_FEMALE, male))
  mole = np.stack([unif(-26, 26), unif(-24, 34), sometimes(0.5, 1.1, 2.1)], 1)
  return IdentityParams(
      gender=gender,
      face_width=unif(37, 44) + 1.5 * male, face_top=unif(49, 56),
      face_bottom=unif(43, 50) + 1.5 * male,
      jaw_taper=unif(0.2, 0.55) - 0.12 * male,
      eye_spacing=unif(30, 38), eye_width=unif(5.6, 7.6),
      eye_openness=unif(0.40, 0.62),
      brow_gap=unif(3.5, 7.0), brow_thickness=unif(1.3, 2.6) + 0.7 * male,
      brow_arch=unif(0.3, 2.5), brow_slant=unif(-0.15, 0.2),
      nose_length=unif(17, 22), nose_width=unif(4.0, 6.5) + 0.6 * male,
      mouth_gap=unif(12, 17), mouth_width=unif(9.5, 14.0),
      lip_thickness=unif(1.6, 3.2) - 0.4 * male,
      hair_style=style.astype(np.int32), hair_volume=unif(0.5, 3.5),
      hairline_shift=unif(-3, 3), hair_part=unif(-0.35, 0.35),
      hair_arch=unif(0, 7), hair_length=unif(-10, 15),
      grey_onset=unif(30, 58), grey_span=unif(12, 35),
      balding=(male * sometimes(0.5, 0.4, 1.0)).astype(_F32),
      beard=(male * sometimes(0.35, 0.3, 0.8)).astype(_F32),
      mole=mole.astype(_F32),
      freckle_offset=rng.integers(0, 120, (n, 2)).astype(np.int32),
      wrinkle_rate=unif(0.6, 1.4), cheek_fat=unif(0.0, 1.0), **colours)


def _age_geometry(p: IdentityParams, ages: np.ndarray) -> dict[str, np.ndarray]:
  """Turns identity factors and ages into per-image geometry and colours."""
  g, s = growth(ages), senescence(ages)
  male = p.gender.astype(_F32)
  geo = {
      'width': p.face_width * (1.05 - 0.05 * g) * (1 + 0.03 * s),
      'top': p.face_top * (1.16 - 0.16 * g),
      'bottom': p.face_bottom * (0.72 + 0.28 * g) * (1 + 0.04 * s),
      'taper': p.jaw_taper * (0.35 + 0.65 * g) * (1 - 0.3 * s),
      'eye_spacing': p.eye_spacing * (0.94 + 0.06 * g),
      'eye_width': p.eye_width * (1.3 - 0.3 * g),
      'iris_ratio': 0.62 - 0.1 * g,
      'brow_gap': p.brow_gap * (0.8 + 0.2 * g) - 1.2 * s,
      'brow_thickness': p.brow_thickness * (0.6 + 0.4 * g) * (1 + 0.15 * s),
      'brow_alpha': 0.3 + 0.65 * g,
      'nose_v': _EYE_V + p.nose_length * (0.62 + 0.38 * g) * (1 + 0.07 * s),
      'nose_width': p.nose_width * (0.68 + 0.32 * g) * (1 + 0.1 * s),
      'mouth_width': p.mouth_width * (0.72 + 0.28 * g),
      'lip_thickness': p.lip_thickness * (0.8 + 0.2 * g) * (1 - 0.4 * s),
      'hair_alpha': np.clip(0.15 + ages / 2.5, 0.15, 1.0),
      'beard_alpha': p.beard * np.clip((ages - 16) / 8, 0, 1),
      'wrinkles': p.wrinkle_rate * s ** 1.2,
      'folds': (0.2 + 0.8 * s) * g ** 2,
      'texture': 0.012 + 0.02 * s,
      'blush': 0.28 * (1 - g) + 0.08 * (1 - male) * g,
      'mole_alpha': np.clip((ages - 2) / 8, 0, 1) * (p.mole[:, 2] > 0),
      'freckles': p.freckles * (1 - 0.5 * s) * np.clip(ages / 6, 0, 1),
      'cheeks': p.cheek_fat * (0.4 + 0.6 * (1 - g)) + 0.6 * (1 - g),
      'growth': g, 'sag': s, 'spots': 0.3 * s ** 2,
  }
  geo['eye_height'] = geo['eye_width'] * p.eye_openness * (1 - 0.25 * s)
  geo['mouth_v'] = (geo['nose_v'] + p.mouth_gap * (0.62 + 0.38 * g)
                    + 1.5 * s)
  geo['hairline'] = (_STYLE_TABLE[p.hair_style, 0] + p.hairline_shift
                     - 18 * p.balding * s - 6 * (1 - g))
  geo['crown_alpha'] = 1 - 0.85 * p.balding * np.clip(s * 1.5 - 0.3, 0, 1)
  geo['hair'] = _hair_colour(p, ages, g)
  # Children are a little pinker, the old a little paler and sallower.
  pink = np.array([0.04, -0.02, -0.01], _F32)
  sallow = np.array([-0.02, -0.03, -0.06], _F32)
  geo['skin'] = np.clip(p.skin + (1 - g)[:, None] * pink
                        + s[:, None] * sallow, 0, 1)
  # Lipstick only from the teens; natural lips are a redder, darker skin.
  natural = geo['skin'] * np.array([0.86, 0.58, 0.58], _F32)
  grown_up = np.clip((ages - 14) / 4, 0, 1)[:, None]
  geo['lips'] = natural + (p.lips - natural) * grown_up
  return {k: np.asarray(v, _F32) for k, v in geo.items()}


def _hair_colour(p: IdentityParams, ages, g) -> np.ndarray:
  """Hair colour with toddler lightening and age-driven greying."""
  blonde = np.array([0.80, 0.66, 0.42], _F32)
  light_mix = (0.35 * (1 - g))[:, None]
  hair = p.hair * (1 - light_mix) + blonde * light_mix
  grey_frac = np.clip((ages - p.grey_onset) / p.grey_span, 0, 1) ** 0.8
  grey = np.where((grey_frac > 0.7)[:, None], [0.88, 0.88, 0.86],
                  [0.62, 0.61, 0.60]).astype(_F32)
  return hair * (1 - grey_frac[:, None]) + grey * grey_frac[:, None]


def sample_nuisance(num_images: int,
                    rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Draws per-image nuisance: pose, expression, lighting, background, noise.

  Pose is a sub-pixel shift, a scale, and yaw/pitch offsets of the inner
  features against the outline (in-plane roll is left out: aligned crops
  remove it, and without it the canonical coordinates are separable, which
  makes every layer several times cheaper to draw).

  Args:
    num_images: number of images.
    rng: NumPy generator.

  Returns:
    A dict of float32/int32 arrays with a leading dimension ``num_images``.
  """
  n = num_images
  normal = lambda sd, lim: np.clip(rng.normal(0, sd, n), -lim, lim)
  light_angle = rng.uniform(0, 2 * np.pi, n)
  out = {
      'shift_x': normal(1.6, 4.0), 'shift_y': normal(1.6, 4.0),
      'scale': 1 + normal(0.035, 0.08), 'yaw': normal(1.3, 3.0),
      'pitch': normal(0.8, 2.0),
      'gaze': rng.uniform(-0.8, 0.8, (n, 2)),
      'smile': rng.uniform(-0.5, 1.5, n),
      'light': np.stack([np.cos(light_angle), np.sin(light_angle)], 1)
               * rng.uniform(0.0, 0.28, (n, 1)),
      'brightness': rng.uniform(0.82, 1.12, n),
      'tint': rng.normal(1, 0.035, (n, 3)),
      'background': rng.uniform(0.05, 0.95, (n, 2, 3)),
      'shirt': rng.uniform(0.05, 0.9, (n, 3)),
      'noise_sigma': rng.uniform(0.008, 0.03, n),
      'noise_offset': rng.integers(0, _BANK_SIZE - IMAGE_SIZE, (n, 2)),
  }
  return {k: (v.astype(np.int32) if v.dtype.kind == 'i' else v.astype(_F32))
          for k, v in out.items()}


_BANK_SIZE = 256


@functools.lru_cache(maxsize=1)
def _texture_banks() -> dict[str, np.ndarray]:
  """Fixed noise textures shared by all images (white, blotchy, streaks)."""
  rng = np.random.default_rng(20210621)
  white = rng.standard_normal((_BANK_SIZE, _BANK_SIZE)).astype(_F32)

  def blur(x, axis, radius, passes):
    for _ in range(passes):  # Repeated box blurs approximate a Gaussian.
      x = sum(np.roll(x, d, axis) for d in range(-radius, radius + 1))
    return x / x.std()

  blotchy = blur(blur(white, 0, 1, 3), 1, 1, 3)
  streaks = blur(blur(white, 0, 4, 3), 1, 0, 1)  # Smooth along rows only.
  return {'white': white, 'blotchy': blotchy.astype(_F32),
          'streaks': streaks.astype(_F32)}


def _col(x) -> np.ndarray:
  """[B] parameters -> [B, 1, 1] to broadcast over an image window."""
  x = np.asarray(x, _F32)
  return x if x.ndim == 0 else x[:, None, None]


def _sat(x: np.ndarray) -> np.ndarray:
  """Clips to [0, 1] in place (saves a temporary per call)."""
  return np.clip(x, 0, 1, out=x)


def _ramp(x) -> np.ndarray:
  """Clips to [0, 1], not in place (for small vectors)."""
  return np.clip(x, 0, 1)


def _ellipse(u, v, cu, cv, ru, rv, edge=1.0) -> np.ndarray:
  """Soft inside-ness (0..1) of per-image ellipses, ~``edge`` px anti-aliased.

  ``u`` is [B, 1, w] and ``v`` [B, h, 1], so all per-pixel work is a single
  broadcast add and a clip.
  """
  ru, rv = np.asarray(ru, _F32), np.asarray(rv, _F32)
  k = _col((ru + rv) / (4 * edge))
  du = (u - _col(cu)) / _col(ru)
  dv = (v - _col(cv)) / _col(rv)
  return _sat((k + 0.5 - k * du * du) - k * dv * dv)


def _band(distance, half_width) -> np.ndarray:
  """Soft 0..1 mask of pixels within ``half_width`` of a curve."""
  out = np.abs(distance)
  np.subtract(_col(half_width) + 0.5, out, out=out)
  return _sat(out)


def _sliding_windows(arr: np.ndarray, h: int, w: int) -> np.ndarray:
  """Writeable view [..., H-h+1, W-w+1, h, w] of all windows of ``arr``.

  Only ever written through for windows of different images, which never
  overlap in memory.
  """
  strides = arr.strides
  shape = arr.shape[:-2] + (arr.shape[-2] - h + 1, arr.shape[-1] - w + 1, h, w)
  return np.lib.stride_tricks.as_strided(arr, shape, strides + strides[-2:],
                                         writeable=True)


class _Surface:
  """Pixels being drawn: a window view of the canvas or per-image patches.

  ``img`` is [3, B, h, w] (planar), ``u`` [B, 1, w] and ``v`` [B, h, 1] the
  canonical coordinates, ``face`` the face alpha [B, h, w] once drawn.
  """

  def __init__(self, img, u, v, face, box=None, commit=None):
    self.img, self.u, self.v, self.box = img, u, v, box
    self._face = face  # An array, or a function gathering it on first use.
    self._commit = commit
    self.images = self.origin = None  # Set for patches.

  @property
  def face(self) -> np.ndarray:
    """Face alpha [B, h, w] under this surface."""
    if callable(self._face):
      self._face = self._face()
    return self._face

  @property
  def shape(self) -> tuple[int, int]:
    """(h, w) of the surface."""
    return self.img.shape[-2:]

  def blend(self, alpha: np.ndarray, colour, texture=None) -> None:
    """Alpha-composites a colour ([3] or [B, 3]), optionally modulated per
    pixel by ``texture`` [B, h, w]."""
    colour = np.broadcast_to(np.asarray(colour, _F32), (self.img.shape[1], 3))
    tmp = np.empty(np.broadcast_shapes(alpha.shape, self.img.shape[1:]), _F32)
    for c in range(3):
      img = self.img[c]
      if texture is None:
        np.subtract(_col(colour[:, c]), img, out=tmp)
      else:
        np.multiply(_col(colour[:, c]), texture, out=tmp)
        tmp -= img
      tmp *= alpha
      img += tmp

  def shade(self, factor: np.ndarray) -> None:
    """Multiplies by a per-pixel brightness factor [B, h, w]."""
    for c in range(3):
      self.img[c] *= factor

  def done(self) -> None:
    """Writes patches back into the canvas (windows are views: no-op)."""
    if self._commit is not None:
      self._commit(self.img)


class _Canvas:
  """A chunk of images being drawn, with per-image canonical coordinates.

  Canonical u depends only on the column and v only on the row. Large layers
  are drawn in the smallest window holding their canonical box for all images
  of the chunk; small features in same-sized per-image patches.
  """

  def __init__(self, nuisance: dict[str, np.ndarray], size: int = IMAGE_SIZE):
    self.size = size
    self.cx = _ORIGIN_X + nuisance['shift_x']
    self.cy = _ORIGIN_Y + nuisance['shift_y']
    self.scale = nuisance['scale']
    self.noise_offset = nuisance['noise_offset']
    grid = np.arange(size, dtype=_F32)
    self.u = (grid[None, None, :] - _col(self.cx)) / _col(self.scale)
    self.v = (grid[None, :, None] - _col(self.cy)) / _col(self.scale)
    # Planar [channel, image, row, column]: windows stay contiguous in rows.
    self.img = np.empty((3, len(self.cx), size, size), _F32)
    # Additive noise (sensor grain), drawn at the end.
    self.grain = _bank_crops('white', self.noise_offset[:, 0],
                            self.noise_offset[:, 1], size, size)
    self.grain = self.grain * _col(nuisance['noise_sigma'])
    self.face = np.zeros((len(self.cx), size, size), _F32)
    # Hair coverage (front and back hair), for the masks of render_truth.
    self.hair = np.zeros((len(self.cx), size, size), _F32)

  def add_hair(self, surface: _Surface, alpha: np.ndarray) -> None:
    """Records hair coverage ``alpha`` drawn on a window ``surface``."""
    rows, cols = surface.box
    window = self.hair[:, rows, cols]
    np.maximum(window, alpha, out=window)

  def window(self, umin, umax, vmin, vmax, margin: float = 1.5):
    """A view surface covering a canonical box in every image (or None)."""
    x0 = max(int(np.floor(np.min(self.cx + self.scale * umin) - margin)), 0)
    x1 = min(int(np.ceil(np.max(self.cx + self.scale * umax) + margin)) + 1,
             self.size)
    y0 = max(int(np.floor(np.min(self.cy + self.scale * vmin) - margin)), 0)
    y1 = min(int(np.ceil(np.max(self.cy + self.scale * vmax) + margin)) + 1,
             self.size)
    if x0 >= x1 or y0 >= y1:
      return None
    rows, cols = slice(y0, y1), slice(x0, x1)
    return _Surface(self.img[:, :, rows, cols], self.u[:, :, cols],
                    self.v[:, rows, :], self.face[:, rows, cols], (rows, cols))

  def patch(self, cu, cv, half_u, half_v, images=None,
            margin: float = 1.5) -> _Surface:
    """Per-image patches of one size centred on canonical (cu[b], cv[b]).

    Args:
      cu, cv, half_u, half_v: centre and half extents, per image of
        ``images`` (or scalars).
      images: indices of the chunk's images to cover (default: all).
      margin: extra pixels around the extents.

    Returns:
      A _Surface; call ``done()`` to write it back.
    """
    images = np.arange(len(self.cx)) if images is None else images
    cx, cy, scale = self.cx[images], self.cy[images], self.scale[images]
    smax = float(np.max(scale))
    w = min(int(np.ceil(2 * (np.max(half_u) * smax + margin))) + 1, self.size)
    h = min(int(np.ceil(2 * (np.max(half_v) * smax + margin))) + 1, self.size)
    x0 = np.clip(np.round(cx + scale * cu - w / 2), 0, self.size - w)
    y0 = np.clip(np.round(cy + scale * cv - h / 2), 0, self.size - h)
    x0, y0 = x0.astype(np.int32), y0.astype(np.int32)
    # Gather/scatter through a strided view of all h x w windows: copies whole
    # rows, ~8x faster than per-pixel fancy indexing.
    img_windows = _sliding_windows(self.img, h, w)
    face_windows = _sliding_windows(self.face, h, w)
    u = (x0[:, None, None] + np.arange(w) - _col(cx)) / _col(scale)
    v = (y0[:, None, None] + np.arange(h)[:, None] - _col(cy)) / _col(scale)

    def commit(img):
      img_windows[:, images, y0, x0] = img

    surface = _Surface(img_windows[:, images, y0, x0], u.astype(_F32),
                       v.astype(_F32),
                       lambda: face_windows[images, y0, x0],
                       commit=commit)
    surface.origin, surface.images = (y0, x0), images
    return surface

  def crops(self, bank: str, surface: _Surface) -> np.ndarray:
    """Per-image crops of a texture bank aligned with a surface -> [B, h, w].

    Each image reads the bank at its own random offset, so textures differ
    between images but stay put relative to the pixels.
    """
    h, w = surface.shape
    if surface.images is None:
      start_y = self.noise_offset[:, 0] + surface.box[0].start
      start_x = self.noise_offset[:, 1] + surface.box[1].start
    else:
      start_y = self.noise_offset[surface.images, 0] + surface.origin[0]
      start_x = self.noise_offset[surface.images, 1] + surface.origin[1]
    return _bank_crops(bank, start_y, start_x, h, w)


def _bank_crops(bank: str, start_y, start_x, h: int, w: int) -> np.ndarray:
  """Crops [B, h, w] of a texture bank at per-image (clipped) starts."""
  tex = _texture_banks()[bank]
  start_y = np.clip(start_y, 0, _BANK_SIZE - h)
  start_x = np.clip(start_x, 0, _BANK_SIZE - w)
  return _sliding_windows(tex, h, w)[start_y, start_x]


def _draw_background(cv: _Canvas, nu) -> None:
  """A vertical two-colour gradient per image."""
  ramp = np.linspace(0, 1, cv.size, dtype=_F32)[None, :, None]
  for c in range(3):
    top = _col(nu['background'][:, 0, c])
    bottom = _col(nu['background'][:, 1, c])
    cv.img[c] = top + (bottom - top) * ramp


def _hair_shape(p: IdentityParams, geo) -> dict[str, np.ndarray]:
  """Per-image hair extents from the style table and identity factors."""
  style = _STYLE_TABLE[p.hair_style]
  extra = p.hair_volume + style[:, 5]
  long_side = style[:, 1] > 20
  return {
      'wide': geo['width'] + extra, 'tall': geo['top'] + extra,
      'side_len': style[:, 1] + np.where(long_side, p.hair_length, 0),
      'back_len': np.where(style[:, 2] > -50, style[:, 2] + p.hair_length, -99),
      'alpha': geo['hair_alpha'] * style[:, 3], 'curl': style[:, 4],
  }


def _draw_back_hair(cv: _Canvas, hair, geo) -> None:
  """Hair behind the neck and shoulders, for the long styles."""
  back_len = hair['back_len']
  if back_len.max() < -50:
    return
  wide = hair['wide'] + 1
  s = cv.window(-wide.max(), wide.max(), 0, back_len.max())
  if s is None:
    return
  # Only below the crown: above it the front hair's cap covers the same area.
  # Every layer ends at its own canonical extent, never at the edge of the
  # chunk's shared window, so an image does not depend on its chunk-mates.
  rounded = _ramp((_col(back_len) - s.v) * 0.15) ** 0.5 * _col(back_len > -50)
  rounded *= _ramp(s.v + 0.5)
  alpha = _ramp(_col(wide) + 0.5 - np.abs(s.u))
  alpha = alpha * (rounded * _col(hair['alpha']))
  s.blend(alpha, geo['hair'] * 0.7)
  cv.add_hair(s, alpha)


def _draw_neck_and_shirt(cv: _Canvas, geo, nu) -> None:
  """Neck (a shaded column below the jaw) and shoulders in a shirt colour."""
  half, neck_top = geo['width'] * 0.5, geo['bottom'] * 0.55
  s = cv.window(-half.max(), half.max(), neck_top.min(), 90)
  if s is not None:
    s.blend(_ramp(_col(half) + 0.5 - np.abs(s.u))
            * _ramp(s.v - _col(neck_top) + 0.5), geo['skin'] * 0.74)
  top = geo['bottom'] + 7
  s = cv.window(-90, 90, top.min() - 2, 90)
  if s is not None:
    shoulders = _ellipse(s.u, s.v, 0, top + 30, geo['width'] * 1.9, 32)
    s.blend(shoulders, nu['shirt'])


def _draw_ears(cv: _Canvas, geo, nu) -> None:
  """Ears at the sides, between eye and nose height (behind the face)."""
  centre_v = (_EYE_V + geo['nose_v']) / 2 + nu['pitch']
  ru = geo['width'] * 0.11
  rv = (geo['nose_v'] - _EYE_V) * 0.55
  for side in (-1, 1):
    cu = side * geo['width'] * 0.97
    s = cv.patch(cu, centre_v, ru, rv)
    outer = _ellipse(s.u, s.v, cu, centre_v, ru, rv)
    inner = _ellipse(s.u, s.v, cu + side * 0.8, centre_v, ru * 0.5, rv * 0.6)
    s.blend(outer, geo['skin'] * 0.9, texture=1 - 0.22 * inner)
    s.done()


def _face_field(u, v, geo) -> np.ndarray:
  """Implicit face outline: < 1 inside. Cranium above, tapered jaw below."""
  bottom = _col(geo['bottom'])
  t = _ramp(v / bottom)
  half_width = _col(geo['width']) * (
      1 - _col(geo['taper']) * t * t + _col(geo['cheeks']) * 0.24 * t * (1 - t))
  vn = v / np.where(v < 0, _col(geo['top']), bottom)
  f = u * (1 / half_width)
  f *= f
  f += vn * vn
  return f


def _draw_face(cv: _Canvas, geo) -> None:
  """Skin with darker edges, skin texture and age spots; alpha -> cv.face."""
  w = geo['width'].max() * 1.12 + 1
  s = cv.window(-w, w, -geo['top'].max(), geo['bottom'].max())
  f = _face_field(s.u, s.v, geo)
  half = _col(geo['width'] * 0.5)
  alpha = _sat(f * -half + (half + 0.5))
  # Texture = edge darkening x (1 + skin grain - age spots).
  np.minimum(f, 1, out=f)
  f *= -0.13
  f += 1
  tex = cv.crops('blotchy', s)
  grain = tex * _col(geo['texture'])
  grain += 1
  if geo['spots'].max() > 0.005:
    tex -= 1.9
    tex *= 1.5
    grain -= _sat(tex) * _col(geo['spots'])
  f *= grain
  s.blend(alpha, geo['skin'], texture=f)
  s.face[:] = alpha


def _subset(images, *arrays):
  """Rows ``images`` of each per-image array."""
  return [np.asarray(a)[images] for a in arrays]


def _draw_skin(cv: _Canvas, geo, p: IdentityParams, nu) -> None:
  """Cheek blush (children, women), identity freckles and mole."""
  yaw, nose_v = nu['yaw'], geo['nose_v'] + nu['pitch']
  cheek_u = geo['eye_spacing'] * 0.5 + 1
  blushing = np.flatnonzero(geo['blush'] > 0.01)
  if len(blushing):
    yaw_b, nose_b, cheek_b, blush_b = _subset(blushing, yaw, nose_v, cheek_u,
                                              geo['blush'])
    for side in (-1, 1):
      s = cv.patch(yaw_b + side * cheek_b, nose_b - 1, 9, 7, blushing)
      alpha = _ellipse(s.u, s.v, yaw_b + side * cheek_b, nose_b - 1, 7.5, 5.5,
                       edge=4)
      s.blend(alpha * _col(blush_b), np.array([0.92, 0.45, 0.45]))
      s.done()
  freckled = np.flatnonzero(geo['freckles'] > 0)
  if len(freckled):
    _draw_freckles(cv, freckled, geo, p, nu)
  with_mole = np.flatnonzero(geo['mole_alpha'] > 0)
  if len(with_mole):
    _draw_mole(cv, with_mole, geo, p, nu)


def _draw_freckles(cv: _Canvas, images, geo, p: IdentityParams, nu) -> None:
  """Freckles: each identity reads the texture bank at its own offset, so
  the pattern belongs to the identity and moves with the face."""
  yaw, nose_v, amount, skin, offset, cx, cy = _subset(
      images, nu['yaw'], geo['nose_v'] + nu['pitch'], geo['freckles'],
      geo['skin'], p.freckle_offset, cv.cx + nu['yaw'] * cv.scale,
      cv.cy + nu['pitch'] * cv.scale)
  s = cv.patch(yaw, nose_v - 3, 26, 10, images)
  h, w = s.shape
  # Bank position = canonical position + the identity's offset.
  start_y = s.origin[0] - np.round(cy).astype(int) + offset[:, 1] + 60
  start_x = s.origin[1] - np.round(cx).astype(int) + offset[:, 0] + 60
  spots = _bank_crops('blotchy', start_y, start_x, h, w)
  region = _ellipse(s.u, s.v, yaw, nose_v - 3, 25, 9, edge=4) * s.face
  spots = spots - 1.2
  spots *= 2
  region *= _sat(spots)
  s.blend(region * _col(amount), skin * 0.72)
  s.done()


def _draw_mole(cv: _Canvas, images, geo, p: IdentityParams, nu) -> None:
  """An identity-specific mole; its height follows the lower face's growth."""
  mole, yaw, pitch, bottom, face_bottom, alpha, skin = _subset(
      images, p.mole, nu['yaw'], nu['pitch'], geo['bottom'], p.face_bottom,
      geo['mole_alpha'], geo['skin'])
  mole_u = mole[:, 0] + yaw
  mole_v = np.where(mole[:, 1] > 0, mole[:, 1] * bottom / face_bottom,
                    mole[:, 1]) + pitch
  r = np.maximum(mole[:, 2], 0.5)
  s = cv.patch(mole_u, mole_v, r, r, images)
  dot = _ellipse(s.u, s.v, mole_u, mole_v, r, r) * _col(alpha)
  s.blend(dot * s.face, skin * 0.42)
  s.done()


def _draw_wrinkles(cv: _Canvas, geo, nu) -> None:
  """Forehead lines and crow's feet growing with age."""
  strength = geo['wrinkles']
  if strength.max() < 0.01:
    return
  yaw, eye_v = nu['yaw'], _EYE_V + nu['pitch']
  brow_v = eye_v - geo['eye_height'] - geo['brow_gap']
  s = cv.patch(yaw, brow_v - 10, 24, 8)
  du = (s.u - _col(yaw)) / 22
  above = _col(brow_v) - s.v
  # cos(a + b) = cos a cos b - sin a sin b keeps the trigonometry on vectors.
  a, b = above * 1.3, 0.7 * np.sin(du * 3.0)
  wave = np.cos(a) * np.cos(b) - np.sin(a) * np.sin(b)
  across = _ramp(1 - du * du)
  along = _ramp((above - 3) * 0.5) * _ramp((18 - above) * 0.4)
  lines = _sat((wave - 0.5) * 3) * (across * 0.3) * (along * _col(strength))
  s.shade(1 - lines)
  s.done()
  corner = geo['eye_spacing'] / 2 + geo['eye_width'] + 1.5
  for side in (-1, 1):
    cu = yaw + side * corner
    s = cv.patch(cu + side * 3, eye_v, 4, 6)
    du = (s.u - _col(cu)) * side  # Distance outwards from the eye corner.
    dv = s.v - _col(eye_v)
    fan = _sat((np.cos(dv / (np.abs(du) + 1.5) * 5.0) - 0.4) * 2)
    fan *= _ramp(du) * _ramp(6 - du)
    fan *= _ramp(5.5 - np.abs(dv)) * _col(strength * 0.3)
    s.shade(1 - fan)
    s.done()


def _draw_folds(cv: _Canvas, geo, nu) -> None:
  """Nasolabial folds (adults, deepening with age) and marionette lines."""
  yaw = nu['yaw']
  nose_v, mouth_v = geo['nose_v'] + nu['pitch'], geo['mouth_v'] + nu['pitch']
  mw, nw = geo['mouth_width'], geo['nose_width']
  s = cv.patch(yaw, (nose_v + mouth_v) / 2 + 4, mw + 6,
               (mouth_v - nose_v) / 2 + 6)
  du = np.abs(s.u - _col(yaw))
  v0, v1 = _col(nose_v - 1), _col(mouth_v + 3)
  t = (s.v - v0) / (v1 - v0)
  u0, u1 = _col(nw + 1.5), _col(mw + 3)
  curve = u0 + (u1 - u0) * t + 1.5 * t * (1 - t)
  fold = _band(du - curve, 0.5) * (_ramp(t * 5) * _ramp((1 - t) * 5)
                                   * _col(geo['folds'] * 0.22))
  factor = 1 - fold
  if geo['sag'].max() > 0:
    t2 = (s.v - _col(mouth_v + 1)) / 8
    weight = _ramp(t2 * 5) * _ramp((1 - t2) * 5)
    weight = weight * _col(geo['sag'] ** 1.5 * 0.25)
    factor -= _band(du - _col(mw + 1) - t2, 0.45) * weight
  s.shade(factor)
  s.done()


def _draw_nose(cv: _Canvas, geo, nu) -> None:
  """Nose as shading: bridge sides, wings, tip highlight, nostrils."""
  yaw, nw = nu['yaw'], geo['nose_width']
  nv, eye_v = geo['nose_v'] + nu['pitch'], _EYE_V + nu['pitch']
  s = cv.patch(yaw, (eye_v + nv) / 2 + 2, nw + 2, (nv - eye_v) / 2 + 3)
  u, v = s.u, s.v
  du = np.abs(u - _col(yaw))
  t = _ramp((v - _col(eye_v) - 3) / _col(nv - eye_v - 3))
  along = _ramp((_col(nv) - 2 - v) * 0.5) * _ramp((v - _col(eye_v) - 4) * 0.3)
  factor = 1 - _band(du - _col(nw) * (0.35 + 0.4 * t), 0.6) * (along * 0.08)
  factor -= 0.10 * _ellipse(du, v, nw * 0.8, nv, nw * 0.45, 2.8, edge=1.5)
  factor -= 0.12 * _ellipse(u, v, yaw, nv + 3.0, nw * 0.8, 1.4, edge=1.5)
  factor += 0.06 * _ellipse(u, v, yaw, nv - 1.5, nw * 0.55, 3.0, edge=2)
  s.shade(factor)
  nostrils = _ellipse(du, v, nw * 0.42, nv + 1.6, nw * 0.28, 1.0)
  s.blend(nostrils * 0.75, geo['skin'] * 0.35)
  s.done()


def _draw_beard(cv: _Canvas, geo, nu) -> None:
  """Stubble/beard over the lower face of adult men with a beard factor."""
  images = np.flatnonzero(geo['beard_alpha'] > 0)
  if not len(images):
    return
  yaw, mw, nv, mv, width, bottom, beard, hair = _subset(
      images, nu['yaw'], geo['mouth_width'], geo['nose_v'] + nu['pitch'],
      geo['mouth_v'] + nu['pitch'], geo['width'], geo['bottom'],
      geo['beard_alpha'], geo['hair'])
  s = cv.patch(0, (nv + bottom) / 2 + 0.5, width * 1.12,
               (bottom - nv) / 2 + 0.5, images)
  du = np.abs(s.u - _col(yaw))
  moustache = _ramp((s.v - _col(nv) - 2.5) * 0.7) * _ramp(_col(mw) + 3 - du)
  # Below a line from the mouth corners rising to the sideburns.
  cheek_line = _col(mv + 1) - np.maximum(du - _col(mw), 0) * 0.9
  region = np.maximum(_sat((s.v - cheek_line) * 0.4), moustache)
  region *= _ramp(s.v - _col(nv) + 0.5)  # Ends at the patch's own top.
  region *= _sat(0.8 + 0.2 * cv.crops('blotchy', s))
  region *= s.face * _col(beard)
  s.blend(region, hair * 0.85)
  s.done()


def _draw_eyes(cv: _Canvas, geo, p: IdentityParams, nu) -> None:
  """Eyes: under-eye bags, lash line, white, iris with pupil, and a glint."""
  yaw, ew, eh = nu['yaw'], geo['eye_width'], geo['eye_height']
  eye_v = _EYE_V + nu['pitch']
  lash_colour = p.hair * 0.3 + 0.02
  ir = ew * geo['iris_ratio']
  for side in (-1, 1):
    cu = yaw + side * geo['eye_spacing'] / 2
    s = cv.patch(cu, eye_v + 1.2, ew + 1.5, eh + 3.8)
    u, v = s.u, s.v
    if geo['sag'].max() > 0:
      bag = (_ellipse(u, v, cu, eye_v + 1, ew * 1.05, eh + 3.2, edge=1.5)
             - _ellipse(u, v, cu, eye_v + 0.5, ew * 0.95, eh + 1.6, edge=1.5))
      s.shade(1 - _sat(bag) * _col(0.2 * geo['sag']))
    lash = (_ellipse(u, v, cu, eye_v - 0.3, ew + 0.9, eh + 1.0)
            * _ramp(_col(eye_v + eh * 0.3) - v))
    s.blend(lash * 0.85, lash_colour)
    white = _ellipse(u, v, cu, eye_v, ew, eh)
    s.blend(white, np.array([0.93, 0.91, 0.88]))
    iu, iv = cu + nu['gaze'][:, 0], eye_v + nu['gaze'][:, 1] * 0.5
    iris = np.minimum(_ellipse(u, v, iu, iv, ir, ir), white)
    pupil = _ellipse(u, v, iu, iv, ir * 0.45, ir * 0.45)
    s.blend(iris, p.iris, texture=1 - 0.93 * pupil)
    glint = _ellipse(u, v, iu - ir * 0.3, iv - ir * 0.35, ir * 0.22, ir * 0.22)
    s.blend(glint * 0.8, np.array([1.0, 1.0, 1.0]))
    s.done()


def _draw_brows(cv: _Canvas, geo, p: IdentityParams, nu) -> None:
  """Arched brows, thinner towards the outer end, in a darkened hair colour."""
  yaw, ew = nu['yaw'], geo['eye_width']
  half_len = ew * 1.35
  base_v = (_EYE_V + nu['pitch'] - geo['eye_height'] - geo['brow_gap'] - 1)
  colour = geo['hair'] * 0.75
  for side in (-1, 1):
    cu = yaw + side * (geo['eye_spacing'] / 2 + 0.5)
    s = cv.patch(cu, base_v - 1, half_len + 1, 4.5)
    x = (s.u - _col(cu)) * side / _col(half_len)
    curve = (_col(base_v) - _col(p.brow_arch) * (1 - (x - 0.3) ** 2)
             - _col(p.brow_slant * half_len) * x)
    half_thick = _col(geo['brow_thickness']) * (0.5 - 0.22 * _ramp(x))
    ends = _ramp((1 - np.abs(x)) * _col(half_len) * 0.5)
    ends = ends * _col(geo['brow_alpha'])
    alpha = np.abs(s.v - curve)
    np.subtract(half_thick + 0.5, alpha, out=alpha)
    alpha = _sat(alpha)
    alpha *= ends
    s.blend(alpha, colour)
    s.done()


def _draw_mouth(cv: _Canvas, geo, nu) -> None:
  """Upper and lower lips and the mouth line, curved by the smile."""
  yaw, mw, lt = nu['yaw'], geo['mouth_width'], geo['lip_thickness']
  mv = geo['mouth_v'] + nu['pitch']
  s = cv.patch(yaw, mv, mw + 1, 2 * lt + 2)
  x = (s.u - _col(yaw)) / _col(mw)
  curve = _col(mv) - _col(nu['smile'] * 1.2) * (x * x)
  upper = _ellipse(s.u, s.v, yaw, mv - lt * 0.45, mw, lt * 0.8)
  lower = _ellipse(s.u, s.v, yaw, mv + lt * 0.55, mw * 0.85, lt)
  line = _band(s.v - curve, 0.5)
  line *= _ramp((1 - np.abs(x)) * _col(mw) * 0.5 + 0.5) * 0.7
  s.blend(np.maximum(upper, lower), geo['lips'], texture=1 - line)
  s.blend(line * (1 - np.maximum(upper, lower)), geo['lips'] * 0.4)
  s.done()


def _draw_front_hair(cv: _Canvas, hair, geo, p: IdentityParams) -> None:
  """Hair on top of the head and at the sides, in front of the face."""
  wide, tall, side_len = hair['wide'], hair['tall'], hair['side_len']
  # The lowest hairline any image can have (part, arch and the strands at
  # |du| <= 1.2 pushing it down): the window reaches it for every image, so
  # no image's hair is cut at the edge of a window sized by its chunk-mates.
  lowest = (np.maximum(geo['hairline'], np.minimum(side_len, -4))
            + 1.2 * (6 * np.abs(p.hair_part) + 1.2 * p.hair_arch)
            + 1.2 * _texture_banks()['streaks'].max() + 0.5)
  s = cv.window(-wide.max() - 1, wide.max() + 1, -tall.max() - 1,
                max(side_len.max(), lowest.max(), 0) + 1)
  u, v = s.u, s.v
  du, dv = u / _col(wide), v / _col(tall)
  f = du * du + dv * dv
  if hair['curl'].max() > 0:  # Wavy outline for curly hair.
    f = f + (_col(hair['curl'] * 0.09) * np.sin(u * 0.55)) * np.sin(v * 0.55)
  cap = _sat(f * -_col(wide * 0.5) + _col(wide * 0.5 + 0.5))
  # The hairline: an arch dropping to the sideburns, receding at the
  # temples with age (balding), swept by the parting.
  adu = np.abs(u) / _col(geo['width'])
  temple = _ramp(1 - ((adu - 0.5) * 4) ** 2) ** 2 * _col(
      2 + 10 * p.balding * geo['sag'])
  side_top = np.minimum(side_len, -4)
  drop = _ramp((adu - 0.55) * 3.3) ** 2 * _col(side_top - geo['hairline'])
  arch = _col(p.hair_arch) * (du * du)
  hairline = (_col(geo['hairline']) + _col(p.hair_part * 6) * du + arch
              - temple + drop)
  streaks = cv.crops('streaks', s)
  top = hairline - v
  top += 1.2 * streaks  # Uneven strands along the hairline.
  top = _sat(top)
  top *= cap
  if geo['crown_alpha'].min() < 1:
    top *= 1 - _col(1 - geo['crown_alpha']) * _ramp((-v - 30) / 8)
  beside = (_ramp(adu * _col(geo['width']) - _col(geo['width']) * 0.8 + 0.5)
            * _ramp(_col(wide) + 0.5 - np.abs(u)))
  sides = beside * _ramp(_col(side_len) - v + 0.5)
  sides *= np.where(v < 0, cap, 1)
  alpha = np.maximum(top, sides)
  alpha *= _col(hair['alpha'])
  cv.add_hair(s, alpha)
  streaks *= 0.07
  streaks += 1
  s.blend(alpha, geo['hair'], texture=streaks)


def _finish(cv: _Canvas, nu, out: np.ndarray) -> None:
  """Directional light, exposure, tint and noise; writes uint8 into ``out``."""
  gain = nu['brightness'] * 255
  light = nu['light'] * (gain / 56)[:, None]
  factor = _col(gain) + (_col(light[:, 0]) * cv.u + _col(light[:, 1]) * cv.v)
  noise = cv.grain
  noise *= 255
  noise += 0.5  # Rounds on the truncating cast below.
  for c in range(3):
    channel = cv.img[c]
    channel *= factor
    channel *= _col(nu['tint'][:, c])
    channel += noise
    np.clip(channel, 0, 255, out=channel)
    out[..., c] = channel


def _render_chunk(p: IdentityParams, geo, nu, out: np.ndarray,
                  masks: np.ndarray | None = None) -> None:
  """Draws one chunk of faces, back to front, into ``out`` (uint8).

  ``masks`` (float32 [B, 2, H, W]), when given, receives the face alpha and
  the hair coverage.
  """
  cv = _Canvas(nu)
  hair = _hair_shape(p, geo)
  _draw_background(cv, nu)
  _draw_back_hair(cv, hair, geo)
  _draw_neck_and_shirt(cv, geo, nu)
  _draw_ears(cv, geo, nu)
  _draw_face(cv, geo)
  _draw_skin(cv, geo, p, nu)
  _draw_wrinkles(cv, geo, nu)
  _draw_folds(cv, geo, nu)
  _draw_nose(cv, geo, nu)
  _draw_beard(cv, geo, nu)
  _draw_eyes(cv, geo, p, nu)
  _draw_brows(cv, geo, p, nu)
  _draw_mouth(cv, geo, nu)
  _draw_front_hair(cv, hair, geo, p)
  _finish(cv, nu, out)
  if masks is not None:
    masks[:, 0], masks[:, 1] = cv.face, cv.hair


def default_num_threads() -> int:
  """Rendering threads: the usable CPUs, at most 4.

  The threads share the GIL between NumPy calls; beyond a few of them the
  contention costs more than the extra cores bring (16 threads render slower
  than 2).
  """
  try:
    cpus = len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    cpus = os.cpu_count() or 1
  return max(1, min(cpus, 4))


@functools.lru_cache(maxsize=1)
def _keep_freed_memory() -> bool:
  """Stops glibc from returning NumPy's temporaries to the OS after each use.

  Rendering allocates and frees many 0.1-3 MB temporaries; by default glibc
  maps each one fresh (mmap) and the page faults cost ~30% of the render time
  on small VMs. Raising the mmap and trim thresholds (process-wide, once)
  lets freed blocks be reused. A no-op where glibc is absent.

  Returns:
    Whether the thresholds were set.
  """
  if os.environ.get('MTLFACE_SYNTHETIC_NO_MALLOPT'):
    return False
  try:
    libc = ctypes.CDLL('libc.so.6')
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)
                and libc.mallopt(m_trim_threshold, 256 << 20))
  except (OSError, AttributeError):
    return False


def render_with_nuisance(identity_params: IdentityParams, ages,
                         nuisance: dict[str, np.ndarray],
                         num_threads: int | None = None,
                         return_masks: bool = False):
  """Renders faces from fully specified factors (no randomness inside).

  Args:
    identity_params: one row per image (use ``IdentityParams.take``).
    ages: ages in years per image, in [0, 120].
    nuisance: per-image nuisance from :func:`sample_nuisance`.
    num_threads: rendering threads (default: all CPUs). The result does not
      depend on it.
    return_masks: also return the renderer's masks.

  Returns:
    uint8 [N, 112, 112, 3] RGB images; with ``return_masks`` the pair
    ``(images, masks)`` where masks is float32 [N, 2, 112, 112] in [0, 1]:
    channel 0 the face's alpha (skin of the head, under any hair), channel 1
    the hair's coverage (front and back hair; 0 where bald).
  """
  ages = np.asarray(ages, _F32).reshape(-1)
  n = len(ages)
  if len(identity_params) != n or any(len(v) != n for v in nuisance.values()):
    raise ValueError(
        f'identity_params ({len(identity_params)} rows), ages ({n}) and '
        'nuisance must have one row per image')
  if n and (ages.min() < 0 or ages.max() > 120):
    raise ValueError(
        f'ages must lie in [0, 120], got [{ages.min()}, {ages.max()}]')
  _keep_freed_memory()
  geo = _age_geometry(identity_params, ages)
  out = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
  masks = (np.empty((n, 2, IMAGE_SIZE, IMAGE_SIZE), _F32) if return_masks
           else None)
  # Chunks of similar style and age skip more layers and have tighter
  # windows; the drawing order does not change any image.
  order = np.lexsort((ages, identity_params.hair_style))
  chunks = [order[i:i + _CHUNK] for i in range(0, n, _CHUNK)]

  def render(index: np.ndarray) -> None:
    chunk_out = np.empty((len(index),) + out.shape[1:], np.uint8)
    chunk_masks = None if masks is None else masks[index]
    _render_chunk(identity_params.take(index),
                  {k: v[index] for k, v in geo.items()},
                  take_nuisance(nuisance, index), chunk_out,
                  chunk_masks)
    out[index] = chunk_out
    if masks is not None:
      masks[index] = chunk_masks

  threads = num_threads or default_num_threads()
  if threads == 1 or len(chunks) <= 1:
    for sl in chunks:
      render(sl)
  else:
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      list(pool.map(render, chunks))  # list() re-raises worker exceptions.
  return (out, masks) if return_masks else out


def render_faces(identity_params: IdentityParams, ages,
                 rng: np.random.Generator,
                 num_threads: int | None = None) -> np.ndarray:
  """Renders one face per (identity row, age) with random per-image nuisance.

  Args:
    identity_params: one row per image, e.g. ``identities.take(image_ids)``.
    ages: ages in years, one per image.
    rng: NumPy generator for the nuisance; same state -> same images.
    num_threads: rendering threads (default: all CPUs).

  Returns:
    uint8 [N, 112, 112, 3] RGB images.
  """
  nuisance = sample_nuisance(len(np.asarray(ages).reshape(-1)), rng)
  return render_with_nuisance(identity_params, ages, nuisance, num_threads)


@dataclasses.dataclass(frozen=True)
class TruthRendering:
  """Faces of a split redrawn at other ages, with the renderer's masks.

  Row n, column a is image ``indices[n]`` of the split at ``ages[n, a]``: the
  same identity, pose, expression, light, background and sensor noise.
  """
  images: np.ndarray  # uint8 [N, A, 112, 112, 3].
  face: np.ndarray    # float32 [N, A, 112, 112]: face alpha in [0, 1].
  hair: np.ndarray    # float32 [N, A, 112, 112]: hair coverage in [0, 1].
  ages: np.ndarray    # float32 [N, A].


def take_nuisance(nuisance: dict[str, np.ndarray], index) -> dict[str, np.ndarray]:
  """Rows ``index`` of every per-image nuisance array."""
  return {k: v[index] for k, v in nuisance.items()}


def render_truth(split: SplitArrays, indices, ages,
                 num_threads: int | None = None) -> TruthRendering:
  """Redraws faces of ``split`` at other ages: the ground truth of age synthesis.

  Args:
    split: a split from :func:`make_dataset` (it carries its factors).
    indices: [N] images of the split.
    ages: [A] ages for every image, or [N, A] per image, in [0, 120]. Drawing
      image i at ``split.ages[i]`` reproduces ``split.images[i]``.
    num_threads: rendering threads (no effect on the output).

  Returns:
    A :class:`TruthRendering` with N x A faces and masks.

  Raises:
    ValueError: if the split has no factors (built by hand) or the shapes
      disagree.
  """
  if split.factors is None:
    raise ValueError('this split carries no render factors; build it with '
                     'make_dataset to redraw its faces')
  indices = np.asarray(indices, np.int64).reshape(-1)
  ages = np.asarray(ages, _F32)
  if ages.ndim == 1:
    ages = np.broadcast_to(ages, (len(indices), len(ages)))
  if ages.ndim != 2 or ages.shape[0] != len(indices):
    raise ValueError(f'ages must be [A] or [N={len(indices)}, A], got '
                     f'{ages.shape}')
  columns = ages.shape[1]
  rows = np.repeat(indices, columns)  # Image-major: row n, then its ages.
  images, masks = render_with_nuisance(
      split.factors.identities.take(rows), ages.reshape(-1),
      take_nuisance(split.factors.nuisance, rows), num_threads,
      return_masks=True)
  shape = (len(indices), columns)
  return TruthRendering(
      images=images.reshape(shape + images.shape[1:]),
      face=masks[:, 0].reshape(shape + masks.shape[2:]),
      hair=masks[:, 1].reshape(shape + masks.shape[2:]),
      ages=np.array(ages, _F32))


def group_centre_ages(num_groups: int = 7, max_age: int = MAX_AGE) -> np.ndarray:
  """The middle age of each age group, the oldest group ending at ``max_age``.

  Group g covers ages in (t[g-1], t[g]] (``ages.thresholds_for``), the first
  from 0: for 7 groups and max_age 80, 5, 15, 25, 35, 45, 55 and 70.

  Returns:
    float32 [num_groups].
  """
  thresholds = ages_lib.thresholds_for(num_groups)
  if max_age <= thresholds[-1]:
    raise ValueError(f'max_age {max_age} leaves the oldest group '
                     f'(> {thresholds[-1]}) empty')
  bounds = np.array((0,) + tuple(thresholds) + (max_age,), _F32)
  return (bounds[:-1] + bounds[1:]) / 2


def stratified_ages(num_identities: int, images_per_identity: int,
                    max_age: int, rng: np.random.Generator) -> np.ndarray:
  """Whole-year ages per identity spread over [0, max_age] (one per stratum).

  Every identity covers the whole age range, so each one appears in every age
  group and matched verification pairs can span decades.

  Returns:
    float32 [num_identities, images_per_identity], rows in random order.
  """
  k = images_per_identity
  jitter = rng.uniform(size=(num_identities, k))
  ages = np.floor((np.arange(k) + jitter) / k * (max_age + 1))
  ages = np.minimum(ages, max_age)
  return rng.permuted(ages, axis=1).astype(_F32)


def _split(identities: IdentityParams, ages: np.ndarray, id_range: range,
           rng: np.random.Generator, num_threads: int | None) -> SplitArrays:
  """Renders every image of the identities in ``id_range`` (identity-major)."""
  ids = np.repeat(np.arange(id_range.start, id_range.stop, dtype=np.int32),
                  ages.shape[1])
  split_ages = ages[id_range.start:id_range.stop].reshape(-1)
  params = identities.take(ids)
  nuisance = sample_nuisance(len(split_ages), rng)
  images = render_with_nuisance(params, split_ages, nuisance, num_threads)
  return SplitArrays(images=images, ids=ids, ages=split_ages.astype(_F32),
                     genders=params.gender.astype(np.int32),
                     factors=RenderFactors(params, nuisance))


def make_dataset(num_identities: int = 1000, images_per_identity: int = 20,
                 seed: int = 0, *, test_fraction: float = 0.1,
                 max_age: int = MAX_AGE, num_folds: int = 10,
                 pairs_per_fold: int = 300, min_age_gap: float = 20,
                 num_threads: int | None = None) -> SyntheticFaces:
  """Renders the synthetic dataset: disjoint train/test identities + pairs.

  Args:
    num_identities: identities in total (train + test).
    images_per_identity: images per identity, at stratified ages over
      [0, max_age] so every identity spans childhood to old age.
    seed: the whole dataset is a deterministic function of the arguments.
    test_fraction: fraction of identities held out for the test split (at
      least 2 per fold); 0 renders no test split and no pairs (e.g. for a
      tiny training run).
    max_age: oldest age.
    num_folds: verification folds (LFW uses 10).
    pairs_per_fold: matched and (as many) mismatched pairs per fold.
    min_age_gap: minimum age difference within every pair, so matched pairs
      are cross-age and the age gap does not give mismatches away.
    num_threads: rendering threads (default: default_num_threads(); no
      effect on the output).

  Returns:
    SyntheticFaces. Train labels are 0..num_train_identities-1; test labels
    continue from there.

  Raises:
    ValueError: on impossible sizes (too few identities/images for the folds
      and pairs asked for).
  """
  if num_identities < 1 or images_per_identity < 1:
    raise ValueError('need >= 1 identity and >= 1 image per identity, got '
                     f'{num_identities} and {images_per_identity}')
  if not 0 <= max_age <= 120:
    raise ValueError(f'max_age must be in [0, 120], got {max_age}')
  num_test = 0
  if test_fraction > 0:
    num_test = max(int(round(num_identities * test_fraction)), 2 * num_folds)
  if num_test >= num_identities:
    raise ValueError(
        f'{num_identities} identities leave none for training with '
        f'{num_test} test identities ({num_folds} folds need >= 2 each)')
  id_seq, age_seq, train_seq, test_seq, pair_seq = (
      np.random.SeedSequence(seed).spawn(5))
  identities = sample_identities(num_identities, np.random.default_rng(id_seq))
  ages = stratified_ages(num_identities, images_per_identity, max_age,
                         np.random.default_rng(age_seq))
  num_train = num_identities - num_test
  train = _split(identities, ages, range(0, num_train),
                 np.random.default_rng(train_seq), num_threads)
  test = _split(identities, ages, range(num_train, num_identities),
                np.random.default_rng(test_seq), num_threads)
  pairs = np.zeros((0, 4), np.int32)
  if num_test:
    pairs = make_pairs(test.ids, test.ages, test.genders, num_folds,
                       pairs_per_fold, min_age_gap,
                       np.random.default_rng(pair_seq))
  return SyntheticFaces(train=train, test=test, pairs=pairs,
                        num_train_identities=num_train, seed=seed)


def make_pairs(ids, ages, genders, num_folds: int, pairs_per_fold: int,
               min_age_gap: float, rng: np.random.Generator) -> np.ndarray:
  """LFW-style verification pairs with identity-disjoint folds.

  Each fold takes its own identities; it holds ``pairs_per_fold`` matched
  pairs (same identity, ages at least ``min_age_gap`` apart) followed by as
  many mismatched pairs (different identities, same gender where the fold has
  two identities of that gender, also ``min_age_gap`` apart). No pair repeats.

  Args:
    ids, ages, genders: labels of the images the pairs index.
    num_folds: number of folds.
    pairs_per_fold: matched (and mismatched) pairs per fold.
    min_age_gap: minimum age difference within a pair.
    rng: NumPy generator.

  Returns:
    int32 [num_folds * 2 * pairs_per_fold, 4]: (index_a, index_b, issame, fold).

  Raises:
    ValueError: if a fold cannot supply the pairs asked for.
  """
  ids, ages, genders = np.asarray(ids), np.asarray(ages), np.asarray(genders)
  identities = rng.permutation(np.unique(ids))
  if len(identities) < 2 * num_folds:
    raise ValueError(f'{len(identities)} identities cannot fill {num_folds} '
                     'folds with >= 2 identities each')
  rows = []
  for fold, fold_ids in enumerate(np.array_split(identities, num_folds)):
    members = np.flatnonzero(np.isin(ids, fold_ids))
    matched = _matched_pairs(ids, ages, members, pairs_per_fold, min_age_gap,
                             rng, fold)
    mismatched = _mismatched_pairs(ids, ages, genders, members, pairs_per_fold,
                                   min_age_gap, rng, fold)
    for pairs, same in ((matched, 1), (mismatched, 0)):
      labels = np.full((len(pairs), 2), (same, fold))
      rows.append(np.column_stack([pairs, labels]))
  return np.concatenate(rows).astype(np.int32)


def _matched_pairs(ids, ages, members, count, min_age_gap, rng, fold):
  """``count`` distinct same-identity pairs with an age gap, or ValueError."""
  candidates = []
  for identity in np.unique(ids[members]):
    idx = members[ids[members] == identity]
    a, b = np.triu_indices(len(idx), 1)
    keep = np.abs(ages[idx[a]] - ages[idx[b]]) >= min_age_gap
    candidates.append(np.column_stack([idx[a][keep], idx[b][keep]]))
  candidates = np.concatenate(candidates)
  if len(candidates) < count:
    raise ValueError(
        f'fold {fold}: only {len(candidates)} matched pairs with an age gap >= '
        f'{min_age_gap}, {count} asked for; lower pairs_per_fold or '
        'min_age_gap, or add images per identity')
  return candidates[rng.choice(len(candidates), count, replace=False)]


def _mismatched_pairs(ids, ages, genders, members, count, min_age_gap, rng,
                      fold):
  """``count`` distinct different-identity pairs, sampled by rejection."""
  fold_ids = np.unique(ids[members])
  id_gender = {i: genders[members[ids[members] == i][0]] for i in fold_ids}
  same_gender_possible = {
      g: sum(v == g for v in id_gender.values()) >= 2 for g in (0, 1)}
  chosen, seen = [], set()
  for _ in range(200):  # Rejection rounds; a fold that cannot fill fails.
    a, b = rng.choice(members, (2, 4 * count))
    ok = ids[a] != ids[b]
    ok &= np.abs(ages[a] - ages[b]) >= min_age_gap
    need_same = np.array([same_gender_possible[g] for g in genders[a]], bool)
    ok &= ~need_same | (genders[a] == genders[b])
    for x, y in zip(a[ok], b[ok]):
      key = (min(x, y), max(x, y))
      if key not in seen:
        seen.add(key)
        chosen.append(key)
        if len(chosen) == count:
          return np.array(chosen)
  raise ValueError(f'fold {fold}: could not find {count} distinct mismatched '
                   f'pairs with an age gap >= {min_age_gap}')
