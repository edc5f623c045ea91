"""The command line behind ``eval.py``: flags -> :class:`EvalOptions` -> :func:`run`.

``python eval.py --checkpoint=DIR --protocol=P[,P...] [sources] [options]``
with protocols ``verification``, ``identification``, ``age`` and ``fas``;
several protocols (comma-separated or the flag repeated) run on one loaded
model and share embeddings: each distinct image file is decoded and embedded
once per run (``protocols.EmbeddingCache``, keyed by file and crop). Every
source given is evaluated by each protocol it fits and reported under its own
name (``name=path`` names a path flag's set, ``--name`` the ``--folder``/
``--list`` set). The report goes to ``--output_dir`` (``report.json``,
``report.txt``, ``roc.png``, FAS grids) and its tables are printed. Input
errors stop the run with one line ``eval.py: error: ...`` (exit 1); a bad
``--bin`` set is reported on its own while the other sets' results are kept
and written (exit 1 at the end). See ``docs/evaluation.md`` for every flag and
report field.
"""

import dataclasses
import os
import pickle
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from absl import flags
from absl import logging

from mtlface_jax import predict
from mtlface_jax import synthetic
from mtlface_jax.evaluation import datasets
from mtlface_jax.evaluation import identification as id_lib
from mtlface_jax.evaluation import protocols
from mtlface_jax.evaluation import report as report_lib
from mtlface_jax.evaluation import runner
from mtlface_jax.evaluation import synthetic_truth
from mtlface_jax.formats import images as images_lib

PROTOCOLS = ("verification", "identification", "age", "fas")
PAIR_FORMATS = ("auto", "generic", "numbered", "lfw")
# ECAF's two alignments of the same faces: image_data/img_<alignment>/.
ECAF_ALIGNMENTS = ("mtcnn", "ffhq")
# What a bad input raises; each becomes one line "eval.py: error: ...".
INPUT_ERRORS = (ValueError, FileNotFoundError, pickle.UnpicklingError)


