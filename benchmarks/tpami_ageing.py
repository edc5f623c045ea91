"""Face ageing throughput of the released TPAMI model (style path + StyleGAN2 decoder).

Times the jitted ageing of a batch of 112x112 faces with full-size random
weights, after compilation and warm-up, and prints one JSON object::

  python benchmarks/tpami_ageing.py                       # CPU: batch 8, float32
  python benchmarks/tpami_ageing.py --batch 64 --dtype bfloat16   # accelerator

``--stage generator`` times ``TPAMIGenerator`` on given encoder features (what
synthesising every age group repeats); ``--stage end_to_end`` (default) also
runs the IR-50 encoder, as ageing a new face does. The work per face is about
12.6 GFLOP (encoder) + 55.5 (style path) + 61.4 (128 px synthesis) forward
(docs/architecture.md section T1.5); ``achieved_tflops`` uses those constants.
``--model reduced`` smoke-tests the script with narrow widths (numbers meaningless).
"""

import argparse
import json
import os
from pathlib import Path
import statistics
import sys
import time

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GFLOP_ENCODER = 12.6
GFLOP_STYLE_PATH = 55.5
GFLOP_SYNTHESIS = 61.4


def build(model: str, dtype):
  """(encoder, generator) modules: released sizes, or narrow ones for smoke tests."""
  from mtlface_jax.models import iresnet  # pylint: disable=g-import-not-at-top
  from mtlface_jax.models import tpami_generator  # pylint: disable=g-import-not-at-top
  if model == "full":
    return (iresnet.encoder_for("tpami", dtype=dtype),
            tpami_generator.TPAMIGenerator(dtype=dtype))
  encoder = iresnet.Encoder(50, units=(1, 1, 1, 1), depths=(8, 16, 32, 64), attention_version=2,
                            dropout_rate=0.4, normalize_embedding=True, dtype=dtype)
  return encoder, tpami_generator.TPAMIGenerator(style_dim=32, channels=(32,) * 6, dtype=dtype)


def _host_value(path: str, shape: tuple, rng) -> "np.ndarray":
  """An in-range random value for one variable, by its role (no init compile needed).

  Throughput does not depend on the values as long as activations stay finite
  and away from denormals; these follow the modules' own initialisers.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  leaf = path.rsplit("/", 1)[-1]
  if "/noise_" in path:
    return rng.standard_normal(shape)
  if leaf in ("scale", "var") or (leaf == "bias" and "modulation" in path):
    return np.ones(shape)
  if leaf == "slope":
    return np.full(shape, 0.25)
  if leaf in ("mean", "bias", "latent_avg") or len(shape) < 2:
    return np.zeros(shape)
  # StyleGAN2 weights are stored N(0, 1) (equalized LR scales them at run time).
  fan_in = 1 if "decoder" in path else int(np.prod(shape[:-1]))
  return rng.standard_normal(shape) / np.sqrt(fan_in)


def host_variables(module, *args, seed: int = 0, **kwargs):
  """``module``'s variables filled on the host from ``jax.eval_shape`` shapes.

  ``args`` are arrays (traced); ``kwargs`` static flags.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  key = jax.random.PRNGKey(seed)
  shapes = jax.eval_shape(lambda *a: module.init(key, *a, **kwargs), *args)
  fill = lambda path, leaf: jax.numpy.asarray(
      _host_value(jax.tree_util.keystr(path, simple=True, separator="/"), leaf.shape,
                  rng).astype(np.float32))
  return jax.tree_util.tree_map_with_path(fill, shapes)


def make_step(encoder, generator, stage: str):
  """The jitted ageing function of (variables, images, target_group)."""
  import jax  # pylint: disable=g-import-not-at-top

  def age(variables, images, target, features):
    if stage == "end_to_end":
      out = encoder.apply(variables["encoder"], images, False)
      features = (out.x2, out.x3, out.x4, out.x_id)
    return generator.apply(variables["generator"], images, *features, target)

  return jax.jit(age)


def run(args) -> dict:
  """Initialises, compiles, warms up and times; returns the result dict."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
  encoder, generator = build(args.model, dtype)
  key = jax.random.PRNGKey(0)
  images = jax.random.uniform(key, (args.batch, 112, 112, 3), dtype, -1.0, 1.0)
  target = jnp.arange(args.batch, dtype=jnp.int32) % generator.num_groups
  variables = {"encoder": host_variables(encoder, images, train=False)}
  out = jax.eval_shape(lambda v, x: encoder.apply(v, x, False), variables["encoder"], images)
  features = tuple(jax.random.normal(key, f.shape, dtype) for f in (out.x2, out.x3, out.x4,
                                                                    out.x_id))
  variables["generator"] = host_variables(generator, images, *features, target)
  step = make_step(encoder, generator, args.stage)
  start = time.perf_counter()
  jax.block_until_ready(step(variables, images, target, features))
  compile_s = time.perf_counter() - start
  for _ in range(args.warmup):
    jax.block_until_ready(step(variables, images, target, features))
  times = []
  for _ in range(args.iters):
    start = time.perf_counter()
    jax.block_until_ready(step(variables, images, target, features))
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  gflop = GFLOP_STYLE_PATH + GFLOP_SYNTHESIS + (GFLOP_ENCODER if args.stage == "end_to_end" else 0)
  return {
      "benchmark": "tpami_ageing", "stage": args.stage, "model": args.model,
      "dtype": args.dtype, "batch": args.batch, "device": str(jax.devices()[0].device_kind),
      "backend": jax.default_backend(), "iters": args.iters,
      "compile_and_first_s": round(compile_s, 2), "median_step_s": round(median, 4),
      "min_step_s": round(min(times), 4), "faces_per_s": round(args.batch / median, 3),
      "gflop_per_face_forward": gflop if args.model == "full" else None,
      "achieved_tflops": (round(args.batch * gflop / median / 1e3, 3)
                          if args.model == "full" else None),
      "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  parser.add_argument("--stage", choices=["end_to_end", "generator"], default="end_to_end")
  parser.add_argument("--model", choices=["full", "reduced"], default="full")
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1)
  args = parser.parse_args(argv)
  print(json.dumps(run(args)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
