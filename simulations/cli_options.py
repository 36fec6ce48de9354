"""What several ``pfl`` commands' parsers share: list and setting types, and the model,
training-cache and evaluation options."""

from __future__ import annotations

import argparse
import json

from edge_client.ondevice import BACKENDS


def csv_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def setting(text: str) -> tuple[str, str, object]:
    """``perpcs.gate_steps=50`` -> ("perpcs", "gate_steps", 50); values are JSON or strings."""
    name, sep, raw = text.partition("=")
    section, dot, key = name.partition(".")
    if not sep or not dot or not section or not key:
        raise argparse.ArgumentTypeError(f"expected METHOD.KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return section.strip(), key.strip(), value


def method_settings(args) -> dict:
    """``--set METHOD.KEY=VALUE`` options as ``{METHOD: {KEY: VALUE}}``."""
    settings: dict = {}
    for section, key, value in getattr(args, "set", None) or []:
        settings.setdefault(section, {})[key] = value
    return settings


def train_cache_option(parser) -> None:
    parser.add_argument("--no-train-cache", "--no-sharer-cache", dest="reuse_trained",
                        action="store_false",
                        help="train stage 1, PerFit stage 1, every PER-PCS sharer and every "
                             "user's OPPU/LoRA-P/PerFit state again, even when an earlier run "
                             "trained them from the same model, users, examples and settings "
                             "(they are kept under the cache dir, trained-state/ and "
                             "sharer-pieces/)")


def model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="smollm2-135m (default, embedded), tiny, or a local HF checkpoint path")
    parser.add_argument("--device", default=None, help="cpu, cuda, or auto (default)")
    parser.add_argument("--cache-dir", default=None,
                        help="where converted weights are cached (default $PFL_CACHE_DIR "
                             "or ~/.cache/pfl)")


def eval_options(parser: argparse.ArgumentParser) -> None:
    """The options of a ``pfl eval`` run (also each point of ``pfl study``)."""
    parser.add_argument("--task", required=True,
                        help="news-headline, news-category, synthetic, LaMP-1..LaMP-7, LaMP-2N")
    parser.add_argument("--data", default=None,
                        help="data path (HuffPost folder or .jsonl, LaMP questions file or folder)")
    parser.add_argument("--users", type=int, default=40, help="number of target users (default 40)")
    parser.add_argument("--queries-per-user", type=int, default=None,
                        help="each target's latest N items are its queries, the history strictly "
                             "older (default 3 on HuffPost and synthetic; LaMP has 1)")
    parser.add_argument("--min-history", type=int, default=None,
                        help="minimum history items per user (default: the task's; HuffPost 10)")
    parser.add_argument("--sharers", type=int, default=None,
                        help="PER-PCS sharers, chosen among non-targets (default 10)")
    parser.add_argument("--collective", type=int, default=None,
                        help="collective users for stage 1, disjoint from targets (default 30)")
    parser.add_argument("--max-history", type=int, default=None,
                        help="trained methods use each user's N most recent items (default 50)")
    parser.add_argument("--stage1-epochs", type=float, default=None,
                        help="default: the recipe's (paper: 3)")
    parser.add_argument("--personal-epochs", type=float, default=None,
                        help="default: the recipe's (paper: 2)")
    parser.add_argument("--set", type=setting, action="append", metavar="METHOD.KEY=VALUE",
                        help="a method setting, e.g. perpcs.gate_steps=50, perpcs.top_k=1, "
                             "perfit.epochs=2, perfit.positions=l7 (repeatable)")
    parser.add_argument("--recipe", default="tuned",
                        help="training recipe: tuned (default: the one shipped for this model and "
                             "task, else paper), paper (the papers' settings) or a file written "
                             "by pfl tune; --set and the epoch flags override it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8, help="generation batch size")
    parser.add_argument("--sample", action="store_true",
                        help="sample (T=0.1, top-k 10, top-p 0.9) instead of greedy decoding")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--backend", default="torch",
                        choices=BACKENDS,
                        help="answer with PyTorch (default) or ONNX Runtime on the exported "
                             "graph, fp32 or weight-only quantized (pfl export onnx)")
    train_cache_option(parser)
    model_options(parser)
