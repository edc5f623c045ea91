"""Selective fine-tuning of AIFR with synthesized faces (TPAMI; every detail OURS).

The TPAMI paper says only that synthesized faces are used, selectively, to
fine-tune recognition (docs/architecture.md T2). Our reading, every choice a
key of the config section ``selective`` (configs/common.py):

1. With a trained FAS run frozen, synthesize each identity-labelled training
   face into every OTHER age group. A face's own group comes from its age
   label; where the age is unknown (LFW faces of the real-data recipe) we take
   the frozen age estimator's group of the source as its own (ours).
2. Keep a synthetic face iff the frozen age estimator's group (argmax of the
   flip-averaged group logits) is the target group AND the cosine between the
   source's and the synthetic face's embeddings is >= tau. tau defaults to
   the threshold at FAR ``far`` (1e-3) of the frozen encoder on the recipe's
   held-out verification pairs (the same pairs the arms are evaluated on).
3. Fine-tune AIFR (CosFace on the same identity labels) from the AIFR run on
   its real training data plus the kept faces (labelled with their source's
   identity and gender and the middle age of their target group) at a low
   learning rate.

The ``--from`` workdir's AIFR checkpoint says which recipe trained it (its
config's ``data.name``, :func:`recipe_data`): the demo's procedural faces
(``synthetic_faces``; held-out synthetic pairs) or the LFW + UTKFace shards
(``face_shards``; LFW folds 6-10 and UTKFace's held-out 20%,
``recipes.lfw_utkface``). :func:`run_ablation` runs the three arms (no
fine-tuning, plain fine-tuning on all synthesized faces, selective
fine-tuning) and writes ``ablation.json`` with that recipe's held-out
evaluation of each (``recipes.heldout.evaluate``).

``python -m mtlface_jax.recipes.selective --config=configs/selective_ft.py
--workdir=OUT --from=WORKDIR`` (a workdir with ``aifr/`` and ``fas/``).
"""

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mtlface_jax import ages as ages_lib
from mtlface_jax import checkpoint_io
from mtlface_jax import data_sources
from mtlface_jax import input_pipeline
from mtlface_jax import predict
from mtlface_jax.evaluation import datasets
from mtlface_jax.evaluation import fas as fas_lib
from mtlface_jax.evaluation import runner as runner_lib
from mtlface_jax.formats import images as images_lib
from mtlface_jax.models import spec as spec_lib
from mtlface_jax.recipes import heldout
from mtlface_jax.training import loop
from mtlface_jax.training import sharding

ARMS = ("no_finetune", "plain_finetune", "selective_finetune")


def select(target_groups, estimated_groups, cosines, tau: float,
           num_groups: int) -> tuple[np.ndarray, dict[str, Any]]:
  """Which synthetic faces to keep, and the kept fraction per target group.

  Args:
    target_groups: int [M] the group each face was synthesized into.
    estimated_groups: int [M] the frozen estimator's group of each face.
    cosines: float [M] cosine of each face's embedding to its source's.
    tau: the identity threshold (kept iff cosine >= tau).
    num_groups: age groups.

  Returns:
    (bool [M] keep mask, report): ``kept``, ``candidates``, ``kept_fraction``,
    ``group_match_fraction``, ``identity_pass_fraction`` and ``per_group``:
    one ``{candidates, kept, kept_fraction}`` per target group (fraction None
    for a group without candidates).
  """
  target = np.asarray(target_groups, np.int64)
  group_ok = np.asarray(estimated_groups, np.int64) == target
  identity_ok = np.asarray(cosines, np.float64) >= tau
  keep = group_ok & identity_ok
  fraction = lambda k, n: float(k) / n if n else None
  per_group = {}
  for g in range(num_groups):
    mine = target == g
    per_group[str(g)] = {"candidates": int(mine.sum()), "kept": int(keep[mine].sum()),
                         "kept_fraction": fraction(keep[mine].sum(), mine.sum())}
  report = {"tau": float(tau), "candidates": int(keep.size), "kept": int(keep.sum()),
            "kept_fraction": fraction(keep.sum(), keep.size),
            "group_match_fraction": fraction(group_ok.sum(), keep.size),
            "identity_pass_fraction": fraction(identity_ok.sum(), keep.size),
            "per_group": per_group}
  return keep, report


