"""JAX and PyTorch MTLFace steps timed in ONE run, on the same synthetic batches.

For each ``task:batch`` it times the project's jitted step (the builders of
``benchmarks/train_throughput.py``: full IR-50 MTLFace at 112x112, 10,575
classes, bf16 compute) and the PyTorch reference steps of
``benchmarks/torch_steps.py`` in each configuration (AMP fp16 eager,
channels_last, channels_last + torch.compile), and writes ONE JSON file:
images/s, ms/step, peak memory, versions, and each JAX number's ratio to the
best PyTorch configuration of the same task and batch::

  python benchmarks/side_by_side.py --runs aifr:256,fas:128,infer:256,aifr:128 \
      --output side_by_side.json
  python benchmarks/side_by_side.py --tiny --output tiny.json   # CPU, seconds

Both frameworks see the very same batches: ``train_throughput.random_batches``
(seeded NumPy) converted NHWC -> NCHW for PyTorch; each run records a digest of
its first batch and the comparison says whether the digests agree.

Each measurement runs in a child process (one per JAX run on a GPU, because
JAX's peak-memory counter cannot be reset; one per task for PyTorch, whose
counter can). Peak memory is ``peak_bytes_in_use`` (JAX) or
``torch.cuda.max_memory_allocated`` (PyTorch) on a GPU, the process's peak
resident set (VmHWM, reset before each run) on a CPU. Runs go in the order
given; with ``--deadline_s`` a run that would start too late is recorded as
skipped, and the JSON is rewritten after every child so that a killed run
still leaves its numbers. PyTorch children see ``JAX_PLATFORMS=cpu`` so that
JAX never takes GPU memory from them. Imports: jax, flax, optax, torch,
ml_collections (for ``configs/common.py``); no TensorFlow.

``--tiny``: the reduced JAX model (48x48, see train_throughput) against the
smallest port (IR-34 at 48x48, same heads), batch 2, a few steps: it checks
that the script runs, its numbers mean nothing.
"""

import argparse
import datetime
import hashlib
import json
import os
from pathlib import Path
import platform
import subprocess
import sys
import time

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import train_throughput  # pylint: disable=g-import-not-at-top

MARKER = "SIDE_BY_SIDE "
DEFAULT_RUNS = "aifr:256,fas:128,infer:256,aifr:128"
TINY_RUNS = "aifr:2,fas:2,infer:2"
NUM_BATCHES = 2
# Issue 18's targets on the lent H200: (task, batch) -> (min images/s, min ratio to best torch).
TARGETS = {("aifr", 256): (10_000, 2.5), ("aifr", 128): (None, 2.5),
           ("fas", 128): (4_000, 4.0), ("infer", 256): (20_000, None)}
# A child that would have less than this left is not started.
MIN_CHILD_S = 45


def batch_digest(batch: dict) -> str:
  """sha1 of a NumPy batch's arrays (sorted keys): equal digests, equal inputs."""
  digest = hashlib.sha1()
  for key in sorted(batch):
    digest.update(key.encode())
    digest.update(batch[key].tobytes())
  return digest.hexdigest()[:16]


def reset_peak_rss() -> None:
  """Resets VmHWM (Linux: writing 5 to clear_refs); no-op elsewhere."""
  try:
    Path("/proc/self/clear_refs").write_text("5")
  except OSError:
    pass


def peak_rss_gib():
  try:
    for line in Path("/proc/self/status").read_text().splitlines():
      if line.startswith("VmHWM:"):
        return round(int(line.split()[1]) * 1024 / 2**30, 3)
  except OSError:
    pass
  return None


def host_batches(task: str, batch: int, tiny: bool) -> tuple[object, list]:
  """The config of ``task:batch`` and its NUM_BATCHES seeded NumPy batches."""
  config = train_throughput.build_config(task if task != "infer" else "aifr", batch,
                                         "reduced" if tiny else "full", "bfloat16")
  return config, train_throughput.random_batches(config, NUM_BATCHES, on_device=False)


