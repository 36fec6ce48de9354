"""The ``pfl`` command.

    pfl demo        the main job: every baseline on built-in synthetic users, embedded model
    pfl eval        evaluate methods on target users (in-process, one base model)
    pfl data stats  users, queries and history sizes of a task's data
    pfl bench model forward and training throughput of a model
    pfl bench population  simulation throughput and peak memory vs population size
    pfl bench aggregation server aggregation time vs number of replies
    pfl bench storage     server and per-user storage vs number of users
    pfl bench personalize personalization time per user vs history length
    pfl bench traffic     uplink/downlink bytes per client and phase (audit ledgers)
    pfl bench privacy     stage-1 round time and bytes with and without SecAgg+ and DP
    pfl simulate    a federation of virtual devices (Flower simulation engine or in-process)
    pfl tune        choose a training recipe on validation users (never on targets)
    pfl compare     paired comparisons of methods (95% intervals) in a pfl eval results file
    pfl claims      check the papers' claims against a pfl eval results file
    pfl audit       show, summarize or verify a device's audit ledger
    pfl certs       a development CA and TLS certificates for the given hosts
    pfl pool        serve or check the PER-PCS piece pool (gRPC with TLS, SQLite + blobs)
    pfl deploy      a real deployment on this machine (pool, SuperLink, SuperNodes), and
                    its status
    pfl config show every run-config key: value, default, source; the settings devices get

A problem the user can fix prints ``pfl: error: ...`` on one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from cloud_server.pool_cli import add_certs_command, add_pool_commands, add_serve_command
from edge_client.generate_cli import add_generate_command
from edge_client.ondevice import BACKENDS
from edge_client.node_cli import add_device_key_command, add_node_key_command
from edge_client.ondevice.cli import add_export_command
from edge_client.audit import add_audit_commands
from edge_client.audit import summary as ledger_summary
from shared.config import MAX_HISTORY, settings_keys
from shared.errors import PflError
from shared.files import write_json
from simulations.bench_cli import add_bench_commands
from simulations.cli_options import (csv_list, eval_options, method_settings, model_options,
                                     setting, train_cache_option)
from simulations.config_cli import add_config_commands
from simulations.deploy import add_deploy_commands


# ------------------------------------------------------------------------------ commands
def eval_config(args):
    """The :class:`~simulations.evaluate.EvalConfig` of ``pfl eval``'s arguments."""
    # lazy: a command loads only what it runs (pfl --help loads no torch)
    from simulations.evaluate import EvalConfig

    options = method_settings(args)
    return EvalConfig(task=args.task, data=args.data,
                      methods=csv_list(getattr(args, "methods", "perpcs")),
                      model=args.model, users=args.users,
                      queries_per_user=args.queries_per_user, seed=args.seed,
                      batch_size=args.batch_size, device=args.device,
                      cache_dir=args.cache_dir, min_history=args.min_history,
                      progress=not args.quiet, sample=args.sample, options=options,
                      recipe=args.recipe, reuse_trained=args.reuse_trained,
                      backend=getattr(args, "backend", "torch"),
                      **{k: getattr(args, k) for k in ("sharers", "collective", "max_history",
                                                        "stage1_epochs", "personal_epochs")
                         if getattr(args, k, None) is not None})