@dataclasses.dataclass
class EvalOptions:
  """Everything one evaluation run needs (the flags of ``eval.py``).

  ``protocol`` is one name, comma-separated names or a sequence of them;
  ``pairs``, ``pair_list`` and ``bins`` are one path or a sequence, each
  optionally ``name=path``.
  """
  checkpoint: str
  protocol: Any
  output_dir: str = "eval_output"
  step: Optional[int] = None
  dtype: str = "float32"
  batch_size: int = 64
  flip: bool = True
  progress: bool = True
  skip_bad_examples: bool = False
  # Sources.
  pairs: Any = ()
  pair_list: Any = ()
  pair_format: str = "auto"
  bins: Any = ()
  ecaf: str = ""
  ecaf_alignment: str = "mtcnn"
  folder: str = ""
  folder_format: str = ""
  list: str = ""
  name: str = ""
  gallery: str = ""
  probe: str = ""
  gallery_subset: Optional[str] = None
  probe_subset: Optional[str] = None
  nested: str = "include"
  images_root: str = ""
  lfw_crop: bool = False
  crop: str = ""
  synthetic: bool = False
  synthetic_identities: int = 200
  synthetic_images_per_identity: int = 20
  synthetic_seed: int = 0
  synthetic_test_fraction: float = 0.1
  synthetic_num_folds: int = 10
  synthetic_pairs_per_fold: int = 100
  # Protocol options.
  identification: str = "loio"
  num_folds: int = 10
  eval_folds: str = ""
  max_pairs_per_fold: int = 0
  max_images: int = 0
  cs_years: float = 5.0
  group_from: str = "head"
  num_inputs: int = 64
  grid_rows: int = 8
  grid_faces: int = 16
  age_checkpoint: str = ""
  id_checkpoint: str = ""


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the ``eval.py`` flags (one per :class:`EvalOptions` field)."""
  d = {"flag_values": flag_values}
  flags.DEFINE_string("checkpoint", None, "Training workdir, its checkpoints/ folder, or a "
                      "converted PyTorch checkpoint.", required=True, **d)
  flags.DEFINE_multi_string("protocol", None, "What to evaluate: one or more of "
                            f"{', '.join(PROTOCOLS)}, comma-separated or the flag repeated "
                            "(one run, shared embeddings).", required=True, **d)
  flags.DEFINE_string("output_dir", "eval_output", "Where report.json/report.txt/roc.png "
                      "and FAS grids are written.", **d)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", **d)
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of the encoder and "
                    "generator (parameters stay float32).", **d)
  flags.DEFINE_integer("batch_size", 64, "Images per device call (rounded up to a multiple "
                       "of the device count).", **d)
  flags.DEFINE_bool("flip", True, "Average each face's embedding with its mirror's.", **d)
  flags.DEFINE_bool("progress", True, "Show progress bars.", **d)
  flags.DEFINE_bool("skip_bad_examples", False, "Count and list malformed list lines/file "
                    "names instead of failing on the first.", **d)
  _define_source_flags(d)
  _define_face_flags(d)
  _define_protocol_flags(d)


def _define_source_flags(d: dict) -> None:
  flags.DEFINE_multi_string("pairs", [], "LFW pairs.txt (verification), [name=]path; "
                            "repeatable. Images under --images_root (default: <pairs "
                            "dir>/images if present, else the pairs dir).", **d)
  flags.DEFINE_multi_string("pair_list", [], "Pair list (verification), [name=]path "
                            "(default name: the file's stem); repeat the flag for several. "
                            "See --pair_format.", **d)
  flags.DEFINE_enum("pair_format", "auto", PAIR_FORMATS,
                    "auto: from each list's first line; generic: 'path1 path2 same "
                    "[fold]'; numbered (CACD-VS): 'n path1 path2 same'; lfw: pairs.txt. "
                    "Names with spaces: \"quoted name.jpg\" or tab-separated fields.", **d)
  flags.DEFINE_string("ecaf", "", "ECAF root (verification): every image_pairs/*.txt "
                      "('img1 img2 1|-1', 10 contiguous folds, see --num_folds) is scored "
                      "as its own set ecaf_<stem>, images under image_data/img_<--ecaf_"
                      "alignment>/.", **d)
  flags.DEFINE_enum("ecaf_alignment", "mtcnn", ECAF_ALIGNMENTS, "ECAF image folder: "
                    "mtcnn (img_mtcnn) or ffhq (img_ffhq).", **d)
  flags.DEFINE_multi_string("bin", [], "insightface .bin set(s) (verification), "
                            "[name=]path, e.g. agedb_30.bin; repeat the flag for several. "
                            "Each is scored on its own: a bad one is reported and the run "
                            "exits 1 after writing the others' results.", **d)
  flags.DEFINE_string("folder", "", "Labelled image folder (identification, age; fas: "
                      "inputs), [name=]path, read as --folder_format.", **d)
  flags.DEFINE_enum("folder_format", "", ("", *datasets.FOLDER_FORMATS),
                    "utkface | fgnet | identity (<folder>/<person>/..., see --nested) | "
                    "images (unlabelled). Default: fgnet for identification, utkface for "
                    "age, images for fas (give it when running several of these).", **d)
  flags.DEFINE_string("list", "", "MTLFace/SCAF list 'id filename age gender' (age, fas), "
                      "[name=]path, names relative to --images_root.", **d)
  flags.DEFINE_string("name", "", "Report name of the --folder set (else of the --list "
                      "set); default: the folder's (or list's) name.", **d)
  flags.DEFINE_string("gallery", "", "Identification gallery: an identity folder or an "
                      "MTLFace list, [name=]path.", **d)
  flags.DEFINE_string("probe", "", "Identification probes: an identity folder or an "
                      "MTLFace list (may be the --gallery folder, split by subset).", **d)
  flags.DEFINE_string("gallery_subset", None, "Gallery: only images of this subfolder of "
                      "each <person>/ folder ('' = directly inside; comma-separated for "
                      "several). Default: all.", **d)
  flags.DEFINE_string("probe_subset", None, "Probes: as --gallery_subset, e.g. "
                      "--gallery=DIR --gallery_subset= --probe=DIR --probe_subset=y for "
                      "<person>/ (old) and <person>/y/ (young).", **d)
  flags.DEFINE_enum("nested", "include", datasets.NESTED_MODES, "Identity folders: images "
                    "in subfolders of <person>/ (e.g. <person>/y/) belong to the person "
                    "(include; counted per subset in the report) or are refused.", **d)
  flags.DEFINE_string("images_root", "", "Folder list/pair names are relative to.", **d)
  flags.DEFINE_bool("synthetic", False, "Use the held-out test split (and pairs) of the "
                    "procedural synthetic faces, sized by the --synthetic_* flags.", **d)
  flags.DEFINE_integer("synthetic_identities", 200, "Synthetic identities (train + test).", **d)
  flags.DEFINE_integer("synthetic_images_per_identity", 20, "Synthetic images per identity.",
                       **d)
  flags.DEFINE_integer("synthetic_seed", 0, "Synthetic dataset seed.", **d)
  flags.DEFINE_float("synthetic_test_fraction", 0.1, "Fraction of identities held out.", **d)
  flags.DEFINE_integer("synthetic_num_folds", 10, "Synthetic verification folds.", **d)
  flags.DEFINE_integer("synthetic_pairs_per_fold", 100, "Synthetic matched (and mismatched) "
                       "pairs per fold.", **d)


def _define_face_flags(d: dict) -> None:
  flags.DEFINE_bool("lfw_crop", False, "Apply the fixed central LFW crop (raw 250x250 "
                    "deep-funneled LFW) instead of a plain resize; = --crop=lfw.", **d)
  flags.DEFINE_string("crop", "", "Cut this box out of every image file before the "
                      "resize: 'x0,y0,x1,y1' in pixels, or a preset: "
                      f"{', '.join(sorted(images_lib.CROP_PRESETS))}. Images that are "
                      "still not square or not 112x112 are counted (report 'datasets' "
                      "entry 'shapes') with a warning.", **d)


def _define_protocol_flags(d: dict) -> None:
  flags.DEFINE_enum("identification", "loio", protocols.IDENTIFICATION_METHODS,
                    "Within-set identification (--folder, --synthetic): loio = leave one "
                    "image out; lopo = leave one person out (adds per-person means).", **d)
  flags.DEFINE_integer("num_folds", 10, "Folds of .bin sets and of pair lists without "
                       "fold labels (contiguous blocks).", **d)
  flags.DEFINE_string("eval_folds", "", "Folds to evaluate, numbered FROM 1 in order of "
                      "their labels, e.g. '6-10' = LFW's last five folds (labels 5..9). "
                      "Each fold's threshold is chosen on the other selected folds. "
                      "Default: all.", **d)
  flags.DEFINE_integer("max_pairs_per_fold", 0, "Keep only the first N matched and N "
                       "mismatched pairs of each fold (quick runs; pair lists and "
                       "synthetic pairs). 0 = all.", **d)
  flags.DEFINE_integer("max_images", 0, "Evaluate at most N faces per set: identification "
                       "keeps whole identities (every kept probe keeps its matches), age "
                       "and fas take N evenly spaced faces. 0 = all.", **d)
  flags.DEFINE_float("cs_years", 5.0, "Tolerance of the age cumulative score CS(n).", **d)
  flags.DEFINE_enum("group_from", "head", runner.GROUP_SOURCES, "Estimated age group: "
                    "the estimator's group head, or the group of the expected age.", **d)
  flags.DEFINE_integer("num_inputs", 64, "FAS: faces synthesized into every group (evenly "
                       "spaced over the source). 0 = all.", **d)
  flags.DEFINE_integer("grid_rows", 8, "FAS: input faces per progression grid PNG.", **d)
  flags.DEFINE_integer("grid_faces", 16, "FAS: input faces drawn in grids in total.", **d)
  flags.DEFINE_string("age_checkpoint", "", "FAS: judge synthesized ages with this "
                      "checkpoint's age estimator (default: the evaluated checkpoint's).", **d)
  flags.DEFINE_string("id_checkpoint", "", "FAS: measure identity preservation with this "
                      "checkpoint's encoder (default: the evaluated checkpoint's).", **d)


def options_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> EvalOptions:
  """Reads parsed flags into :class:`EvalOptions`."""
  values = {}
  for field in dataclasses.fields(EvalOptions):
    name = "bin" if field.name == "bins" else field.name
    values[field.name] = flag_values[name].value
  for name in ("bins", "pairs", "pair_list", "protocol"):
    values[name] = tuple(values[name] or ())
  return EvalOptions(**values)


# --------------------------------------------------------------------------- #
# Option helpers.
# --------------------------------------------------------------------------- #


def protocol_names(protocol: Any) -> tuple[str, ...]:
  """The protocols of ``--protocol`` (names, comma-separated, or a sequence), in order.

  Raises:
    ValueError: naming an unknown protocol.
  """
  items = [protocol] if isinstance(protocol, str) else list(protocol or ())
  names = [n.strip() for item in items for n in str(item).split(",") if n.strip()]
  unknown = [n for n in names if n not in PROTOCOLS]
  if unknown or not names:
    raise ValueError(f"--protocol: {unknown or 'nothing'} given; use one or more of "
                     f"{', '.join(PROTOCOLS)} (e.g. --protocol=verification,age)")
  return tuple(dict.fromkeys(names))


def as_paths(value: Any) -> list[str]:
  """One path or a sequence of paths -> a list (empty strings dropped)."""
  items = [value] if isinstance(value, (str, os.PathLike)) else list(value or ())
  return [str(v) for v in items if str(v)]


def split_name(value: str) -> tuple[Optional[str], str]:
  """``name=path`` -> (name, path); a plain path -> (None, path).

  A value that exists as a path is never split, so paths holding "=" work.
  The name must not contain a path separator.

  Raises:
    ValueError: for an empty name or path.
  """
  if "=" not in value or os.path.exists(value):
    return None, value
  name, path = value.split("=", 1)
  if "/" in name or os.sep in name:
    return None, value
  if not name or not path:
    raise ValueError(f"{value!r}: use name=path (both non-empty) or a plain path")
  return name, path


def face_preparation(options: EvalOptions) -> tuple[bool, Optional[images_lib.CropBox]]:
  """(lfw_style, crop box) from ``--lfw_crop`` and ``--crop``.

  ``--crop=lfw`` is exactly ``--lfw_crop``; other presets and pixel boxes are
  cut before the plain resize.

  Raises:
    ValueError: for a malformed crop, or a box together with --lfw_crop.
  """
  text = (options.crop or "").strip()
  if not text:
    return bool(options.lfw_crop), None
  if text == "lfw":
    return True, None
  try:
    box = images_lib.parse_crop(text)
  except ValueError as error:
    raise ValueError(f"--crop: {error}") from None
  if options.lfw_crop:
    raise ValueError(f"--crop={text} and --lfw_crop both crop the images; give one")
  return False, box


def subset_selection(value: Optional[str]) -> Optional[list[str]]:
  """``--gallery_subset``/``--probe_subset``: None = all, "" = directly inside, "a,b"."""
  if value is None:
    return None
  return [part.strip() for part in value.split(",")] if value.strip() else [""]


# --------------------------------------------------------------------------- #
# The run.
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class _Run:
  """What every protocol of one run shares."""
  options: EvalOptions
  protocols: tuple[str, ...]
  model: runner.ModelRunner
  report: dict
  synthetic: "_SyntheticCache"
  cache: protocols.EmbeddingCache
  lfw_style: bool
  crop: Optional[images_lib.CropBox]


def run(options: EvalOptions) -> dict[str, Any]:
  """Loads the checkpoint, evaluates the protocols, writes and returns the report.

  Args:
    options: what to evaluate.

  Returns:
    The report (result objects; ``report['files']`` lists what was written,
    ``report['errors']`` the ``--bin`` sets that could not be scored).

  Raises:
    ValueError / FileNotFoundError / pickle.UnpicklingError: on bad options
      or inputs, naming them (``checkpoint_io.CheckpointError`` for an
      unreadable checkpoint).
  """
  names = protocol_names(options.protocol)
  check_paths(options)
  lfw_style, crop = face_preparation(options)
  check_options(options, names)
  loaded = predict.load(options.checkpoint, options.dtype, options.step)
  model = runner.ModelRunner(loaded, batch_size=options.batch_size, flip=options.flip,
                             progress=options.progress)
  report = report_lib.new_report(",".join(names), loaded.info, dataclasses.asdict(options))
  # One pass through encoder + age estimator serves every protocol when ages
  # are needed at all; otherwise the encoder alone.
  with_age = "age" in names and "age" in loaded.variables
  ctx = _Run(options, names, model, report, _SyntheticCache(options),
             protocols.EmbeddingCache(model, with_age), lfw_style, crop)
  evaluators = {"verification": _verification, "identification": _identification,
                "age": _age, "fas": _fas}
  for name in names:
    evaluators[name](ctx)
  report["embedding_cache"] = ctx.cache.stats()
  report_lib.write_report(report, options.output_dir)
  return report


def check_paths(options: EvalOptions) -> None:
  """Fails fast, before loading any model, on a missing input file or folder.

  Raises:
    FileNotFoundError: naming the flag and the path.
  """
  given = [("pairs", v) for v in as_paths(options.pairs)]
  given += [("pair_list", v) for v in as_paths(options.pair_list)]
  given += [("bin", v) for v in as_paths(options.bins)]
  given += [("list", options.list), ("gallery", options.gallery), ("probe", options.probe),
            ("folder", options.folder), ("ecaf", options.ecaf)]
  given = [(flag, split_name(value)[1]) for flag, value in given if value]
  given += [("images_root", options.images_root), ("age_checkpoint", options.age_checkpoint),
            ("id_checkpoint", options.id_checkpoint)]
  for flag, path in given:
    if path and not Path(path).exists():
      raise FileNotFoundError(f"--{flag}: {path} does not exist")


def check_options(options: EvalOptions, names: Sequence[str]) -> None:
  """Refuses flag combinations that cannot mean anything, naming the fix.

  Raises:
    ValueError: one line, suggesting the flag that fixes it.
  """
  if options.identification not in protocols.IDENTIFICATION_METHODS:
    raise ValueError(f"--identification must be one of "
                     f"{protocols.IDENTIFICATION_METHODS}, got {options.identification!r}")
  if options.nested not in datasets.NESTED_MODES:
    raise ValueError(f"--nested must be one of {datasets.NESTED_MODES}, got "
                     f"{options.nested!r}")
  if options.ecaf_alignment not in ECAF_ALIGNMENTS:
    raise ValueError(f"--ecaf_alignment must be one of {ECAF_ALIGNMENTS}, got "
                     f"{options.ecaf_alignment!r}")
  if options.pair_format not in PAIR_FORMATS:
    raise ValueError(f"--pair_format must be one of {PAIR_FORMATS}, got "
                     f"{options.pair_format!r}")
  if bool(options.gallery) != bool(options.probe):
    raise ValueError("gallery/probe identification needs both --gallery and --probe "
                     "(they may be the same identity folder with --gallery_subset/"
                     "--probe_subset)")
  for flag in ("gallery_subset", "probe_subset"):
    if getattr(options, flag) is not None and not options.gallery:
      raise ValueError(f"--{flag} selects subfolders of --gallery/--probe identity "
                       "folders; give --gallery and --probe")
  users = [n for n in names if n in ("identification", "age", "fas")]
  if options.folder and len(users) > 1 and not options.folder_format:
    raise ValueError(f"--folder is read by {', '.join(users)}, whose default formats "
                     "differ: give --folder_format (utkface, fgnet, identity or images)")


def _add(ctx: _Run, section: str, name: str, result: Any, dataset: dict) -> None:
  """Stores a result; the set's ``datasets`` entry gathers every protocol's facts."""
  if name in (ctx.report.get(section) or {}):
    raise ValueError(f"two {section} sets are named {name!r}: name them with "
                     "name=path (or --name)")
  report_lib.add_result(ctx.report, section, name, result)
  ctx.report["datasets"].setdefault(name, {}).update(dataset)


def one_line(error: BaseException) -> str:
  """An exception as one line of text."""
  return " ".join(str(error).split()) or type(error).__name__


def _record_error(ctx: _Run, section: str, name: str, source: str,
                  error: BaseException) -> None:
  """A set that could not be scored: kept in ``report['errors']``, the run goes on."""
  message = one_line(error)
  logging.error("%s set %s (%s): %s", section, name, source, message)
  ctx.report.setdefault("errors", []).append(
      {"section": section, "dataset": name, "source": source, "error": message})


def _shapes(ctx: _Run, name: str, paths: Sequence[str], lfw_style: bool,
            crop: Optional[images_lib.CropBox]) -> dict:
  """The ``shapes`` entry of a file set's distinct files (after embedding), warning once."""
  tally = ctx.cache.shape_tally(list(dict.fromkeys(paths)), lfw_style, crop)
  warning = tally.warning()
  if tally.num_not_square:
    warning += " (eval.py --crop=x0,y0,x1,y1)"
  if warning:
    ctx.report.setdefault("warnings", []).append(f"{name}: {warning}")
    logging.warning("%s: %s", name, warning)
  return {"num_images": tally.num_images, "num_not_square": tally.num_not_square,
          "num_resized": tally.num_resized,
          "examples": [f"{source} ({size})" for source, size in tally.examples]}