def jax_run(spec: dict) -> dict:
  """Times the project's step (or inference) of ``spec`` in this process."""
  import jax  # pylint: disable=g-import-not-at-top
  task, batch, tiny = spec["task"], spec["batch"], spec["tiny"]
  args = argparse.Namespace(model="reduced" if tiny else "full",
                            dtype="float32" if tiny else "bfloat16")
  config, host = host_batches(task, batch, tiny)
  reset_peak_rss()
  if task == "infer":
    embed, variables_fn = train_throughput.inference_fns(
        train_throughput.build_config("infer", batch, args.model, args.dtype))
    variables = jax.jit(variables_fn)(jax.random.PRNGKey(0))
    images = [jax.device_put(b["image"]) for b in host]
    start = time.perf_counter()
    compiled = embed.lower(variables, images[0]).compile()
    compile_s = time.perf_counter() - start
    run_step = lambda carry, i: compiled(variables, images[i % len(images)])[0, 0] + carry
    state = jax.numpy.zeros(())
  else:
    _, step = train_throughput.train_setup(args, task, batch)
    state = jax.jit(step.initial_state, out_shardings=step.state_sharding)(
        jax.random.PRNGKey(0))
    batches = [jax.device_put(b, step.batch_sharding) for b in host]
    rng = jax.device_put(jax.random.PRNGKey(1), step.state_sharding)
    start = time.perf_counter()
    compiled = step.fn.lower(state, batches[0], rng).compile()
    compile_s = time.perf_counter() - start
    run_step = lambda s, i: compiled(s, batches[i % len(batches)], rng)[0]
  for i in range(spec["warmup"]):
    state = run_step(state, i)
  seconds, samples, _ = train_throughput.time_steps(run_step, state, spec["steps"],
                                                    spec["repeats"])
  return {**_timing(batch, seconds, samples), "compile_s": round(compile_s, 2),
          "compute_dtype": args.dtype, "model": "reduced" if tiny else "ir50",
          **_jax_peak(), "batch_digest": batch_digest(host[0]), "environment": jax_environment()}


def _jax_peak() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.local_devices()[0].memory_stats() or {}
  if stats.get("peak_bytes_in_use") is not None:
    return {"peak_memory_gib": round(stats["peak_bytes_in_use"] / 2**30, 3),
            "peak_memory_source": "jax memory_stats peak_bytes_in_use"}
  return {"peak_memory_gib": peak_rss_gib(), "peak_memory_source": "process VmHWM (host RSS)"}


def jax_environment() -> dict:
  env = train_throughput.environment()
  import optax  # pylint: disable=g-import-not-at-top
  env["optax"] = optax.__version__
  return env


def _timing(batch: int, seconds: float, samples: list) -> dict:
  return {"images_per_s": round(batch / seconds, 2), "ms_per_step": round(seconds * 1e3, 3),
          "ms_per_step_samples": [round(s * 1e3, 3) for s in samples]}


def torch_run(spec: dict) -> dict:
  """Times one PyTorch reference configuration of ``spec`` in this process."""
  import gc  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_steps  # pylint: disable=g-import-not-at-top
  task, batch, tiny = spec["task"], spec["batch"], spec["tiny"]
  device = "cuda" if torch.cuda.is_available() else "cpu"
  setup = torch_steps.Setup(spec["config"], device, spec.get("cpu_amp", "float32"))
  if setup.compile and not setup.cuda and not spec.get("compile_on_cpu"):
    return {**setup.describe(), "skipped": "torch.compile on a CPU builds C++ kernels for "
            "minutes and says nothing about the GPU (pass --compile_on_cpu to force it)"}
  torch.backends.cudnn.benchmark = True
  config, host = host_batches(task, batch, tiny)
  gc.collect()
  if setup.cuda:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
  reset_peak_rss()
  models = torch_steps.build_models(config, setup, 34 if tiny else 50, task)
  step, facts = torch_steps.STEP_FNS[task](config, setup, models, host)
  timed = torch_steps.time_steps(step, setup.device, warmup=spec["warmup"], steps=spec["steps"],
                                 repeats=spec["repeats"])
  if setup.cuda:
    peak = {"peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
            "peak_memory_source": "torch.cuda.max_memory_allocated"}
  else:
    peak = {"peak_memory_gib": peak_rss_gib(), "peak_memory_source": "process VmHWM (host RSS)"}
  result = {**_timing(batch, timed["seconds"], timed["samples"]), **setup.describe(), **facts,
            **peak, "warmup_s": round(timed["warmup_s"], 2), "model": "ir34" if tiny else "ir50",
            "batch_digest": batch_digest(host[0]), "environment": torch_steps.environment()}
  if setup.compile:
    torch._dynamo.reset()  # pylint: disable=protected-access
  return result