def cmd_study(args) -> int:
    """Run a PER-PCS robustness study: one pfl eval per point (PER-PCS on the same targets and
    stage 1; the first point adds the stage-1-only reference), then a table, a plot and a
    report with 95% intervals. Resumable: points already in --out are kept."""
    import shlex
    import sys

    # lazy: a command loads only what it runs (pfl --help loads no torch)
    from simulations.study import run_study, study_table

    summary = run_study(eval_config(args), args.axis, csv_list(args.values), args.out,
                        metric=args.metric,
                        command="pfl " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    print(study_table(summary))
    print(f"results, table and plot in {args.out}/{args.axis}.json, .md, .png")
    return 0


def cmd_eval(args) -> int:
    # lazy: a command loads only what it runs (pfl --help loads no torch)
    from simulations.evaluate import run_eval
    from shared.report import comparison_pairs, comparisons_table, results_table

    config = eval_config(args)
    previous = None
    if args.resume:
        if not args.out:
            raise PflError("--resume needs --out: the results file to resume")
        if Path(args.out).exists():
            previous = json.loads(Path(args.out).read_text())
    results = run_eval(config, on_method=(lambda partial: write_json(args.out, partial, indent=2))
                       if args.out else None, previous=previous)
    print(results_table(results))
    pairs = comparison_pairs(results, against=REFERENCES)
    if pairs:
        print("\npaired on the same users (> 0: the first is better)")
        print(comparisons_table(results, pairs))
    if args.out:
        write_json(args.out, results, indent=2)
        print(f"results written to {args.out}")
    return 0


DEMO_OPTIONS = {"max_history": 8, "personal_epochs": 2, "perpcs": {"gate_steps": 20},
                "perfit": {"epochs": 2}}


def cmd_demo(args) -> int:
    """The main job: a whole federation on one machine, on the embedded model and built-in
    synthetic users: collective stage 1 (FedAvg), federated k-means sharer selection, sharing
    to the TLS piece pool, OPPU / PER-PCS / PerFit personalization and evaluation on the
    devices; then the results table and an audit summary per device."""
    # lazy: a command loads only what it runs (pfl --help loads no torch)
    from cloud_server.federation import format_results
    from simulations.simulate import run_federation_simulation

    model = args.model or "smollm2-135m"
    methods = "nonpersonalized,oppu,perpcs,perfit"
    print(f"pfl demo: {args.clients} devices ({args.targets} targets, {args.sharers} sharers), "
          f"methods {methods}, model {model}; run folder {args.run_dir}", flush=True)
    summary = run_federation_simulation(
        args.clients, methods=methods, targets=args.targets, sharers=args.sharers, model=model,
        task="synthetic", run_dir=args.run_dir, seed=args.seed, rounds=1,
        options={"max-steps": 10, **settings_keys(DEMO_OPTIONS), "recipe": args.recipe})
    print()
    print(format_results(summary))
    print(f"({len(summary['evaluated_targets'])} targets x their queries: intervals this wide "
          "cannot tell methods apart; the 40 x 3 comparisons are in docs/results.md)")
    print("\nphases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in
                                      summary["phase_seconds"].items()))
    print(f"piece pool: {summary['pool_pieces']} pieces; wall {summary['wall_seconds']:.0f} s\n")
    print(answers_table(summary, args.run_dir))
    print(audit_table(summary))
    if args.out:
        write_json(args.out, summary, indent=2)
        print(f"\nresults written to {args.out}; ledgers: pfl audit show "
              f"{Path(args.run_dir) / 'clients' / 'partition-00000' / 'ledger.jsonl'}")
    return 0


#: The in-process grid's first node id (simulations.simulate.LocalGrid.FIRST_NODE_ID, not
#: imported: that module loads Flower, and pfl --help must not): node - it = partition.
FIRST_NODE_ID = 1001


def answers_table(summary: dict, run_dir: str, width: int = 60) -> str:
    """Each target's queries with the truth and every method's answer, as the devices kept
    them (edge_client.phases.ANSWERS_FILE: on the device; the demo's devices are folders of
    this machine). Answers that differ between methods are what personalization changed."""
    # lazy: a command loads only what it runs (pfl --help loads no torch)
    from edge_client.phases import ANSWERS_FILE
    from edge_client.state import partition_dir

    first = FIRST_NODE_ID
    lines, differ = [], 0
    for node in summary.get("evaluated_targets", []):
        path = partition_dir(run_dir, int(node) - first) / ANSWERS_FILE
        if not path.is_file():
            continue
        kept = json.loads(path.read_text())
        methods = list(kept["answers"])
        for i, query in enumerate(kept["queries"]):
            text = " ".join(str(query["input"]).split())
            text = text if len(text) <= width else "..." + text[-(width - 3):]
            answers = {m: " ".join(str(kept["answers"][m][i]).split())[:24] for m in methods}
            differ += len({a.rstrip(".").lower() for a in answers.values()}) > 1
            lines.append(f"device {int(node) - first}, query {i + 1}: {text}")
            lines.append("  truth " + str(query["gold"]) + " | " + " | ".join(
                f"{m} {a}" for m, a in answers.items()))
    if not lines:
        return ""
    return (f"answers (kept on each target device; {differ} of {len(lines) // 2} queries "
            "answered differently by some method)\n" + "\n".join(lines) + "\n")


