"""``pfl bench ...``: each benchmark's command and parser (the benchmarks themselves are the
``simulations.bench_*`` modules, loaded only by the command that runs one)."""

from __future__ import annotations

from pathlib import Path

from edge_client.ondevice import BACKENDS
from shared.files import write_json
from simulations.cli_options import csv_list, int_list, method_settings, model_options, setting


def _report(result: dict, table, plot, out_dir: str, name: str) -> int:
    """A benchmark's output: its table on stdout, ``NAME.json`` and ``NAME.png`` in
    ``out_dir``."""
    print(table(result))
    out = Path(out_dir)
    write_json(str(out / f"{name}.json"), result, indent=2)
    png = plot(result, out / f"{name}.png")
    print(f"results written to {out / f'{name}.json'} and {png}")
    return 0


def cmd_bench_population(args) -> int:
    """Client updates per second and peak memory (all processes) of `pfl simulate` at each
    population size, beside a no-op ClientApp through the same engine (Flower's floor)."""
    # lazy: a command loads only what it runs (pfl --help loads no torch)
    from simulations.bench_population import (bench_population, population_plot,
                                              population_table)

    result = bench_population(args.clients, sample=args.sample_per_round, rounds=args.rounds,
                              method=args.method, model=args.model, max_steps=args.max_steps,
                              work_dir=Path(args.work_dir), timeout=args.timeout,
                              on_row=lambda partial: write_json(
                                  str(Path(args.out_dir) / "population.json"), partial, indent=2))
    return _report(result, population_table, population_plot, args.out_dir, "population")


def cmd_bench_aggregation(args) -> int:
    """Server aggregation time (validation + example-weighted mean, R re-orthonormalized for
    PerFit) against the number of replies, on the model's real stage-1 array shapes."""
    # lazy: a command loads only what it runs (pfl --help loads no torch)
    from simulations.bench_aggregation import (aggregation_plot, aggregation_table,
                                               bench_aggregation)

    result = bench_aggregation(args.replies, model=args.model or "smollm2-135m",
                               repeats=args.repeats)
    return _report(result, aggregation_table, aggregation_plot, args.out_dir, "aggregation")


def cmd_bench_storage(args) -> int:
    """Server and per-user storage of OPPU, PerFit and PER-PCS against the number of users,
    from real artifacts on the model's shapes (PER-PCS paper, Figure 7 top)."""
    # lazy: a command loads only what it runs (pfl --help loads no torch)
    from simulations.bench_storage import bench_storage, storage_plot, storage_table

    result = bench_storage(args.model or "smollm2-135m", args.users, sharers=args.sharers,
                           pieces_per_module=args.pieces_per_module)
    return _report(result, storage_table, storage_plot, args.out_dir, "storage")


def cmd_bench_personalize(args) -> int:
    """Personalization seconds per user against history length: OPPU training, PER-PCS
    assembly, PerFit stage 2, same user and process (PER-PCS paper, Figure 7 bottom)."""
    # lazy: a command loads only what it runs (pfl --help loads no torch)
    from simulations.bench_personalize import (bench_personalize, personalize_plot,
                                               personalize_table)

    result = bench_personalize(args.model or "smollm2-135m", args.task, args.data,
                               args.history, sharers=args.sharers, repeats=args.repeats,
                               personal_epochs=args.personal_epochs,
                               perfit_epochs=args.perfit_epochs)
    return _report(result, personalize_table, personalize_plot, args.out_dir, "personalize")


def cmd_bench_serve(args) -> int:
    """Generated tokens/s of the base model, of one user at a time and of mixed batches of
    distinct users of each method, then a load test of the real inference service."""
    # lazy: a command loads only what it runs (pfl --help loads no torch)
    from simulations.bench_serve import bench_serve, serve_plot, serve_table

    result = bench_serve(args.model or "smollm2-135m", batch_sizes=args.batch_sizes,
                         new_tokens=args.new_tokens, repeats=args.repeats, clients=args.clients,
                         requests=args.requests, max_batch=args.max_batch,
                         timeout=args.timeout, device=args.device,
                         load_test=not args.no_load_test)
    code = _report(result, serve_table, serve_plot, args.out_dir, "serve")
    load = result.get("load_test")
    return 1 if load and (load["failed"] or load["wrong_answers"]) else code


