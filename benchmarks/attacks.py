"""The attacks of the fault matrix (``benchmarks/faults.py``): what one who can only create runs (the Prefect form or
API), or only write files inside a folder the operator listed in LLMPIPE_DATA_DIRS, tries. Each is refused before
any stage (``tasks/policy.py``) or where a stage reads (``tasks/confine.py``), and quotes nothing it read."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from tasks.artifacts import Workspace
from tasks.config import load_config
from tasks.errors import DataError
from tasks.ingest import ingest_corpus, ingest_labeled


def tiny(ws: Path | str, *overrides: str):
    return load_config("tiny", [f"workspace={ws}", *overrides])


def leftovers(ws: Path) -> list[str]:
    return [str(p) for p in ws.rglob("*.tmp-*")] if ws.exists() else []


SECRET = "HF_TOKEN=hf_abcdefghijklmnopqrstuvwxyz012345"


def _attack_place(ws: Path) -> dict[str, Path]:
    """A data folder the operator allows, an outside folder holding a secret, the run's workspace."""
    data, outside = ws / "data", ws / "outside"
    for d in (data, outside):
        d.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"review number {i} {'good' if i % 2 else 'bad'},{'pos' if i % 2 else 'neg'}\n" for i in range(60))
    (data / "train.csv").write_text("text,label\n" + rows)
    (outside / "secret.csv").write_text("text,label\n" + "".join(f"{SECRET} {i},pos\n" for i in range(60)))
    return {"data": data, "outside": outside, "ws": ws / "w"}


def _policy(place: dict[str, Path], **env: str):
    from tasks.policy import Policy

    return Policy.from_env({"LLMPIPE_DATA_DIRS": str(place["data"]), "LLMPIPE_WORKSPACE_DIRS": str(place["ws"]), **env})


def refused_at_admission(field: str, setting: str, overrides: Callable[[dict[str, Path]], list[str]],
                         refs: Callable[[dict[str, Path]], dict] | None = None, **env: str):
    """A run whose parameters ask for ``field``: refused before any stage, naming it and the operator's setting."""
    from tasks.policy import PolicyError, check_config

    def run(ws: Path):
        place = _attack_place(ws)
        started = time.time()
        try:
            cfg = tiny(place["ws"], *overrides(place))
            check_config(cfg, _policy(place, **env), refs(place) if refs else None)
        except PolicyError as exc:
            line = next((x.strip() for x in str(exc).splitlines() if x.strip().startswith(field)), "")
            ok = bool(line) and setting in line and SECRET not in str(exc) and not (place["ws"] / "corpora").exists()
            return ok, f"PolicyError in {time.time() - started:.1f}s: {line[:100]}", "0 bytes (no stage ran)"
        return False, "admitted", "-"
    return run


def confined_read(read: Callable[[dict[str, Path]], object], must_name: str):
    """A stage of an untrusted run reads what files inside the data folder point at: refused (PolicyError naming
    ``must_name``), or read without the outside file; the secret appears in no error and no artifact."""
    from tasks import confine
    from tasks.errors import PolicyError

    def run(ws: Path):
        place = _attack_place(ws)
        rules = _policy(place)
        try:
            with confine.confined(rules.confinement(place["ws"])):
                read(place)
        except (PolicyError, DataError) as exc:
            text = str(exc)
            written = "".join(p.read_text(errors="replace") for p in place["ws"].rglob("*") if p.is_file()) \
                if place["ws"].exists() else ""
            ok = must_name in text and SECRET not in text and SECRET not in written and not leftovers(place["ws"])
            return ok, f"{type(exc).__name__}: {text.splitlines()[0][:100]}", "0 bytes (nothing read outside)"
        written = "".join(p.read_text(errors="replace") for p in place["ws"].rglob("*.jsonl"))
        return SECRET not in written and bool(written), "read the folder's own files only; outside file unread", "-"
    return run


