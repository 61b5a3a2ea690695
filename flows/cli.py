"""The ``llmpipe`` command: ``llmpipe run`` and the commands around it (predict, promote, rollback, config, gc,
deploy, serve). Heavy imports (prefect, torch, mlflow) happen only once a command needs them."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from tasks.config import PipelineConfig, load_config, to_yaml
from tasks.errors import ConfigError, LlmpipeError

EXIT_FAILED = 1
EXIT_CONFIG = 2  # a usage or configuration error, as argparse's own
EXIT_INTERRUPTED = 130
FLOWS = ("pipeline", "pretrain", "finetune")

DESCRIPTION = """\
Train a small language model, fine-tune a text classifier from it and register
both in MLflow, each step a Prefect task. No server and no data of your own are
needed: llmpipe run keeps everything in the folder it runs in."""

EXAMPLES = """\
examples:
  llmpipe run                    the whole pipeline on built-in sample data
  llmpipe run --config tiny      the same at smoke-test size, in seconds
  llmpipe run --flow finetune --set finetune.max_steps=400
                                 fine-tune again; unchanged stages are reused
  llmpipe predict --model models:/llmpipe-sentiment@champion "a moving film"
  llmpipe config show --config sst2
                                 a preset's effective configuration, as YAML

llmpipe COMMAND --help describes a command.
Exit status: 0 done, 1 failed, 2 usage or configuration error.
"""


def version() -> str:
    from importlib import metadata

    try:
        return metadata.version("llmpipe")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _config_args(p: argparse.ArgumentParser, what: str = "") -> None:
    from tasks.config import CONFIG_DIR

    names = sorted((f.stem for f in CONFIG_DIR.glob("*.yaml")), key=lambda n: (n != "quickstart", n))
    p.add_argument("--config", "-c", default=None, metavar="PRESET|FILE",
                   help=f"a preset ({', '.join(names)}) or a YAML file; default: quickstart" + what)
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change one field by its dotted path, e.g. --set pretrain.max_steps=100 (repeatable)")


def _verbose_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", "-v", action="store_true",
                   help="also show what libraries log for developers (MLflow, transformers) and, on a terminal, "
                        "Prefect's INFO lines")


def _model_spec(spec: str) -> str:
    """``--model``'s type: a models:/ URI, or a usage error (exit 2)."""
    from tasks.predict import model_uri

    try:
        return model_uri(spec)
    except LlmpipeError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--model: ")) from None


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """The commands listed under "commands:" without a line naming their metavar first."""

    def _format_action(self, action: argparse.Action) -> str:
        text = super()._format_action(action)
        if isinstance(action, argparse._SubParsersAction):
            text = text.split("\n", 1)[1]
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmpipe", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"llmpipe {version()}",
                        help="print llmpipe's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")

    run = sub.add_parser(
        "run", help="run the pipeline, or one of its flows",
        description="Run the pipeline (ingest, tokenizer, tokens, pretrain, evaluate, fine-tune, evaluate, register) "
                    "with Prefect's temporary local API, MLflow in ./mlflow.db and artifacts in the workspace "
                    "(./.llmpipe); stages whose inputs did not change are reused. On a terminal a live display "
                    "shows each stage, training's step, loss, speed and time left.")
    _config_args(run)
    run.add_argument("--flow", choices=FLOWS, default="pipeline",
                     help="pipeline: everything (default); pretrain: up to the evaluated language model; finetune: "
                          "the classifier (pretraining first, reused when it is unchanged)")
    run.add_argument("--no-progress", action="store_true",
                     help="no live display on a terminal: log lines, as when the output is not a terminal")
    _verbose_arg(run)

    predict = sub.add_parser("predict", help="label texts with a registered classifier",
                             description="Label texts with a classifier of the MLflow registry that llmpipe run "
                                         "wrote in this folder (./mlflow.db), or of MLFLOW_TRACKING_URI.")
    predict.add_argument("--model", "-m", required=True, type=_model_spec, metavar="MODEL",
                         help="models:/NAME@ALIAS or models:/NAME/VERSION, e.g. models:/llmpipe-sentiment@champion")
    predict.add_argument("--input", "-i", type=Path, default=None, metavar="FILE",
                         help="a CSV, TSV or JSONL file of texts; predictions go to FILE's folder as "
                              "<name>.predictions.<ext>")
    predict.add_argument("--text-column", default="text", help="column (or JSON key) holding the text (default: text)")
    predict.add_argument("texts", nargs="*", help="texts to classify (instead of --input)")
    _config_args(predict, "; the registry is the one llmpipe run writes in this folder")
    _verbose_arg(predict)

    promote = sub.add_parser("promote", help="give a registered version the champion alias")
    promote.add_argument("name", help="registered model name, e.g. llmpipe-sentiment")
    promote.add_argument("version", type=int, help="version number")
    rollback = sub.add_parser("rollback", help="give the champion alias back to the previous champion")
    rollback.add_argument("name", help="registered model name, e.g. llmpipe-sentiment")
    for p in (promote, rollback):
        p.add_argument("--alias", default=None, help="the champion alias (default: the config's, champion)")
        p.add_argument("--challenger-alias", default=None,
                       help="the challenger alias, removed from a version that becomes champion (default: the "
                            "config's, challenger)")
        _config_args(p, "; the registry is the one llmpipe run writes in this folder")
        _verbose_arg(p)

    config = sub.add_parser("config", help="show the effective configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    show = config_sub.add_parser("show", help="print the effective config as YAML")
    _config_args(show)

    gc = sub.add_parser("gc", help="list (--delete: remove) what the workspace no longer needs",
                        description="List, and with --delete remove, what the workspace no longer needs: leftovers "
                                    "of builds that did not finish, and artifacts no model version and no recent run "
                                    "refers to.")
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
    _verbose_arg(gc)

    deploy = sub.add_parser("deploy", help="create work pools and deployments on a Prefect server",
                            description="Create the work pools and deployments of deployments/prefect.yaml on the "
                                        "Prefect server of PREFECT_API_URL.")
    _config_args(deploy)  # the deployments' default parameters; none given: the flows' own defaults
    deploy.add_argument("--update-pools", action="store_true",
                        help="give existing process pools that let runs override the command, environment or "
                             "working directory llmpipe's template")
    _verbose_arg(deploy)
    serve = sub.add_parser("serve", help="run the deployments in this process (Prefect serve)",
                           description="Run the deployments of deployments/prefect.yaml in this process (Prefect "
                                       "serve), for a single machine.")
    _config_args(serve)
    _verbose_arg(serve)
    return parser


def _load(args: argparse.Namespace) -> PipelineConfig:
    return load_config(args.config, args.overrides)


def preflight(cfg: PipelineConfig) -> None:
    """Cheap checks of inputs before any stage starts."""
    from tasks.sources import check_files

    labeled = cfg.labeled.source
    if labeled.kind == "files":
        for split in ("train", "validation", "test"):
            value = getattr(labeled, split)
            if value and not Path(value).is_file():
                raise ConfigError(f"labeled.source.{split}: file not found: {value}")
    if labeled.kind == "dataframe":
        raise ConfigError("labeled.source: kind 'dataframe' takes DataFrames passed from Python to ingest_labeled; "
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


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no such method, or a closed stream
        return False


def terminal(stream: Any = None) -> bool:
    """Whether ``stream`` (default stdout) is a terminal that can redraw a live display (not a pipe, a file, or
    TERM=dumb)."""
    return _isatty(stream or sys.stdout) and os.environ.get("TERM", "") not in ("dumb", "unknown")


def cmd_run(cfg: PipelineConfig, flow: str = "pipeline", verbose: bool = False, progress: bool = True,
            args: argparse.Namespace | None = None) -> int:
    """Run ``flow`` (``FLOWS``) in this process and print its summary. On a terminal, unless ``progress`` is off,
    a live display shows the stages as they run."""
    from flows import runtime

    runtime.mark("cli")  # the interpreter, the CLI's imports, the config
    preflight(cfg)  # before anything is written
    exit_on_sigterm()
    on_terminal = terminal()
    show = progress and on_terminal
    # Prefect's console lines go above the display at WARNING and up; log lines sent to a file (2>run.log) stay whole.
    quiet_console = show and _isatty(sys.stderr)
    env = runtime.configure(cfg.workspace, verbose=verbose, live=quiet_console, terminal=on_terminal)
    from tasks.tracking import check_tracking_server

    check_tracking_server()  # an MLflow server that does not answer: a clear error now, before anything starts
    # Prefect's API comes up while the imports below run. start_backends imports prefect first, which sets up
    # Prefect's log handlers: before the display takes the terminal.
    backends_ready = runtime.start_backends(cfg.workspace)
    runtime.mark("configure, import prefect")
    from flows import progress

    name = {"pipeline": "llm_pipeline"}.get(flow, flow)
    with progress.live(name) if show else contextlib.nullcontext():
        with progress.stage("start up"):  # imports, and Prefect's temporary API: seconds on a small machine
            run_flow = _flow(flow)
            runtime.mark("import flows and stages")
            backends_ready()
        started = time.time()
        result = run_flow(cfg)
        runtime.mark("flow")
    print_summary(name, time.time() - started, cfg, env, result, args)
    runtime.mark("summary")
    runtime.write_marks()
    return 0


def _flow(flow: str) -> Any:
    """The flow function ``llmpipe run --flow`` names."""
    if flow == "pretrain":
        from flows.pretrain import pretrain

        return pretrain
    if flow == "finetune":
        from flows.finetune import finetune

        return finetune
    from flows.pipeline import llm_pipeline

    return llm_pipeline


def _rerun_args(args: argparse.Namespace | None) -> str:
    """The --config and --set options of this run, to repeat in a suggested command."""
    if args is None:
        return ""
    parts = ([f"--config {shlex.quote(args.config)}"] if args.config else []) + \
        [f"--set {shlex.quote(o)}" for o in args.overrides]
    return "".join(f" {p}" for p in parts)


def print_summary(name: str, seconds: float, cfg: PipelineConfig, env: dict[str, str], result: Any,
                  args: argparse.Namespace | None = None) -> None:
    """What a run produced and where to see it: the LM (pipeline, pretrain), the classifier and its model version
    (pipeline, finetune), then what to do next."""
    pre = result if hasattr(result, "lm_report") else getattr(result, "pretrain", None)
    fin = result if hasattr(result, "model_version") else getattr(result, "finetune", None)
    refs = ([pre.corpus, pre.tokenizer, pre.tokens, pre.lm, pre.lm_report] if pre else []) + \
        ([fin.classifier, fin.report] if fin else [])
    reused = all(r.reused for r in refs)
    print()
    print(f"{name} finished in {seconds:.0f}s" + (" (every artifact reused)" if reused else ""))
    if pre is not None:
        lm = pre.lm_report.load()
        print(f"  language model: validation perplexity {lm['val_ppl']:.2f} (unigram baseline {lm['unigram_ppl']:.2f})")
    mv = None
    if fin is not None:
        from tasks.evaluate import vs_tfidf

        mv = fin.model_version
        report = fin.report.load()
        metric = cfg.registry.metric
        delta = vs_tfidf(report)[metric]  # computed here too: a report reused from before it was recorded
        name_of = {"accuracy": "accuracy", "macro_f1": "macro-F1"}[metric]
        print(f"  classifier:     test accuracy {report['model']['accuracy']:.4f}, "
              f"macro-F1 {report['model']['macro_f1']:.4f} "
              f"(TF-IDF+LR {report['baselines']['tfidf_logreg']['accuracy']:.4f}, macro-F1 "
              f"{report['baselines']['tfidf_logreg']['macro_f1']:.4f}"
              + (f", on {report['tfidf_features']['features']})" if report.get("tfidf_features") else ")")
              + f"; {abs(delta):.1f} points {'above' if delta >= 0 else 'below'} TF-IDF+LR in {name_of}")
        state = "registered" if mv.created else "already registered"
        print(f"  model:          {mv.uri} {state}; {mv.decision}")
        if mv.below_floor:
            print(f"  WARNING:        {mv.uri} does not beat the baselines on the test split (the quality floor); "
                  "it is not champion")
        elif mv.created and cfg.registry.champion_alias in mv.aliases and delta < 0:
            print(f"  WARNING:        the new champion {mv.uri} trails TF-IDF+LR by {-delta:.1f} points of {name_of} "
                  "on the test split; registry.baseline_floor=tfidf_logreg keeps such a model from the alias")
    print()
    if mv is not None:
        alias_uri = mv.uri if mv.below_floor else f"models:/{mv.name}@{cfg.registry.champion_alias}"
        print(f"Predict:    llmpipe predict --model {alias_uri} \"a wonderful, moving film\"")
    else:
        print(f"Fine-tune:  llmpipe run --flow finetune{_rerun_args(args)}   (reuses this language model)")
    print(f"MLflow UI:  mlflow ui --backend-store-uri {env['MLFLOW_TRACKING_URI']}")
    if not os.environ.get("PREFECT_API_URL"):
        print(f"Prefect UI: PREFECT_HOME={env['PREFECT_HOME']} prefect server start")


def use_registry(args: argparse.Namespace) -> PipelineConfig:
    """For the commands that read or change the registry: the store ``llmpipe run`` writes in this folder (or
    MLFLOW_TRACKING_URI's), or ``NoRegistry`` (exit 1) before anything is created. Returns the config."""
    from flows import runtime

    cfg = _load(args)
    uri = runtime.find_registry()  # raises NoRegistry, saying where it looked
    os.environ["MLFLOW_TRACKING_URI"] = uri  # absolute: the store found, whatever the working folder
    runtime.library_output(verbose=args.verbose, terminal=terminal())
    return cfg


def cmd_predict(args: argparse.Namespace) -> int:
    if bool(args.texts) == (args.input is not None):
        raise ConfigError("predict: give texts as arguments or one --input file, not both (nor neither)")
    from tasks import predict

    uri = args.model  # a models:/ URI (checked by the parser)
    total = predict.count_rows(args.input, args.text_column) if args.input else 0  # every row, before any model
    use_registry(args)
    mv = predict.resolve_version(uri)
    version_uri = f"models:/{mv.name}/{mv.version}"
    if args.input is None:
        for row in predict.predict(version_uri, args.texts):
            print(f"{row['label']}\t{row['score']:.4f}\t{row['text']}")
        return 0
    with contextlib.ExitStack() as stack:
        on_progress = None
        if terminal(sys.stderr):
            from flows.progress import rows_bar

            on_progress = stack.enter_context(rows_bar(total, f"predict {args.input.name}"))
        out, counts = predict.predict_file(version_uri, args.input, args.text_column, total, on_progress=on_progress)
    print(f"{total} predictions from {uri} (version {mv.version}) written to {out}")
    print("  " + ", ".join(f"{label}: {n}" for label, n in sorted(counts.items())))
    return 0


def cmd_alias(args: argparse.Namespace) -> int:
    cfg = use_registry(args)
    from tasks import registry

    alias = args.alias or cfg.registry.champion_alias
    challenger = args.challenger_alias or cfg.registry.challenger_alias
    if args.command == "promote":
        print(registry.promote(args.name, args.version, alias, challenger))
    else:
        print(registry.rollback(args.name, alias, challenger))
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
        from flows import runtime

        try:
            uri = runtime.find_registry()
        except runtime.NoRegistry as exc:
            raise ConfigError(f"gc: no MLflow store found ({exc.where}), so it cannot tell which artifacts are still "
                              "referenced; run it where the store is, set MLFLOW_TRACKING_URI, or pass --no-registry "
                              "to treat only leftovers") from None
        registry_uri = os.environ.get("MLFLOW_REGISTRY_URI") or uri
        runtime.library_output(verbose=args.verbose, terminal=terminal())
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
    print("automations: " + "; ".join(done.automations))
    print()
    print("Start workers:  prefect worker start --pool cpu")
    print(f"                {deploy.GPU_SLOT_ENV}=gpu-$(hostname)-0 CUDA_VISIBLE_DEVICES=0 prefect worker start --pool gpu")
    print("                (on a server over PostgreSQL, also PREFECT_CLIENT_RETRY_EXTRA_CODES=500: see docs/deployment.md)")
    example = "llm_pipeline/cpu" if "llm_pipeline/cpu" in done.deployments else done.deployments[0]
    print(f"Run one:        prefect deployment run '{example}'   (or in the UI: Deployments > {example} > Run)")
    return 0


def cmd_serve(cfg: PipelineConfig | None) -> int:
    from flows import deploy

    deploy.serve(cfg)
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "config":
        sys.stdout.write(to_yaml(_load(args)))
        return 0
    if args.command == "run":
        return cmd_run(_load(args), args.flow, args.verbose, not args.no_progress, args)
    if args.command in ("deploy", "serve"):
        from flows import runtime

        cfg = _deploy_config(args)
        runtime.library_output(verbose=args.verbose, terminal=terminal())
        return cmd_deploy(cfg, args.update_pools) if args.command == "deploy" else cmd_serve(cfg)
    if args.command == "predict":
        return cmd_predict(args)
    if args.command in ("promote", "rollback"):
        return cmd_alias(args)
    if args.command == "gc":
        return cmd_gc(args)
    raise AssertionError(f"unknown command {args.command!r}")


def write_traceback(args: argparse.Namespace | None, argv: list[str]) -> Path:
    """The current exception's full traceback, with secrets masked, in ``<workspace>/logs/`` when the workspace
    exists (never creating one), else in the temporary folder."""
    from tasks.redact import redact

    folder = Path(tempfile.gettempdir())
    try:
        workspace = Path(_load(args).workspace) if args is not None and hasattr(args, "overrides") else None
        if workspace is not None and workspace.is_dir():
            folder = workspace / "logs"
    except Exception:  # noqa: BLE001 - the config may be what failed; the temporary folder then
        pass
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = redact(f"llmpipe {version()}: llmpipe {shlex.join(argv)}\n\n{traceback.format_exc()}")
    for where in dict.fromkeys((folder, Path(tempfile.gettempdir()))):
        try:
            where.mkdir(parents=True, exist_ok=True)
            path = where / f"llmpipe-error-{stamp}-{os.getpid()}.log"
            path.write_text(text, encoding="utf-8")
            return path.resolve()
        except OSError:
            continue
    raise OSError("cannot write the traceback anywhere")


def main(argv: list[str] | None = None) -> int:
    """The ``llmpipe`` command; returns the exit status. Called with ``argv`` (from Python, as the tests do), it
    puts back the environment variables it set; as the command itself (``argv`` None) they last until the process
    exits, when Prefect's and MLflow's exit handlers still read them."""
    from tasks.redact import redact

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help and --version (0), usage errors (2): argparse has said why
        return exc.code if isinstance(exc.code, int) else EXIT_CONFIG if exc.code else 0
    saved = dict(os.environ) if argv is not None else None
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"llmpipe: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except LlmpipeError as exc:
        print(f"llmpipe: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("llmpipe: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        try:
            where = f"traceback in {write_traceback(args, sys.argv[1:] if argv is None else argv)}"
        except Exception:  # noqa: BLE001 - nowhere to write it: show it here after all
            traceback.print_exc()
            where = "traceback above"
        message = " ".join(redact(str(exc)).split())
        message = message if len(message) <= 300 else message[:297] + "..."
        print(f"llmpipe: unexpected error: {type(exc).__name__}: {message} ({where})", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if saved is not None and os.environ != saved:
            os.environ.clear()
            os.environ.update(saved)


if __name__ == "__main__":
    sys.exit(main())