def _face_set_entry(ctx: _Run, faces: datasets.FaceSet) -> dict:
  """A FaceSet's summary plus, for files, its shape counts."""
  entry = faces.summary()
  if faces.paths is not None:
    entry["shapes"] = _shapes(ctx, faces.name, faces.paths, faces.lfw_style, faces.crop)
  return entry


class _SyntheticCache:
  """Renders the synthetic dataset once per run, when a source needs it."""

  def __init__(self, options: EvalOptions):
    self._options, self._data = options, None

  def get(self) -> synthetic.SyntheticFaces:
    if self._data is None:
      o = self._options
      self._data = synthetic.make_dataset(
          o.synthetic_identities, o.synthetic_images_per_identity, o.synthetic_seed,
          test_fraction=o.synthetic_test_fraction, num_folds=o.synthetic_num_folds,
          pairs_per_fold=o.synthetic_pairs_per_fold)
    return self._data

  def test_set(self) -> datasets.FaceSet:
    return datasets.from_synthetic("synthetic_test", self.get().test)


# --------------------------------------------------------------------------- #
# Verification.
# --------------------------------------------------------------------------- #


def _verification(ctx: _Run) -> None:
  options = ctx.options
  ordinals = datasets.parse_fold_ordinals(options.eval_folds)
  if as_paths(options.bins) and options.max_pairs_per_fold:
    raise ValueError("--max_pairs_per_fold applies to pair lists and synthetic pairs, "
                     "not to .bin sets")
  for value in as_paths(options.pairs):
    name, path = split_name(value)
    root = options.images_root or _lfw_images_root(path)
    _pair_list(ctx, path, "lfw", root, ordinals, name or Path(path).parent.name or "pairs")
  for value in as_paths(options.pair_list):
    name, path = split_name(value)
    pair_format = options.pair_format
    if pair_format == "auto":
      pair_format = datasets.guess_pair_format(path)
    default = Path(path).parent.name if pair_format == "lfw" else Path(path).stem
    _pair_list(ctx, path, pair_format, options.images_root or None, ordinals,
               name or default or "pairs")
  if options.ecaf:
    _ecaf(ctx, ordinals)
  for value in as_paths(options.bins):
    _bin_set(ctx, value, ordinals)
  if options.synthetic:
    pairs = ctx.synthetic.get().pairs
    folds = datasets.resolve_eval_folds(ordinals, pairs[:, 3])
    result = protocols.verify_synthetic(ctx.model, ctx.synthetic.get(), folds,
                                        options.max_pairs_per_fold)
    _add(ctx, "verification", "synthetic", result,
         {"source": "synthetic test pairs", "num_pairs": result.num_pairs})
  _require_results(ctx, "verification", "--pairs, --pair_list, --ecaf, --bin or --synthetic")


