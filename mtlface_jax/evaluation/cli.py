"""The command line behind ``eval.py``: flags -> :class:`EvalOptions` -> :func:`run`.

``python eval.py --checkpoint=DIR --protocol=P [sources] [options]`` with
protocols ``verification``, ``identification``, ``age`` and ``fas``. Every
source given is evaluated and reported under its own name; the report goes to
``--output_dir`` (``report.json``, ``report.txt``, ``roc.png``, FAS grids) and
its tables are printed. See the README section "Evaluation" for examples and
every report field.
"""

import dataclasses
import sys
from pathlib import Path
from typing import Any, Optional

from absl import flags
from absl import logging

from mtlface_jax import predict
from mtlface_jax import synthetic
from mtlface_jax.evaluation import datasets
from mtlface_jax.evaluation import protocols
from mtlface_jax.evaluation import report as report_lib
from mtlface_jax.evaluation import runner

PROTOCOLS = ("verification", "identification", "age", "fas")


@dataclasses.dataclass
class EvalOptions:
  """Everything one evaluation run needs (the flags of ``eval.py``)."""
  checkpoint: str
  protocol: str
  output_dir: str = "eval_output"
  step: Optional[int] = None
  dtype: str = "float32"
  batch_size: int = 64
  flip: bool = True
  progress: bool = True
  skip_bad_examples: bool = False
  # Sources.
  pairs: str = ""
  pair_list: str = ""
  pair_format: str = "generic"
  bins: tuple = ()
  folder: str = ""
  folder_format: str = ""
  list: str = ""
  gallery: str = ""
  probe: str = ""
  images_root: str = ""
  lfw_crop: bool = False
  synthetic: bool = False
  synthetic_identities: int = 200
  synthetic_images_per_identity: int = 20
  synthetic_seed: int = 0
  synthetic_test_fraction: float = 0.1
  synthetic_num_folds: int = 10
  synthetic_pairs_per_fold: int = 100
  # Protocol options.
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
  flags.DEFINE_enum("protocol", None, PROTOCOLS, "What to evaluate.", required=True, **d)
  flags.DEFINE_string("output_dir", "eval_output", "Where report.json/report.txt/roc.png "
                      "and FAS grids are written.", **d)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", **d)
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of the encoder and "
                    "generator (parameters stay float32).", **d)
  flags.DEFINE_integer("batch_size", 64, "Images per device call (rounded up to a multiple "
                       "of the device count).", **d)
  flags.DEFINE_bool("flip", True, "Sum each face's embedding with its mirror's.", **d)
  flags.DEFINE_bool("progress", True, "Show progress bars.", **d)
  flags.DEFINE_bool("skip_bad_examples", False, "Count and list malformed list lines/file "
                    "names instead of failing on the first.", **d)
  _define_source_flags(d)
  _define_protocol_flags(d)


def _define_source_flags(d: dict) -> None:
  flags.DEFINE_string("pairs", "", "LFW pairs.txt (verification). Images under "
                      "--images_root (default: <pairs dir>/images if present, else the "
                      "pairs dir).", **d)
  flags.DEFINE_string("pair_list", "", "Pair list (verification), see --pair_format.", **d)
  flags.DEFINE_enum("pair_format", "generic", ("generic", "numbered"),
                    "generic: 'path1 path2 same [fold]'; numbered (CACD-VS): "
                    "'n path1 path2 same'.", **d)
  flags.DEFINE_multi_string("bin", [], "insightface .bin set(s) (verification), e.g. "
                            "agedb_30.bin; repeat the flag for several.", **d)
  flags.DEFINE_string("folder", "", "Labelled image folder (identification: leave-one-out; "
                      "age; fas: inputs), read as --folder_format.", **d)
  flags.DEFINE_enum("folder_format", "", ("", *datasets.FOLDER_FORMATS),
                    "utkface | fgnet | identity (<folder>/<person>/<img>) | images "
                    "(unlabelled). Default: fgnet for identification, utkface for age, "
                    "images for fas.", **d)
  flags.DEFINE_string("list", "", "MTLFace/SCAF list 'id filename age gender' (age, fas), "
                      "names relative to --images_root.", **d)
  flags.DEFINE_string("gallery", "", "Identification gallery: an identity folder or an "
                      "MTLFace list.", **d)
  flags.DEFINE_string("probe", "", "Identification probes: an identity folder or an "
                      "MTLFace list.", **d)
  flags.DEFINE_string("images_root", "", "Folder list/pair names are relative to.", **d)
  flags.DEFINE_bool("lfw_crop", False, "Apply the fixed central LFW crop (raw 250x250 "
                    "deep-funneled LFW) instead of a plain resize.", **d)
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