def tau_at_far(result, far: float = 1e-3) -> float:
  """The score threshold of a ``VerificationResult`` at false accept rate ``far``.

  Raises:
    ValueError: when ``far`` is not among the result's FARs.
  """
  for entry in result.tar_at_far:
    if np.isclose(entry["far"], far):
      return float(entry["threshold"])
  raise ValueError(f"FAR {far} not evaluated; the result has "
                   f"{[e['far'] for e in result.tar_at_far]}")


def group_mid_ages(num_groups: int) -> np.ndarray:
  """Age label of a face synthesized into each group: the group's middle (ours).

  Group g covers (t[g-1], t[g]]; the first starts at 0 and the last is taken
  to span 10 years, as the inner groups do at 7 groups.
  """
  t = (0,) + tuple(ages_lib.thresholds_for(num_groups))
  edges = t + (t[-1] + 10,)
  return np.array([(edges[g] + edges[g + 1]) / 2 for g in range(num_groups)], np.float32)


@dataclasses.dataclass
class SourceFaces:
  """The training faces synthesized from, with the labels their syntheses inherit.

  Attributes:
    read: positions [n] -> uint8 [n, H, W, 3] faces (read a chunk at a time).
    ids: int [N] identities (all known: only identity-labelled faces are sources).
    ages: float [N] years, -1 unknown (then the estimator gives the own group).
    genders: int [N], -1 unknown.
  """
  read: Callable[[np.ndarray], np.ndarray]
  ids: np.ndarray
  ages: np.ndarray
  genders: np.ndarray

  def __len__(self) -> int:
    return len(self.ids)


@dataclasses.dataclass
class RecipeData:
  """What the ablation takes from the recipe that trained the ``--from`` runs.

  Attributes:
    name: the AIFR run's ``data.name``.
    real: its training examples, as the AIFR stage saw them.
    sources: the identity-labelled training faces to synthesize from.
    heldout: the recipe's held-out evaluation without FAS inputs (each arm's
      report; tau is read from its verification pairs).
    pairs: how ``ablation.json`` names those pairs.
  """
  name: str
  real: input_pipeline.Source
  sources: SourceFaces
  heldout: heldout.HeldOut
  pairs: str


def recipe_data(aifr_config) -> RecipeData:
  """The procedural faces or the LFW + UTKFace shards, by ``aifr_config.data.name``.

  Args:
    aifr_config: the ``--from`` AIFR run's config (from its checkpoint meta).

  Returns:
    The :class:`RecipeData`.

  Raises:
    ValueError: for data the ablation has no held-out protocol for.
  """
  name = aifr_config.data.name
  if name == "synthetic_faces":
    data = data_sources.synthetic_for(aifr_config)
    split = data.train
    sources = SourceFaces(lambda idx: split.images[idx], split.ids, split.ages, split.genders)
    return RecipeData(name, data_sources.train_source(aifr_config), sources,
                      heldout.synthetic_heldout(data, num_fas_inputs=0),
                      "the synthetic test pairs")
  if name == "face_shards":
    # Imported here: the real-data recipe is only needed for its own runs.
    from mtlface_jax import real_data  # pylint: disable=g-import-not-at-top
    from mtlface_jax.recipes import lfw_utkface  # pylint: disable=g-import-not-at-top
    shards = real_data.ShardSet(aifr_config.data.face_shards.dir)
    # UTKFace faces have no identity (-1): nothing to fine-tune identities on.
    labelled = np.intersect1d(shards.select(split="train"), np.flatnonzero(shards.ids >= 0))
    sources = SourceFaces(lambda idx: shards.images(labelled[idx]), shards.ids[labelled],
                          shards.ages[labelled], shards.genders[labelled])
    return RecipeData(name, data_sources.train_source(aifr_config), sources,
                      lfw_utkface.lfw_utkface_heldout(shards, num_fas_inputs=0),
                      "the held-out LFW folds 6-10 pairs")
  raise ValueError(f"the AIFR run's data.name is {name!r}; selective fine-tuning knows "
                   "synthetic_faces (the demo) and face_shards (recipes.lfw_utkface)")