def audit_table(summary: dict) -> str:
    """One line per device: its role and what left it, from its audit ledger."""
    first = FIRST_NODE_ID
    roles = {}
    for role in ("targets", "sharers", "collective"):
        for node in summary.get(role, []):
            roles[int(node) - first] = role.rstrip("s") if role != "collective" else role
    rows = [f"{'device':<8} {'role':<10} {'entries':>7} {'bytes out':>10}  {'intact':<6} rules"]
    for pid, path in sorted(summary["ledgers"].items(), key=lambda kv: int(kv[0])):
        info = ledger_summary(path)
        rules = ", ".join(f"{r} x{n}" for r, n in sorted(info["consent_rules"].items()))
        rows.append(f"{pid:<8} {roles.get(int(pid), '-'):<10} {info['entries']:>7} "
                    f"{info['bytes']:>10,}  {str(info['intact']):<6} {rules}")
    return "audit (what left each device)\n" + "\n".join(rows)


def _infer_task(path_or_task: str, task: str | None) -> tuple[str, str | None]:
    """(task, path) from ``pfl data stats``' argument: a task name or a data path."""
    # lazy: a command loads only what it runs (pfl --help loads no torch)
    from shared.tasks import TASK_NAMES, lamp_task

    if task:
        return task, path_or_task
    names = {n.lower() for n in TASK_NAMES}
    if path_or_task.lower() in names:
        return path_or_task, None
    path = Path(path_or_task)
    if not path.exists():
        raise PflError(f"{path_or_task!r} is neither a task ({', '.join(TASK_NAMES)}) "
                       "nor an existing path")
    if path.suffix == ".jsonl" or (path.is_dir() and any(path.glob("*.jsonl"))):
        return "news-headline", path_or_task
    for part in reversed(path.resolve().parts):
        try:
            return lamp_task(part).name, path_or_task
        except PflError:
            continue
    raise PflError(f"cannot tell the task of {path_or_task}: pass --task")


def cmd_data_stats(args) -> int:
    # lazy: a command loads only what it runs (pfl --help loads no torch)
    from shared.data import dataset_stats, format_stats, load_dataset

    task, path = _infer_task(args.path_or_task, args.task)
    dataset = load_dataset(task, path, split=args.split, min_history=args.min_history,
                           num_users=args.num_users)
    stats = dataset_stats(dataset)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


STAGE1_KIND = {"lora": "lora", "lora-c": "lora", "oppu": "lora", "perpcs": "lora",
               "perfit": "perfit"}


def _dp_options(args) -> dict:
    """Stage 1's run-config privacy keys from ``pfl simulate``'s flags: DP (none when off)
    and secure aggregation."""
    out: dict = {}
    if args.secagg:
        out.update({"secagg": True, "secagg-num-shares": args.secagg_num_shares,
                    "secagg-threshold": args.secagg_threshold})
    if args.dp_noise_multiplier:
        out.update({"dp-noise-multiplier": args.dp_noise_multiplier,
                    "dp-clipping-norm": args.dp_clipping_norm, "dp-delta": args.dp_delta})
    return out