def _define_protocol_flags(d: dict) -> None:
  flags.DEFINE_integer("num_folds", 10, "Folds of .bin sets and of pair lists without "
                       "fold labels (contiguous blocks).", **d)
  flags.DEFINE_string("eval_folds", "", "Folds to evaluate, numbered FROM 1 in order of "
                      "their labels, e.g. '6-10' = LFW's last five folds (labels 5..9). "
                      "Each fold's threshold is chosen on the other selected folds. "
                      "Default: all.", **d)
  flags.DEFINE_integer("max_pairs_per_fold", 0, "Keep only the first N matched and N "
                       "mismatched pairs of each fold (quick runs; pair lists and "
                       "synthetic pairs). 0 = all.", **d)
  flags.DEFINE_integer("max_images", 0, "Evaluate at most N faces per set, evenly spaced "
                       "(identification/age). 0 = all.", **d)
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
  values["bins"] = tuple(values["bins"] or ())
  return EvalOptions(**values)


def run(options: EvalOptions) -> dict[str, Any]:
  """Loads the checkpoint, evaluates the protocol, writes and returns the report.

  Args:
    options: what to evaluate.

  Returns:
    The report (result objects; ``report['files']`` lists what was written).

  Raises:
    ValueError / FileNotFoundError: on bad options or inputs, naming them.
  """
  if options.protocol not in PROTOCOLS:
    raise ValueError(f"protocol must be one of {PROTOCOLS}, got {options.protocol!r}")
  check_paths(options)
  loaded = predict.load(options.checkpoint, options.dtype, options.step)
  model = runner.ModelRunner(loaded, batch_size=options.batch_size, flip=options.flip,
                                progress=options.progress)
  report = report_lib.new_report(options.protocol, loaded.info, dataclasses.asdict(options))
  evaluate = {"verification": _verification, "identification": _identification,
              "age": _age, "fas": _fas}[options.protocol]
  evaluate(options, model, report, _SyntheticCache(options))
  report_lib.write_report(report, options.output_dir)
  return report


def check_paths(options: EvalOptions) -> None:
  """Fails fast, before loading any model, on a missing input file or folder.

  Raises:
    FileNotFoundError: naming the flag and the path.
  """
  given = [("pairs", options.pairs), ("pair_list", options.pair_list),
           ("list", options.list), ("gallery", options.gallery), ("probe", options.probe),
           ("folder", options.folder), ("images_root", options.images_root),
           ("age_checkpoint", options.age_checkpoint),
           ("id_checkpoint", options.id_checkpoint)]
  given += [("bin", path) for path in options.bins]
  for flag, path in given:
    if path and not Path(path).exists():
      raise FileNotFoundError(f"--{flag}: {path} does not exist")


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


def _verification(options: EvalOptions, model, report: dict, data: _SyntheticCache) -> None:
  ordinals = datasets.parse_fold_ordinals(options.eval_folds)
  if options.bins and options.max_pairs_per_fold:
    raise ValueError("--max_pairs_per_fold applies to pair lists and synthetic pairs, "
                     "not to .bin sets")
  if options.pairs:
    root = options.images_root or _lfw_images_root(options.pairs)
    _pair_list(options, model, report, options.pairs, "lfw", root, ordinals)
  if options.pair_list:
    _pair_list(options, model, report, options.pair_list, options.pair_format,
               options.images_root or None, ordinals)
  for path in options.bins:
    folds = datasets.resolve_eval_folds(ordinals, range(options.num_folds))
    result = protocols.verify_bin(model, path, options.num_folds, folds)
    report_lib.add_result(report, "verification", Path(path).stem, result,
                         {"source": path, "num_pairs": result.num_pairs})
  if options.synthetic:
    pairs = data.get().pairs
    folds = datasets.resolve_eval_folds(ordinals, pairs[:, 3])
    result = protocols.verify_synthetic(model, data.get(), folds, options.max_pairs_per_fold)
    report_lib.add_result(report, "verification", "synthetic", result,
                         {"source": "synthetic test pairs", "num_pairs": result.num_pairs})
  _require_results(report, "verification", "--pairs, --pair_list, --bin or --synthetic")


def _lfw_images_root(pairs_path: str) -> str:
  """LFW images next to pairs.txt: ``images/`` when present, else the folder."""
  folder = Path(pairs_path).parent
  return str(folder / "images") if (folder / "images").is_dir() else str(folder)


def _pair_list(options, model, report, path, pair_format, root, ordinals) -> None:
  """Parses, optionally shortens and evaluates one pair list."""
  pairs, parsed = datasets.load_pairs(path, pair_format, root, options.num_folds,
                                      options.skip_bad_examples)
  listed = len(pairs)
  pairs = datasets.with_contiguous_folds(pairs, options.num_folds)
  pairs = datasets.limit_pairs_per_fold(pairs, options.max_pairs_per_fold)
  folds = datasets.resolve_eval_folds(ordinals, datasets.pair_fold_labels(pairs))
  name = Path(path).parent.name if pair_format == "lfw" else Path(path).stem
  result = protocols.verify_pairs(model, pairs, options.lfw_crop, folds)
  report_lib.add_result(report, "verification", name or "pairs", result, {
      "source": str(path), "images_root": root, "num_pairs_listed": listed,
      "num_pairs": result.num_pairs, "num_skipped": parsed.num_skipped,
      "skipped": [{"entry": w, "reason": r} for w, r in parsed.skipped[:20]]})


