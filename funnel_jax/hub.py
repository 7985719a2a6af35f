"""Hugging Face Hub ids or local paths -> local directories, as `transformers` resolves them.

    model_dir = resolve_model_dir("funnel-transformer/small")      # config + weights
    tok_dir = resolve_tokenizer_dir("funnel-transformer/small")    # tokenizer files

An argument that exists on disk is returned as it is (a `save_pretrained` directory, an Orbax
model directory, a weights file); anything else is taken as a Hub repository id and fetched with
`huggingface_hub` (the optional extra `funnel-jax[hub]`, imported only then) into its cache.
Only the files needed are fetched: config.json; the weights in the order `transformers` prefers
them (model.safetensors, the shards of model.safetensors.index.json, pytorch_model.bin, the
shards of pytorch_model.bin.index.json); the tokenizer files. All land in one snapshot
directory, `<cache>/models--ORG--NAME/snapshots/<commit>/`, which is returned.

`revision`, `cache_dir`, `local_files_only` and `token` mean what they mean in `transformers`.
`HF_HUB_OFFLINE=1` (or `TRANSFORMERS_OFFLINE=1`) has the effect of `local_files_only=True`;
`HF_HUB_CACHE` and `HF_ENDPOINT` choose the cache and the server. These three are read when a
function here is called, so setting them after `huggingface_hub` was imported works too.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
# (file name, is a shard index), in the order transformers prefers them.
WEIGHTS_CANDIDATES = (
    (SAFETENSORS_NAME, False),
    (SAFETENSORS_INDEX_NAME, True),
    (BIN_NAME, False),
    (BIN_INDEX_NAME, True),
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
TOKENIZER_REQUIRED = ("tokenizer.json", "vocab.txt")  # at least one of them
HUB_EXTRA = "pip install 'funnel-jax[hub]'  (or: pip install huggingface_hub)"
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


class HubError(OSError):
    """A Hub id that cannot be resolved: the message says why and what to do."""


def is_local(name_or_path: str | os.PathLike) -> bool:
    """True when the argument names something on disk (then no Hub access is made)."""
    return os.path.exists(os.path.expanduser(os.fspath(name_or_path)))


def looks_like_repo_id(name: str) -> bool:
    """`NAME` or `ORG/NAME` with the characters the Hub allows (no `..`, `--`, leading `.`)."""
    return (
        bool(_REPO_ID.match(name))
        and ".." not in name
        and "--" not in name
        and not name.endswith(".git")
    )


# --- settings read at call time ------------------------------------------------------------


def _true(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _offline(local_files_only: bool) -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return bool(local_files_only) or constants.HF_HUB_OFFLINE or _true(env)


def _cache_dir(cache_dir) -> Path:
    from huggingface_hub import constants

    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("HF_HUB_CACHE")
    return Path(os.path.expandvars(os.path.expanduser(env or constants.HF_HUB_CACHE)))


def _endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _import_hub(name: str):
    try:
        import huggingface_hub
    except ImportError:
        raise HubError(
            f"{name!r} is not a local path, and loading it from the Hugging Face Hub needs "
            f"huggingface_hub, which is not installed: {HUB_EXTRA}"
        ) from None
    return huggingface_hub


# --- the fetcher ---------------------------------------------------------------------------


class _Repo:
    """One repository at one revision: fetches single files into the Hub cache."""

    def __init__(self, repo_id, revision, cache_dir, local_files_only, token):
        self.hub = _import_hub(repo_id)
        self.repo_id = repo_id
        self.revision = revision
        self.cache_dir = _cache_dir(cache_dir)
        self.offline = _offline(local_files_only)
        self.token = token
        self.endpoint = _endpoint()
        self.snapshot: Path | None = None

    @property
    def where(self) -> str:
        rev = f" at revision {self.revision!r}" if self.revision else ""
        return f"{self.repo_id}{rev}"

    def fetch(self, filename: str, required: bool = True) -> Path | None:
        """The local path of `filename`; None when it is absent and not `required`.

        Absent means: not in the repository (online), or not in the cached snapshot (offline,
        once config.json was found there). Everything else raises HubError.
        """
        from huggingface_hub import utils as errors  # the error classes, in every release

        try:
            path = self.hub.hf_hub_download(
                self.repo_id,
                filename,
                revision=self.revision,
                cache_dir=self.cache_dir,
                local_files_only=self.offline,
                token=self.token,
                endpoint=self.endpoint,
            )
        except errors.GatedRepoError as e:
            raise HubError(
                f"{self.repo_id} is a gated repository: accept its terms on the Hub and pass "
                f"token= (or set HF_TOKEN / run `hf auth login`). ({_first_line(e)})"
            ) from None
        except errors.RepositoryNotFoundError:
            raise HubError(
                f"{self.repo_id!r} is neither a local path nor a repository on the Hugging Face "
                f"Hub ({self.endpoint}): check the name, or pass token= for a private one"
            ) from None
        except errors.RevisionNotFoundError:
            raise HubError(
                f"{self.repo_id} has no revision {self.revision!r} (a branch, tag or commit "
                "hash): see the repository's branches and commits on the Hub"
            ) from None
        except errors.LocalEntryNotFoundError:
            # Offline with the snapshot known: the file is not cached. Online this means the
            # Hub could not be reached and the file is not cached either.
            if self.offline and not required and (self.snapshot or self.cached_snapshot()):
                return None
            raise self._not_cached(filename) from None
        except errors.EntryNotFoundError:  # online (or a cached "no such file" marker)
            if required:
                raise HubError(f"{self.where} has no file {filename}") from None
            return None
        except errors.HfHubHTTPError as e:
            raise HubError(f"{self.where}: the Hub answered {_first_line(e)}") from None
        path = Path(path)
        if self.snapshot is None:
            self.snapshot = path.parent
        return path

    def fetch_index(self, index_name: str) -> Path:
        """A shard index and every shard it names."""
        index = self.fetch(index_name)
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            shards = list(dict.fromkeys(weight_map.values()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise HubError(
                f"{self.where}: {index_name} is not a valid shard index ({type(e).__name__}: {e})"
            ) from None
        for shard in shards:
            self.fetch(shard)
        return index

    def cached_snapshot(self) -> Path | None:
        """The cached snapshot directory of this revision, if the cache has one."""
        repo_dir = self.cache_dir / ("models--" + self.repo_id.replace("/", "--"))
        revision = self.revision or "main"
        ref = repo_dir / "refs" / revision
        try:
            commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else revision
        except OSError:
            return None
        snapshot = repo_dir / "snapshots" / commit
        return snapshot if snapshot.is_dir() else None

    def _not_cached(self, filename: str) -> HubError:
        repo_dir = self.cache_dir / ("models--" + self.repo_id.replace("/", "--"))
        why = (
            "offline (HF_HUB_OFFLINE=1 or local_files_only=True)"
            if self.offline
            else f"the Hub ({self.endpoint}) cannot be reached"
        )
        if repo_dir.is_dir():
            refs = sorted(p.name for p in (repo_dir / "refs").glob("*") if p.is_file())
            snaps = sorted(p.name for p in (repo_dir / "snapshots").glob("*") if p.is_dir())
            have = (
                f"the cache holds revisions {', '.join(refs) or '-'} "
                f"(snapshots {', '.join(s[:12] for s in snaps) or '-'})"
            )
            what = f"{filename} of {self.where} is not in the cache at {self.cache_dir}; {have}"
        else:
            what = f"{self.repo_id} is not in the cache at {self.cache_dir}"
        rev = f" --revision {self.revision}" if self.revision else ""
        return HubError(
            f"{what}, and {why}. On a machine with network run `hf download {self.repo_id}{rev}` "
            f"(or `huggingface-cli download {self.repo_id}{rev}`) and copy its cache here, or set "
            "HF_HUB_CACHE / cache_dir= to a cache that holds it"
        )

    def listing(self) -> list[str]:
        """The repository's files (from the Hub when online, else the cached snapshot)."""
        if not self.offline:
            try:
                api = self.hub.HfApi(endpoint=self.endpoint, token=self.token)
                return sorted(api.list_repo_files(self.repo_id, revision=self.revision))
            except Exception:  # noqa: BLE001 (the listing only improves a message)
                pass
        snapshot = self.snapshot or self.cached_snapshot()
        if snapshot is None:
            return []
        return sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _check_funnel_config(repo: _Repo, config_path: Path) -> None:
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise HubError(f"{repo.where}: {CONFIG_NAME} is not valid JSON ({e})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type is not None and model_type != "funnel":
        raise HubError(
            f"{repo.where} holds a {model_type!r} model (config.json model_type), not a Funnel "
            f"Transformer; files found: {', '.join(repo.listing())}"
        )


def _resolve_local(name_or_path) -> Path | None:
    path = Path(os.path.expanduser(os.fspath(name_or_path)))
    if path.exists():
        return path
    if not looks_like_repo_id(os.fspath(name_or_path)):
        raise FileNotFoundError(
            f"{os.fspath(name_or_path)}: no such file or directory (and not a Hugging Face Hub "
            "id, which is NAME or ORG/NAME)"
        )
    return None


def resolve_model_dir(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    tokenizer: bool = False,
) -> Path:
    """A local directory holding config.json and Funnel weights (or the local path as given).

    For a Hub id, fetches config.json, then the first weights format present (see the module
    docstring; shard indexes are followed to their shards) and, with `tokenizer=True`, the
    tokenizer files that exist. Returns the snapshot directory. Raises `HubError` for an id or
    revision that does not exist, for a model that is neither cached nor reachable, and for a
    repository without Funnel weights (naming the files found).
    """
    local = _resolve_local(name_or_path)
    if local is not None:
        return local
    repo = _Repo(os.fspath(name_or_path), revision, cache_dir, local_files_only, token)
    config_path = repo.fetch(CONFIG_NAME, required=False)
    if config_path is None:
        raise HubError(
            f"{repo.where} has no {CONFIG_NAME}, so it holds no transformers model; files "
            f"found: {', '.join(repo.listing()) or 'none'}"
        )
    _check_funnel_config(repo, config_path)
    found = False
    for name, is_index in WEIGHTS_CANDIDATES:
        if is_index:
            if repo.fetch(name, required=False) is not None:
                repo.fetch_index(name)
                found = True
        else:
            found = repo.fetch(name, required=False) is not None
        if found:
            break
    if not found:
        where = "in the cached snapshot" if repo.offline else "in the repository"
        names = ", ".join(n for n, _ in WEIGHTS_CANDIDATES)
        listing = ", ".join(repo.listing()) or "none"
        hint = (
            " (offline: the weights may exist on the Hub but are not in the cache)"
            if repo.offline
            else ""
        )
        raise HubError(
            f"{repo.where} has no Funnel weights {where}{hint}: looked for {names}; "
            f"files found: {listing}"
        )
    if tokenizer:
        for name in TOKENIZER_FILES:
            repo.fetch(name, required=False)
    return config_path.parent


def resolve_config_dir(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """A local directory holding config.json: a Hub id fetches that one file."""
    local = _resolve_local(name_or_path)
    if local is not None:
        return local
    repo = _Repo(os.fspath(name_or_path), revision, cache_dir, local_files_only, token)
    config_path = repo.fetch(CONFIG_NAME)
    _check_funnel_config(repo, config_path)
    return config_path.parent


def resolve_tokenizer_dir(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """A local directory holding tokenizer.json or vocab.txt (plus the tokenizer configs).

    For a Hub id, fetches each of TOKENIZER_FILES that exists; at least one of tokenizer.json
    and vocab.txt must.
    """
    local = _resolve_local(name_or_path)
    if local is not None:
        return local
    repo = _Repo(os.fspath(name_or_path), revision, cache_dir, local_files_only, token)
    got = {}
    for name in TOKENIZER_FILES:
        path = repo.fetch(name, required=False)
        if path is not None:
            got[name] = path
    if not any(name in got for name in TOKENIZER_REQUIRED):
        where = "in the cached snapshot" if repo.offline else "in the repository"
        raise HubError(
            f"{repo.where} has no tokenizer {where}: looked for "
            f"{' or '.join(TOKENIZER_REQUIRED)}; files found: {', '.join(repo.listing()) or 'none'}"
        )
    return next(iter(got.values())).parent


def resolve_orbax_model_dir(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """A local Orbax model directory (config.json + params/); a Hub id fetches those files."""
    local = _resolve_local(name_or_path)
    if local is not None:
        return local
    repo = _Repo(os.fspath(name_or_path), revision, cache_dir, local_files_only, token)
    repo.fetch(CONFIG_NAME)
    from huggingface_hub import utils as errors

    try:
        folder = repo.hub.snapshot_download(
            repo.repo_id,
            revision=repo.revision,
            cache_dir=repo.cache_dir,
            local_files_only=repo.offline,
            token=repo.token,
            endpoint=repo.endpoint,
            allow_patterns=[CONFIG_NAME, "params/*", "params/**", *TOKENIZER_FILES],
        )
    except errors.LocalEntryNotFoundError:
        raise repo._not_cached("params/") from None
    except errors.HfHubHTTPError as e:
        raise HubError(f"{repo.where}: the Hub answered {_first_line(e)}") from None
    folder = Path(folder)
    if not (folder / "params").is_dir():
        raise HubError(
            f"{repo.where} is not an Orbax model directory (no params/); files found: "
            f"{', '.join(repo.listing()) or 'none'}"
        )
    return folder
