"""What a run shows in the Prefect UI besides its logs: every markdown report, rendered here, and the artifacts that
carry them (data reports, training curves, the LM report, the classifier beside its baselines, the registered
version with the gate's numbers, links to MLflow).

The ``*_markdown`` functions turn what a stage wrote (its report or manifest numbers) into Markdown; the other
functions publish a stage's artifacts from inside its Prefect task.
"""

from __future__ import annotations

import base64
from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from tasks import evaluate, finetune, ingest, tracking
from tasks.artifacts import CheckpointRef, CorpusRef, LabeledRef, ReportRef
from tasks.config import RegistryConfig
from tasks.registry import ModelVersionRef

# ---------------------------------------------------------------------------------------------- markdown


def data_report_markdown(report: dict[str, Any]) -> str:
    """The data report as Markdown: counts per step and per source, splits, and the length histogram."""
    if "class_balance" in report:
        return labeled_markdown(report)
    lines = ["## Corpus", "", "| step | documents |", "|---|---|"]
    lines += [f"| {s['step']} | {s['documents']:,} |" for s in report["steps"]]
    lines += ["", "### Sources", "", "| source | weight | read | empty | short/long | duplicates | train | validation"
              " | invalid UTF-8 |", "|---|---|---|---|---|---|---|---|---|"]
    for s in report["sources"]:
        lines.append(f"| {s['source']} | {s['weight']:g} | {s['read']:,} | {s['empty_dropped']:,} | "
                     f"{s['short_dropped']:,}/{s['long_dropped']:,} | {s['duplicates_dropped']:,} | "
                     f"{s['train']:,} | {s['validation']:,} | {s['invalid_utf8_replaced']:,} |")
    lines += ["", "### Splits", "", "| split | documents | characters |", "|---|---|---|"]
    lines += [f"| {name} | {s['documents']:,} | {s['chars']:,} |" for name, s in report["splits"].items()]
    hist = report["length_histogram"]
    if hist:
        peak = max(b["documents"] for b in hist) or 1
        lines += ["", "### Document length (characters)", "", "| length | documents | |", "|---|---|---|"]
        lines += [f"| {b['min_chars']:,}-{b['max_chars']:,} | {b['documents']:,} | "
                  f"{'█' * max(1 if b['documents'] else 0, round(20 * b['documents'] / peak))} |" for b in hist]
    return "\n".join(lines) + "\n"


def labeled_markdown(report: dict[str, Any]) -> str:
    """The labeled data report as Markdown: rows and class balance per split, held-out texts seen in training."""
    labels = report["labels"]
    lines = ["## Labeled data", "", "| split | origin | rows | empty text dropped | " + " | ".join(labels) + " |",
             "|---|---|---|---|" + "---|" * len(labels)]
    for split, balance in report["class_balance"].items():
        lines.append(f"| {split} | {report['origin'][split]} | {report['rows'][split]:,} | "
                     f"{report['empty_text_dropped'].get(split, 0):,} | "
                     + " | ".join(f"{balance[lab]:,}" for lab in labels) + " |")
    if report.get("held_out_group_rows_left_out"):
        lines += ["", f"{report['held_out_group_rows_left_out']:,} rows grouped with held-out texts (duplicates or "
                  "contained phrases) were left out of training (labeled.split_groups)."]
    seen = {k: n for k, n in report.get("held_out_texts_in_train", {}).items() if n}
    if seen:
        lines += ["", "Held-out rows whose text is also a training text (scored on answers seen in training; "
                  "`labeled.split_groups` prevents this in splits taken off train): "
                  + ", ".join(f"{k} {n:,}" for k, n in seen.items()) + "."]
    return "\n".join(lines) + "\n"


def lm_markdown(r: dict[str, Any]) -> str:
    """The language-model report: validation loss and perplexity beside the unigram baseline, and samples."""
    return (f"## Language model\n\n| metric | value |\n|---|---|\n| validation loss | {r['val_loss']:.4f} |\n"
            f"| perplexity | {r['val_ppl']:.2f} |\n| unigram baseline perplexity | {r['unigram_ppl']:.2f} |\n"
            f"| bits per byte | {r['val_bits_per_byte']:.4f} |\n\n### Samples\n\n"
            + "\n".join(f"- {s!r}" for s in r["samples"]))


