#!/usr/bin/env python
"""Give a trained base-engine checkpoint a range support (dota.model.DoTAConfig.support_fraction /
support_margin_mm): the same weights, its dose zero from ``margin`` mm past the last slice where the base
dose exceeds ``fraction`` of its maximum, so that truncated inference is exact by construction.

    python scripts/set_support.py runs/default/best.safetensors runs/default/best-support.safetensors \
        --fraction 1e-3 --margin-mm 10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--fraction", type=float, default=1e-3, help="base-dose fraction of its maximum (default 1e-3)")
    p.add_argument("--margin-mm", type=float, default=10.0, help="margin past that slice, mm (default 10)")
    args = p.parse_args(argv)
    from dota.checkpoint import load_model, read_checkpoint_metadata, save_model

    model = load_model(args.checkpoint)
    extra = read_checkpoint_metadata(args.checkpoint).get("extra") or {}
    if isinstance(extra, str):
        extra = json.loads(extra)
    model.config = dataclasses.replace(model.config, support_fraction=args.fraction, support_margin_mm=args.margin_mm)
    save_model(model, args.out, extra=extra)
    print(f"wrote {args.out}: support {args.fraction:g} of the base maximum + {args.margin_mm:g} mm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
