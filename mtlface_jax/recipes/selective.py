"""Selective fine-tuning of AIFR with synthesized faces (TPAMI; every detail OURS).

The TPAMI paper says only that synthesized faces are used, selectively, to
fine-tune recognition (docs/architecture.md T2). Our reading, every choice a
key of ``configs/selective_ft.py``:

1. With a trained FAS run frozen, synthesize each training face into every
   OTHER age group (its own group by its age label is skipped).
2. Keep a synthetic face iff the frozen age estimator's group (argmax of the
   flip-averaged group logits) is the target group AND the cosine between the
   source's and the synthetic face's embeddings is >= tau. tau defaults to
   the threshold at FAR ``far`` (1e-3) of the frozen encoder on the held-out
   synthetic test pairs.
3. Fine-tune AIFR (CosFace on the same identity labels) from the AIFR run on
   the real faces plus the kept ones (labelled with their source's identity and
   gender and the middle age of their target group) at a low learning rate.

:func:`run_ablation` runs the three arms (no fine-tuning, plain fine-tuning
on all synthesized faces, selective fine-tuning) and writes ``ablation.json``
with held-out verification of each (``recipes.heldout.evaluate_synthetic``).

``python -m mtlface_jax.recipes.selective --config=configs/selective_ft.py
--workdir=OUT --from=DEMO_WORKDIR`` (a workdir with ``aifr/`` and ``fas/``).
"""

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np

from mtlface_jax import ages as ages_lib
from mtlface_jax import checkpoint_io
from mtlface_jax import data_sources
from mtlface_jax import input_pipeline
from mtlface_jax import predict
from mtlface_jax.evaluation import datasets
from mtlface_jax.evaluation import fas as fas_lib
from mtlface_jax.evaluation import protocols
from mtlface_jax.evaluation import runner as runner_lib
from mtlface_jax.formats import images as images_lib
from mtlface_jax.models import spec as spec_lib
from mtlface_jax.recipes import heldout
from mtlface_jax.training import loop

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


def synthesize_candidates(runner: runner_lib.ModelRunner, split,
                          chunk: int = 256) -> dict[str, np.ndarray]:
  """Every training face synthesized into every other group, with its judgements.

  Args:
    runner: the frozen FAS model (encoder, age estimator, generator).
    split: a synthetic split (``images`` uint8, ``ids``, ``ages``, ``genders``).
    chunk: source faces synthesized per pass (bounds host memory).

  Returns:
    Arrays over candidates M: ``images`` uint8 [M, S, S, 3] at the model's
    side, ``source`` (index into ``split``), ``target_group``,
    ``estimated_group``, ``cosine``.
  """
  size, num_groups = runner.image_size, runner.num_groups
  own = ages_lib.groups_of(split.ages, num_groups)
  parts = []
  for start in range(0, len(split.ids), chunk):
    idx = np.arange(start, min(start + chunk, len(split.ids)))
    faces = np.stack(list(datasets.array_faces(split.images[idx], size)))
    source = runner.estimate_ages(faces, progress=False)["embedding"]
    synthesized = runner.synthesize(faces, progress=False)  # [n, G, S, S, 3]
    rows, groups = np.nonzero(np.arange(num_groups)[None] != own[idx, None])
    candidates = synthesized[rows, groups]
    judged = runner.estimate_ages(candidates, progress=False)
    parts.append({"images": fas_lib.to_uint8_images(candidates), "source": idx[rows],
                  "target_group": groups.astype(np.int32),
                  "estimated_group": judged["group"].astype(np.int32),
                  "cosine": np.sum(judged["embedding"] * source[rows], axis=-1)})
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def training_source(split, candidates: dict[str, np.ndarray], keep: np.ndarray,
                    image_size: int, num_groups: int) -> input_pipeline.Source:
  """Real training faces plus the kept synthetic ones, both at ``image_size``.

  Kept faces take their source's identity and gender and the middle age of
  their target group (:func:`group_mid_ages`).
  """
  real = np.stack([images_lib.resize_image(im, image_size) for im in split.images])
  src = candidates["source"][keep]
  mid = group_mid_ages(num_groups)
  return input_pipeline.source_from_arrays(
      np.concatenate([real, candidates["images"][keep]]),
      np.concatenate([split.ids, split.ids[src]]),
      np.concatenate([split.ages, mid[candidates["target_group"][keep]]]),
      np.concatenate([split.genders, split.genders[src]]))


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


def _evaluate(model, data, output_dir, batch_size: int) -> dict:
  """Held-out verification (and age) of one arm, as the demo reports it."""
  report = heldout.evaluate_synthetic(model, data=data, output_dir=output_dir,
                                      num_fas_inputs=0, batch_size=batch_size)
  return report["summary"]