def classifier_markdown(report: dict[str, Any]) -> str:
    """The classifier report for people: model beside baselines, per-class scores, confusion matrix, mistakes."""
    labels = report["labels"]
    rows = report.get("comparison") or evaluate.comparison_rows(report)
    lines = [f"## Classifier on the {report.get('split', 'test')} split ({report['test_rows']} rows)", "",
             "| model | accuracy | macro-F1 | ECE |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {r['ece']:.4f} |" for r in rows]
    if features := report.get("tfidf_features"):
        lines += ["", tfidf_features_line(features)]
    lines += ["", "### Per class (model)", "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |"
              for name, c in report[evaluate.MODEL]["per_class"].items()]
    lines += ["", "### Confusion matrix (rows: true, columns: predicted)", "",
              "| | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    lines += [f"| **{labels[i]}** | " + " | ".join(str(v) for v in row) + " |"
              for i, row in enumerate(report[evaluate.MODEL]["confusion_matrix"])]
    mistakes = report.get("confident_mistakes") or []
    if mistakes:
        lines += ["", "### Most confident mistakes", "", "| confidence | true | predicted | text |", "|---|---|---|---|"]
        lines += [f"| {m['confidence']:.3f} | {m['label']} | {m['predicted']} | "
                  f"{m['text'][:160].replace('|', '/').replace(chr(10), ' ')} |" for m in mistakes]
    return "\n".join(lines) + "\n"


def tfidf_features_line(f: dict[str, Any]) -> str:
    """Which features the TF-IDF + LR baseline used, and the validation scores it chose them by."""
    got = f.get("validation_macro_f1") or {}
    order = [n for n in evaluate.TFIDF_FEATURES if n in got] + sorted(set(got) - set(evaluate.TFIDF_FEATURES))
    scores = ", ".join(f"{name} {got[name]:.4f}" for name in order)  # in the order that breaks ties
    why = (f"chosen by macro-F1 on the {f['validation_rows']:,} validation rows: {scores}" if scores
           else "no validation rows to choose on")
    return f"TF-IDF + LR used **{f['features']}** ({why})."