def ecaf_sources(root, alignment: str = "mtcnn") -> tuple[list[Path], Path]:
  """ECAF's pair lists and the image folder their names are relative to.

  The layout is the distributed one (docs/evaluation.md): ``image_pairs/*.txt``
  and ``image_data/img_mtcnn`` / ``image_data/img_ffhq``.

  Args:
    root: the ECAF folder.
    alignment: "mtcnn" or "ffhq".

  Returns:
    (sorted pair lists, image folder).

  Raises:
    FileNotFoundError: naming the missing part of the layout.
  """
  root = Path(root)
  lists_found = sorted((root / "image_pairs").glob("*.txt"))
  if not lists_found:
    raise FileNotFoundError(f"--ecaf: no image_pairs/*.txt under {root}")
  images = root / "image_data" / f"img_{alignment}"
  if not images.is_dir():
    raise FileNotFoundError(f"--ecaf: {images} is not a folder (--ecaf_alignment="
                            f"{alignment})")
  return lists_found, images


def _ecaf(ctx: _Run, ordinals) -> None:
  """Scores every ECAF pair list: generic 'img1 img2 1|-1' lines, contiguous folds."""
  # Ours (docs/architecture.md T3): the +-1 format and LFW-style 10-fold accuracy
  # are inferred from the original's .bin converter and the author's remarks.
  pair_lists, images = ecaf_sources(ctx.options.ecaf, ctx.options.ecaf_alignment)
  for path in pair_lists:
    _pair_list(ctx, str(path), "generic", str(images), ordinals, f"ecaf_{path.stem}")


