"""Command line: python -m jaxsi.export WORKDIR OUT_DIR [--step N]

Writes the parameters of a jaxsi run as a Hugging Face checkpoint (config.json +
model.safetensors) that transformers loads with `from_pretrained`.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jaxsi.export",
                                   description="Export a jaxsi run to a Hugging Face checkpoint.")
  parser.add_argument("workdir", help="a jaxsi run directory (holds checkpoints/)")
  parser.add_argument("out_dir", help="where to write config.json and model.safetensors")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)

  from jaxsi import pretrained
  from jaxsi.models import to_pretrained

  if not pretrained.is_workdir(args.workdir):
    print(f"error: {args.workdir!r} is not a jaxsi run directory (it has no checkpoints/).",
          file=sys.stderr)
    return 2
  try:
    lm, params, config = pretrained.load_workdir(args.workdir, step=args.step)
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  to_pretrained(lm, params, args.out_dir)
  print(f"wrote {config.model.family} ({config.model.get('variant', '')}) to {args.out_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
