"""Summarises a ``jax.profiler`` trace (``*.xplane.pb``) of GPU steps.

Adds up the device time of every kernel on the GPU streams, by kernel class
(cuDNN/cuBLAS/Triton/XLA loop or reduction fusion, memcpy) and by HLO op, so
that a step's time can be split into matrix work, memory-bound fusions and
gaps between kernels::

  python benchmarks/profile_summary.py trace.xplane.pb --steps 3 --top 30

Prints one JSON object.
"""

import argparse
import collections
import json
from typing import Any


def kernel_class(name: str) -> str:
  """A coarse class for a GPU kernel or HLO op name."""
  lower = name.lower()
  if "memcpy" in lower or "memset" in lower:
    return "memcpy/memset"
  if any(k in lower for k in ("cudnn", "xmma", "conv", "implicit_gemm", "wgrad", "dgrad",
                              "fprop", "cutlass__5x_cudnn")):
    return "convolution (cuDNN)"
  if "triton" in lower:
    return "triton fusion"
  if any(k in lower for k in ("gemm", "nvjet", "cublas", "cutlass", "sm90_", "dot")):
    return "gemm"
  if lower.startswith(("input_", "reduce")) or "reduction" in lower or "reduce" in lower:
    return "xla reduction fusion"
  if lower.startswith(("loop_", "fusion", "wrapped_", "copy", "transpose", "concatenate",
                       "select", "dynamic", "slice", "pad", "broadcast")):
    return "xla loop fusion"
  return "other"


def _stat(event, key: str):
  for name, value in event.stats:
    if name == key:
      return value
  return None


def summarize(path: str, steps: int = 1, top: int = 30) -> dict[str, Any]:
  """Per-step device time by class and the top kernels/HLO ops of a trace.

  Args:
    path: the ``.xplane.pb`` file.
    steps: steps the trace covers (times are divided by it).
    top: how many kernels to list.

  Returns:
    A JSON-ready dict (milliseconds per step).
  """
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top
  data = ProfileData.from_file(path)
  by_kernel = collections.Counter()
  counts = collections.Counter()
  by_class = collections.Counter()
  by_hlo = collections.Counter()
  first, last, kernels = None, None, 0
  lines_seen = {}
  for plane in data.planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    for line in plane.lines:
      events = list(line.events)
      lines_seen[line.name] = len(events)
      if not line.name.startswith("Stream"):
        continue
      for event in events:
        duration_ms = event.duration_ns / 1e6
        hlo_op = _stat(event, "hlo_op")
        name = event.name
        by_kernel[name] += duration_ms
        counts[name] += 1
        by_class[kernel_class(name)] += duration_ms
        if hlo_op:
          by_hlo[str(hlo_op)] += duration_ms
        kernels += 1
        start, end = event.start_ns, event.start_ns + event.duration_ns
        first = start if first is None else min(first, start)
        last = end if last is None else max(last, end)
  busy = sum(by_class.values())
  span = (last - first) / 1e6 if first is not None else 0.0
  per_step = lambda ms: round(ms / steps, 3)
  return {
      "trace": path,
      "gpu_lines": lines_seen,
      "kernels_per_step": kernels / steps,
      "span_ms_per_step": per_step(span),
      "busy_ms_per_step": per_step(busy),
      "idle_fraction": round(1 - busy / span, 4) if span else None,
      "by_class_ms_per_step": {k: per_step(v) for k, v in by_class.most_common()},
      "top_kernels_ms_per_step": [[k[:120], per_step(v), counts[k] // steps]
                                  for k, v in by_kernel.most_common(top)],
      "top_hlo_ops_ms_per_step": [[k[:120], per_step(v)] for k, v in by_hlo.most_common(top)],
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("trace", help="path of a .xplane.pb file")
  parser.add_argument("--steps", type=int, default=1, help="steps the trace covers")
  parser.add_argument("--top", type=int, default=30)
  args = parser.parse_args(argv)
  print(json.dumps(summarize(args.trace, args.steps, args.top), indent=1))


if __name__ == "__main__":
  main()