def _lfw_images_root(pairs_path: str) -> str:
  """LFW images next to pairs.txt: ``images/`` when present, else the folder."""
  folder = Path(pairs_path).parent
  return str(folder / "images") if (folder / "images").is_dir() else str(folder)


def _pair_list(ctx: _Run, path, pair_format, root, ordinals, name) -> None:
  """Parses, optionally shortens and evaluates one pair list."""
  options = ctx.options
  pairs, parsed = datasets.load_pairs(path, pair_format, root, options.num_folds,
                                      options.skip_bad_examples)
  listed = len(pairs)
  pairs = datasets.with_contiguous_folds(pairs, options.num_folds)
  pairs = datasets.limit_pairs_per_fold(pairs, options.max_pairs_per_fold)
  folds = datasets.resolve_eval_folds(ordinals, datasets.pair_fold_labels(pairs))
  result = protocols.verify_pairs(ctx.model, pairs, ctx.lfw_style, folds, ctx.crop,
                                  ctx.cache)
  used = [p.path1 for p in pairs] + [p.path2 for p in pairs]
  _add(ctx, "verification", name, result, {
      "source": str(path), "pair_format": pair_format, "images_root": root,
      "num_pairs_listed": listed, "num_pairs": result.num_pairs,
      "num_skipped": parsed.num_skipped,
      "skipped": [{"entry": w, "reason": r} for w, r in parsed.skipped[:20]],
      "crop": datasets.crop_key(ctx.lfw_style, ctx.crop) or "none",
      "shapes": _shapes(ctx, name, used, ctx.lfw_style, ctx.crop)})


