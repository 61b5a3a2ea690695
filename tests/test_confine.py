"""Reads of runs created through the API stay inside the operator's data folders (``tasks.confine``): a dataset
folder's README, links, a saved dataset's state.json, a file swapped after the check and wild globs reach nothing
outside, and nothing read is quoted back; the operator's own reads follow links as before. Real files, no mocks."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tasks import confine, ingest, sources, tokenize
from tasks.artifacts import Workspace
from tasks.config import LabeledConfig, LabeledFiles, TokenizerConfig
from tasks.confine import Confinement, confined
from tasks.errors import ConfigError, DataError, PolicyError
from tasks.redact import NOT_SHOWN, excerpt
from tests.support import files_corpus, paragraphs

SECRET = "outside-secret-line"


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """An admitted data folder and, beside it, a folder outside it holding a secret in several formats."""
    root, outside = tmp_path.resolve() / "data", tmp_path.resolve() / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text(f"{SECRET}\n", encoding="utf-8")
    (outside / "secret.csv").write_text(f"text,label\n{SECRET},pos\n{SECRET},neg\n", encoding="utf-8")
    return root, outside


def _jail(root: Path, quote_data: bool = False) -> Confinement:
    return Confinement(roots=(root,), quote_data=quote_data)


def _csv(path: Path, n: int = 12) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("text,label\n" + "".join(f"review number {i},{'pos' if i % 2 else 'neg'}\n" for i in range(n)),
                    encoding="utf-8")
    return path


def _texts(splits: dict) -> list[str]:
    return [t for ds in splits.values() for t in ds["text"]]


# ---------------------------------------------------------------------------------------------- dataset folders


def test_a_dataset_folders_readme_data_files_are_ignored(tree) -> None:
    root, outside = tree
    folder = root / "reviews"
    _csv(folder / "train.csv")
    _csv(folder / "test.csv", 4)
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n"
        f"  - split: train\n    path: {outside / 'secret.csv'}\n"
        "  - split: validation\n    path: ../../outside/secret.csv\n"
        "  - split: test\n    path: http://example.invalid/secret.csv\n---\n", encoding="utf-8")
    for jail in (None, _jail(root)):
        with confined(jail):
            splits = sources.hub_dataset_splits(str(folder), field="labeled.source")
        assert sorted(splits) == ["test", "train"]
        assert len(splits["train"]) == 12 and len(splits["test"]) == 4
        assert not any(SECRET in t for t in _texts(splits))


def test_a_folder_of_data_files_is_split_by_datasets_default_patterns(tmp_path: Path) -> None:
    folder = tmp_path.resolve() / "ds"
    _csv(folder / "train-0.csv")
    _csv(folder / "dev.csv")
    (folder / "data_test.jsonl").write_text('{"text": "a", "label": "pos"}\n', encoding="utf-8")
    (folder / "dataset_info.json").write_text("{}", encoding="utf-8")  # datasets' metadata, not data
    (folder / "notes.md").write_text("not data", encoding="utf-8")
    (folder / ".hidden.csv").write_text("x\n1\n", encoding="utf-8")

    def names(folder: Path) -> dict[str, list[str]]:
        return {k: [p.relative_to(folder).as_posix() for p in v]
                for k, v in confine.data_folder_files(folder, "f").items()}

    assert names(folder) == {"train": ["train-0.csv"], "validation": ["dev.csv"], "test": ["data_test.jsonl"]}
    _csv(tmp_path / "by-folder" / "train" / "a.csv")
    _csv(tmp_path / "by-folder" / "test" / "b.csv")
    assert names(tmp_path / "by-folder") == {"train": ["train/a.csv"], "test": ["test/b.csv"]}
    _csv(tmp_path / "plain" / "reviews.csv")
    assert names(tmp_path / "plain") == {"train": ["reviews.csv"]}  # no split in a name: all train


def test_a_link_in_a_dataset_folder_is_refused_confined_and_followed_for_the_operator(tree) -> None:
    root, outside = tree
    folder = root / "reviews"
    _csv(folder / "train.csv")
    (folder / "test.csv").symlink_to(outside / "secret.csv")
    with confined(_jail(root)), pytest.raises(PolicyError) as info:
        sources.hub_dataset_splits(str(folder), field="labeled.source")
    assert "symbolic link" in str(info.value) and "secret" not in str(info.value)
    assert SECRET in _texts(sources.hub_dataset_splits(str(folder)))  # the operator's run reads through links


def test_state_json_naming_a_file_outside_its_folder_is_refused(tree) -> None:
    import datasets

    root, outside = tree
    saved = root / "saved"
    datasets.Dataset.from_dict({"text": ["inside one", "inside two"]}).save_to_disk(str(saved))
    with confined(_jail(root)):
        assert sources.hub_dataset_splits(str(saved))["train"]["text"] == ["inside one", "inside two"]
    datasets.Dataset.from_dict({"text": [SECRET]}).save_to_disk(str(outside / "other"))
    arrow = next((outside / "other").glob("*.arrow"))
    state = json.loads((saved / "state.json").read_text())
    state["_data_files"] = [{"filename": f"../../outside/other/{arrow.name}"}]
    (saved / "state.json").write_text(json.dumps(state))
    for jail in (None, _jail(root)):
        with confined(jail), pytest.raises(PolicyError, match=r"state\.json names a file outside its folder"):
            sources.hub_dataset_splits(str(saved), field="corpus.sources[0]")


def test_a_builder_reads_only_the_data_files_named(tree) -> None:
    root, outside = tree
    _csv(root / "a.csv")
    (root / "README.md").write_text(f"---\nconfigs:\n- config_name: default\n  data_files: {outside}/secret.csv\n"
                                    "---\n", encoding="utf-8")
    with confined(_jail(root)):
        splits = sources.hub_dataset_splits("csv", data_files=[str(root / "*.csv")], field="corpus.sources[0]")
        assert len(splits["train"]) == 12 and not any(SECRET in t for t in _texts(splits))
        _csv(root / "b.csv", 3)
        assert len(sources.hub_dataset_splits(str(root), data_files=[str(root / "b.csv")])["train"]) == 3
        with pytest.raises(PolicyError, match=r"corpus\.sources\[0\]\.data_files: .* outside the allowed"):
            sources.hub_dataset_splits("csv", data_files=[str(outside / "secret.csv")], field="corpus.sources[0]")


# ---------------------------------------------------------------------------------------------- files


def test_a_linked_data_file_is_refused_naming_the_field_and_the_path_given(tree, tmp_path: Path) -> None:
    root, outside = tree
    link = _csv(root / "train.csv")
    cfg = LabeledConfig(source=LabeledFiles(train=str(link)))  # the config resolves links: swapped in after it
    link.unlink()
    link.symlink_to(outside / "secret.csv")
    ws = Workspace(tmp_path / "ws")
    with confined(_jail(root)), pytest.raises(PolicyError) as info:
        ingest.ingest_labeled(cfg, ws)
    assert str(info.value) == (f"labeled.source.train: {link} is a symbolic link (links are not followed for runs "
                               "created through the API)")
    (root / "sub").symlink_to(outside, target_is_directory=True)
    with confined(_jail(root)), pytest.raises(PolicyError, match="passes through a symbolic link"):
        confine.open_file(root / "sub" / "secret.txt", "f")
    with confine.open_file(link, "f") as f:  # the operator's run follows the link
        assert SECRET in f.read().decode()


def test_paths_outside_the_roots_relative_paths_and_fifos_are_refused(tree) -> None:
    root, outside = tree
    os.mkfifo(root / "pipe.csv")
    with confined(_jail(root)):
        for path, why in [(outside / "secret.txt", "outside the allowed data folders"),
                          (f"{root}/../outside/secret.txt", "outside the allowed data folders"),
                          ("data/x.csv", "not an absolute path"),
                          (root / "pipe.csv", "not a regular file")]:
            with pytest.raises(PolicyError, match=why):
                confine.open_file(path, "f")
        with pytest.raises(DataError, match=rf"f: file not found: {root}/missing\.csv"):
            confine.open_file(root / "missing.csv", "f")


def test_a_file_swapped_for_a_link_after_the_listing_is_refused_when_opened(tree) -> None:
    root, outside = tree
    _csv(root / "a.csv")
    with confined(_jail(root)):
        [listed] = confine.glob_files(str(root / "*.csv"), "corpus.sources[0].paths")
        listed.unlink()
        listed.symlink_to(outside / "secret.csv")
        with pytest.raises(PolicyError, match="a.csv is a symbolic link"):
            confine.open_file(listed, "corpus.sources[0].paths")


def test_a_glob_reaching_a_link_is_refused_without_naming_it(tree) -> None:
    root, outside = tree
    _csv(root / "a.csv")
    (root / "zz-leak.csv").symlink_to(outside / "secret.csv")
    pattern = str(root / "**" / "*.csv")
    with confined(_jail(root)), pytest.raises(PolicyError) as info:
        confine.glob_files(pattern, "f")
    assert str(info.value) == (f"f: pattern {pattern!r} reaches 1 symbolic link (links are not followed for runs "
                               "created through the API)")
    assert [p.name for p in confine.glob_files(pattern, "f")] == ["a.csv", "zz-leak.csv"]  # the operator's


def test_wild_globs_are_refused_quickly_without_naming_a_match(tree) -> None:
    root, _ = tree
    for i in range(30):
        _csv(root / f"d{i}" / "x.csv", 1)
    cases = [(str(root / "*" / ".." / ".." / "outside" / "*"), "has a '..' component"),
             (str(root / "**" / "**" / "**" / "*.csv"), "more than one '\\*\\*'")]
    for jail, error in ((None, ConfigError), (_jail(root), PolicyError)):
        for pattern, why in cases:
            start = time.monotonic()
            with confined(jail), pytest.raises(error, match=why) as info:
                confine.glob_files(pattern, "f")
            assert time.monotonic() - start < 1 and "secret" not in str(info.value)
    with confined(_jail(root)), pytest.raises(PolicyError) as info:
        confine.glob_files(str(root / "**" / "*.csv"), "f", entries=20)
    assert "visits more than 20 folder entries (the listing budget)" in str(info.value)
    assert "x.csv'" not in str(info.value).replace(f"{root}/**/*.csv", "")
    with pytest.raises(ConfigError, match=r"took longer than 0 s \(the listing budget\)"):
        confine.glob_files(str(root / "**" / "*.csv"), "f", seconds=0)
    assert len(confine.glob_files(str(root / "**" / "*.csv"), "f")) == 30


def test_files_source_and_literal_paths_read_as_before(tree, tmp_path: Path) -> None:
    root, _ = tree
    odd = root / "notes[1].txt"
    odd.write_text("\n\n".join(paragraphs(40)), encoding="utf-8")
    ws = Workspace(tmp_path / "ws")
    cfg = files_corpus(odd)
    plain = ingest.ingest_corpus(cfg, ws)
    with confined(_jail(root)):
        assert ingest.ingest_corpus(cfg, ws).fingerprint == plain.fingerprint  # same files, same identity
        with pytest.raises(DataError, match=r"is not a file \(use a glob"):
            confine.glob_files(str(root), "f")


# ---------------------------------------------------------------------------------------------- tokenizers


def _tokenizer(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<eos>": 1, "hello": 2, "world": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(str(folder))
    return folder


def test_a_tokenizer_folder_loads_from_a_checked_copy_and_a_link_inside_is_refused(tree, tmp_path: Path) -> None:
    root, outside = tree
    folder = _tokenizer(root / "tok")
    (tmp_path / "c.txt").write_text("\n\n".join(paragraphs(40)), encoding="utf-8")
    ws = Workspace(tmp_path / "ws")
    corpus = ingest.ingest_corpus(files_corpus(tmp_path / "c.txt"), ws)
    cfg = TokenizerConfig(pretrained=str(folder), eos_token="<eos>")
    plain = tokenize.train_tokenizer(corpus, cfg, ws)
    with confined(_jail(root)):
        copy = confine.staged(folder, "tokenizer.pretrained")
        assert copy != folder and sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in folder.iterdir())
        assert tokenize.train_tokenizer(corpus, cfg, ws).fingerprint == plain.fingerprint
    _tokenizer(outside / "tok")
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.json").symlink_to(outside / "tok" / "tokenizer.json")
    with confined(_jail(root)), pytest.raises(PolicyError, match=r"tokenizer\.pretrained: .* symbolic link"):
        tokenize.train_tokenizer(corpus, cfg, ws)
    assert confine.staged(folder, "tokenizer.pretrained") == folder  # the operator loads the folder itself


# ---------------------------------------------------------------------------------------------- quoting


def test_nothing_read_is_quoted_when_confined_without_quote_data(tree, tmp_path: Path) -> None:
    root, _ = tree
    assert excerpt("a value") == "'a value'"
    with confined(_jail(root)):
        assert not confine.may_quote() and excerpt("a value") == NOT_SHOWN
        with confined(None):
            assert confine.may_quote()
        train = _csv(root / "train.csv")
        with train.open("a") as f:
            f.write(f"a review,{SECRET}\n")
        with pytest.raises(DataError) as info:
            ingest.ingest_labeled(LabeledConfig(source=LabeledFiles(train=str(train)), labels=["pos", "neg"]),
                                  Workspace(tmp_path / "ws"))
        assert "row 14: unknown label (not shown)" in str(info.value) and SECRET not in str(info.value)
    with confined(_jail(root, quote_data=True)):
        assert confine.may_quote() and excerpt("a value") == "'a value'"
    assert confine.current() is None


def test_confident_mistakes_keep_rows_labels_and_scores_but_not_texts(tree) -> None:
    import numpy as np

    from tasks.evaluate import confident_mistakes

    root, _ = tree
    proba = np.array([[0.9, 0.1], [0.2, 0.8]])
    with confined(_jail(root)):
        [m] = confident_mistakes(["a secret text", "fine"], np.array([1, 1]), proba, ["neg", "pos"], 5)
    assert m == {"row": 0, "text": NOT_SHOWN, "label": "pos", "predicted": "neg", "confidence": 0.9}
    assert confident_mistakes(["a secret text", "fine"], np.array([1, 1]), proba, ["neg", "pos"], 5)[0]["text"] == \
        "a secret text"


def test_the_suffixes_of_data_files_are_those_sources_reads() -> None:
    assert set(confine.DATA_SUFFIXES) == {*sources.FORMATS, ".txt", ".arrow"}
