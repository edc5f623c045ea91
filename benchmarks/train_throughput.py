"""Steady-state throughput of the jitted MTLFace training steps and of inference.

Measures, for each requested ``task:batch`` (per-device batch), the pure jitted
step of ``mtlface_jax.training.steps`` with the full models at 112x112, 10,575
classes and bf16 compute (``configs/common.py``), on device-resident random
batches, after compilation and warm-up. Prints one JSON object per run and a
final JSON list::

  python benchmarks/train_throughput.py --runs aifr:128,aifr:256,fas:128,infer:256

Tasks:
  aifr   config.train_fr=True,  train_fas=False (encoder + CosFace + age heads, SGD)
  fas    config.train_fr=False, train_fas=True  (D then G update, frozen encoder, Adam)
  infer  flip-summed embeddings (encoder on x and its mirror, inference mode)

Each run executes in its own process so that ``peak_bytes_in_use`` belongs to
that run alone. FLOPs come from XLA's cost analysis of the same step lowered
for the CPU on abstract shapes (``flops_source: xla_cpu_cost_analysis``), on
every host: the GPU has no cost analysis of a lowered program, and that of
its compiled program leaves out the cuDNN convolutions (custom calls), ~99% of
the work. ``--flops_only`` reports the same count without timing anything.
The count is checked against a dense convolution/matmul count of the traced
program (``benchmarks/flop_count.py``) and against the IR-50 count of 12.6
GFLOP per 112x112 image forward (3x that per training image). MFU is reported
against the H100 SXM dense bf16 peak (989.4 TFLOP/s) and against a measured
bf16 matmul ceiling (~798 TFLOP/s on this workplace's H100, 8192^3).

``--model reduced`` uses a tiny network (seconds on a CPU) to smoke-test the
script itself; its numbers mean nothing.
"""

import argparse
import gzip
import json
import os
from pathlib import Path
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

H100_SXM_BF16_DENSE_TFLOPS = 989.4
MEASURED_BF16_MATMUL_TFLOPS = 798.0  # 8192^3 bf16 product on this workplace's H100
IR50_GFLOP_PER_IMAGE_FORWARD = 12.6


def build_config(task: str, batch: int, model: str, dtype: str):
  """The reference config for ``task`` with a per-device ``batch``."""
  from configs import common  # pylint: disable=g-import-not-at-top
  config = common.get_config()
  config.train_fr = task == "aifr"
  config.train_fas = task == "fas"
  config.batch_size = batch
  config.dtype = dtype
  if model == "reduced":
    config.image_size = 48
    config.model.units = (1, 1, 1, 1)
    config.model.depths = (8, 8, 16, 16)
    config.model.num_classes = 10
    config.model.icm_unit_count = 8
    config.model.decoder_features = (16, 8, 8, 8)
    config.model.discriminator_features = (8, 8, 16, 16, 16)
  return config


def random_batches(config, count: int, on_device: bool = True) -> list[dict]:
  """``count`` batches of the batch contract (``mtlface_jax.batch.fake`` of steps 0..count-1)."""
  import jax  # pylint: disable=g-import-not-at-top
  from mtlface_jax import batch as batch_lib  # pylint: disable=g-import-not-at-top
  batches = [batch_lib.fake(config, i) for i in range(count)]
  return [jax.device_put(b) for b in batches] if on_device else batches


