"""The ``llmpipe`` command. Heavy imports (prefect, torch, mlflow) happen only once a command needs them."""

from __future__ import annotations

import argparse
import os
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

    config = sub.add_parser("config", help="inspect configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print the effective config as YAML")
    _config_args(show)

    predict = sub.add_parser("predict", help="label texts with a registered classifier")
    predict.add_argument("--model", "-m", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    predict.add_argument("texts", nargs="+", help="texts to classify")
    return parser


def _load(args: argparse.Namespace) -> PipelineConfig:
    return load_config(args.config, args.overrides)


def preflight(cfg: PipelineConfig) -> None:
    """Cheap checks of inputs before any stage starts."""
    labeled = cfg.labeled
    if labeled.source == "files":
        for field in ("train_path", "validation_path", "test_path"):
            value = getattr(labeled, field)
            if value and not Path(value).is_file():
                raise ConfigError(f"labeled.{field}: file not found: {value}")
    if cfg.corpus.source == "files":
        from tasks.ingest import _expand

        _expand(cfg.corpus.paths)


def cmd_run(cfg: PipelineConfig) -> int:
    from flows import runtime

    env = runtime.configure(cfg.workspace)
    preflight(cfg)
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
    alias_uri = f"models:/{mv.name}@{cfg.registry.champion_alias}"
    print()
    print(f"Predict:    llmpipe predict --model {alias_uri} \"a wonderful, moving film\"")
    print(f"MLflow UI:  mlflow ui --backend-store-uri {env['MLFLOW_TRACKING_URI']}")
    if not os.environ.get("PREFECT_API_URL"):
        print(f"Prefect UI: PREFECT_HOME={env['PREFECT_HOME']} prefect server start")
    return 0


def cmd_predict(model: str, texts: list[str]) -> int:
    from flows import runtime

    runtime.configure(".llmpipe")
    from tasks.register import predict

    for row in predict(model, texts):
        print(f"{row['label']}\t{row['score']:.4f}\t{row['text']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "config":
            sys.stdout.write(to_yaml(_load(args)))
            return 0
        if args.command == "run":
            return cmd_run(_load(args))
        if args.command == "predict":
            return cmd_predict(args.model, args.texts)
    except ConfigError as exc:
        print(f"llmpipe: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except LlmpipeError as exc:
        print(f"llmpipe: {exc}", file=sys.stderr)
        return 1
    return 1


if __name__ == "__main__":
    sys.exit(main())