def attack_cases(case: Callable) -> None:
    from tasks import confine
    from tasks.artifacts import CheckpointRef

    # 1. code execution through the registry: a run names the model the gate loads
    case("attack: a run names another registered model", "refused: registry names are the operator's",
         refused_at_admission("registry.model_name", "LLMPIPE_REGISTRY", lambda p: ["registry.model_name=pyfunc-evil"]))
    case("attack: champion alias moved to a pyfunc model", "the gate never loads it; candidate is challenger",
         pyfunc_champion)
    # 2. champion by parameter
    case("attack: challenger alias set to 'champion'", "refused: aliases are the operator's",
         refused_at_admission("registry.challenger_alias", "LLMPIPE_REGISTRY",
                              lambda p: ["registry.champion_alias=x", "registry.challenger_alias=champion"]))
    case("attack: alpha 0.99 to crown a coin flip", "refused: alpha is the operator's",
         refused_at_admission("registry.alpha", "LLMPIPE_REGISTRY", lambda p: ["registry.alpha=0.99"]))
    case("attack: the floor turned off (margin, floor)", "refused: the floor is the operator's",
         refused_at_admission("registry.baseline_floor", "LLMPIPE_REGISTRY",
                              lambda p: ["registry.baseline_floor=majority"], LLMPIPE_REGISTRY="baseline_floor=tfidf_logreg"))
    # 3. reads outside the data folders through files inside them
    def readme(pattern: Callable[[dict[str, Path]], str]):
        def read(place: dict[str, Path]):
            folder = place["data"] / "set"
            folder.mkdir()
            (folder / "train.csv").write_text((place["data"] / "train.csv").read_text())
            (folder / "README.md").write_text(f"---\nconfigs:\n- config_name: default\n  data_files:\n"
                                              f"  - split: train\n    path: {json.dumps(pattern(place))}\n---\n")
            cfg = tiny(place["ws"], f"labeled.source={{kind: hub, name: '{folder}', validation_split: null, "
                       "test_split: null}")
            return ingest_labeled(cfg.labeled, Workspace(place["ws"]), cfg.seed)
        return read

    case("attack: README data_files with an absolute path", "ignored: only the folder's own files are read",
         confined_read(readme(lambda p: str(p["outside"] / "secret.csv")), "set"))
    case("attack: README data_files with '..'", "ignored: only the folder's own files are read",
         confined_read(readme(lambda p: "../../outside/*.csv"), "set"))
    case("attack: README data_files with an http URL", "ignored: no network without LLMPIPE_ALLOW=urls",
         readme_url(readme))

    def linked_data(place: dict[str, Path]):
        (place["data"] / "more.csv").symlink_to(place["outside"] / "secret.csv")
        cfg = tiny(place["ws"], f"corpus.sources=[{{kind: files, paths: ['{place['data']}/*.csv'], "
                   "text_columns: [text]}]")
        return ingest_corpus(cfg.corpus, Workspace(place["ws"]), cfg.seed)

    case("attack: a symlink to an outside file in the data folder", "refused at the read, link not followed",
         confined_read(linked_data, "symbolic link"))

    def linked_tokenizer(place: dict[str, Path]):
        folder = place["data"] / "tokenizer"
        folder.mkdir()
        (folder / "tokenizer_config.json").write_text("{}")
        (folder / "vocab.json").symlink_to(place["outside"] / "secret.csv")
        cfg = tiny(place["ws"], f"tokenizer.pretrained={folder}")
        return confine.staged(cfg.tokenizer.pretrained, "tokenizer.pretrained")

    case("attack: a tokenizer folder with a symlinked vocabulary", "refused: no outside file becomes vocabulary",
         confined_read(linked_tokenizer, "symbolic link"))

    def saved_dataset(place: dict[str, Path]):
        import datasets

        real = place["outside"] / "saved"
        datasets.Dataset.from_dict({"text": [SECRET] * 4, "label": [0, 1] * 2}).save_to_disk(str(real))
        folder = place["data"] / "saved"
        folder.mkdir()
        for name in ("dataset_info.json", "state.json"):
            (folder / name).write_text((real / name).read_text())
        state = json.loads((folder / "state.json").read_text())
        for entry in state["_data_files"]:
            entry["filename"] = f"../../outside/saved/{entry['filename']}"
        (folder / "state.json").write_text(json.dumps(state))
        cfg = tiny(place["ws"], f"labeled.source={{kind: hub, name: '{folder}'}}")
        return ingest_labeled(cfg.labeled, Workspace(place["ws"]), cfg.seed)

    case("attack: save_to_disk state.json naming outside arrow files", "refused: file names stay in the folder",
         confined_read(saved_dataset, "state.json"))

    def swapped(place: dict[str, Path]):
        target = place["data"] / "train.csv"
        listed = confine.glob_files(str(target), "labeled.source.train")  # the admission's look
        target.unlink()
        target.symlink_to(place["outside"] / "secret.csv")  # swapped after the check
        with confine.open_file(listed[0], "labeled.source.train") as f:
            return f.read()

    case("attack: a file swapped for a symlink after the check", "refused when opened (no link followed)",
         confined_read(swapped, "labeled.source.train"))
    case("attack: hub README resolving to local files", "refused: a Hub data set's files stay hf://",
         hub_local_files)

    def quoted_label(place: dict[str, Path]):
        (place["data"] / "labels.csv").write_text("text,label\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(40))
                                                   + f"x,{SECRET}\n")
        cfg = tiny(place["ws"], f"labeled.source={{kind: files, train: '{place['data'] / 'labels.csv'}'}}",
                   "labeled.labels=[a, b]")
        return ingest_labeled(cfg.labeled, Workspace(place["ws"]), cfg.seed)

    case("attack: a label error quoting what it read", "names file and row, quotes nothing",
         confined_read(quoted_label, "labels.csv"))
    # 4. paths interpreted two ways
    case("attack: an lm ref with an absolute kind", "refused: refs are rebuilt from the run's workspace",
         refused_at_admission("lm", "by fingerprint", lambda p: [], refs=lambda p: {"lm": CheckpointRef(
             kind=str(p["outside"]), fingerprint="0123456789abcdef0123", path=str(p["outside"]))}))
    case("attack: workspace '~/x'", "checked and written as the same folder", home_workspace)
    case("attack: a glob with '..' after a wildcard", "refused without naming what it matches",
         refused_at_admission("corpus.sources[0].paths", "'..'",
                              lambda p: [f"corpus.sources=[{{kind: files, paths: ['{p['data']}/*/../../outside/*']}}]"]))
    case("attack: '**' repeated to make admission slow", "refused at once",
         refused_at_admission("corpus.sources[0].paths", "'**'",
                              lambda p: [f"corpus.sources=[{{kind: files, paths: ['{p['data']}/**/**/**/**/*.txt']}}]"]))
    # 5. no limits
    for name, field, setting, override in [
        ("4,096 processes per node", "pretrain.devices", "devices=", "pretrain.devices=4096"),
        ("a billion steps", "pretrain.max_steps", "steps=", "pretrain.max_steps=1000000000"),
        ("a 100-billion-parameter model", "model", "params=", "model.n_layer=96"),
        ("a context of a million tokens", "model.n_positions", "seq_len=", "model.n_positions=1000000"),
        ("a billion generated documents", "corpus.sources[0].documents", "documents=",
         "corpus.sources=[{kind: sample, documents: 1000000000}]"),
        ("100,000 threads", "runtime.threads", "threads=", "runtime.threads=100000"),
        ("a time limit of years", "runtime.stage_timeout_s", "stage_timeout_s=", "runtime.stage_timeout_s=1e9"),
        ("10,000 quoted examples", "evaluate.confident_mistakes", "examples=", "evaluate.confident_mistakes=10000"),
    ]:
        extra = ["model.n_embd=12288", "model.n_head=96"] if field == "model" else []
        case(f"attack: {name}", "refused: over the operator's limit",
             refused_at_admission(field, f"over the operator's limit {setting}", lambda p, o=override, e=extra: [o, *e]))


