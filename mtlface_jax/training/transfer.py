"""Matching checkpoint variables to a model by path and shape (fine-tuning, resume).

``config.init_from`` copies every variable of a source checkpoint whose path
(``module/collection/...``) and shape match this run's model, except the
paths named in ``config.init_from_exclude``, which keep their fresh
initialisation. Anything else that does not match is an error naming the
parameter, both shapes and the config key that decides the shape, so the
user knows whether to exclude it (a new ``model.num_classes`` for the head)
or to fix the config (another ``model.depths`` for the encoder).
"""

import json
from typing import Any, Iterable, Optional

import numpy as np

# (path fragment, config keys): the first fragment contained in a parameter's
# path (matched on whole path components) names the keys deciding its shape.
_SHAPE_KEYS = (
    ("head", ("model.num_classes",)),
    ("encoder/params/output_layer/fc", ("image_size", "model.depths")),
    ("encoder/params/fsm/channel/fc1", ("image_size", "model.depths")),
    ("encoder", ("model.depths", "model.units", "model.backbone_name")),
    ("age/params/group_fc", ("age_group",)),
    ("da_age/params/group_fc", ("age_group",)),
    ("age/params/fc1", ("image_size", "model.depths")),
    ("da_age/params/fc1", ("image_size", "model.depths")),
    ("age", ("model.depths",)),
    ("da_age", ("model.depths",)),
    ("generator", ("model.icm_unit_count", "model.decoder_features", "model.depths",
                   "age_group")),
    ("discriminator", ("model.discriminator_features", "age_group")),
)


class VariableMismatchError(ValueError):
  """Checkpoint variables that do not fit this config's model (one message per problem)."""


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """``{'a/b/c': leaf}`` for a nested dict (the variable paths used in messages)."""
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(flatten(value, f"{prefix}{key}/"))
    return out
  return {prefix[:-1]: tree}


def unflatten(flat: dict[str, Any]) -> dict:
  """The inverse of :func:`flatten`."""
  tree: dict = {}
  for path, leaf in flat.items():
    node = tree
    *parents, name = path.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[name] = leaf
  return tree


def _contains(path: str, fragment: str) -> bool:
  """Whether ``fragment`` occurs in ``path`` on whole ``/`` components."""
  return f"/{fragment}/" in f"/{path}/"


def matches_exclude(path: str, patterns: Iterable[str]) -> bool:
  """Whether a variable path is excluded.

  A pattern is a module (``head``), a module path with or without its
  collection (``encoder/output_layer`` matches ``encoder/params/output_layer/...``
  and ``encoder/batch_stats/output_layer/...``) or any full path prefix.

  Args:
    path: ``module/collection/...``.
    patterns: the ``init_from_exclude`` entries.

  Returns:
    True if any pattern covers the path.
  """
  parts = path.split("/")
  without_collection = "/".join(parts[:1] + parts[2:])
  for pattern in patterns:
    pattern = pattern.strip("/")
    for candidate in (path, without_collection):
      if candidate == pattern or candidate.startswith(pattern + "/"):
        return True
  return False


def _config_value(config: Any, key: str) -> Any:
  node = config
  for part in key.split("."):
    try:
      node = node[part]
    except (KeyError, TypeError):
      return None
  return node.to_dict() if hasattr(node, "to_dict") else node


def _jsonable(value: Any) -> Any:
  return json.loads(json.dumps(value, default=list))


def explain(path: str, config: Any = None, source_config: Any = None) -> str:
  """The config keys deciding the shape of ``path``, with values where known.

  Args:
    path: ``module/collection/...``.
    config: this run's config (values shown when given).
    source_config: the config that wrote the checkpoint, if known; keys whose
      values differ between the two are listed first, as the likely cause.

  Returns:
    e.g. ``"model.num_classes (checkpoint 10, this config 20)"``.
  """
  keys = next((keys for fragment, keys in _SHAPE_KEYS if _contains(path, fragment)),
              ("model.*",))
  described, differing = [], []
  for key in keys:
    here = None if config is None else _config_value(config, key)
    there = None if source_config is None else _config_value(source_config, key)
    if source_config is not None and here is not None and there is not None:
      if _jsonable(here) != _jsonable(there):
        differing.append(f"{key} (checkpoint {_jsonable(there)}, this config {_jsonable(here)})")
        continue
    described.append(key if here is None else f"{key}={_jsonable(here)}")
  return ", ".join(differing) if differing else " / ".join(described)