def finetune_markdown(meta: dict[str, Any]) -> str:
    """What a fine-tuning run did, for people: the starting point, what was trained, and which weights were kept."""
    rows = [("base", meta.get("base")), ("model type", meta.get("model_type")), ("method", meta.get("method")),
            ("parameters trained", f"{meta.get('trainable_parameters', 0):,} of {meta.get('parameters', 0):,}"),
            ("class weights", meta.get("class_weights") or "none"),
            ("steps", f"{meta.get('steps')} ({meta.get('stop_reason')})"),
            ("weights kept from step", meta.get("kept_step")),
            ("validation accuracy", meta.get("val_accuracy")), ("validation macro-F1", meta.get("val_macro_f1"))]
    lines = ["## Fine-tuning", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def _comparison_table(title: str, g: dict[str, Any], other: str) -> list[str]:
    lines = ["", f"### {title}", "", "| | value |", "|---|---|"]
    for key in ("metric", "candidate_score", "champion_score", "champion_version", "delta", "margin", "test",
                "p_value", "alpha", "rows"):
        if g.get(key) is not None:
            value, name = g[key], key.replace("_", " ").replace("champion", other)
            lines.append(f"| {name} | {value:.4g} |" if isinstance(value, float) else f"| {name} | {value} |")
    return lines


def gate_markdown(ref: ModelVersionRef) -> str:
    g = ref.gate or {}
    head = "## Registered model"
    if ref.below_floor:
        head += "\n\n**Not champion: this version does not beat the baselines (the quality floor).** It is registered " \
                "for inspection, without an alias."
    lines = [f"{head}\n\n- model: `{ref.uri}`" + (f" (`{ref.alias_uri}`)" if ref.alias_uri else ""),
             f"- decision: {ref.decision}", f"- source language model: `{ref.lm_uri}`",
             f"- MLflow run: `{ref.run_id}`", f"- tracking URI: `{tracking.tracking_uri()}`"]
    if ref.floor:
        lines += _comparison_table("Quality floor (against the baselines)", ref.floor, "baseline")
    if g.get("candidate_score") not in (None, "None") and not ref.below_floor:
        lines += _comparison_table("Gate (against the champion)", g, "champion")
    return "\n".join(lines) + "\n"


def curve_markdown(heading: str, description: str, png: bytes) -> str:
    """A heading and a PNG image inlined (Prefect artifacts hold text, not files)."""
    return f"{heading}\n\n![{description}](data:image/png;base64,{base64.b64encode(png).decode()})"


# ---------------------------------------------------------------------------------------------- Prefect artifacts


def data_report(ref: CorpusRef | LabeledRef, key: str, description: str) -> None:
    """The data report in the artifact (counts per step, class balance, lengths)."""
    if (ref.dir / ingest.DATA_REPORT).is_file():
        create_markdown_artifact(key=key, markdown=data_report_markdown(ingest.load_data_report(ref)),
                                 description=description)


def training_curve(ref: CheckpointRef, image: str, key: str, description: str, heading: str) -> None:
    """A training curve of the artifact; none for an artifact built before the stage drew one."""
    curve = ref.dir / image
    if curve.is_file():
        create_markdown_artifact(key=key, description=description,
                                 markdown=curve_markdown(heading, description, curve.read_bytes()))


def pretrain_report(ref: CheckpointRef) -> None:
    m = ref.meta
    training_curve(ref, "loss_curve.png", "pretrain-loss-curve", "Pretraining loss curve",
                   f"## Pretraining\n\n{m['parameters'] / 1e6:.2f}M parameters, {m['steps']} steps, "
                   f"{m['tokens_seen']:,} tokens, stopped by {m.get('stop_reason', 'max_steps')}")


def lm_report(ref: ReportRef) -> None:
    create_markdown_artifact(key="lm-report", markdown=lm_markdown(ref.load()), description="Language-model evaluation")


def finetune_report(ref: CheckpointRef) -> None:
    m = ref.meta
    create_markdown_artifact(key="finetune-summary", markdown=finetune_markdown(m),
                             description="Fine-tuning: method, parameters trained, stop and the weights kept")
    training_curve(ref, finetune.CURVE_FILE, "finetune-training-curve",
                   "Fine-tuning curve: training loss and validation scores by step",
                   f"## Fine-tuning\n\n{m.get('steps')} steps, stopped by {m.get('stop_reason', 'max_steps')}; "
                   f"weights kept from step {m.get('kept_step')}")


def classifier_report(ref: ReportRef) -> None:
    r = ref.load()
    create_table_artifact(
        key="classifier-vs-baselines",
        table=[{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()} for row in r["comparison"]],
        description="Classifier beside the majority and TF-IDF + logistic-regression baselines on the test split",
    )
    create_markdown_artifact(key="classifier-report", markdown=classifier_markdown(r),
                             description="Classifier evaluation beside baselines")


def model_version_link(reg: RegistryConfig, ref: ModelVersionRef, key: str) -> None:
    create_link_artifact(key=key, link=tracking.version_url(reg, ref.name, ref.version), link_text=ref.uri,
                         description=f"MLflow model version ({tracking.tracking_uri()})")


def registered_model(ref: ModelVersionRef) -> None:
    create_markdown_artifact(key="registered-model", markdown=gate_markdown(ref),
                             description="MLflow model registry: version, alias and the gate's numbers")


def mlflow_run_link(reg: RegistryConfig, experiment_id: str, run_id: str) -> None:
    create_link_artifact(key="mlflow-run", link=tracking.run_url(reg, experiment_id, run_id),
                         link_text=f"MLflow run {run_id}",
                         description=f"MLflow parent run of this pipeline (tracking URI {tracking.tracking_uri()})")
