"""The ``llmpipe`` command. Heavy imports (prefect, torch, mlflow) happen only once a command needs them."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from tasks.config import PipelineConfig, load_config, to_yaml
from tasks.errors import ConfigError, LlmpipeError

EXIT_CONFIG = 2


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None,
                   help="preset name from configs/ (quickstart, ...) or a YAML file; default: built-in quickstart")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field by dotted path, e.g. --set pretrain.max_steps=100 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmpipe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the whole pipeline (llm_pipeline flow)")
    _config_args(run)

    deploy = sub.add_parser("deploy", help="create the work pools and deployments of deployments/prefect.yaml "
                                           "on the configured Prefect API")
    _config_args(deploy)  # the deployments' default parameters; none given: the flows' own defaults
    deploy.add_argument("--update-pools", action="store_true",
                        help="give existing process pools that let runs override the command, environment or "
                             "working directory llmpipe's template")
    serve = sub.add_parser("serve", help="run the deployments of deployments/prefect.yaml in this process "
                                         "(Prefect serve), for a single box")
    _config_args(serve)

    config = sub.add_parser("config", help="inspect configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print the effective config as YAML")
    _config_args(show)

    predict = sub.add_parser("predict", help="label texts with a registered classifier")
    predict.add_argument("--model", "-m", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    predict.add_argument("--input", "-i", type=Path, default=None, metavar="FILE",
                         help="a CSV, TSV or JSONL file of texts; predictions go to FILE's folder as "
                              "<name>.predictions.<ext>")
    predict.add_argument("--text-column", default="text", help="column (or JSON key) holding the text (default: text)")
    predict.add_argument("texts", nargs="*", help="texts to classify (instead of --input)")

    promote = sub.add_parser("promote", help="give a registered version the champion alias")
    promote.add_argument("name", help="registered model name")
    promote.add_argument("version", type=int, help="version number")
    rollback = sub.add_parser("rollback", help="give the champion alias back to the previous champion")
    rollback.add_argument("name", help="registered model name")
    for p in (promote, rollback):
        p.add_argument("--alias", default="champion", help="the champion alias (default: champion)")
        p.add_argument("--challenger-alias", default="challenger",
                       help="the challenger alias, removed from a version that becomes champion (default: challenger)")

    gc = sub.add_parser("gc", help="list (and with --delete remove) leftovers and artifacts nothing refers to")
    _config_args(gc)
    gc.add_argument("--workspace", "-w", default=None, metavar="DIR", help="the workspace (default: the config's)")
    gc.add_argument("--keep-days", type=float, default=7.0, metavar="N",
                    help="keep unfinished builds' checkpoints written to, and artifacts of runs started, in the "
                         "last N days (default: 7)")
    gc.add_argument("--experiment", default=None,
                    help="MLflow experiment whose recent runs keep artifacts (default: the config's, llmpipe)")
    gc.add_argument("--delete", action="store_true", help="remove what is listed (default: only list it)")
    gc.add_argument("--no-registry", action="store_true",
                    help="do not consult MLflow: treat only leftovers, never unreferenced artifacts")
    return parser


def _load(args: argparse.Namespace) -> PipelineConfig:
    return load_config(args.config, args.overrides)


def preflight(cfg: PipelineConfig) -> None:
    """Cheap checks of inputs before any stage starts."""
    from tasks.sources import check_files

    labeled = cfg.labeled
    if labeled.source == "files":
        for field in ("train_path", "validation_path", "test_path"):
            value = getattr(labeled, field)
            if value and not Path(value).is_file():
                raise ConfigError(f"labeled.{field}: file not found: {value}")
    if labeled.source == "dataframe":
        raise ConfigError("labeled.source: 'dataframe' takes DataFrames passed from Python to ingest_labeled; "
                          "llmpipe run cannot pass them (use 'files' or 'hub')")
    for i, source in enumerate(cfg.corpus.sources):
        field = f"corpus.sources[{i}]"
        if source.kind == "files":
            check_files(source, field)  # files exist, tables have their text columns
        elif source.kind == "dataframe":
            raise ConfigError(f"{field}: a 'dataframe' source takes a DataFrame passed from Python to ingest_corpus; "
                              "llmpipe run cannot pass one (use 'files' or 'hub')")


def exit_on_sigterm() -> None:
    """Unwind on SIGTERM (a scheduler's timeout, ``kill``) as on Ctrl-C: the running stage's cleanup runs
    (the torchrun group is killed), Prefect records the run as crashed, and exit handlers stop the
    temporary local API instead of leaving it running without a parent."""

    from tasks import interrupts

    def handler(signum: int, frame) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    interrupts.install()  # ...but never in the middle of an MLflow write


def cmd_run(cfg: PipelineConfig) -> int:
    from flows import runtime

    preflight(cfg)  # before anything is written
    exit_on_sigterm()
    env = runtime.configure(cfg.workspace)
    from tasks.register import check_tracking_server

    check_tracking_server()  # an MLflow server that does not answer: a clear error now, not retries for minutes
    runtime.prepare_backends(cfg.workspace)
    from flows.pipeline import llm_pipeline

    started = time.time()
    result = llm_pipeline(cfg)
    mv = result.finetune.model_version
    report = result.finetune.report.load()
    lm = result.pretrain.lm_report.load()
    reused = all(r.reused for r in (result.pretrain.corpus, result.pretrain.tokenizer, result.pretrain.tokens,
                                    result.pretrain.lm, result.finetune.classifier))
    print()
    print(f"llm_pipeline finished in {time.time() - started:.0f}s" + (" (every artifact reused)" if reused else ""))
    print(f"  language model: validation perplexity {lm['val_ppl']:.2f} (unigram baseline {lm['unigram_ppl']:.2f})")
    print(f"  classifier:     test accuracy {report['model']['accuracy']:.4f}, macro-F1 {report['model']['macro_f1']:.4f}"
          f" (TF-IDF+LR {report['baselines']['tfidf_logreg']['accuracy']:.4f})")
    state = "registered" if mv.created else "already registered"
    print(f"  model:          {mv.uri} {state}; {mv.decision}")
    if mv.below_floor:
        print(f"  WARNING:        {mv.uri} does not beat the baselines on the test split (the quality floor); it is "
              "not champion")
    alias_uri = mv.uri if mv.below_floor else f"models:/{mv.name}@{cfg.registry.champion_alias}"
    print()
    print(f"Predict:    llmpipe predict --model {alias_uri} \"a wonderful, moving film\"")
    print(f"MLflow UI:  mlflow ui --backend-store-uri {env['MLFLOW_TRACKING_URI']}")
    if not os.environ.get("PREFECT_API_URL"):
        print(f"Prefect UI: PREFECT_HOME={env['PREFECT_HOME']} prefect server start")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    if bool(args.texts) == (args.input is not None):
        raise ConfigError("predict: give texts as arguments or one --input file, not both (nor neither)")
    from tasks.register import model_uri, read_texts

    uri = model_uri(args.model)
    rows, texts = read_texts(args.input, args.text_column) if args.input else ([], args.texts)
    from flows import runtime

    runtime.configure(".llmpipe")
    from tasks import register

    mv = register.resolve_version(uri)
    preds = register.predict(f"models:/{mv.name}/{mv.version}", texts)
    if args.input is None:
        for row in preds:
            print(f"{row['label']}\t{row['score']:.4f}\t{row['text']}")
        return 0
    out = register.write_predictions(args.input, rows, preds)
    counts: dict[str, int] = {}
    for row in preds:
        counts[row["label"]] = counts.get(row["label"], 0) + 1
    print(f"{len(preds)} predictions from {uri} (version {mv.version}) written to {out}")
    print("  " + ", ".join(f"{label}: {n}" for label, n in sorted(counts.items())))
    return 0


def cmd_alias(args: argparse.Namespace) -> int:
    from flows import runtime

    runtime.configure(".llmpipe")
    from tasks import register

    if args.command == "promote":
        print(register.promote(args.name, args.version, args.alias, args.challenger_alias))
    else:
        print(register.rollback(args.name, args.alias, args.challenger_alias))
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from tasks import gc
    from tasks.redact import redact

    if args.keep_days < 0:
        raise ConfigError("gc: --keep-days must be 0 or more")
    cfg = _load(args)
    workspace = Path(args.workspace or cfg.workspace).expanduser().resolve()
    experiment = args.experiment or cfg.registry.experiment
    print(f"workspace {workspace}")
    referenced: set[str] | None = None
    if args.no_registry:
        print("registry: not consulted (--no-registry); which artifacts models and runs refer to is unknown, "
              "so only leftovers are treated")
    else:
        uri = gc.find_tracking_uri()
        if uri is None:
            env_uri = os.environ.get("MLFLOW_TRACKING_URI")
            where = (f"MLFLOW_TRACKING_URI ({redact(env_uri)}) names no existing store" if env_uri
                     else "MLFLOW_TRACKING_URI is not set and there is no mlflow.db here")
            raise ConfigError(f"gc: no MLflow store found ({where}), so it cannot tell which artifacts are still "
                              "referenced; run it where the store is, set MLFLOW_TRACKING_URI, or pass --no-registry "
                              "to treat only leftovers")
        registry_uri = os.environ.get("MLFLOW_REGISTRY_URI") or uri
        if registry_uri != uri and not gc.existing_store(registry_uri):
            raise ConfigError(f"gc: MLFLOW_REGISTRY_URI names no existing store ({redact(registry_uri)}); "
                              "pass --no-registry to treat only leftovers")
        from mlflow import MlflowClient

        try:
            client = MlflowClient(tracking_uri=uri, registry_uri=registry_uri)
            referenced = gc.registry_references(client, experiment, args.keep_days)
        except Exception as exc:  # never guess what is unreferenced
            raise LlmpipeError(f"gc: cannot read the MLflow store at {redact(uri)}: {redact(str(exc))}") from exc
        print(f"registry: {redact(uri)}: {len(referenced)} fingerprints referenced by model versions and by runs "
              f"of experiment {experiment!r} started in the last {args.keep_days:g} days (and their inputs kept)")
    entries = gc.find_garbage(workspace, referenced, args.keep_days)
    for entry in entries:
        print(gc.describe(entry, workspace))
    total = sum(e.size for e in entries)
    summary = f"{len(entries)} entries, {total} bytes ({gc.human(total)})"
    if not args.delete:
        print(summary + ("; nothing removed (pass --delete to remove them)" if entries else ""))
        return 0
    outcomes = gc.remove(entries, args.keep_days)
    removed = [o for o in outcomes if o.removed]
    for o in outcomes:
        if not o.removed:
            print(f"kept          {o.entry.path}: {o.note}")
    freed = sum(o.entry.size for o in removed)
    print(f"{summary}; removed {len(removed)} ({freed} bytes, {gc.human(freed)})"
          + (f", kept {len(outcomes) - len(removed)}" if len(removed) < len(outcomes) else ""))
    return 0


def _deploy_config(args: argparse.Namespace) -> PipelineConfig | None:
    return _load(args) if args.config or args.overrides else None


def cmd_deploy(cfg: PipelineConfig | None, update_pools: bool = False) -> int:
    from flows import deploy

    done = deploy.deploy(cfg, update_pools=update_pools)
    print(f"Prefect API {done.api_url}")
    print("work pools: " + ", ".join(f"{p} ({state})" for p, state in done.pools.items()))
    if open_pools := [p for p, state in done.pools.items() if state == "open"]:
        print(f"WARNING: work pool(s) {', '.join(open_pools)} let a run override the command, environment or working "
              "directory; `llmpipe deploy --update-pools` gives them llmpipe's template")
    print("deployments: " + ", ".join(done.deployments))
    print()
    print("Start workers:  prefect worker start --pool cpu")
    print(f"                {deploy.GPU_SLOT_ENV}=gpu-$(hostname)-0 CUDA_VISIBLE_DEVICES=0 prefect worker start --pool gpu")
    example = "llm_pipeline/cpu" if "llm_pipeline/cpu" in done.deployments else done.deployments[0]
    print(f"Run one:        prefect deployment run '{example}'   (or in the UI: Deployments > {example} > Run)")
    return 0


def cmd_serve(cfg: PipelineConfig | None) -> int:
    from flows import deploy

    deploy.serve(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "config":
            sys.stdout.write(to_yaml(_load(args)))
            return 0
        if args.command == "run":
            return cmd_run(_load(args))
        if args.command == "deploy":
            return cmd_deploy(_deploy_config(args), args.update_pools)
        if args.command == "serve":
            return cmd_serve(_deploy_config(args))
        if args.command == "predict":
            return cmd_predict(args)
        if args.command in ("promote", "rollback"):
            return cmd_alias(args)
        if args.command == "gc":
            return cmd_gc(args)
    except ConfigError as exc:
        print(f"llmpipe: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except LlmpipeError as exc:
        print(f"llmpipe: {exc}", file=sys.stderr)
        return 1
    return 1


if __name__ == "__main__":
    sys.exit(main())