def match_variables(target: dict, source: dict, exclude: Iterable[str] = (),
                    config: Any = None, source_config: Any = None,
                    what: str = "checkpoint") -> tuple[dict, list[str], list[str]]:
  """Takes ``source`` values for every ``target`` variable of a shared module.

  Args:
    target: this run's variables (module -> collections; arrays or
      ``ShapeDtypeStruct``s).
    source: the checkpoint's variables (module -> collections of arrays).
    exclude: ``init_from_exclude`` patterns (see :func:`matches_exclude`).
    config: this run's config, for messages.
    source_config: the checkpoint's config, if known, for messages.
    what: how messages name the source (e.g. ``"init_from runs/aifr"``).

  Returns:
    ``(taken, kept, ignored)``: ``taken`` maps the flat paths to copy to
    their NumPy values; ``kept`` lists paths left freshly initialised
    (excluded, or of a module the source does not have); ``ignored`` lists
    excluded source paths this model does not have.

  Raises:
    VariableMismatchError: naming every parameter of a shared module that is
      missing from either side or has another shape, with both shapes and
      the config keys that decide it.
  """
  exclude = tuple(exclude)
  flat_target, flat_source = flatten(target), flatten(source)
  shared = set(target) & set(source)
  taken, kept, ignored, problems = {}, [], [], []
  for path, leaf in flat_target.items():
    if path.split("/")[0] not in shared or matches_exclude(path, exclude):
      kept.append(path)
      continue
    if path not in flat_source:
      problems.append(f"{path}: in this model {tuple(leaf.shape)}, not in the {what}")
      continue
    value = np.asarray(flat_source[path])
    if tuple(value.shape) != tuple(leaf.shape):
      problems.append(f"{path}: {what} has shape {tuple(value.shape)}, this model "
                      f"{tuple(leaf.shape)}")
      continue
    taken[path] = value
  for path, value in flat_source.items():
    if path.split("/")[0] in shared and path not in flat_target:
      if matches_exclude(path, exclude):
        ignored.append(path)
      else:
        problems.append(f"{path}: in the {what} {tuple(np.shape(value))}, not in this model")
  if problems:
    raise VariableMismatchError(mismatch_message(problems, config, source_config, what))
  return taken, kept, ignored


def mismatch_message(problems: list[str], config, source_config, what: str,
                     max_listed: int = 8, explain_keys: bool = True) -> str:
  """One line per problem (with its config keys), the first ``max_listed`` of them.

  Args:
    problems: ``"path: what is wrong"`` lines.
    config: this run's config (or None).
    source_config: the checkpoint's config (or None).
    what: the message's subject (``"init_from runs/aifr"``).
    max_listed: lines listed before ``... and N more``.
    explain_keys: add the config keys deciding each path's shape.

  Returns:
    The multi-line message.
  """
  lines = [f"{what}: {len(problems)} variable(s) do not fit this config's model:"]
  for problem in problems[:max_listed]:
    path = problem.split(":")[0]
    why = f"; decided by {explain(path, config, source_config)}" if explain_keys else ""
    lines.append(f"  {problem}{why}")
  if len(problems) > max_listed:
    lines.append(f"  ... and {len(problems) - max_listed} more")
  return "\n".join(lines)


def source_config_of(meta: Optional[dict]) -> Any:
  """The training config stored in a checkpoint's meta, or None (conversions, bundles)."""
  text = (meta or {}).get("config")
  if not isinstance(text, str):
    return None
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return None
