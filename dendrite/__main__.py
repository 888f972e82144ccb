"""Command line: ``python -m dendrite {generate,search,game24,bench} ...``.

    python -m dendrite generate --prompt "4 4 10 13" --max-new-tokens 64
    python -m dendrite generate --model PATH --prompt-ids 1,2,3 --json
    python -m dendrite generate --prompt "" --json-schema data/schemas/character.schema.json
    python -m dendrite search --algo beam --prompt "Once upon" --width 4 --json
    python -m dendrite search --algo mcts --prompt "Once upon" --simulations 16
    python -m dendrite game24 --method mcts --split test
    python -m dendrite bench fork
    python -m dendrite bench soak --ops 100000
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
from typing import Any

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
    p.add_argument(
        "--threads", type=int, default=0, help="CPU threads (0: one for models under 50M params)"
    )


def _load_engine(args: argparse.Namespace) -> Any:
    """The engine for ``--model``; on CPU, small models run on one thread (they are all
    overhead: a second thread only adds synchronisation, and stalls when the machine is busy)."""
    from dendrite.engine import Engine

    engine = Engine.from_pretrained(
        args.model,
        device=args.device,
        dtype=_dtype(args.dtype) if args.dtype else None,
        page_size=args.page_size,
    )
    if engine.device.type == "cpu":
        small = engine.model_config.num_params < 50_000_000
        torch.set_num_threads(args.threads or (1 if small else torch.get_num_threads()))
    return engine


def cmd_generate(args: argparse.Namespace) -> None:
    from dendrite.sampling import SamplingParams

    engine = _load_engine(args)
    prompt = _prompt(args)
    constraint = _constraint(args, engine)
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        stop=tuple(args.stop),
    )
    if constraint is None:
        gen = engine.generate(prompt, params, seed=args.seed)[0]
    else:
        b = engine.add(prompt, params, seed=args.seed, constraint=constraint)
        engine.run([b])
        gen = engine.result(b)
        engine.free(b)
    if args.json:
        print(
            json.dumps(
                {"prompt_ids": gen.prompt_ids, "output_ids": gen.output_ids, "text": gen.text}
            )
        )
    else:
        print(gen.text if gen.text is not None else " ".join(map(str, gen.output_ids)))


def _prompt(args: argparse.Namespace) -> str | list[int]:
    if args.prompt_ids is None:
        return str(args.prompt)
    try:
        return [int(t) for t in args.prompt_ids.split(",") if t.strip()]
    except ValueError:
        raise DendriteError(
            f"--prompt-ids must be comma-separated ints, got {args.prompt_ids!r}"
        ) from None


def _constraint(args: argparse.Namespace, engine: Any) -> Any:
    chosen = [a for a in ("json_schema", "lark", "regex") if getattr(args, a, None)]
    if not chosen:
        return None
    if len(chosen) > 1:
        raise DendriteError("give at most one of --json-schema, --lark, --regex")
    from dendrite.grammar import Grammar

    tok = engine.tokenizer
    if tok is None:
        raise DendriteError("grammars need the model's tokenizer, and this model has none")
    try:
        if args.json_schema:
            grammar = Grammar.json_schema(Path(args.json_schema).read_text(), tok)
        elif args.lark:
            grammar = Grammar.lark(Path(args.lark).read_text(), tok)
        else:
            grammar = Grammar.regex(args.regex, tok)
    except OSError as e:
        raise DendriteError(f"cannot read the grammar file: {e}") from None
    return grammar.matcher()


def cmd_search(args: argparse.Namespace) -> None:

    engine = _load_engine(args)
    prompt = _prompt(args)
    out: dict[str, Any]
    if args.algo == "beam":
        from dendrite.search.beam import beam_search

        modes: dict[str, bool | str] = {"true": True, "false": False, "never": "never"}
        es = modes[args.early_stopping]
        res = beam_search(
            engine,
            prompt,
            num_beams=args.width,
            max_new_tokens=args.max_new_tokens,
            length_penalty=args.length_penalty,
            early_stopping=es,
        )
        out = {
            "algo": "beam",
            "beams": [{"output_ids": b.output_ids, "score": b.score} for b in res.beams],
        }
        if not args.json:
            for b in res.beams:
                text = engine.tokenizer.decode(b.output_ids) if engine.tokenizer else b.output_ids
                print(f"{b.score:9.4f}  {text!r}")
    else:
        out = _tree_search(engine, prompt, args)
    if args.json:
        print(json.dumps(out))


def _tree_search(engine: Any, prompt: str | list[int], args: argparse.Namespace) -> dict[str, Any]:
    from dendrite.errors import SearchError
    from dendrite.search.mcts import MCTSConfig, mcts
    from dendrite.search.tot import best_of_n, tot_bfs
    from dendrite.search.tree import SearchTree, StepConfig
    from dendrite.search.value import LogprobValue

    if args.simulations < 0:
        raise SearchError(f"--simulations must be >= 0, got {args.simulations}")
    if args.width < 1:
        raise SearchError(f"--width must be >= 1, got {args.width}")
    step = StepConfig(
        delimiter=None if args.algo == "best-of-n" else args.delimiter,
        max_step_tokens=args.max_new_tokens,
        temperature=args.temperature,
    )
    with SearchTree(engine, prompt, step, seed=args.seed) as tree:
        if args.algo == "mcts":
            cfg = MCTSConfig(
                simulations=args.simulations, children=args.width, max_depth=args.max_depth
            )
            best = mcts(tree, cfg, LogprobValue()).best_path
        elif args.algo == "tot":
            best = tot_bfs(
                tree, LogprobValue(), breadth=args.width, k=args.width, max_depth=args.max_depth
            ).best_path
        else:
            res = best_of_n(tree, args.width, answer=lambda t: t.strip() or None)
            best = [tree.root.id, max(res.samples, key=lambda i: tree[i].logprob)]
        nodes = [
            {"id": n.id, "parent": n.parent, "text": n.text, "visits": n.visits, "value": n.value}
            for n in tree.dfs()
        ]
        if not args.json:
            print(tree.path_text(tree[best[-1]]))
    return {"algo": args.algo, "nodes": nodes, "best_path": best}


def cmd_game24(args: argparse.Namespace) -> None:
    from dendrite.tasks import game24 as g24
    from dendrite.tasks.game24_eval import evaluate, parse_puzzles

    puzzles = parse_puzzles(args.puzzles) if args.puzzles else list(g24.split_puzzles(args.split))
    if args.limit:
        puzzles = puzzles[: args.limit]
    engine = _load_engine(args)
    results, summary = evaluate(engine, puzzles, args.method, args.budget, args.seed, not args.json)
    if not args.json:
        from dendrite.bench.common import print_table

        rows = [
            (" ".join(map(str, r.puzzle)), "yes" if r.solved else "no", r.answer or "-",
             r.tokens, r.forks, r.seconds)
            for r in results
        ]  # fmt: skip
        print_table(("puzzle", "solved", "answer", "tokens", "forks", "seconds"), rows)
    print(json.dumps(summary))


def cmd_bench(args: argparse.Namespace) -> None:
    out = sys.stderr if args.json else sys.stdout
    if args.threads:
        torch.set_num_threads(args.threads)  # both sides of every comparison use the same
    with contextlib.redirect_stdout(out):
        if args.which == "fork":
            from dendrite.bench import fork

            result = fork.run(forks=args.forks)
        elif args.which == "decode":
            from dendrite.bench import decode

            result = decode.run(new_tokens=args.new_tokens, repeats=args.repeats)
        elif args.which == "soak":
            from dendrite.bench import soak

            result = soak.run(ops=args.ops, seed=args.seed)
        elif args.which == "widgets":
            from dendrite.bench import widgets

            result = widgets.run()
        elif args.which == "gpu":
            from dendrite.bench import gpu

            if args.part == "cascade":
                from dendrite.bench import cascade

                result = cascade.run()
            elif args.part == "depth":
                from dendrite.bench import cascade

                result = cascade.run_depth()
            elif args.part == "extras":
                result = gpu.extras()
            else:
                result = gpu.run()
        elif args.which == "search":
            from dendrite.bench import search

            result = search.run(simulations=args.simulations)
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
    g.add_argument("--json-schema", default=None, help="constrain to this JSON schema file")
    g.add_argument("--lark", default=None, help="constrain to this Lark grammar file")
    g.add_argument("--regex", default=None, help="constrain to this regular expression")
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("search", help="beam search, MCTS, tree-of-thought or best-of-N")
    _add_model_args(s)
    src2 = s.add_mutually_exclusive_group()
    src2.add_argument("--prompt", default="", help='text; "" means BOS alone')
    src2.add_argument("--prompt-ids", default=None, help="comma-separated token ids")
    s.add_argument("--algo", required=True, choices=("beam", "mcts", "tot", "best-of-n"))
    s.add_argument("--width", type=int, default=4, help="beams / children per expansion / N")
    s.add_argument("--max-new-tokens", type=int, default=32, help="beam: tokens; tree: per step")
    s.add_argument("--length-penalty", type=float, default=1.0)
    s.add_argument("--early-stopping", choices=("true", "false", "never"), default="false")
    s.add_argument("--simulations", type=int, default=16)
    s.add_argument("--max-depth", type=int, default=4)
    s.add_argument("--delimiter", default="\n", help="step delimiter for tree searches")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_search)

    q = sub.add_parser("game24", help="solve Game of 24 puzzles with a method, report the rate")
    _add_model_args(q)
    q.add_argument(
        "--method", required=True, choices=("greedy", "sample", "best-of-n", "beam", "tot", "mcts")
    )
    which = q.add_mutually_exclusive_group()
    which.add_argument("--split", default="test", choices=("train", "validation", "test"))
    which.add_argument("--puzzles", default=None, help='e.g. "1 2 7 7;3 3 8 8"')
    q.add_argument("--budget", type=int, default=None, help="n / width / breadth / simulations")
    q.add_argument("--limit", type=int, default=0, help="only the first N puzzles")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--json", action="store_true", help="only the summary JSON line")
    q.set_defaults(func=cmd_game24)

    b = sub.add_parser("bench", help="benchmarks: a table, then one JSON line")
    b.add_argument("which", choices=("fork", "decode", "search", "gpu", "widgets", "soak"))
    b.add_argument("--json", action="store_true", help="print only the JSON line on stdout")
    b.add_argument("--forks", type=int, default=10_000, help="fork: forks per figure")
    b.add_argument("--new-tokens", type=int, default=128, help="decode: tokens per run")
    b.add_argument("--repeats", type=int, default=5, help="decode: runs per figure")
    b.add_argument("--simulations", type=int, default=100, help="search: MCTS simulations")
    b.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    b.add_argument("--ops", type=int, default=10_000, help="soak: random operations")
    b.add_argument("--seed", type=int, default=0, help="soak: seed of the operation mix")
    b.add_argument(
        "--part",
        default="main",
        choices=("main", "cascade", "depth", "extras"),
        help="gpu: main (a, b, c against HF), cascade (f: cascade vs plain), depth (f: levels "
        "by depth on nested trees), extras (d, e)",
    )
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