def child_main(specs: list[dict]) -> None:
  """Runs ``specs`` in order, printing one MARKER line of JSON per run."""
  for spec in specs:
    start = time.time()
    try:
      result = (jax_run if spec["framework"] == "jax" else torch_run)(spec)
    except Exception as error:  # pylint: disable=broad-except
      # One failing configuration (a compile error, out of memory) must not lose the others.
      result = {"error": f"{type(error).__name__}: {error}"[-2000:]}
    result = {**_identity(spec), **result, "wall_s": round(time.time() - start, 2)}
    print(MARKER + json.dumps(result, default=str), flush=True)


def _identity(spec: dict) -> dict:
  return {k: spec[k] for k in ("framework", "task", "batch", "config") if k in spec}


def plan(args) -> list[list[dict]]:
  """The children to start, in order, each a list of run specs."""
  common = {"tiny": args.tiny, "steps": args.steps, "warmup": args.warmup,
            "repeats": args.repeats, "cpu_amp": args.cpu_amp,
            "compile_on_cpu": args.compile_on_cpu}
  configs = [c for c in args.torch_configs.split(",") if c]
  jax_children, torch_children = [], []
  for run in args.runs.split(","):
    task, batch = train_throughput.parse_run(run)
    if "jax" in args.frameworks:
      jax_children.append([{**common, "framework": "jax", "task": task, "batch": batch}])
    if "torch" in args.frameworks and configs:
      torch_children.append([{**common, "framework": "torch", "task": task, "batch": batch,
                              "config": c} for c in configs])
  if args.group == "framework":  # two processes in all: cheaper imports on a slow host
    return [c for c in ([s for g in jax_children for s in g],
                        [s for g in torch_children for s in g]) if c]
  # Per run for JAX (its peak counter cannot be reset); per task for PyTorch.
  return [c for pair in zip(jax_children, torch_children) for c in pair] + (
      jax_children[len(torch_children):] + torch_children[len(jax_children):])


def run_child(specs: list[dict], timeout_s: float, env: dict) -> list[dict]:
  """Runs one child process; every spec comes back as a result or an error."""
  command = [sys.executable, __file__, "--child", json.dumps(specs)]
  try:
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s,
                          check=False)
    stdout, stderr, code = proc.stdout, proc.stderr, proc.returncode
  except subprocess.TimeoutExpired as error:
    stdout = error.stdout.decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
    stderr, code = f"timed out after {timeout_s:.0f} s", "timeout"
  done = [json.loads(line[len(MARKER):]) for line in stdout.splitlines()
          if line.startswith(MARKER)]
  missing = specs[len(done):]
  tail = (stderr or stdout)[-2000:]
  return done + [{**_identity(s), "error": f"child exit {code}: {tail}"} for s in missing]


def child_env(specs: list[dict], xla_flags: str) -> dict:
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  if specs[0]["framework"] == "torch" and all(s["framework"] == "torch" for s in specs):
    env["JAX_PLATFORMS"] = "cpu"  # batches and configs only: never take GPU memory from torch
  if xla_flags:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()
  return env


def compare(runs: list[dict]) -> dict:
  """Per task:batch, the JAX numbers against the best PyTorch configuration."""
  table = {}
  for run in runs:
    entry = table.setdefault(f"{run['task']}:{run['batch']}", {"torch": {}})
    if "images_per_s" not in run:
      continue
    if run["framework"] == "jax":
      entry["jax"] = run
    else:
      entry["torch"][run["config"]] = run
  out = {}
  for key, entry in table.items():
    jax_run_, torch_runs = entry.get("jax"), entry["torch"]
    row = {"jax_images_per_s": jax_run_["images_per_s"] if jax_run_ else None,
           "torch_images_per_s": {c: r["images_per_s"] for c, r in torch_runs.items()}}
    digests = {r["batch_digest"] for r in [jax_run_, *torch_runs.values()] if r}
    row["same_batches"] = len(digests) == 1 if len(digests) else None
    if torch_runs:
      best = max(torch_runs, key=lambda c: torch_runs[c]["images_per_s"])
      row.update(best_torch_config=best, best_torch_images_per_s=torch_runs[best]["images_per_s"])
      if jax_run_:
        row["ratio_to_best_torch"] = round(jax_run_["images_per_s"] / row[
            "best_torch_images_per_s"], 3)
        row["ratio_to_each_torch"] = {c: round(jax_run_["images_per_s"] / r["images_per_s"], 3)
                                      for c, r in torch_runs.items()}
    out[key] = row
  return out