def cmd_simulate(args) -> int:
    """A federation of virtual devices on one machine, on Flower's simulation engine (Ray) or
    an in-process grid: every phase (sharer selection, collective stage 1, sharing to the TLS
    piece pool, personalization and evaluation on the devices), or only stage 1 with
    ``--phases stage1``. Each virtual device is one user with its own data partition, folder
    and audit ledger under --run-dir."""
    # lazy: a command loads only what it runs (pfl --help loads no torch)
    from simulations.simulate import run_federation_simulation, run_stage1_simulation

    methods = csv_list(args.method)
    if not methods:
        raise PflError("--method needs at least one method")
    if args.phases == "stage1":
        kinds = {STAGE1_KIND.get(m) for m in methods}
        if None in kinds or len(kinds) != 1:
            raise PflError("--phases stage1 trains one collective part: --method lora "
                           "(or lora-c, oppu, perpcs) or --method perfit")
        kind = kinds.pop()
        summary = run_stage1_simulation(
            method=kind, num_clients=args.clients, rounds=args.rounds, model=args.model,
            run_dir=args.run_dir, seed=args.seed, fraction_train=args.fraction_train,
            num_users_per_client=args.users_per_client, backend=args.backend,
            max_history=args.max_history, max_steps=args.max_steps,
            num_cpus_per_client=args.cpus_per_client, verbose=args.verbose,
            num_gpus_per_client=args.client_gpus, ray_address=args.ray_address,
            options={"sample-per-round": args.sample_per_round, "task": args.task,
                     **_dp_options(args),
                     **({"data-path": args.data} if args.data else {})})
        losses = ", ".join(f"{x:.3f}" for x in summary.get("train_loss", []) if x is not None)
        print(f"stage 1 ({kind}) over {args.clients} clients, {summary['rounds']} rounds "
              f"in {summary['wall_seconds']:.1f} s ({summary['backend']})")
        print(f"replies per round: {summary.get('replies')}; train loss per round: {losses}")
        if summary.get("secagg"):
            sa = summary["secagg"]
            print(f"secure aggregation: SecAgg+, {sa['devices_per_round']} devices per round, "
                  f"{sa['shares']} shares, threshold {sa['threshold']}")
        if summary.get("dp"):
            dp = summary["dp"]
            print(f"differential privacy: epsilon {dp['epsilon']:.3f} at delta {dp['delta']:g} "
                  f"(noise multiplier {dp['noise_multiplier']:g}, clipping norm "
                  f"{dp['clipping_norm']:g}, {dp['releases']} releases)")
        print(f"global arrays: {summary['final_arrays']}")
        print(f"client ledgers: {len(summary.get('ledgers', {}))} under {args.run_dir} "
              "(read them with pfl audit show LEDGER)")
        if args.out:
            write_json(args.out, summary, indent=2)
        return 0

    # lazy: a command loads only what it runs (pfl --help loads no torch)
    from cloud_server.federation import NothingEvaluated, format_results

    method_options = method_settings(args)
    for key in ("max_history", "personal_epochs", "stage1_epochs"):
        if getattr(args, key, None) is not None:
            method_options[key] = getattr(args, key)
    options = {**settings_keys(method_options), "recipe": args.recipe,
               "fraction-train": args.fraction_train,
               "sample-per-round": args.sample_per_round,
               "selection-sample": (args.selection_sample if args.selection_sample is not None
                                    else args.sample_per_round)}
    if args.max_steps is not None:
        options["max-steps"] = args.max_steps
    options.update(_dp_options(args))
    print(f"pfl simulate: {args.clients} virtual devices ({args.targets} targets, "
          f"{args.sharers} sharers), methods {','.join(methods)}, model {args.model}, "
          f"backend {args.backend}; run folder {args.run_dir}", flush=True)
    try:
        summary = run_federation_simulation(
            args.clients, methods=",".join(methods), targets=args.targets,
            sharers=args.sharers, model=args.model, task=args.task, data_path=args.data,
            run_dir=args.run_dir, seed=args.seed, rounds=args.rounds, backend=args.backend,
            options=options, num_cpus_per_client=args.cpus_per_client, verbose=args.verbose,
            num_gpus_per_client=args.client_gpus, ray_address=args.ray_address,
            answer_backend=args.answer_backend, consent_policy=args.consent)
    except NothingEvaluated as exc:  # the table says what failed; the command fails
        print("\n" + format_results(exc.summary))
        raise
    print()
    print(format_results(summary))
    print("\nphases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in
                                      summary["phase_seconds"].items()))
    print(f"piece pool: {summary['pool_pieces']} pieces; devices with a ledger: "
          f"{len(summary['ledgers'])}; wall {summary['wall_seconds']:.0f} s")
    if args.out:
        write_json(args.out, summary, indent=2)
        print(f"results written to {args.out}")
    return 0


def _grid_axis(text: str) -> tuple[str, str, list]:
    """``oppu.lr=1e-4,1e-3`` -> ("oppu", "lr", [1e-4, 1e-3]); values are JSON or strings."""
    section, key, raw = setting(text)
    if isinstance(raw, list):
        return section, key, raw
    if not isinstance(raw, str):  # one JSON value
        return section, key, [raw]
    values = []
    for part in raw.split(","):
        try:
            values.append(json.loads(part))
        except json.JSONDecodeError:
            values.append(part.strip())
    return section, key, values


def cmd_tune(args) -> int:
    """Choose a recipe on validation users (never the targets pfl eval reports)."""
    # lazy: a command loads only what it runs (pfl --help loads no torch)
    from simulations.tune import DEFAULT_GRID, TuneConfig, tune, tune_report

    grid = json.loads(json.dumps(DEFAULT_GRID))
    for section, key, values in args.grid or []:
        grid.setdefault(section, {})[key] = values
    config = TuneConfig(task=args.task, data=args.data, model=args.model, seed=args.seed,
                        validation=args.validation_users, queries_per_user=args.queries_per_user,
                        targets=args.targets, sharers=args.sharers, collective=args.collective,
                        max_history=args.max_history, min_history=args.min_history,
                        stages=csv_list(args.stages), grid=grid, batch_size=args.batch_size,
                        device=args.device, cache_dir=args.cache_dir, progress=not args.quiet,
                        reuse_trained=args.reuse_trained,
                        validate_on_sharers=args.validate_on_sharers)
    previous = None
    if args.resume and Path(args.out).exists():
        previous = json.loads(Path(args.out).read_text())
    recipe = tune(config, on_trial=lambda partial: write_json(args.out, partial, indent=2),
                  previous=previous)
    report = tune_report(recipe)
    command = "pfl " + " ".join(args.argv)
    recipe["command"] = command
    write_json(args.out, recipe, indent=2)
    Path(args.out).with_suffix(".md").write_text(f"```\n$ {command}\n{report}\n```\n")
    print(report)
    print(f"recipe written to {args.out} (use it: pfl eval --recipe {args.out})")
    return 0


