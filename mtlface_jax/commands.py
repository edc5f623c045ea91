"""The ``mtlface`` command: photos in, answers out; and every other entry point.

::

  mtlface verify A.jpg B.jpg --model runs/fas [--threshold 0.3] [--json]
  mtlface age PHOTO... --model runs/fas [--json]
  mtlface progress PHOTO -o grid.png --model runs/fas
  mtlface embed PHOTO... -o emb.npy --model runs/fas
  mtlface serve runs/fas [--port 8000]
  mtlface train|eval|convert|export|align ...   (the existing entry points)

``--model`` (or the environment variable ``MTLFACE_MODEL``) is a training
workdir, a converted checkpoint or an exported bundle. Problems are answered
in one line on stderr with a non-zero exit status.
"""

import argparse
import json
import os
from pathlib import Path
import runpy
import sys
from typing import Optional, Sequence

MODEL_ENV = "MTLFACE_MODEL"
FORWARDED = {
    "train": "train.py at the repository root (absl flags: --config, --workdir)",
    "eval": "eval.py (absl flags: --checkpoint or --model, --protocol, ...)",
    "convert": "python -m mtlface_jax.convert",
    "export": "python -m mtlface_jax.export",
    "align": "python -m mtlface_jax.align",
}


def build_parser() -> argparse.ArgumentParser:
  """The parser of the photo subcommands (the forwarded ones bypass it)."""
  parser = argparse.ArgumentParser(
      prog="mtlface", description="Face verification, age estimation and age progression "
      "on your photos with an MTLFace checkpoint.",
      epilog="Also: " + "; ".join(f"mtlface {k} ... -> {v}" for k, v in FORWARDED.items()))
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  verify = _add(commands, "verify", "are two photos the same person?")
  verify.add_argument("photos", nargs=2, metavar="PHOTO")
  verify.add_argument("--threshold", type=float, default=None,
                      help="cosine similarity threshold (default: the one an evaluation of the "
                      "checkpoint recorded in eval/report.json, else 0.3)")
  verify.add_argument("--json", action="store_true", help="print JSON")
  age = _add(commands, "age", "estimated age and age group per photo")
  age.add_argument("photos", nargs="+", metavar="PHOTO")
  age.add_argument("--json", action="store_true", help="print JSON")
  progress = _add(commands, "progress", "the face at every age group, as a titled PNG grid")
  progress.add_argument("photo", metavar="PHOTO")
  progress.add_argument("-o", "--output", default=None,
                        help="PNG to write (default: PHOTO_progress.png here)")
  embed = _add(commands, "embed", "identity embeddings [N, D] as a .npy file")
  embed.add_argument("photos", nargs="+", metavar="PHOTO")
  embed.add_argument("-o", "--output", required=True, help=".npy file to write")
  serve = _add(commands, "serve", "a local web page: drop one photo (age, progression) "
               "or two (same person?)")
  serve.add_argument("checkpoint", nargs="?", default=None, metavar="MODEL",
                     help="the checkpoint (or --model / $MTLFACE_MODEL)")
  serve.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (0: any free)")
  serve.add_argument("--threshold", type=float, default=None, help="as for verify")
  return parser


def _add(commands, name: str, help_text: str) -> argparse.ArgumentParser:
  """A subcommand with the options every photo command shares."""
  sub = commands.add_parser(name, help=help_text, description=help_text)
  sub.add_argument("--model", default=None,
                   help=f"training workdir, converted checkpoint or bundle (default ${MODEL_ENV})")
  sub.add_argument("--align", default="auto", choices=("auto", "mtcnn", "dlib", "none"),
                   help="face alignment: a detector when installed ([align] extra), else "
                   "photos are taken as aligned crops; 'none' always takes them as crops")
  sub.add_argument("--no-align", dest="align", action="store_const", const="none",
                   help="same as --align none")
  return sub


def _model_path(args) -> str:
  path = getattr(args, "checkpoint", None) or args.model or os.environ.get(MODEL_ENV)
  if not path:
    raise ValueError(f"no model: give --model PATH or set {MODEL_ENV}")
  return path


def _load(args, notice=None):
  """The model of ``args``, after checking its photos decode (no compute for a typo)."""
  from mtlface_jax import api  # pylint: disable=g-import-not-at-top
  photos = getattr(args, "photos", None) or [p for p in [getattr(args, "photo", None)] if p]
  for photo in photos:
    api.decode_photo(photo)
  return api.load(_model_path(args), align=args.align,
                  threshold=getattr(args, "threshold", None), notice=notice)