def _bin_set(ctx: _Run, value: str, ordinals) -> None:
  """Scores one .bin set; a bad set is recorded and the others go on."""
  name, path = split_name(value)
  name = name or Path(path).stem
  folds = datasets.resolve_eval_folds(ordinals, range(ctx.options.num_folds))
  try:
    result = protocols.verify_bin(ctx.model, path, ctx.options.num_folds, folds)
  except INPUT_ERRORS as error:  # Unsafe pickles, corrupt images, bad layouts.
    _record_error(ctx, "verification", name, path, error)
    return
  _add(ctx, "verification", name, result, {"source": path, "num_pairs": result.num_pairs})


# --------------------------------------------------------------------------- #
# Identification, age, face age synthesis.
# --------------------------------------------------------------------------- #

IDENTIFICATION_NAMES = {"loio": "leave-one-image-out", "lopo": "leave-one-person-out"}


def _identification(ctx: _Run) -> None:
  options = ctx.options
  if options.gallery:
    _gallery_probe(ctx)
  sets = []
  if options.folder:
    sets += _folder_sets(ctx, "fgnet", ("fgnet", "identity"))
  if options.synthetic:
    sets.append(ctx.synthetic.test_set())
  for faces in sets:
    # Whole identities, so that every kept probe keeps its matches.
    faces = faces.subset(id_lib.thin_by_identity(faces.ids, options.max_images))
    result = protocols.identify_set(ctx.model, faces, options.identification, ctx.cache)
    entry = _face_set_entry(ctx, faces)
    entry["identification"] = IDENTIFICATION_NAMES[options.identification]
    _add(ctx, "identification", faces.name, result, entry)
  _require_results(ctx, "identification", "--gallery/--probe, --folder or --synthetic")