def flops_of(compiled) -> float:
  """Total FLOPs of a compiled executable from XLA's cost analysis (0 if absent)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per computation
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", 0.0))


def time_steps(run_step, state, num_steps: int, repeats: int):
  """Median seconds per step over ``repeats`` blocks of ``num_steps`` steps."""
  import jax  # pylint: disable=g-import-not-at-top
  per_step = []
  for _ in range(repeats):
    jax.block_until_ready(state)
    start = time.perf_counter()
    for i in range(num_steps):
      state = run_step(state, i)
    jax.block_until_ready(state)
    per_step.append((time.perf_counter() - start) / num_steps)
  return statistics.median(per_step), per_step, state


def _save_artifacts(args, compiled, run_step, state, name: str) -> dict:
  """Optionally writes the optimised HLO and a profiler trace of a few steps."""
  import jax  # pylint: disable=g-import-not-at-top
  saved = {}
  if args.hlo_dir:
    path = Path(args.hlo_dir) / f"{name}.hlo.txt.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
      f.write(compiled.as_text())
    saved["hlo"] = str(path)
  if args.profile_dir:
    trace_dir = Path(args.profile_dir) / f"trace_{name}"
    with jax.profiler.trace(str(trace_dir)):
      for i in range(3):
        state = run_step(state, i)
      jax.block_until_ready(state)
    planes = sorted(trace_dir.rglob("*.xplane.pb"))
    if planes:
      target = Path(args.profile_dir) / f"{name}.xplane.pb"
      shutil.copy(planes[-1], target)
      shutil.rmtree(trace_dir)
      saved["xplane"] = str(target)
      try:
        from benchmarks import profile_summary  # pylint: disable=g-import-not-at-top
        saved["profile"] = profile_summary.summarize(str(target), steps=3, top=args.top)
      except Exception as error:  # pylint: disable=broad-except
        # A trace format change must not lose the timing already measured.
        saved["profile_error"] = repr(error)
  return saved


def train_setup(args, task: str, batch: int, devices=None):
  """Config and the training loop's own jitted step of one run.

  Args:
    args: the parsed flags (``model``, ``dtype``).
    task: ``'aifr'`` or ``'fas'``.
    batch: per-device batch.
    devices: the mesh's devices; the first local device by default.

  Returns:
    ``(config, step)``: a ``loop.TrainStep`` (``step.fn`` jitted,
    ``step.initial_state`` pure, ``step.state_sharding``/``batch_sharding``).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from mtlface_jax.training import loop  # pylint: disable=g-import-not-at-top
  from mtlface_jax.training import sharding  # pylint: disable=g-import-not-at-top
  config = build_config(task, batch, args.model, args.dtype)
  mesh = sharding.make_mesh(devices or jax.local_devices()[:1])
  return config, loop.build_step(config, mesh)


def _lowered_flops(lowered) -> float:
  """FLOPs of the unoptimised program (0 where the backend cannot count them)."""
  try:
    analysis = lowered.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return 0.0
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", 0.0))


def _trace_on_cpu(args, task: str, batch: int):
  """Traces the step (or inference) for the host CPU on abstract shapes.

  Returns:
    ``(traced, reference_gflop_per_image)``; nothing touches device memory.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  cpu = jax.devices("cpu")[:1]
  key = jax.random.PRNGKey(0)
  if task == "infer":
    config = build_config(task, batch, args.model, args.dtype)
    embed, variables_fn = inference_fns(config)
    # Abstract arguments committed to the CPU make jit lower for the CPU backend.
    on_cpu = jax.sharding.SingleDeviceSharding(cpu[0])
    abstract = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_cpu)
    variables = jax.tree_util.tree_map(abstract, jax.eval_shape(variables_fn, key))
    images = abstract(jax.ShapeDtypeStruct((batch,) + (config.image_size,) * 2 + (3,),
                                           jnp.float32))
    return embed.trace(variables, images), IR50_GFLOP_PER_IMAGE_FORWARD * 2
  # A step built on a CPU mesh: its shardings, hence its backend, are the CPU's.
  from mtlface_jax import batch as batch_lib  # pylint: disable=g-import-not-at-top
  config, step = train_setup(args, task, batch, devices=cpu)
  shape_of = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
  traced = step.fn.trace(jax.eval_shape(step.initial_state, key), batch_lib.spec(config),
                         shape_of(key))
  return traced, IR50_GFLOP_PER_IMAGE_FORWARD * 3


def count_flops(args, task: str, batch: int) -> dict:
  """FLOPs of one step from XLA's cost analysis of its CPU lowering, on any host.

  The timed runs call this too, so their FLOP fields equal ``--flops_only``'s.

  Args:
    args: the parsed flags (``model``, ``dtype``).
    task: ``'aifr'``, ``'fas'`` or ``'infer'``.
    batch: per-device batch.

  Returns:
    GFLOP per step and per image, where they came from (``flops_source``), the
    dense convolution/matmul count of the same trace and the IR-50 reference.
  """
  from benchmarks import flop_count  # pylint: disable=g-import-not-at-top
  try:
    traced, reference = _trace_on_cpu(args, task, batch)
  except RuntimeError as error:  # e.g. JAX_PLATFORMS excludes the CPU
    return {"task": task, "batch": batch, "flops_per_step": 0.0, "xla_gflop_per_step": 0.0,
            "flops_source": f"unavailable: {error}"[:300]}
  lowered = traced.lower()
  flops, source = _lowered_flops(lowered), "xla_cpu_cost_analysis"
  if not flops:  # a JAX whose CPU lowering cannot be analysed: compile it (slow)
    flops, source = flops_of(lowered.compile()), "xla_cpu_compiled_cost_analysis"
  dense = flop_count.dense_flops(traced.jaxpr)
  return {"task": task, "batch": batch, "flops_per_step": flops,
          "xla_gflop_per_step": round(flops / 1e9, 3),
          "xla_gflop_per_image": round(flops / batch / 1e9, 3),
          "flops_source": source,
          "dense_gflop_per_image": round(dense / batch / 1e9, 3),
          "xla_vs_dense": round(flops / dense, 3) if dense else None,
          "ir50_reference_gflop_per_image": reference,
          "xla_vs_ir50_reference": round(flops / batch / 1e9 / reference, 3)}


def measure_train(args, task: str, batch: int) -> dict:
  """Compiles and times the jitted AIFR or FAS step."""
  import jax  # pylint: disable=g-import-not-at-top
  config, step = train_setup(args, task, batch)
  state = jax.jit(step.initial_state, out_shardings=step.state_sharding)(jax.random.PRNGKey(0))
  batches = [jax.device_put(b, step.batch_sharding)
             for b in random_batches(config, 2, on_device=False)]
  rng = jax.device_put(jax.random.PRNGKey(1), step.state_sharding)
  start = time.perf_counter()
  compiled = step.fn.lower(state, batches[0], rng).compile()
  compile_s = time.perf_counter() - start

  def run_step(s, i):
    return compiled(s, batches[i % len(batches)], rng)[0]

  for i in range(args.warmup):
    state = run_step(state, i)
  seconds, samples, state = time_steps(run_step, state, args.steps, args.repeats)
  result = _report(seconds, samples, count_flops(args, task, batch), compiled)
  result["compile_s"] = round(compile_s, 1)
  result["step"] = int(state.step)
  result["artifacts"] = _save_artifacts(args, compiled, run_step, state, f"{task}{batch}")
  return result


def inference_fns(config):
  """(jitted flip-averaged embed(variables, images), variables initialiser)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mtlface_jax import predict  # pylint: disable=g-import-not-at-top
  from mtlface_jax.models import spec as spec_lib  # pylint: disable=g-import-not-at-top
  encoder = spec_lib.build_from_config(config).encoder
  size = config.image_size

  @jax.jit
  def embed(variables, images):
    return predict.embed(encoder, variables, images)

  return embed, lambda rng: encoder.init(rng, jnp.zeros((1, size, size, 3)))