#: what pfl eval and pfl compare compare every method against by default
REFERENCES = ("nonpersonalized", "lora-c")


def _read_results(path_text: str) -> dict:
    path = Path(path_text)
    if not path.is_file():
        raise PflError(f"no results file at {path}")
    try:
        results = json.loads(path.read_text())
    except RecursionError:
        raise PflError(f"{path} is not a pfl eval results file (nested too deeply)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PflError(f"{path} is not a pfl eval results file ({exc})") from None
    if not isinstance(results, dict) or not isinstance(results.get("methods"), dict):
        raise PflError(f"{path} is not a pfl eval results file (no methods)")
    for name, method in results["methods"].items():
        if not isinstance(method, dict) or not isinstance(method.get("metrics", {}), dict):
            raise PflError(f"{path} is not a pfl eval results file (method {str(name)[:40]!r} "
                           "has no metrics object)")
    return results


def _add_methods(results: dict, results_path: str, path: str, label: str | None) -> list[str]:
    """Add the methods of the results file ``path`` to ``results`` (read from
    ``results_path``) and return their names there: ``METHOD@label``, or with ``label``
    None their own names, only those ``results`` lacks. Both files must hold the same task's
    same target users: a paired comparison needs the same users' queries."""
    other = _read_results(path)
    if other.get("targets") != results.get("targets") or \
            other.get("task") != results.get("task"):
        raise PflError(f"{path}: other targets or task than {results_path}: a paired "
                       "comparison needs the same users' queries")
    added = []
    for name, method in other["methods"].items():
        key = name if label is None else f"{name}@{label}"
        if label is None and key in results["methods"]:
            continue
        results["methods"][key] = method
        added.append(key)
    return added


def cmd_compare(args) -> int:
    """Paired comparisons of methods of one pfl eval results file, on the same users."""
    # lazy: a command loads only what it runs (pfl --help loads no torch)
    from shared.report import comparison_pairs, comparisons_table

    results = _read_results(args.results)
    for spec in args.also or ():
        path, _, label = spec.partition("=")
        _add_methods(results, args.results, path, label or Path(path).stem)
    if (args.a is None) != (args.b is None):
        raise PflError("give two methods (A B), or none to compare each against --against")
    against = csv_list(args.against) if args.against else REFERENCES
    try:
        pairs = comparison_pairs(results, args.a, args.b, against)
        if not pairs:
            raise PflError(f"nothing to compare: no per-query results of {', '.join(against)}")
        metrics = csv_list(args.metrics) if args.metrics else None
        print(comparisons_table(results, pairs, metrics))
    except (KeyError, ValueError) as exc:
        raise PflError(f"{args.results}: {exc.args[0] if exc.args else exc}") from None
    return 0


def cmd_claims(args) -> int:
    # lazy: a command loads only what it runs (pfl --help loads no torch)
    from simulations.claims import claims_table

    results = _read_results(args.results)
    for path in args.also or ():
        added = _add_methods(results, args.results, path, None)
        print(f"from {path}: {', '.join(added) or 'no method the first file lacks'}")
    try:
        print(claims_table(results))
    except (KeyError, StopIteration, ValueError, TypeError, AttributeError) as exc:
        raise PflError(f"{args.results} is not a pfl eval results file "
                       f"({type(exc).__name__})") from None
    return 0


# -------------------------------------------------------------------------------- parser


# ------------------------------------------------------------- the commands' parsers
def add_demo_command(commands) -> None:
    demo = commands.add_parser("demo", help="the main job on the embedded model and built-in data",
                               description=cmd_demo.__doc__)
    demo.add_argument("--clients", type=int, default=8, help="virtual devices (default 8)")
    demo.add_argument("--targets", type=int, default=3, help="target devices (default 3)")
    demo.add_argument("--sharers", type=int, default=2, help="PER-PCS sharers (default 2)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--run-dir", default="runs/demo",
                      help="devices' folders, ledgers, pool (default %(default)s)")
    demo.add_argument("--out", default="results/demo.json",
                      help="write the results JSON here (default %(default)s)")
    demo.add_argument("--recipe", default="tuned",
                      help="training recipe: tuned (default), paper or a pfl tune file")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    model_options(demo)
    demo.set_defaults(func=cmd_demo)


def add_eval_command(commands) -> None:
    ev = commands.add_parser("eval", help="evaluate methods on target users",
                             description="Personalize each target user with each method, "
                                         "answer their queries, print a table, write JSON.")
    ev.add_argument("--methods", default="nonpersonalized,rag1,pag",
                    help="comma-separated method names, e.g. nonpersonalized,random1,rag1,rag2,"
                         "rag4,pag,pag+rag1 (default: %(default)s)")
    eval_options(ev)
    ev.add_argument("--out", default=None, help="write the results JSON here (after each "
                    "method, so a run that is cut off keeps what it finished)")
    ev.add_argument("--resume", action="store_true",
                    help="keep the methods already in --out (same settings required) and run "
                         "only the others")
    ev.set_defaults(func=cmd_eval)


def add_study_command(commands) -> None:
    study = commands.add_parser(
        "study", help="PER-PCS robustness: score against the number of sharers or the "
                      "sharing ratio, with 95%% intervals and a plot",
        description=cmd_study.__doc__)
    study.add_argument("axis", choices=["sharers", "sharing-ratio"])
    study.add_argument("--values", required=True,
                       help="comma-separated points, e.g. 5,10,20,max (sharers; max: as many "
                            "as the data allows) or 0.2,0.5,1.0 (sharing ratio)")
    study.add_argument("--out", required=True,
                       help="folder for each point's results and AXIS.json/.md/.png; points "
                            "already there with the same settings are kept")
    study.add_argument("--metric", default=None, help="default: the task's first metric")
    eval_options(study)
    study.set_defaults(func=cmd_study)


def add_simulate_command(commands) -> None:
    sim = commands.add_parser("simulate", help="a federation of virtual devices on one machine",
                              description=cmd_simulate.__doc__)
    sim.add_argument("--method", "--methods", dest="method",
                     default="nonpersonalized,oppu,perpcs,perfit",
                     help="comma-separated methods (default %(default)s); with --phases "
                          "stage1: lora or perfit")
    sim.add_argument("--clients", type=int, default=10, help="virtual devices (default 10)")
    sim.add_argument("--sample-per-round", type=int, default=0,
                     help="stage-1 devices trained per round (default 0: --fraction-train)")
    sim.add_argument("--fraction-train", type=float, default=1.0,
                     help="share of the collective trained per round when --sample-per-round "
                          "is 0 (default 1.0)")
    sim.add_argument("--rounds", type=int, default=2, help="stage-1 FedAvg rounds (default 2)")
    sim.add_argument("--targets", type=int, default=4,
                     help="devices personalized and evaluated (default 4)")
    sim.add_argument("--sharers", type=int, default=2, help="PER-PCS sharers (default 2)")
    sim.add_argument("--selection-sample", type=int, default=None,
                     help="candidates asked in sharer selection (default: --sample-per-round, "
                          "0 = all)")
    sim.add_argument("--task", default="synthetic",
                     help="synthetic (default), news-headline, news-category, LaMP-N")
    sim.add_argument("--data", default=None, help="data path for a real task")
    sim.add_argument("--phases", choices=["all", "stage1"], default="all",
                     help="every phase (default) or only collective stage 1")
    sim.add_argument("--users-per-client", type=int, default=2,
                     help="--phases stage1 only: users in each client's partition")
    sim.add_argument("--max-history", type=int, default=None,
                     help="trained methods use each user's N most recent items")
    sim.add_argument("--max-steps", type=int, default=None,
                     help="cap on local stage-1 training steps per round")
    sim.add_argument("--personal-epochs", type=float, default=None)
    sim.add_argument("--stage1-epochs", type=float, default=None)
    sim.add_argument("--set", type=setting, action="append", metavar="METHOD.KEY=VALUE",
                     help="a method setting, as in pfl eval (repeatable)")
    sim.add_argument("--backend", choices=["ray", "inprocess"], default="ray",
                     help="Flower's simulation engine (ray, default) or an in-process grid")
    sim.add_argument("--consent", default=None, metavar="FILE",
                     help="every virtual device's consent policy (default: "
                          "simulations/consent_simulation.toml, which shares pieces; "
                          "edge_client/consent_default.toml is a real device's default)")
    sim.add_argument("--answer-backend", choices=BACKENDS, default="torch",
                     help="how the devices answer their queries: PyTorch (default) or ONNX "
                          "Runtime on the exported graph (a device setting)")
    sim.add_argument("--client-cpus", "--cpus-per-client", dest="cpus_per_client",
                     type=float, default=1.0,
                     help="Ray CPUs per virtual client: 1.0 runs one client per core")
    sim.add_argument("--dp-noise-multiplier", type=float, default=0.0,
                     help="stage 1 with central differential privacy: the Gaussian noise "
                          "multiplier (default 0: off)")
    sim.add_argument("--dp-clipping-norm", type=float, default=1.0,
                     help="DP: each stage-1 update is clipped to this L2 norm (default 1.0)")
    sim.add_argument("--dp-delta", type=float, default=1e-5,
                     help="DP: the delta at which epsilon is reported (default 1e-5)")
    sim.add_argument("--secagg", action="store_true",
                     help="stage 1 under secure aggregation (SecAgg+): the server sees only "
                          "the sum of the devices' updates (at least 3 devices per round)")
    sim.add_argument("--secagg-num-shares", type=int, default=0,
                     help="SecAgg+: neighbours each device shares its secrets with "
                          "(default 0: every sampled device)")
    sim.add_argument("--secagg-threshold", type=int, default=0,
                     help="SecAgg+: shares that rebuild a secret (default 0: a majority)")
    sim.add_argument("--client-gpus", type=float, default=0.0,
                     help="Ray GPUs per virtual client; fractions share a GPU, e.g. 0.25 runs "
                          "four clients on each (default 0)")
    sim.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                     help="join this running Ray cluster (ray start --head) instead of "
                          "starting a private one; 'auto' finds a local one")
    sim.add_argument("--model", default="tiny", help="tiny (default), smollm2-135m or a path")
    sim.add_argument("--run-dir", default="runs/simulate",
                     help="devices' folders and ledgers, pool, arrays (default %(default)s)")
    sim.add_argument("--out", default=None, help="write the summary JSON here")
    sim.add_argument("--recipe", default="tuned",
                     help="training recipe: tuned (default), paper or a pfl tune file")
    sim.add_argument("--seed", type=int, default=0)
    sim.set_defaults(func=cmd_simulate)