def cmd_bench_poison(args) -> int:
    """PER-PCS targets against 0, 1, 2, 5 ... in-bound attacking sharers (pieces just under
    the pool's norm bound, gates aimed at the mean input): each variant's score with its
    interval, paired against no attacker, and the answers the attack changed."""
    # lazy: a command loads only what it runs (pfl --help loads no torch)
    from simulations.bench_poison import PoisonConfig, bench_poison, poison_table

    result = bench_poison(PoisonConfig(
        task=args.task, data=args.data, model=args.model, users=args.users,
        sharers=args.sharers, collective=args.collective, max_history=args.max_history,
        attackers=[int(k) for k in csv_list(args.attackers)], variants=csv_list(args.variants),
        options=method_settings(args), recipe=args.recipe, seed=args.seed,
        cache_dir=args.cache_dir, progress=not args.quiet))
    print(poison_table(result))
    out = Path(args.out_dir) / "poison.json"
    write_json(str(out), result, indent=2)
    print(f"results written to {out}")
    return 0


def cmd_bench_attack(args) -> int:
    """Honest clients' p50/p99 latency on the piece pool and pfl serve, alone and beside
    held-open streams and a flooding connection; exit 1 if an honest call failed or the
    honest p99 grew more than 2x."""
    # lazy: a command loads only what it runs (pfl --help loads no torch)
    from simulations.bench_attack import attack_table, bench_attack

    result = bench_attack(clients=args.clients, seconds=args.seconds, held=args.held,
                          flood=args.flood, model=args.model,
                          services=tuple(csv_list(args.services)))
    print(attack_table(result))
    out = Path(args.out_dir) / "attack.json"
    write_json(str(out), result, indent=2)
    print(f"results written to {out}")
    missed = [r for r in result["rows"] if r["under_attack"]["failed"]
              or (r["p99_ratio"] or 0) > 2.0]
    return 1 if missed else 0


def cmd_bench_device(args) -> int:
    """Time to first token, decode tokens/s and peak memory of answering on a device:
    PyTorch against ONNX Runtime (fp32, int8, int4 weight-only), each in its own process."""
    # lazy: a command loads only what it runs (pfl --help loads no torch)
    from simulations.bench_device import bench_device, device_plot, device_table

    result = bench_device(args.model or "smollm2-135m", batch_sizes=args.batch_sizes,
                          new_tokens=args.new_tokens, repeats=args.repeats,
                          threads=args.threads, backends=csv_list(args.backends),
                          cache=args.cache_dir)
    return _report(result, device_table, device_plot, args.out_dir, "device")


def cmd_bench_privacy(args) -> int:
    """Stage-1 round time and bytes per device with and without secure aggregation
    (SecAgg+) and DP, at each number of simulated devices (in-process grid, real rounds)."""
    # lazy: a command loads only what it runs (pfl --help loads no torch)
    from simulations.bench_privacy import bench_privacy, privacy_plot, privacy_table

    result = bench_privacy(args.devices, model=args.model or "tiny", method=args.method,
                           rounds=args.rounds, max_steps=args.max_steps,
                           settings=csv_list(args.settings),
                           secagg_num_shares=args.secagg_num_shares, repeats=args.repeats,
                           on_row=lambda partial: write_json(
                               str(Path(args.out_dir) / "privacy.json"), partial, indent=2))
    return _report(result, privacy_table, privacy_plot, args.out_dir, "privacy")