def _gallery_probe(ctx: _Run) -> None:
  """Probes ranked against a gallery; both may be subsets of one identity folder."""
  options = ctx.options
  name, _ = split_name(options.gallery)
  gallery = _labelled_set(ctx, options.gallery, options.gallery_subset, "gallery")
  probe = _labelled_set(ctx, options.probe, options.probe_subset, "probe")
  kept_gallery, kept_probe = id_lib.thin_gallery_probe(gallery.ids, probe.ids,
                                                       options.max_images)
  gallery, probe = gallery.subset(kept_gallery), probe.subset(kept_probe)
  result = protocols.identify_gallery_probe(ctx.model, gallery, probe, ctx.cache)
  _add(ctx, "identification", name or f"{gallery.name}->{probe.name}", result,
       {"identification": "gallery-probe", "gallery": _face_set_entry(ctx, gallery),
        "probe": _face_set_entry(ctx, probe)})


def _labelled_set(ctx: _Run, value: str, subset: Optional[str], flag: str) -> datasets.FaceSet:
  """A gallery/probe set: an identity folder (optionally one subset) or a list."""
  options = ctx.options
  _, path = split_name(value)
  subsets = subset_selection(subset)
  if Path(path).is_dir():
    name = datasets.folder_name(path)
    if subsets is not None:
      name += "".join(f"/{s}" for s in subsets if s)
    return datasets.from_folder(path, "identity", ctx.lfw_style, options.skip_bad_examples,
                                ctx.crop, options.nested, subsets, name)
  if subsets is not None:
    raise ValueError(f"--{flag}_subset selects subfolders of an identity folder, but "
                     f"--{flag}={path} is a list file")
  return datasets.from_list(path, options.images_root or None, ctx.lfw_style,
                            options.skip_bad_examples, ctx.crop)


def _age(ctx: _Run) -> None:
  options = ctx.options
  for faces in _face_sets(ctx, "utkface", ("utkface", "fgnet")):
    faces = faces.spread(options.max_images)
    result = protocols.estimate_age(ctx.model, faces, options.group_from,
                                    options.cs_years, ctx.cache)
    _add(ctx, "age", faces.name, result, _face_set_entry(ctx, faces))
  _require_results(ctx, "age", "--folder (--folder_format=utkface or fgnet), --list or "
                   "--synthetic")