def add_tune_command(commands) -> None:
    tune = commands.add_parser(
        "tune", help="choose a training recipe on validation users",
        description=cmd_tune.__doc__ + " Searches a small grid, one trained part after the "
        "other (stage1, oppu, perpcs, perfit), each on the choices before it; writes a recipe "
        "file (after each trial: --resume continues) and a report beside it (.md).")
    tune.add_argument("--task", required=True, help="news-headline, news-category, synthetic")
    tune.add_argument("--data", default=None, help="data path (HuffPost folder or .jsonl)")
    tune.add_argument("--out", required=True, help="the recipe file to write (JSON)")
    tune.add_argument("--resume", action="store_true",
                      help="keep the trials already in --out and run the rest: the same "
                           "search cut off, or a finished one extended by later stages or "
                           "by more values on an axis")
    tune.add_argument("--validation-users", type=int, default=8,
                      help="users scored (default 8); never a target, sharer or collective "
                           "user of the pfl eval run with the same seed and sizes")
    tune.add_argument("--validate-on-sharers", action="store_true",
                      help="also score the pfl eval run's sharers (not targets; their data "
                           "trains no stage 1): more validation users where the data has few "
                           "left (HuffPost). Not with the perpcs stage")
    tune.add_argument("--queries-per-user", type=int, default=None,
                      help="as pfl eval's (default 3 on HuffPost and synthetic)")
    tune.add_argument("--targets", type=int, default=40,
                      help="the pfl eval run's --users, whose targets are left out (default 40)")
    tune.add_argument("--sharers", type=int, default=10)
    tune.add_argument("--collective", type=int, default=30)
    tune.add_argument("--max-history", type=int, default=MAX_HISTORY)
    tune.add_argument("--min-history", type=int, default=None)
    tune.add_argument("--stages", default="stage1,oppu,perpcs,perfit",
                      help="the parts to tune, in order (default %(default)s)")
    tune.add_argument("--grid", type=_grid_axis, action="append", metavar="STAGE.KEY=V1,V2",
                      help="one axis of a stage's grid, e.g. oppu.lr=1e-4,1e-3 (replaces the "
                           "default axis; repeatable)")
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--batch-size", type=int, default=8, help="generation batch size")
    tune.add_argument("--quiet", action="store_true", help="no progress bars")
    train_cache_option(tune)
    model_options(tune)
    tune.set_defaults(func=cmd_tune)