def _identification(options: EvalOptions, model, report: dict, data: _SyntheticCache) -> None:
  if bool(options.gallery) != bool(options.probe):
    raise ValueError("gallery/probe identification needs both --gallery and --probe")
  if options.gallery:
    gallery = _labelled_set(options, options.gallery).spread(options.max_images)
    probe = _labelled_set(options, options.probe).spread(options.max_images)
    result = protocols.identify_gallery_probe(model, gallery, probe)
    report_lib.add_result(report, "identification", f"{gallery.name}->{probe.name}", result,
                         {"gallery": gallery.summary(), "probe": probe.summary()})
  sets = []
  if options.folder:
    sets.append(_folder_set(options, "fgnet", allowed=("fgnet", "identity")))
  if options.synthetic:
    sets.append(data.test_set())
  for faces in sets:
    faces = faces.spread(options.max_images)
    result = protocols.identify_leave_one_out(model, faces)
    report_lib.add_result(report, "identification", faces.name, result, faces.summary())
  _require_results(report, "identification", "--gallery/--probe, --folder or --synthetic")


def _age(options: EvalOptions, model, report: dict, data: _SyntheticCache) -> None:
  for faces in _face_sets(options, data, "utkface", ("utkface", "fgnet")):
    faces = faces.spread(options.max_images)
    result = protocols.estimate_age(model, faces, options.group_from, options.cs_years)
    report_lib.add_result(report, "age", faces.name, result, faces.summary())
  _require_results(report, "age", "--folder, --list or --synthetic")


def _fas(options: EvalOptions, model, report: dict, data: _SyntheticCache) -> None:
  age_model, age_name = _helper_model(options, options.age_checkpoint, model)
  id_model, id_name = _helper_model(options, options.id_checkpoint, model)
  for faces in _face_sets(options, data, "images", datasets.FOLDER_FORMATS):
    faces = faces.spread(options.num_inputs)
    outcome = protocols.face_age_synthesis(model, faces, age_model, id_model,
                                           options.output_dir, options.group_from,
                                           options.grid_rows, options.grid_faces)
    report_lib.add_result(report, "fas", faces.name,
                         report_lib.fas_entry(outcome, age_name, id_name, options.group_from),
                         faces.summary())
  _require_results(report, "fas", "--folder, --list or --synthetic")


def _helper_model(options: EvalOptions, path: str, default):
  """(runner, description) of a separately given checkpoint, or the default."""
  if not path:
    return default, "checkpoint"
  loaded = predict.load(path, options.dtype)
  return (runner.ModelRunner(loaded, batch_size=options.batch_size, flip=options.flip,
                                progress=False), loaded.info["checkpoint"])


def _face_sets(options, data, default_format, allowed) -> list[datasets.FaceSet]:
  """The labelled sets given by --folder, --list and --synthetic."""
  sets = []
  if options.folder:
    sets.append(_folder_set(options, default_format, allowed))
  if options.list:
    sets.append(datasets.from_list(options.list, options.images_root or None,
                                   options.lfw_crop, options.skip_bad_examples))
  if options.synthetic:
    sets.append(data.test_set())
  return sets


def _folder_set(options, default_format, allowed) -> datasets.FaceSet:
  folder_format = options.folder_format or default_format
  if folder_format not in allowed:
    raise ValueError(f"--folder_format={folder_format} cannot be used for "
                     f"{options.protocol}; use one of {allowed}")
  return datasets.from_folder(options.folder, folder_format, options.lfw_crop,
                              options.skip_bad_examples)


def _labelled_set(options, path: str) -> datasets.FaceSet:
  """A gallery/probe set: an identity folder or an MTLFace list file."""
  if Path(path).is_dir():
    return datasets.from_folder(path, "identity", options.lfw_crop, options.skip_bad_examples)
  return datasets.from_list(path, options.images_root or None, options.lfw_crop,
                            options.skip_bad_examples)


def _require_results(report: dict, section: str, sources: str) -> None:
  if not report.get(section):
    raise ValueError(f"{section} needs a source: give {sources}")


def main(argv) -> int:
  """``eval.py``'s entry point: runs the flags' evaluation and prints the tables."""
  if len(argv) > 1:
    print(f"eval.py: unexpected arguments {argv[1:]}", file=sys.stderr)
    return 2
  if not flags.FLAGS["verbosity"].present:
    # orbax logs every restore step at INFO; keep the output to the report.
    logging.set_verbosity(logging.WARNING)
  options = options_from_flags()
  try:
    report = run(options)
  except (ValueError, FileNotFoundError) as error:  # Includes ImageDecodeError.
    print(f"eval.py: error: {error}", file=sys.stderr)
    return 1
  print(report_lib.report_text(report))
  for kind, path in report["files"].items():
    print(f"wrote {kind}: {path}")
  for entry in (report.get("fas") or {}).values():
    for path in entry["grids"]:
      print(f"wrote grid: {path}")
  return 0