def readme_url(readme: Callable) -> Callable:
    """A README whose data_files is an http URL on a local server: no request reaches it."""
    import http.server
    import threading

    def run(ws: Path):
        hits: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the stdlib's name
                hits.append(self.path)
                self.send_response(404)
                self.end_headers()

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}/secret.csv"
            ok, observed, lost = confined_read(readme(lambda p: url), "set")(ws)
        finally:
            server.shutdown()
        return ok and not hits, f"{observed}; requests to the URL: {len(hits)}", lost
    return run


def pyfunc_champion(ws: Path):
    """Someone moved the champion alias to a pyfunc model that runs code when loaded: the gate refuses to load it
    (no llmpipe lineage, not the transformers flavor), so the new version becomes challenger, and nothing ran."""
    import mlflow
    from mlflow import MlflowClient

    from tasks import gate
    from tasks.config import RegistryConfig

    marker = ws / "pwned"
    uri = f"sqlite:///{ws / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        cfg = tiny(ws / "w")
        labeled = ingest_labeled(cfg.labeled, Workspace(ws / "w"), cfg.seed)

        class Evil(mlflow.pyfunc.PythonModel):
            def load_context(self, context):
                Path(context.model_config["marker"]).write_text("ran")

            def predict(self, context, model_input):
                return ["pos"] * len(model_input)

        client = MlflowClient(uri)
        mlflow.set_tracking_uri(uri)
        with mlflow.start_run():
            info = mlflow.pyfunc.log_model(name="evil", python_model=Evil(), model_config={"marker": str(marker)},
                                           registered_model_name=cfg.registry.model_name)
        logged_ran = marker.exists()  # MLflow loads a pyfunc model once while logging it
        marker.unlink(missing_ok=True)
        client.set_registered_model_alias(cfg.registry.model_name, "champion", str(info.registered_model_version))
        champion = client.get_model_version_by_alias(cfg.registry.model_name, "champion")
        texts, y, _ = gate.held_out_split(labeled)
        result = gate.against_champion(RegistryConfig(), cfg.registry.model_name, 99, champion, labeled,
                                       gate_candidate(y), cfg.seed)
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
        mlflow.set_tracking_uri(None)
    ok = logged_ran and not result.promote and "not comparable" in result.reason and not marker.exists()
    return ok, f"promote={result.promote}: {result.reason[:80]}; its code ran in the gate: {marker.exists()}", "-"