def measure_inference(args, batch: int) -> dict:
  """Times flip-summed embeddings: the encoder on x and on its mirror."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  config = build_config("infer", batch, args.model, args.dtype)
  embed, variables_fn = inference_fns(config)
  size = config.image_size
  variables = jax.jit(variables_fn)(jax.random.PRNGKey(0))
  images = [jax.random.uniform(jax.random.PRNGKey(i), (batch, size, size, 3), jnp.float32, -1, 1)
            for i in range(2)]
  start = time.perf_counter()
  compiled = embed.lower(variables, images[0]).compile()
  compile_s = time.perf_counter() - start
  # Chain a dependency through a scalar so steps are timed back to back.
  run_step = lambda carry, i: compiled(variables, images[i % 2])[0, 0] + carry
  carry = jnp.zeros((), jnp.float32)
  for i in range(args.warmup):
    carry = run_step(carry, i)
  seconds, samples, _ = time_steps(run_step, carry, args.steps, args.repeats)
  result = _report(seconds, samples, count_flops(args, "infer", batch), compiled)
  result["compile_s"] = round(compile_s, 1)
  result["embeddings_per_s"] = result["images_per_s"]
  return result


def _report(seconds: float, samples: list, flops: dict, compiled) -> dict:
  """Throughput, FLOP rate and MFU of one run.

  Args:
    seconds: median seconds per step.
    samples: seconds per step of each timed block.
    flops: :func:`count_flops` of the run (the CPU lowering's count).
    compiled: the timed executable; its own cost analysis is kept only as
      ``device_compiled_gflop_per_step``, which on a GPU misses the cuDNN
      convolutions and so must not be used for MFU.

  Returns:
    The run's JSON fields.
  """
  step_flops = flops["flops_per_step"]
  tflops = step_flops / seconds / 1e12
  return {
      **flops,
      "images_per_s": round(flops["batch"] / seconds, 1),
      "ms_per_step": round(seconds * 1e3, 3),
      "ms_per_step_samples": [round(s * 1e3, 3) for s in samples],
      "achieved_tflops": round(tflops, 1) if step_flops else None,
      "mfu_vs_989_peak": round(tflops / H100_SXM_BF16_DENSE_TFLOPS, 4) if step_flops else None,
      "mfu_vs_measured_798_matmul": (round(tflops / MEASURED_BF16_MATMUL_TFLOPS, 4)
                                     if step_flops else None),
      "device_compiled_gflop_per_step": round(flops_of(compiled) / 1e9, 1),
      "peak_gib_in_use": _peak_gib(),
  }


def _peak_gib():
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return round(peak / 2**30, 2) if peak is not None else None


def environment() -> dict:
  """JAX/jaxlib/Flax versions, device kind, driver, and XLA flags in effect."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  env = {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
         "backend": jax.default_backend(), "device": jax.local_devices()[0].device_kind,
         "xla_flags": os.environ.get("XLA_FLAGS", "")}
  if shutil.which("nvidia-smi"):
    query = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                            "--format=csv,noheader"], capture_output=True, text=True, check=False)
    env["nvidia_smi"] = query.stdout.strip()
  return env


