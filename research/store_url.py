"""Store URLs, parsed in one place: where MLflow tracks runs (`tracking.uri`) and where Optuna keeps a study (`sweep.storage`).

    sqlite:///results/mlflow.db       a SQLite file (relative to the current folder; sqlite:////abs/path.db for an absolute one)
    postgresql://user:pw@host/db      PostgreSQL (postgresql+psycopg2://... too)
    journal:PATH  or  PATH.journal    an Optuna journal file (relative paths as every path of the config: see resolve_path)
    http://host:port, https://...     an MLflow tracking server
    databricks[://profile]            Databricks' tracking server
    a plain path                      MLflow's file store
Anything else (mysql://, file://, ...) is kind "other" and passed on as it is. A URL shown in a
message, tag or report has its password masked (`masked`, `shown`).
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from research.config import REPO_ROOT, resolve_path

SQLITE = "sqlite:///"
JOURNAL = "journal:"


@dataclass(frozen=True)
class StoreURL:
    url: str  # as given
    kind: str  # sqlite | postgresql | journal | http | databricks | path | other
    path: Path | None = None  # the file of a sqlite or journal store, the folder of a plain path

    @property
    def password(self) -> str | None:
        """The password in the URL, if it holds one."""
        if "://" not in self.url:
            return None
        try:
            return urllib.parse.urlsplit(self.url).password
        except ValueError:
            return None

    @property
    def masked(self) -> str:
        """The URL with its password replaced by ***, for tags and messages."""
        return mask_password(self.url)

    @property
    def is_server(self) -> bool:
        """A tracking server, which decides for itself where artifacts go."""
        return self.kind in ("http", "databricks")

    def shown(self) -> str:
        """The URL as a report shows it: a file inside the repository relative to it, a password masked."""
        prefix = next((p for p in (SQLITE, JOURNAL) if self.url.startswith(p)), "")
        rest = self.url[len(prefix):]
        if self.kind in ("sqlite", "journal") and rest.startswith(("/", "~")):
            path = Path(rest).expanduser().resolve()
            if path.is_relative_to(REPO_ROOT):
                return prefix + str(path.relative_to(REPO_ROOT))
        return self.masked


def parse(url: str) -> StoreURL:
    """What kind of store `url` names, and its file where it is one."""
    if url.startswith(SQLITE):
        return StoreURL(url, "sqlite", Path(url[len(SQLITE):]))
    if url.startswith(JOURNAL) or url.endswith(".journal"):
        return StoreURL(url, "journal", resolve_path(url.removeprefix(JOURNAL)))
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("http", "https"):
        return StoreURL(url, "http")
    if scheme.split("+")[0] == "postgresql":
        return StoreURL(url, "postgresql")
    if url == "databricks" or scheme == "databricks":
        return StoreURL(url, "databricks")
    if not scheme and ":" not in url.split("/")[0]:
        return StoreURL(url, "path", Path(url).expanduser())
    return StoreURL(url, "other")


def sqlite_url(path: Path) -> str:
    """The URL of a SQLite file."""
    return f"{SQLITE}{path}"


def mask_password(text: str) -> str:
    """A URL with its password replaced by *** (any other text unchanged)."""
    try:
        password = urllib.parse.urlsplit(text).password
    except ValueError:
        return text
    return text.replace(f":{password}@", ":***@") if password else text
