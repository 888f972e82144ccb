"""Command line: ``python -m dendrite {generate,bench} ...``.

    python -m dendrite generate --prompt "4 4 10 13" --max-new-tokens 64
    python -m dendrite generate --model PATH --prompt-ids 1,2,3 --json
    python -m dendrite bench fork
    python -m dendrite bench decode

Benchmarks print a table and end with one JSON line; ``--json`` sends the table to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from dendrite.errors import DendriteError

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "data" / "models" / "dendrite-24"


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="HF checkpoint directory")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument("--page-size", type=int, default=16)


def cmd_generate(args: argparse.Namespace) -> None:
    from dendrite.engine import Engine
    from dendrite.sampling import SamplingParams

    engine = Engine.from_pretrained(
        args.model,
        device=args.device,
        dtype=_dtype(args.dtype) if args.dtype else None,
        page_size=args.page_size,
    )
    if args.prompt_ids is not None:
        try:
            prompt: str | list[int] = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise DendriteError(
                f"--prompt-ids must be comma-separated ints, got {args.prompt_ids!r}"
            ) from None
    else:
        prompt = args.prompt
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        stop=tuple(args.stop),
    )
    gen = engine.generate(prompt, params, seed=args.seed)[0]
    if args.json:
        print(
            json.dumps(
                {"prompt_ids": gen.prompt_ids, "output_ids": gen.output_ids, "text": gen.text}
            )
        )
    else:
        print(gen.text if gen.text is not None else " ".join(map(str, gen.output_ids)))


def cmd_bench(args: argparse.Namespace) -> None:
    out = sys.stderr if args.json else sys.stdout
    with contextlib.redirect_stdout(out):
        if args.which == "fork":
            from dendrite.bench import fork

            result = fork.run(forks=args.forks)
        elif args.which == "decode":
            from dendrite.bench import decode

            result = decode.run(new_tokens=args.new_tokens, repeats=args.repeats)
        else:  # pragma: no cover - argparse restricts the choices
            raise DendriteError(f"unknown benchmark {args.which!r}")
    print(json.dumps(result))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dendrite", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt")
    _add_model_args(g)
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="", help='text; "" means BOS alone')
    src.add_argument("--prompt-ids", default=None, help="comma-separated token ids")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", action="store_true", help="one JSON line instead of text")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="benchmarks: a table, then one JSON line")
    b.add_argument("which", choices=("fork", "decode"))
    b.add_argument("--json", action="store_true", help="print only the JSON line on stdout")
    b.add_argument("--forks", type=int, default=10_000, help="fork: forks per figure")
    b.add_argument("--new-tokens", type=int, default=128, help="decode: tokens per run")
    b.add_argument("--repeats", type=int, default=5, help="decode: runs per figure")
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except DendriteError as e:
        print(f"dendrite: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