def cmd_bench_traffic(args) -> int:
    """Uplink and downlink bytes per client and phase, read from the audit ledgers of a
    federation run folder (pfl simulate / pfl demo)."""
    # lazy: a command loads only what it runs (pfl --help loads no torch)
    from simulations.traffic import ledger_traffic, traffic_plot, traffic_table

    return _report(ledger_traffic(args.run_dir), traffic_table, traffic_plot, args.out_dir,
                   "traffic")


def cmd_bench_model(args) -> int:
    # lazy: a command loads only what it runs (pfl --help loads no torch)
    from simulations.bench_model import bench_model, bench_table

    result = bench_model(args.model, batch_sizes=args.batch_sizes, seq_len=args.seq_len,
                         target_len=args.target_len, repeats=args.repeats, device=args.device,
                         cache_dir=args.cache_dir)
    print(bench_table(result))
    if args.out:
        write_json(args.out, result, indent=2)
        print(f"results written to {args.out}")
    return 0


def add_bench_commands(commands) -> None:
    """``pfl bench model | population | aggregation | storage | personalize | traffic |
    serve | device``."""
    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(
        dest="bench_command", metavar="SUBCOMMAND", required=True)
    bm = bench.add_parser("model", help="forward / training tokens per second")
    bm.add_argument("--batch-sizes", type=int_list, default=[1, 4, 8])
    bm.add_argument("--seq-len", type=int, default=128)
    bm.add_argument("--target-len", type=int, default=8)
    bm.add_argument("--repeats", type=int, default=3)
    bm.add_argument("--out", default=None, help="write the results JSON here")
    model_options(bm)
    bm.set_defaults(func=cmd_bench_model)
    for add in (_add_bench_population, _add_bench_aggregation, _add_bench_storage,
                _add_bench_personalize, _add_bench_traffic, _add_bench_serve,
                _add_bench_device, _add_bench_privacy):
        add(bench)


def _add_bench_population(bench) -> None:
    bp = bench.add_parser("population", help="simulation throughput and peak memory vs "
                                             "population size", description=cmd_bench_population.__doc__)
    bp.add_argument("--clients", type=int_list, default=[10000, 100000],
                    help="population sizes (default 10000,100000)")
    bp.add_argument("--sample-per-round", type=int, default=100)
    bp.add_argument("--rounds", type=int, default=3)
    bp.add_argument("--method", default="perfit", help="perfit (default), oppu, perpcs, lora-c")
    bp.add_argument("--model", default="tiny")
    bp.add_argument("--max-steps", type=int, default=2,
                    help="local stage-1 steps per update (default 2: measures the system, "
                         "not the model)")
    bp.add_argument("--timeout", type=float, default=3600.0, help="per run, seconds")
    bp.add_argument("--work-dir", default="runs/bench-population",
                    help="run folders and logs (default %(default)s)")
    bp.add_argument("--out-dir", default="results/bench",
                    help="population.json and population.png go here (default %(default)s)")
    bp.set_defaults(func=cmd_bench_population)


def _add_bench_aggregation(bench) -> None:
    ba = bench.add_parser("aggregation", help="server aggregation time vs number of replies",
                          description=cmd_bench_aggregation.__doc__)
    ba.add_argument("--replies", type=int_list, default=[10, 100, 1000],
                    help="reply counts (default 10,100,1000)")
    ba.add_argument("--repeats", type=int, default=3)
    ba.add_argument("--model", default=None, help="smollm2-135m (default) or tiny")
    ba.add_argument("--out-dir", default="results/bench",
                    help="aggregation.json and aggregation.png go here (default %(default)s)")
    ba.set_defaults(func=cmd_bench_aggregation)


def _add_bench_storage(bench) -> None:
    bs = bench.add_parser("storage", help="server and per-user storage vs number of users",
                          description=cmd_bench_storage.__doc__)
    bs.add_argument("--users", type=int_list, default=[10, 100, 1000, 10000])
    bs.add_argument("--sharers", type=int, default=10, help="PER-PCS pool sharers (default 10)")
    bs.add_argument("--pieces-per-module", type=int, default=3,
                    help="pieces per layer and module in a recipe (default 3)")
    bs.add_argument("--model", default=None, help="smollm2-135m (default) or tiny")
    bs.add_argument("--out-dir", default="results/bench",
                    help="storage.json and storage.png go here (default %(default)s)")
    bs.set_defaults(func=cmd_bench_storage)