def own_groups(ages: np.ndarray, estimated: np.ndarray, num_groups: int) -> np.ndarray:
  """Each source face's own group: by its age label, else the frozen estimator's (ours).

  Args:
    ages: float [n] age labels, -1 unknown.
    estimated: int [n] the frozen estimator's groups of the same faces.
    num_groups: age groups.

  Returns:
    int [n] groups.
  """
  labelled = ages_lib.groups_of(ages, num_groups)
  return np.where(labelled >= 0, labelled, np.asarray(estimated)).astype(np.int64)


def synthesize_candidates(runner: runner_lib.ModelRunner, sources: SourceFaces,
                          chunk: int = 256) -> dict[str, np.ndarray]:
  """Every source face synthesized into every other group, with its judgements.

  Args:
    runner: the frozen FAS model (encoder, age estimator, generator).
    sources: the faces to synthesize from.
    chunk: source faces synthesized per pass (bounds host memory).

  Returns:
    Arrays over candidates M: ``images`` uint8 [M, S, S, 3] at the model's
    side, ``source`` (index into ``sources``), ``target_group``,
    ``estimated_group``, ``cosine``.
  """
  size, num_groups = runner.image_size, runner.num_groups
  parts = []
  for start in range(0, len(sources), chunk):
    idx = np.arange(start, min(start + chunk, len(sources)))
    faces = np.stack(list(datasets.array_faces(sources.read(idx), size)))
    judged_source = runner.estimate_ages(faces, progress=False)
    own = own_groups(sources.ages[idx], judged_source["group"], num_groups)
    synthesized = runner.synthesize(faces, progress=False)  # [n, G, S, S, 3]
    rows, groups = np.nonzero(np.arange(num_groups)[None] != own[:, None])
    candidates = synthesized[rows, groups]
    judged = runner.estimate_ages(candidates, progress=False)
    parts.append({"images": fas_lib.to_uint8_images(candidates), "source": idx[rows],
                  "target_group": groups.astype(np.int32),
                  "estimated_group": judged["group"].astype(np.int32),
                  "cosine": np.sum(judged["embedding"] * judged_source["embedding"][rows],
                                   axis=-1)})
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def training_source(real: input_pipeline.Source, sources: SourceFaces,
                    candidates: dict[str, np.ndarray], keep: np.ndarray, image_size: int,
                    num_groups: int) -> input_pipeline.Source:
  """The real training examples plus the kept synthetic faces.

  Kept faces take their source's identity and gender and the middle age of
  their target group (:func:`group_mid_ages`). In-memory real faces (the
  procedural ones) are brought to ``image_size`` to join the synthetic array;
  encoded ones (the shards) stay as the AIFR stage read them
  (``input_pipeline.concatenate``).

  Args:
    real: the recipe's training examples.
    sources: the faces the candidates were synthesized from.
    candidates: :func:`synthesize_candidates`.
    keep: bool [M] the candidates to add.
    image_size: the model's input side.
    num_groups: age groups.

  Returns:
    The fine-tuning Source.
  """
  if real.kind == "arrays":
    real = input_pipeline.source_from_arrays(
        np.stack([images_lib.resize_image(im, image_size) for im in real.images]),
        real.ids, real.ages, real.genders, names=real.names)
  src, target = candidates["source"][keep], candidates["target_group"][keep]
  synthetic = input_pipeline.source_from_arrays(
      candidates["images"][keep], sources.ids[src], group_mid_ages(num_groups)[target],
      sources.genders[src], names=[f"synthetic: source {i} -> group {g}"
                                   for i, g in zip(src, target)])
  return input_pipeline.concatenate([real, synthetic])