def run_single(args) -> dict:
  """Measures one ``task:batch`` in this process."""
  task, batch = parse_run(args.single)
  if args.flops_only:
    result = count_flops(args, task, batch)
  elif task == "infer":
    result = measure_inference(args, batch)
  else:
    result = measure_train(args, task, batch)
  result["model"] = args.model
  result["dtype"] = args.dtype
  from mtlface_jax.models import layers  # pylint: disable=g-import-not-at-top
  result["models_from"] = str(Path(layers.__file__).resolve().parent)
  result["environment"] = environment()
  return result


def parse_run(text: str) -> tuple[str, int]:
  """``'aifr:128'`` -> ``('aifr', 128)`` with a clear error for bad input."""
  task, _, batch = text.partition(":")
  if task not in ("aifr", "fas", "infer") or not batch.isdigit() or int(batch) <= 0:
    raise ValueError(f"bad run {text!r}: expected aifr|fas|infer:<positive batch>, e.g. aifr:128")
  return task, int(batch)


def _child_command(args, run: str) -> list[str]:
  command = [sys.executable, __file__, "--single", run, "--model", args.model,
             "--dtype", args.dtype, "--steps", str(args.steps), "--warmup", str(args.warmup),
             "--repeats", str(args.repeats), "--top", str(args.top)]
  if args.flops_only:
    command.append("--flops_only")
  for flag in ("hlo_dir", "profile_dir", "code_root"):
    if getattr(args, flag):
      command += [f"--{flag}", getattr(args, flag)]
  return command


def run_all(args) -> list[dict]:
  """Runs each requested measurement in a fresh process and collects the JSON."""
  env = dict(os.environ)
  if args.xla_flags:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
  results = []
  for run in args.runs.split(","):
    parse_run(run)
    proc = subprocess.run(_child_command(args, run), env=env, capture_output=True, text=True,
                          check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
      result = {"run": run, "error": (proc.stderr or proc.stdout)[-3000:]}
    else:
      result = json.loads(lines[-1])
    if args.label:
      result["label"] = args.label
    print(json.dumps(result), flush=True)
    results.append(result)
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--runs", default="aifr:128,aifr:256,fas:128,infer:256",
                      help="comma-separated task:per-device-batch (tasks: aifr, fas, infer)")
  parser.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
  parser.add_argument("--repeats", type=int, default=3, help="timed blocks; the median is reported")
  parser.add_argument("--warmup", type=int, default=5, help="untimed steps after compilation")
  parser.add_argument("--model", choices=("full", "reduced"), default="full")
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
  parser.add_argument("--xla_flags", default="", help="appended to XLA_FLAGS for the runs")
  parser.add_argument("--hlo_dir", default="", help="write each run's optimised HLO here")
  parser.add_argument("--profile_dir", default="",
                      help="write a jax.profiler trace (xplane.pb) of 3 steps per run here")
  parser.add_argument("--top", type=int, default=25, help="kernels listed in profile summaries")
  parser.add_argument("--code_root", default="",
                      help="import mtlface_jax from this folder first (to time another version)")
  parser.add_argument("--label", default="", help="tag added to every result")
  parser.add_argument("--output", default="", help="also write the JSON list to this file")
  parser.add_argument("--flops_only", action="store_true",
                      help="only lower each run on abstract shapes and count its FLOPs (any host)")
  parser.add_argument("--single", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.code_root:
    sys.path.insert(0, str(Path(args.code_root).resolve()))
  if args.single:
    print(json.dumps(run_single(args)), flush=True)
    return
  results = run_all(args)
  if args.output:
    Path(args.output).write_text(json.dumps(results, indent=1))
  print(json.dumps(results))


if __name__ == "__main__":
  main()
