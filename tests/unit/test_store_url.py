"""Store URLs: each kind recognised, its file found, its password masked (research/store_url.py)."""

from pathlib import Path

import pytest

from conftest import REPO
from research.store_url import mask_password, parse, sqlite_url


@pytest.mark.parametrize("url, kind, path", [
    ("sqlite:///results/mlflow.db", "sqlite", Path("results/mlflow.db")),
    ("sqlite:////abs/optuna.db", "sqlite", Path("/abs/optuna.db")),
    ("postgresql://lab:pw@127.0.0.1:5432/optuna", "postgresql", None),
    ("postgresql+psycopg2://lab@db/mlflow", "postgresql", None),
    ("journal:/tmp/study.journal", "journal", Path("/tmp/study.journal")),
    ("journal:/tmp/study.log", "journal", Path("/tmp/study.log")),
    ("/tmp/study.journal", "journal", Path("/tmp/study.journal")),
    ("http://127.0.0.1:5000", "http", None),
    ("HTTPS://mlflow.example.org/", "http", None),
    ("databricks", "databricks", None),
    ("databricks://profile", "databricks", None),
    ("/srv/mlruns", "path", Path("/srv/mlruns")),
    ("mlruns", "path", Path("mlruns")),
    ("mysql://u:p@host/db", "other", None),
    ("file:///srv/mlruns", "other", None),
])
def test_each_kind_of_store_is_recognised_with_its_file(url, kind, path):
    store = parse(url)
    assert (store.kind, store.path, store.url) == (kind, path, url)
    assert store.is_server == (kind in ("http", "databricks"))


def test_a_relative_journal_is_found_like_every_path_of_the_config():
    assert parse("journal:results/study.journal").path == REPO / "results" / "study.journal"  # no such file here: from the repo root
    assert sqlite_url(Path("/x/optuna.db")) == "sqlite:////x/optuna.db" and parse(sqlite_url(Path("/x/optuna.db"))).path == Path("/x/optuna.db")


def test_passwords_are_masked_and_nothing_else_changes():
    store = parse("postgresql://lab:s3cret-pw@127.0.0.1:5432/optuna")
    assert store.password == "s3cret-pw"
    assert store.masked == "postgresql://lab:***@127.0.0.1:5432/optuna" == store.shown()
    assert parse("postgresql://lab@db/optuna").password is None and parse("postgresql://lab@db/optuna").masked == "postgresql://lab@db/optuna"
    assert parse("https://user:tok@host:8443/").masked == "https://user:***@host:8443/"
    assert parse("sqlite:///results/mlflow.db").password is None
    assert mask_password("just text") == "just text" and mask_password("http://[::1") == "http://[::1"  # unparsable: unchanged


def test_reports_show_storages_inside_the_repo_relative_to_it():
    assert parse(f"sqlite:///{REPO}/results/optuna.db").shown() == "sqlite:///results/optuna.db"
    assert parse(f"journal:{REPO}/results/study.journal").shown() == "journal:results/study.journal"
    assert parse(f"{REPO}/results/study.journal").shown() == "results/study.journal"
    assert parse("sqlite:////elsewhere/optuna.db").shown() == "sqlite:////elsewhere/optuna.db"
    assert parse("sqlite:///results/optuna.db").shown() == "sqlite:///results/optuna.db"
    assert parse("postgresql://u:secret@host/optuna").shown() == "postgresql://u:***@host/optuna"