def prepare(from_dir, options) -> dict[str, Any]:
  """Synthesizes the candidates, sets tau and selects (the frozen-model part).

  Args:
    from_dir: a workdir with ``aifr/`` and ``fas/`` runs.
    options: ``config.selective``.

  Returns:
    ``{'data', 'candidates', 'keep', 'selection', 'image_size', 'num_groups'}``.
  """
  from_dir = Path(from_dir)
  aifr_config = spec_lib.config_from_meta(checkpoint_io.read_meta(from_dir / "aifr")[0])
  data = data_sources.synthetic_for(aifr_config)
  frozen = predict.load(str(from_dir / "fas"))
  runner = runner_lib.ModelRunner(frozen, batch_size=int(options.batch_size), progress=False)
  tau = options.tau
  verified = None
  if tau is None:
    verified = protocols.verify_synthetic(runner, data)
    tau = tau_at_far(verified, float(options.far))
  candidates = synthesize_candidates(runner, data.train, int(options.chunk))
  keep, selection = select(candidates["target_group"], candidates["estimated_group"],
                           candidates["cosine"], tau, runner.num_groups)
  selection["tau_source"] = ("given" if verified is None else
                             f"threshold at FAR {options.far} on the synthetic test pairs")
  return {"data": data, "candidates": candidates, "keep": keep, "selection": selection,
          "image_size": runner.image_size, "num_groups": runner.num_groups}


def run_ablation(config, workdir, from_dir) -> dict[str, Any]:
  """The three arms, each evaluated on the held-out synthetic pairs.

  Args:
    config: ``configs/selective_ft.py`` (reads ``config.selective``).
    workdir: output folder (``<arm>/seed<k>/`` runs and their ``eval/``
      reports, ``ablation.json``).
    from_dir: a workdir with ``aifr/`` and ``fas/`` runs.

  Returns:
    The ablation dict written to ``workdir/ablation.json``.
  """
  options, workdir, from_dir = config.selective, Path(workdir), Path(from_dir)
  workdir.mkdir(parents=True, exist_ok=True)
  prepared = prepare(from_dir, options)
  data, candidates = prepared["data"], prepared["candidates"]
  arms = [a for a in ARMS if a in tuple(options.arms)]
  keeps = {"plain_finetune": np.ones_like(prepared["keep"]),
           "selective_finetune": prepared["keep"]}
  result = {"from": str(from_dir), "selection": prepared["selection"],
            "options": options.to_dict(), "arms": {}}
  batch = int(options.batch_size)
  for arm in arms:
    if arm == "no_finetune":
      summary = _evaluate(str(from_dir / "aifr"), data, workdir / arm / "eval", batch)
      result["arms"][arm] = {"num_synthetic": 0, "heldout": summary,
                             "verification_accuracy_mean": summary["verification_accuracy"],
                             "verification_accuracy_std_over_seeds": 0.0}
      continue
    source = training_source(data.train, candidates, keeps[arm], prepared["image_size"],
                             prepared["num_groups"])
    result["arms"][arm] = {"num_synthetic": int(keeps[arm].sum()),
                           "num_real": len(data.train.ids),
                           **_finetune_runs(source, from_dir, workdir / arm, options, data)}
  (workdir / "ablation.json").write_text(json.dumps(_jsonable(result), indent=2))
  return result


def _finetune_runs(source, from_dir: Path, arm_dir: Path, options, data) -> dict:
  """One fine-tuning run per ``options.ft_seeds``, each evaluated; mean and std."""
  runs = []
  for seed in options.ft_seeds:
    out = arm_dir / f"seed{seed}"
    trained = loop.train(finetune_config(from_dir / "aifr", options, seed), out,
                         batches_fn=batches_from(source))
    runs.append({"seed": int(seed), "steps": trained["step"],
                 "last_metrics": trained["last_metrics"],
                 "heldout": _evaluate(str(out), data, out / "eval", int(options.batch_size))})
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


def main(argv) -> None:
  del argv
  result = run_ablation(_CONFIG.value, _WORKDIR.value, _FROM.value)
  print(json.dumps({"selection": {k: v for k, v in result["selection"].items()
                                  if k != "per_group"},
                    "arms": {a: {k: v for k, v in r.items() if k.startswith("verif")}
                             for a, r in result["arms"].items()}},
                   indent=2, default=str))


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/selective_ft.py",
                                            "Selective fine-tuning config.")
  _WORKDIR = flags.DEFINE_string("workdir", None, "Output folder.", required=True)
  _FROM = flags.DEFINE_string("from", None, "Workdir with aifr/ and fas/ runs.",
                              required=True)
  app.run(main)