def _fas(ctx: _Run) -> None:
  options = ctx.options
  age_model, age_name = _helper_model(options, options.age_checkpoint, ctx.model)
  id_model, id_name = _helper_model(options, options.id_checkpoint, ctx.model)
  for faces in _face_sets(ctx, "images", datasets.FOLDER_FORMATS):
    faces = faces.spread(options.num_inputs)
    outcome = protocols.face_age_synthesis(ctx.model, faces, age_model, id_model,
                                           options.output_dir, options.group_from,
                                           options.grid_rows, options.grid_faces)
    _add(ctx, "fas", faces.name,
         report_lib.fas_entry(outcome, age_name, id_name, options.group_from),
         faces.summary())
  if options.synthetic:  # The procedural faces know the truth: score against it too.
    truth = synthetic_truth.evaluate_truth(ctx.model, ctx.synthetic.get().test,
                                           options.output_dir, num_inputs=options.num_inputs,
                                           grid_rows=options.grid_rows)
    _add(ctx, "fas_truth", "synthetic_test", {**truth["result"].to_dict(), "grid": truth["grid"]},
         {"truth": "the same identities rendered at each group's centre age"})
  _require_results(ctx, "fas", "--folder, --list or --synthetic")


def _helper_model(options: EvalOptions, path: str, default):
  """(runner, description) of a separately given checkpoint, or the default."""
  if not path:
    return default, "checkpoint"
  loaded = predict.load(path, options.dtype)
  return (runner.ModelRunner(loaded, batch_size=options.batch_size, flip=options.flip,
                             progress=False), loaded.info["checkpoint"])


def _face_sets(ctx: _Run, default_format, allowed) -> list[datasets.FaceSet]:
  """The labelled sets given by --folder, --list and --synthetic."""
  options = ctx.options
  sets = []
  if options.folder:
    sets += _folder_sets(ctx, default_format, allowed)
  if options.list:
    name, path = split_name(options.list)
    name = name or (None if options.folder else options.name) or None
    sets.append(datasets.from_list(path, options.images_root or None, ctx.lfw_style,
                                   options.skip_bad_examples, ctx.crop, name))
  if options.synthetic:
    sets.append(ctx.synthetic.test_set())
  return sets


def _folder_sets(ctx: _Run, default_format, allowed) -> list[datasets.FaceSet]:
  """The --folder set for this protocol, or none when another protocol reads it."""
  options = ctx.options
  folder_format = options.folder_format or default_format
  if folder_format not in allowed:
    others = [n for n in ctx.protocols if n in ("identification", "age", "fas")]
    if len(others) > 1:
      return []  # Read by the run's other protocols only.
    raise ValueError(f"--folder_format={folder_format} cannot be used for "
                     f"{'/'.join(ctx.protocols)}; use one of {allowed}")
  name, path = split_name(options.folder)
  return [datasets.from_folder(path, folder_format, ctx.lfw_style,
                               options.skip_bad_examples, ctx.crop, options.nested,
                               name=name or options.name or None)]


def _require_results(ctx: _Run, section: str, sources: str) -> None:
  failed = [e for e in ctx.report.get("errors", []) if e["section"] == section]
  if not ctx.report.get(section) and not failed:
    raise ValueError(f"{section} needs a source: give {sources}")


# --------------------------------------------------------------------------- #
# Entry point.
# --------------------------------------------------------------------------- #


def execute(options: EvalOptions, stdout=None, stderr=None) -> int:
  """Runs ``options`` as ``eval.py`` does: tables to stdout, errors as one line.

  Args:
    options: what to evaluate.
    stdout: where the tables go (default ``sys.stdout``).
    stderr: where warnings and errors go (default ``sys.stderr``).

  Returns:
    The exit status: 0, or 1 after an input error (nothing written) or when
    some ``--bin`` set could not be scored (the others' results written).
  """
  stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
  try:
    report = run(options)
  except INPUT_ERRORS as error:  # ImageDecodeError and CheckpointError included.
    print(f"eval.py: error: {one_line(error)}", file=stderr)
    return 1
  print(report_lib.report_text(report), file=stdout)
  for kind, path in report["files"].items():
    print(f"wrote {kind}: {path}", file=stdout)
  for entry in (report.get("fas") or {}).values():
    for path in entry["grids"]:
      print(f"wrote grid: {path}", file=stdout)
  for warning in report.get("warnings", []):
    print(f"eval.py: warning: {warning}", file=stderr)
  for error in report.get("errors", []):
    print(f"eval.py: error: {error['section']} set {error['dataset']} "
          f"({error['source']}) was not scored: {error['error']}", file=stderr)
  return 1 if report.get("errors") else 0


def main(argv) -> int:
  """``eval.py``'s entry point: runs the flags' evaluation and prints the tables."""
  if len(argv) > 1:
    print(f"eval.py: unexpected arguments {argv[1:]}", file=sys.stderr)
    return 2
  if not flags.FLAGS["verbosity"].present:
    # orbax logs every restore step at INFO; keep the output to the report.
    logging.set_verbosity(logging.WARNING)
  return execute(options_from_flags())