def gate_candidate(y):
    import numpy as np

    return np.asarray(y, dtype=np.int64)  # a perfect candidate: only the champion's loading can stop it


def hub_local_files(ws: Path):
    """With 'hub' allowed, a Hub data set whose README resolves to files on local disk is refused: the builder here
    resolved its data files as such a README makes it (an absolute path on the worker)."""
    import datasets

    from tasks import sources
    from tasks.errors import PolicyError

    place = _attack_place(ws)
    builder = datasets.load_dataset_builder("csv", data_files={"train": [str(place["outside"] / "secret.csv")]},
                                            cache_dir=str(ws / "cache"))
    try:
        sources.require_hub_files(builder, "corpus.sources[0].name", "dataset 'someone/data'")
    except PolicyError as exc:
        ok = "hf://" in str(exc) and SECRET not in str(exc) and not list((ws / "cache").rglob("*.arrow"))
        return ok, f"PolicyError: {str(exc)[:100]}", "0 bytes (nothing read)"
    return False, "accepted local files for a Hub data set", "-"


def home_workspace(ws: Path):
    """``workspace: ~/x``: the policy checks, and the stages write, the same expanded folder."""
    from tasks.policy import check_config

    place = _attack_place(ws)
    old = os.environ.get("HOME")
    os.environ["HOME"] = str(ws)
    try:
        cfg = tiny("~/w")
        check_config(cfg, _policy(place))  # admitted: ~/w is the allowed workspace ws/w
        ingest_corpus(cfg.corpus, Workspace(cfg.workspace), cfg.seed)
    finally:
        if old is None:
            os.environ.pop("HOME")
        else:
            os.environ["HOME"] = old
    ok = cfg.workspace == str(place["ws"].resolve()) and (place["ws"] / "corpora").is_dir() \
        and not (Path.cwd() / "~").exists()
    return ok, f"workspace {cfg.workspace}; written there={ok}", "-"