def add_compare_command(commands) -> None:
    compare = commands.add_parser(
        "compare", help="paired comparisons of methods in a results file",
        description="Method A against B on the same users: the metric's difference with a "
                    "95%% paired bootstrap interval over users, per-user wins/ties/losses and "
                    "identical outputs. Without A and B: every method against --against.")
    compare.add_argument("results", help="a JSON file written by pfl eval --out")
    compare.add_argument("a", nargs="?", default=None, help="a method of the file")
    compare.add_argument("b", nargs="?", default=None, help="the method to compare it with")
    compare.add_argument("--against", default=None,
                         help="references for the all-methods form (default: "
                              f"{','.join(REFERENCES)})")
    compare.add_argument("--metrics", default=None,
                         help="comma-separated metrics (default: the task's first)")
    compare.add_argument("--also", action="append", metavar="FILE[=LABEL]",
                         help="add another results file of the same targets (say, another "
                              "--backend); its methods are named METHOD@LABEL (default "
                              "label: the file's name)")
    compare.set_defaults(func=cmd_compare)


def add_claims_command(commands) -> None:
    claims = commands.add_parser("claims", help="check the papers' claims against a results file")
    claims.add_argument("results", help="a JSON file written by pfl eval --out")
    claims.add_argument("--also", action="append", metavar="FILE",
                        help="add the methods of another results file of the same targets "
                             "that the first lacks (say, methods run later into a file of "
                             "their own, or with another recipe); the methods each file "
                             "gave are listed before the table")
    claims.set_defaults(func=cmd_claims)