def targets(comparison: dict, tiny: bool) -> dict:
  """Issue 18's targets, met or missed (not judged on tiny shapes)."""
  out = {}
  for (task, batch), (min_rate, min_ratio) in TARGETS.items():
    row = comparison.get(f"{task}:{batch}")
    if row is None:
      continue
    judged = {"images_per_s_target": min_rate, "ratio_target": min_ratio}
    if tiny:
      judged["met"] = "not judged (--tiny)"
    else:
      checks = []
      if min_rate is not None:
        checks.append((row["jax_images_per_s"] or 0) >= min_rate)
      if min_ratio is not None:
        checks.append((row.get("ratio_to_best_torch") or 0) >= min_ratio)
      judged["met"] = all(checks)
    out[f"{task}:{batch}"] = judged
  return out


def document(args, runs: list[dict], started: float, finished: bool) -> dict:
  """The one JSON of this run."""
  environment = {"python": platform.python_version(), "host": platform.node(),
                 "machine": platform.machine()}
  for run in runs:
    environment.update(run.pop("environment", None) or {})
  comparison = compare(runs)
  return {
      "schema": "mtlface_jax.side_by_side/1",
      "finished": finished,
      "tiny": args.tiny,
      "started_utc": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(),
      "wall_s": round(time.time() - started, 1),
      "settings": {"runs": args.runs, "torch_configs": args.torch_configs,
                   "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                   "num_distinct_batches": NUM_BATCHES, "group": args.group,
                   "deadline_s": args.deadline_s, "xla_flags": args.xla_flags,
                   "jax_dtype": "float32" if args.tiny else "bfloat16"},
      "environment": environment,
      "runs": runs,
      "comparison": comparison,
      "targets": targets(comparison, args.tiny),
  }


def run_all(args) -> dict:
  """Starts every child in order within the deadline; rewrites the JSON after each."""
  started = time.time()
  runs = []
  output = Path(args.output) if args.output else None
  for specs in plan(args):
    left = args.deadline_s - (time.time() - started) if args.deadline_s else 3600.0
    if left < (MIN_CHILD_S if args.deadline_s else 0):
      runs += [{**_identity(s), "skipped": f"deadline: {left:.0f} s left"} for s in specs]
      continue
    for result in run_child(specs, left, child_env(specs, args.xla_flags)):
      runs.append(result)
      print(json.dumps({k: v for k, v in result.items() if k != "environment"}), flush=True)
    if output:
      snapshot = document(args, [dict(r) for r in runs], started, finished=False)
      output.write_text(json.dumps(snapshot, indent=1, default=str))
  result = document(args, runs, started, finished=True)
  if output:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1, default=str))
  return result


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--runs", default="", help=f"task:batch list (default {DEFAULT_RUNS}; "
                      f"--tiny: {TINY_RUNS})")
  parser.add_argument("--torch_configs", default=",".join(("amp_eager", "channels_last",
                                                           "channels_last_compile")))
  parser.add_argument("--frameworks", default="jax,torch")
  parser.add_argument("--tiny", action="store_true", help="reduced models, batch 2 (CPU check)")
  parser.add_argument("--steps", type=int, default=0, help="timed steps per block (20; tiny 1)")
  parser.add_argument("--repeats", type=int, default=0, help="timed blocks, median (3; tiny 1)")
  parser.add_argument("--warmup", type=int, default=-1, help="untimed steps (5; tiny 1)")
  parser.add_argument("--group", choices=("run", "framework"), default="",
                      help="child processes per run (GPU default) or per framework (CPU)")
  parser.add_argument("--deadline_s", type=float, default=0,
                      help="skip what would start later than this many seconds in")
  parser.add_argument("--cpu_amp", default="float32", choices=("float32", "bfloat16"),
                      help="PyTorch autocast dtype on a CPU (CUDA always uses float16)")
  parser.add_argument("--compile_on_cpu", action="store_true")
  parser.add_argument("--xla_flags", default="", help="appended to XLA_FLAGS of JAX children")
  parser.add_argument("--output", default="", help="the JSON file to write")
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.runs = args.runs or (TINY_RUNS if args.tiny else DEFAULT_RUNS)
  defaults = (1, 1, 1) if args.tiny else (20, 3, 5)
  args.steps = args.steps or defaults[0]
  args.repeats = args.repeats or defaults[1]
  args.warmup = defaults[2] if args.warmup < 0 else args.warmup
  args.group = args.group or ("framework" if args.tiny else "run")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.child:
    child_main(json.loads(args.child))
    return {}
  result = run_all(args)
  print(json.dumps({"comparison": result["comparison"], "targets": result["targets"]}, indent=1))
  return result


if __name__ == "__main__":
  main()