def batches_from(source: input_pipeline.Source):
  """A ``loop.train`` ``batches_fn``: the training pipeline over an in-memory source."""
  return functools.partial(data_sources.TrainBatches, source=source)


def finetune_config(aifr_dir, options, seed: int = 0):
  """The AIFR run's own config, turned into a short low-LR fine-tuning (ours).

  Args:
    aifr_dir: the AIFR training workdir (``init_from``).
    options: ``config.selective`` (``ft_lr``, ``ft_num_iter``, ``ft_warmup``).
    seed: the run's seed (batch order, flips, dropout).

  Returns:
    The ConfigDict for ``loop.train``.
  """
  meta, _ = checkpoint_io.read_meta(aifr_dir)
  config = spec_lib.config_from_meta(meta)
  config.train_fr, config.train_fas = True, False
  config.init_from = str(aifr_dir)
  config.num_iter = int(options.ft_num_iter)
  config.optim.lr = float(options.ft_lr)
  config.optim.warmup = int(options.ft_warmup)
  config.optim.milestone = ()  # A constant low rate after warm-up.
  config.optim.min_lr = min(float(config.optim.min_lr), float(options.ft_lr))
  config.seed = int(seed)
  config.checkpoint_every = config.num_iter
  config.image_every = 0
  return config


def _evaluate(model, recipe: RecipeData, output_dir, batch_size: int) -> dict:
  """The recipe's held-out summary of one arm, plus ``verification_accuracy``.

  The recipe names its verification accuracy (``lfw_heldout_accuracy`` on real
  faces); ``verification_accuracy`` is the same number under one name.
  """
  summary = heldout.evaluate(model, recipe.heldout, output_dir,
                             batch_size=batch_size)["summary"]
  name = f"{recipe.heldout.summary_names[0]}_accuracy"
  return {**summary, "verification_accuracy": summary[name]}


def prepare(from_dir, options) -> dict[str, Any]:
  """Synthesizes the candidates, sets tau and selects (the frozen-model part).

  Args:
    from_dir: a workdir with ``aifr/`` and ``fas/`` runs.
    options: ``config.selective``.

  Returns:
    ``{'recipe', 'candidates', 'keep', 'selection', 'image_size', 'num_groups'}``.
  """
  from_dir = Path(from_dir)
  aifr_config = spec_lib.config_from_meta(checkpoint_io.read_meta(from_dir / "aifr")[0])
  recipe = recipe_data(aifr_config)
  frozen = predict.load(str(from_dir / "fas"))
  runner = runner_lib.ModelRunner(frozen, batch_size=int(options.batch_size), progress=False)
  tau = options.tau
  if tau is None:
    tau = tau_at_far(recipe.heldout.verify(runner), float(options.far))
  candidates = synthesize_candidates(runner, recipe.sources, int(options.chunk))
  keep, selection = select(candidates["target_group"], candidates["estimated_group"],
                           candidates["cosine"], tau, runner.num_groups)
  selection["tau_source"] = ("given" if options.tau is not None else
                             f"threshold at FAR {options.far} on {recipe.pairs}")
  selection["num_sources"] = len(recipe.sources)
  selection["own_group"] = ("age label" if (recipe.sources.ages >= 0).all() else
                            "age label, else the frozen estimator's group (ours)")
  return {"recipe": recipe, "candidates": candidates, "keep": keep, "selection": selection,
          "image_size": runner.image_size, "num_groups": runner.num_groups}