def add_data_command(commands) -> None:
    data = commands.add_parser("data", help="inspect data").add_subparsers(
        dest="data_command", metavar="SUBCOMMAND", required=True)
    stats = data.add_parser("stats", help="users, queries and history items per user")
    stats.add_argument("path_or_task", help="a task name (synthetic) or a data path")
    stats.add_argument("--task", default=None, help="the task, when the path does not tell")
    stats.add_argument("--split", default="dev", help="LaMP split: train, dev or test")
    stats.add_argument("--min-history", type=int, default=None,
                       help="minimum history items per user (default: the task's)")
    stats.add_argument("--num-users", type=int, default=1000, help="synthetic: number of users")
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.set_defaults(func=cmd_data_stats)


def build_parser() -> argparse.ArgumentParser:
    """``pfl``'s parser: one ``add_*`` function per command, in the order of ``pfl --help``."""
    parser = argparse.ArgumentParser(
        prog="pfl", description="Federated edge-cloud personalization of LLMs (OPPU, PER-PCS, "
                                "PerFit) on a frozen base model.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (add_demo_command, add_eval_command, add_study_command, add_simulate_command,
                add_tune_command, add_compare_command, add_claims_command, add_data_command,
                add_bench_commands, add_audit_commands, add_certs_command, add_pool_commands,
                add_serve_command, add_generate_command, add_export_command,
                add_node_key_command, add_device_key_command,
                add_deploy_commands, add_config_commands):
        add(commands)
    return parser


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # transformers' own "Loading weights" bars
    except ImportError:  # pragma: no cover
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    # Flower prints its log (and ours, under "flwr.pfl") with its own console handler; do
    # not print each line a second time through the root handler.
    logging.getLogger("flwr").propagate = False
    try:
        return args.func(args)
    except PflError as exc:
        print(f"pfl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pfl: interrupted", file=sys.stderr)
        return 130


def entry_point() -> None:
    """The ``pfl`` console command: :func:`main`, then, after a failure or Ctrl-C, nothing
    left behind (see :func:`_leave_nothing_behind`). Only the command does this, never a
    caller of :func:`main` inside its own process (a test, a notebook)."""
    code = main()
    if code:
        _leave_nothing_behind(code)
    sys.exit(code)


def _leave_nothing_behind(code: int) -> None:
    """After a failed or interrupted command: stop every process this one started (Ray's
    workers and daemons, a pool server) and, if a worker thread is still waiting on them
    (Flower's ServerApp thread after the simulation engine died), exit now."""
    import threading

    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=10)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            pass
    if any(t.is_alive() and not t.daemon for t in threading.enumerate()
           if t is not threading.main_thread()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    entry_point()