def _add_bench_personalize(bench) -> None:
    bz = bench.add_parser("personalize", help="personalization time vs history length",
                          description=cmd_bench_personalize.__doc__)
    bz.add_argument("--history", type=int_list, default=[5, 10, 20, 40],
                    help="history lengths (default 5,10,20,40)")
    bz.add_argument("--task", default="synthetic")
    bz.add_argument("--data", default=None)
    bz.add_argument("--sharers", type=int, default=3)
    bz.add_argument("--personal-epochs", type=float, default=2.0, help="OPPU (default 2)")
    bz.add_argument("--perfit-epochs", type=float, default=None,
                    help="PerFit stage 2 (default: --personal-epochs)")
    bz.add_argument("--repeats", type=int, default=1)
    bz.add_argument("--model", default=None, help="smollm2-135m (default) or tiny")
    bz.add_argument("--out-dir", default="results/bench",
                    help="personalize.json and personalize.png go here (default %(default)s)")
    bz.set_defaults(func=cmd_bench_personalize)


def _add_bench_serve(bench) -> None:
    bv = bench.add_parser("serve", help="inference: mixed batches of users, and a load test",
                          description=cmd_bench_serve.__doc__)
    bv.add_argument("--batch-sizes", type=int_list, default=[8, 32, 128],
                    help="rows a batch (default 8,32,128)")
    bv.add_argument("--new-tokens", type=int, default=16, help="decoded per request")
    bv.add_argument("--repeats", type=int, default=2)
    bv.add_argument("--clients", type=int, default=50, help="load test: concurrent clients")
    bv.add_argument("--requests", type=int, default=1000, help="load test: requests in all")
    bv.add_argument("--max-batch", type=int, default=32, help="load test: the service's batch")
    bv.add_argument("--timeout", type=float, default=1800.0, help="load test: time bound (s)")
    bv.add_argument("--no-load-test", action="store_true")
    bv.add_argument("--model", default=None, help="smollm2-135m (default) or tiny")
    bv.add_argument("--device", default=None)
    bv.add_argument("--out-dir", default="results/bench",
                    help="serve.json and serve.png go here (default %(default)s)")
    bv.set_defaults(func=cmd_bench_serve)
    ba = bench.add_parser("attack", help="the pool and pfl serve under attack: honest "
                          "latency without and with idle streams and a flooding client",
                          description=cmd_bench_attack.__doc__)
    ba.add_argument("--clients", type=int, default=4, help="honest clients (default 4)")
    ba.add_argument("--seconds", type=float, default=15.0,
                    help="each measurement's length (default 15)")
    ba.add_argument("--held", type=int, default=64,
                    help="streams held open without a request (default 64)")
    ba.add_argument("--flood", type=int, default=32,
                    help="threads of the one flooding connection (default 32)")
    ba.add_argument("--model", default="tiny", help="pfl serve's model (default tiny)")
    ba.add_argument("--services", default="pool,serve", help="pool, serve or both")
    ba.add_argument("--out-dir", default="results/bench",
                    help="attack.json goes here (default %(default)s)")
    ba.set_defaults(func=cmd_bench_attack)
    bp = bench.add_parser("poison", help="PER-PCS targets against hostile sharers: the score "
                          "and the answers changed for 0, 1, 2, 5 attackers",
                          description=cmd_bench_poison.__doc__)
    bp.add_argument("--task", default="synthetic", help="default synthetic")
    bp.add_argument("--data", default=None, help="data path (HuffPost folder or .jsonl)")
    bp.add_argument("--model", default="tiny", help="default tiny (smollm2-135m for numbers)")
    bp.add_argument("--users", type=int, default=20, help="targets (default 20)")
    bp.add_argument("--sharers", type=int, default=10, help="honest sharers (default 10)")
    bp.add_argument("--collective", type=int, default=10,
                    help="collective users (default 10; the first one aims the attack)")
    bp.add_argument("--max-history", type=int, default=16, help="default 16")
    bp.add_argument("--attackers", default="0,1,2,5", help="attacker counts (default 0,1,2,5)")
    bp.add_argument("--variants", default="gates-undefended,gates,loss",
                    help="gates-undefended (the papers' assembly alone), gates, loss")
    bp.add_argument("--set", type=setting, action="append", metavar="METHOD.KEY=VALUE",
                    help="a method setting, as in pfl eval (repeatable)")
    bp.add_argument("--recipe", default="tuned", help="as in pfl eval (default tuned)")
    bp.add_argument("--seed", type=int, default=0)
    bp.add_argument("--cache-dir", default=None)
    bp.add_argument("--quiet", action="store_true", help="no progress bars")
    bp.add_argument("--out-dir", default="results/bench",
                    help="poison.json goes here (default %(default)s)")
    bp.set_defaults(func=cmd_bench_poison)