def run_ablation(config, workdir, from_dir) -> dict[str, Any]:
  """The three arms, each evaluated on the ``--from`` recipe's held-out data.

  Args:
    config: a config with a ``selective`` section (``configs/selective_ft.py``,
      ``configs/real_lfw_utkface.py``).
    workdir: output folder (``<arm>/seed<k>/`` runs and their ``eval/``
      reports, ``ablation.json``).
    from_dir: a workdir with ``aifr/`` and ``fas/`` runs (the demo's or
      ``recipes.lfw_utkface``'s).

  Returns:
    The ablation dict written to ``workdir/ablation.json``.
  """
  options, workdir, from_dir = config.selective, Path(workdir), Path(from_dir)
  workdir.mkdir(parents=True, exist_ok=True)
  prepared = prepare(from_dir, options)
  recipe, candidates = prepared["recipe"], prepared["candidates"]
  arms = [a for a in ARMS if a in tuple(options.arms)]
  keeps = {"plain_finetune": np.ones_like(prepared["keep"]),
           "selective_finetune": prepared["keep"]}
  result = {"from": str(from_dir), "data": recipe.name, "selection": prepared["selection"],
            "options": options.to_dict(), "arms": {}}
  batch, step = int(options.batch_size), None
  for arm in arms:
    if arm == "no_finetune":
      summary = _evaluate(str(from_dir / "aifr"), recipe, workdir / arm / "eval", batch)
      result["arms"][arm] = {"num_synthetic": 0, "num_real": len(recipe.real),
                             "heldout": summary,
                             "verification_accuracy_mean": summary["verification_accuracy"],
                             "verification_accuracy_std_over_seeds": 0.0}
      continue
    source = training_source(recipe.real, recipe.sources, candidates, keeps[arm],
                             prepared["image_size"], prepared["num_groups"])
    if step is None:
      step = _finetune_step(from_dir / "aifr", options)
    result["arms"][arm] = {"num_synthetic": int(keeps[arm].sum()),
                           "num_real": len(recipe.real),
                           **_finetune_runs(source, from_dir, workdir / arm, options, recipe,
                                            step)}
  (workdir / "ablation.json").write_text(json.dumps(_jsonable(result), indent=2))
  return result


def _finetune_step(aifr_dir: Path, options) -> loop.TrainStep:
  """The fine-tuning step, jitted once for every arm and seed.

  The runs' configs differ only in ``seed``, which the step does not read
  (``loop.train`` draws flips and dropout from the run's own config); the
  seed of the step's fresh state does not matter either, since ``init_from``
  replaces every variable with the AIFR run's (same model) and the optimizer
  state starts at zero.
  """
  return loop.build_step(finetune_config(aifr_dir, options), sharding.make_mesh())


def _finetune_runs(source, from_dir: Path, arm_dir: Path, options, recipe: RecipeData,
                   step: loop.TrainStep) -> dict:
  """One fine-tuning run per ``options.ft_seeds``, each evaluated; mean and std."""
  runs = []
  for seed in options.ft_seeds:
    out = arm_dir / f"seed{seed}"
    trained = loop.train(finetune_config(from_dir / "aifr", options, seed), out,
                         batches_fn=batches_from(source), step=step)
    runs.append({"seed": int(seed), "steps": trained["step"],
                 "last_metrics": trained["last_metrics"],
                 "heldout": _evaluate(str(out), recipe, out / "eval", int(options.batch_size))})
  accuracy = [r["heldout"]["verification_accuracy"] for r in runs]
  return {"runs": runs, "verification_accuracy_mean": float(np.mean(accuracy)),
          "verification_accuracy_std_over_seeds": float(np.std(accuracy))}


def _jsonable(value):
  """NumPy scalars and arrays -> Python, recursively."""
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, np.generic):
    return value.item()
  return value


def brief(result: dict[str, Any]) -> str:
  """The selection (without per-group rows) and each arm's accuracy, as JSON text."""
  return json.dumps({"selection": {k: v for k, v in result["selection"].items()
                                   if k != "per_group"},
                     "arms": {a: {k: v for k, v in r.items() if k.startswith("verif")}
                              for a, r in result["arms"].items()}},
                    indent=2, default=str)


def main(argv) -> None:
  del argv
  print(brief(run_ablation(_CONFIG.value, _WORKDIR.value, _FROM.value)))


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/selective_ft.py",
                                            "Selective fine-tuning config.")
  _WORKDIR = flags.DEFINE_string("workdir", None, "Output folder.", required=True)
  _FROM = flags.DEFINE_string("from", None, "Workdir with aifr/ and fas/ runs (the demo's "
                              "or recipes.lfw_utkface's).", required=True)
  app.run(main)