def run_verify(args) -> int:
  verdict = _load(args).verify(*args.photos)
  if args.json:
    print(json.dumps({"photos": args.photos, **verdict.to_dict()}))
  else:
    answer = "same person" if verdict.same else "different people"
    print(f"{answer}: similarity {verdict.similarity:.4f} (threshold {verdict.threshold:.4f}, "
          f"{verdict.threshold_source})")
  return 0


def run_age(args) -> int:
  estimates = _load(args).age(args.photos)
  if args.json:
    print(json.dumps([e.to_dict() for e in estimates]))
    return 0
  width = max(len("photo"), *(len(e.photo) for e in estimates))
  print(f"{'photo':<{width}}  {'age':>5}  group")
  for e in estimates:
    print(f"{e.photo:<{width}}  {e.age:5.1f}  {e.label}")
  return 0


def run_progress(args) -> int:
  output = args.output or f"{Path(args.photo).stem}_progress.png"
  model = _load(args)
  model.progress(args.photo, output)
  print(f"wrote {output}: the input, then ages {', '.join(model.group_labels)}")
  return 0


def run_embed(args) -> int:
  import numpy as np  # pylint: disable=g-import-not-at-top
  embeddings = _load(args).embed(args.photos)
  np.save(args.output, embeddings)
  print(f"wrote {args.output}: {embeddings.shape[0]} x {embeddings.shape[1]} float32 "
        "L2-normalised embeddings, in the order given")
  return 0


def run_serve(args) -> int:
  from mtlface_jax import serve  # pylint: disable=g-import-not-at-top
  model = _load(args)
  return serve.serve(model, port=args.port)


def forward(command: str, argv: list[str]) -> int:
  """Runs an existing entry point with ``argv`` (its own flags)."""
  if command in ("convert", "export", "align"):
    module = __import__(f"mtlface_jax.{command}", fromlist=["main"])
    return int(module.main(argv) or 0)
  if command == "eval":
    return _run_absl_eval(argv)
  script = Path(__file__).resolve().parents[1] / "train.py"
  if not script.is_file():
    raise ValueError(f"mtlface train runs {script}, which needs the repository checkout "
                     "(pip install -e .)")
  sys.argv = [f"mtlface {command}", *argv]
  try:
    runpy.run_path(str(script), run_name="__main__")
  except SystemExit as done:  # absl's app.run exits with main's status.
    return int(done.code or 0) if not isinstance(done.code, str) else 1
  return 0


def _run_absl_eval(argv: list[str]) -> int:
  """eval.py's flags and main; ``--model X`` (or $MTLFACE_MODEL) means ``--checkpoint=X``."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from mtlface_jax.evaluation import cli as eval_cli  # pylint: disable=g-import-not-at-top
  argv = _model_as_checkpoint(argv)
  if "protocol" not in flags.FLAGS:  # Defined once per process (eval.py may have).
    eval_cli.define_flags()
  try:
    app.run(eval_cli.main, argv=["mtlface eval", *argv])
  except SystemExit as done:
    return int(done.code or 0) if not isinstance(done.code, str) else 1
  return 0


def _model_as_checkpoint(argv: list[str]) -> list[str]:
  out, model = [], None
  items = iter(argv)
  for item in items:
    if item == "--model":
      model = next(items, None)
    elif item.startswith("--model="):
      model = item.split("=", 1)[1]
    else:
      out.append(item)
  if not any(a.startswith("--checkpoint") for a in out):
    model = model or os.environ.get(MODEL_ENV)
    if model:
      out.append(f"--checkpoint={model}")
  return out


RUNNERS = {"verify": run_verify, "age": run_age, "progress": run_progress,
           "embed": run_embed, "serve": run_serve}


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of the ``mtlface`` console script; returns the exit status."""
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    if argv and argv[0] in FORWARDED:
      return forward(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    _quiet_logs()
    return RUNNERS[args.command](args)
  except (ValueError, FileNotFoundError, ImportError, OSError) as error:
    message = " ".join(str(error).split())  # One line, whatever the error held.
    print(f"mtlface: error: {message}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    return 130


def _quiet_logs() -> None:
  """orbax logs every restore at INFO and TensorFlow chats on import: keep answers clean."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)


if __name__ == "__main__":
  sys.exit(main())