def _add_bench_device(bench) -> None:
    bd = bench.add_parser("device", help="on-device answers: PyTorch against ONNX Runtime "
                          "fp32 / int8 / int4", description=cmd_bench_device.__doc__)
    bd.add_argument("--batch-sizes", type=int_list, default=[1, 8], help="default 1,8")
    bd.add_argument("--new-tokens", type=int, default=32, help="decoded per request")
    bd.add_argument("--repeats", type=int, default=3)
    bd.add_argument("--threads", type=int, default=2, help="threads of each backend")
    bd.add_argument("--backends", default=",".join(BACKENDS),
                    help="default %(default)s (the first is the reference of the ratios)")
    bd.add_argument("--model", default=None, help="smollm2-135m (default) or tiny")
    bd.add_argument("--cache-dir", default=None, help="where the exported graphs are kept")
    bd.add_argument("--out-dir", default="results/bench",
                    help="device.json and device.png go here (default %(default)s)")
    bd.set_defaults(func=cmd_bench_device)


def _add_bench_privacy(bench) -> None:
    bp = bench.add_parser("privacy", help="stage-1 round time and bytes per device with and "
                          "without SecAgg+ and DP", description=cmd_bench_privacy.__doc__)
    bp.add_argument("--devices", type=int_list, default=[5, 20, 100],
                    help="devices per round (default 5,20,100)")
    bp.add_argument("--settings", default="plain,dp,secagg,secagg+dp",
                    help="default %(default)s")
    bp.add_argument("--method", choices=("lora", "perfit"), default="lora",
                    help="the collective kind (default lora)")
    bp.add_argument("--rounds", type=int, default=2)
    bp.add_argument("--max-steps", type=int, default=1, help="local steps per device")
    bp.add_argument("--repeats", type=int, default=3, help="runs per row (medians)")
    bp.add_argument("--secagg-num-shares", type=int, default=0,
                    help="SecAgg+ neighbours per device (default 0: every device)")
    bp.add_argument("--model", default=None, help="tiny (default) or smollm2-135m")
    bp.add_argument("--out-dir", default="results/bench",
                    help="privacy.json and privacy.png go here (default %(default)s)")
    bp.set_defaults(func=cmd_bench_privacy)


def _add_bench_traffic(bench) -> None:
    bt = bench.add_parser("traffic", help="uplink/downlink bytes per client and phase, from "
                                          "the ledgers of a run", description=cmd_bench_traffic.__doc__)
    bt.add_argument("run_dir", help="a run folder of pfl simulate or pfl demo")
    bt.add_argument("--out-dir", default="results/bench",
                    help="traffic.json and traffic.png go here (default %(default)s)")
    bt.set_defaults(func=cmd_bench_traffic)
