"""Hub ids through the real huggingface_hub code path, offline.

A Hub cache laid out as huggingface_hub writes it (`models--ORG--NAME/refs/main`,
`snapshots/<commit>/<file>` as relative symlinks into `blobs/<sha>`) is built here from tiny
random models saved by `transformers`; the torch model runs in the same test as the reference.
The "Hub" errors that need a server (unknown repository, unknown revision, no network) are
answered by a local HTTP server that replies as the Hub does (404 with `X-Error-Code`), or by a
closed port.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import funnel_jax as fj
from convert import check_parity, orbax_to_torch, torch_to_orbax
from funnel_jax import hub
from tests.reference import max_abs, sample_inputs, to_torch, torch_config, torch_model

WORDS = "the funnel pools hidden states and upsamples them back to full length again".split()
VOCAB = ["<pad>", "<unk>", "<cls>", "<sep>", "<mask>", "<s>", "</s>", *WORDS, "##s", "##ed"]
ATOL = 1e-5


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_snapshot(cache: Path, repo_id: str, folder: Path, ref: str | None = "main") -> str:
    """Put every file under `folder` into `cache` as one commit of `repo_id`; returns the hash.

    Blobs are named as the Hub names them (sha256 for LFS files, the git blob sha1 otherwise),
    snapshot files are relative symlinks to them, and refs/<ref> holds the commit hash.
    """
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    digest = hashlib.sha1()
    for p in files:
        digest.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    commit = digest.hexdigest()
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    for p in files:
        data = p.read_bytes()
        lfs = p.suffix in (".safetensors", ".bin", ".h5", ".msgpack") or "params" in p.parts
        blob = (
            repo_dir / "blobs" / (hashlib.sha256(data).hexdigest() if lfs else _git_blob_sha1(data))
        )
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo_dir / "snapshots" / commit / p.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    return commit


def _write_tokenizer(folder: Path) -> None:
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"do_lower_case": True, "model_max_length": 512})
    )


def _tconfig():
    return torch_config(vocab_size=len(VOCAB), block_sizes=[1, 2], num_decoder_layers=1)


@pytest.fixture(scope="module")
def hubcache(tmp_path_factory):
    """The cache, its repositories, and the torch reference model behind each."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "cache"
    tconfig = _tconfig()
    out = {"cache": cache, "models": {}, "commits": {}, "dirs": {}}

    def save(name, model, how):
        folder = root / "src" / name
        folder.mkdir(parents=True)
        if how == "safetensors":
            model.save_pretrained(folder)
        elif how == "sharded":
            model.save_pretrained(folder, max_shard_size="20KB")
        elif how == "bin":  # what the released funnel-transformer/* repositories hold
            model.config.architectures = [type(model).__name__]
            model.config.save_pretrained(folder)
            torch.save(model.state_dict(), folder / "pytorch_model.bin")
        _write_tokenizer(folder)
        out["dirs"][name] = folder
        return folder

    # ORG/tiny: two commits with different weights; main points at the second.
    old = torch_model("FunnelModel", tconfig, seed=1)
    new = torch_model("FunnelModel", tconfig, seed=2)
    out["commits"]["old"] = add_snapshot(cache, "ORG/tiny", save("old", old, "safetensors"))
    out["commits"]["new"] = add_snapshot(cache, "ORG/tiny", save("new", new, "safetensors"))
    out["models"]["old"], out["models"]["new"] = old, new

    pre = torch_model("FunnelForPreTraining", tconfig, seed=3)
    add_snapshot(cache, "ORG/tiny-bin", save("bin", pre, "bin"))
    out["models"]["bin"] = pre

    sharded = torch_model("FunnelModel", tconfig, seed=4)
    add_snapshot(cache, "ORG/tiny-sharded", save("sharded", sharded, "sharded"))
    out["models"]["sharded"] = sharded

    # A repository without Funnel weights, and one of another model type.
    bare = root / "src" / "bare"
    bare.mkdir()
    tconfig.save_pretrained(bare)
    (bare / "tf_model.h5").write_bytes(b"\x89HDF\r\n" + b"\0" * 32)
    (bare / "README.md").write_text("TensorFlow weights only\n")
    add_snapshot(cache, "ORG/no-weights", bare)
    bert = root / "src" / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 16}))
    (bert / "model.safetensors").write_bytes(b"\0" * 16)
    add_snapshot(cache, "ORG/bert", bert)
    return out


@pytest.fixture
def offline(hubcache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hubcache["cache"]))
    return hubcache


def _outputs(module, params, inputs):
    out = module.apply({"params": params}, **inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _reference(tmodel, inputs):
    with torch.no_grad():
        out = tmodel(**to_torch(inputs))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


INPUTS = sample_inputs(len(VOCAB), seq_len=11)


# --- loading from the cache ----------------------------------------------------------------


def test_from_pretrained_id_and_revision_give_the_reference_outputs(offline):
    module, params = fj.from_pretrained("ORG/tiny")
    assert type(module).__name__ == "FunnelModel"
    new_err = max_abs(
        _outputs(module, params, INPUTS), _reference(offline["models"]["new"], INPUTS)
    )
    assert new_err < ATOL, new_err

    module, params = fj.from_pretrained("ORG/tiny", revision=offline["commits"]["old"])
    got = _outputs(module, params, INPUTS)
    assert max_abs(got, _reference(offline["models"]["old"], INPUTS)) < ATOL
    # The revision was honoured: the two commits' models differ.
    assert max_abs(got, _reference(offline["models"]["new"], INPUTS)) > 1e-2

    snapshot = hub.resolve_model_dir("ORG/tiny")
    assert (
        snapshot == offline["cache"] / "models--ORG--tiny" / "snapshots" / offline["commits"]["new"]
    )


def test_pytorch_bin_only_repository_loads_without_torch_in_funnel_jax(offline):
    module, params = fj.from_pretrained("ORG/tiny-bin")
    assert type(module).__name__ == "FunnelForPreTraining"
    err = max_abs(_outputs(module, params, INPUTS), _reference(offline["models"]["bin"], INPUTS))
    assert err < ATOL, err
    # And in a fresh process, loading it imports neither torch nor transformers.
    code = (
        "import sys, funnel_jax as fj; fj.from_pretrained('ORG/tiny-bin'); "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not bad, bad; print('no torch')"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0 and "no torch" in run.stdout, run.stderr[-2000:]


def test_sharded_safetensors_followed_through_the_index(offline):
    snapshot = hub.resolve_model_dir("ORG/tiny-sharded")
    assert (snapshot / "model.safetensors.index.json").is_file()
    assert not (snapshot / "model.safetensors").exists()
    shards = set(
        json.loads((snapshot / "model.safetensors.index.json").read_text())["weight_map"].values()
    )
    assert len(shards) > 1, shards
    module, params = fj.from_pretrained("ORG/tiny-sharded")
    err = max_abs(
        _outputs(module, params, INPUTS), _reference(offline["models"]["sharded"], INPUTS)
    )
    assert err < ATOL, err


def test_cache_dir_and_local_files_only_arguments(hubcache, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))  # cache_dir must win
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")  # never reached
    module, params = fj.from_pretrained(
        "ORG/tiny", cache_dir=hubcache["cache"], local_files_only=True
    )
    err = max_abs(_outputs(module, params, INPUTS), _reference(hubcache["models"]["new"], INPUTS))
    assert err < ATOL, err


def test_config_from_pretrained(offline):
    config = fj.FunnelConfig.from_pretrained("ORG/tiny", revision=offline["commits"]["old"])
    assert config == fj.FunnelConfig.from_json_file(offline["dirs"]["old"] / "config.json")
    assert fj.FunnelConfig.from_pretrained("ORG/tiny", d_model=32).d_model == 32


def test_tokenizer_from_pretrained_id_matches_transformers(offline):
    tok = fj.FunnelTokenizer.from_pretrained("ORG/tiny")
    ref = transformers.FunnelTokenizerFast.from_pretrained(str(offline["dirs"]["new"]))
    text, pair = "The funnel pools hidden states", "and upsamples them back"
    ours = tok(text, pair)
    theirs = ref(text, pair, return_token_type_ids=True)
    for key in ("input_ids", "token_type_ids"):
        assert np.asarray(ours[key]).reshape(-1).tolist() == list(theirs[key]), key
    assert len(set(theirs["input_ids"])) > 5  # real words, not all <unk>


# --- converters ----------------------------------------------------------------------------


def test_converters_take_ids(offline, tmp_path, capsys):
    dst = tmp_path / "orbax"
    assert torch_to_orbax.main(["ORG/tiny-bin", str(dst), "--no-progress"]) == 0
    assert (dst / "vocab.txt").is_file()  # the tokenizer files came along
    module, params = fj.from_pretrained(dst)
    err = max_abs(_outputs(module, params, INPUTS), _reference(offline["models"]["bin"], INPUTS))
    assert err < ATOL, err

    # An Orbax directory published on the Hub converts back to a transformers directory.
    add_snapshot(offline["cache"], "ORG/tiny-orbax", dst)
    back = tmp_path / "back"
    assert orbax_to_torch.main(["ORG/tiny-orbax", str(back)]) == 0
    reloaded = transformers.FunnelForPreTraining.from_pretrained(back).eval()
    err = max_abs(_reference(reloaded, INPUTS), _reference(offline["models"]["bin"], INPUTS))
    assert err < ATOL, err

    capsys.readouterr()
    code = check_parity.main(
        ["ORG/tiny", "--revision", offline["commits"]["old"], "--text", "the funnel pools"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "OK: worst" in out


# --- errors --------------------------------------------------------------------------------


def test_error_nothing_cached_offline(offline):
    with pytest.raises(hub.HubError) as e:
        fj.from_pretrained("ORG/absent")
    msg = str(e.value)
    assert "ORG/absent is not in the cache at" in msg, msg
    assert "offline (HF_HUB_OFFLINE=1" in msg, msg
    assert "hf download ORG/absent" in msg and "huggingface-cli download ORG/absent" in msg, msg
    assert "HF_HUB_CACHE" in msg, msg


def test_error_revision_not_cached_offline(offline):
    with pytest.raises(hub.HubError) as e:
        fj.from_pretrained("ORG/tiny", revision="v2.0")
    msg = str(e.value)
    assert "ORG/tiny at revision 'v2.0' is not in the cache" in msg, msg
    assert "revisions main" in msg, msg  # what the cache does hold
    assert "hf download ORG/tiny --revision v2.0" in msg, msg


def test_error_repository_without_funnel_weights(offline):
    with pytest.raises(hub.HubError) as e:
        fj.from_pretrained("ORG/no-weights")
    msg = str(e.value)
    assert "ORG/no-weights has no Funnel weights" in msg, msg
    assert "looked for model.safetensors, model.safetensors.index.json, pytorch_model.bin" in msg
    assert "files found: README.md, config.json, tf_model.h5" in msg, msg
    with pytest.raises(hub.HubError, match=r"ORG/bert holds a 'bert' model .*not a Funnel"):
        fj.from_pretrained("ORG/bert")


def test_error_tokenizer_repository_without_vocabulary(offline):
    with pytest.raises(hub.HubError, match=r"no tokenizer .*tokenizer.json or vocab.txt"):
        fj.FunnelTokenizer.from_pretrained("ORG/bert")


def test_error_local_path_that_is_not_an_id(offline, tmp_path):
    missing = tmp_path / "runs" / "base"
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        fj.from_pretrained(missing)


def test_error_huggingface_hub_missing(offline, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(hub.HubError) as e:
        fj.from_pretrained("ORG/tiny")
    assert "pip install 'funnel-jax[hub]'" in str(e.value)
    # Local paths need no huggingface_hub.
    assert fj.FunnelConfig.from_pretrained(offline["dirs"]["new"]).d_model == 16


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """Replies as the Hub does to /{repo}/resolve/{revision}/{file}: 404 + X-Error-Code."""

    def _reply(self):
        parts = self.path.split("/")
        repo, revision = "/".join(parts[1:3]), parts[4] if len(parts) > 4 else ""
        code = "RevisionNotFound" if repo == "ORG/tiny" and revision == "nope" else "RepoNotFound"
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET = _reply

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    yield
    server.shutdown()
    server.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.usefixtures("fake_hub")
def test_error_unknown_repository():
    with pytest.raises(hub.HubError) as e:
        fj.from_pretrained("ORG/does-not-exist")
    msg = str(e.value)
    assert (
        "'ORG/does-not-exist' is neither a local path nor a repository on the Hugging Face Hub"
        in msg
    )


@pytest.mark.usefixtures("fake_hub")
def test_error_unknown_revision():
    with pytest.raises(hub.HubError, match=r"ORG/tiny has no revision 'nope' \(a branch, tag"):
        fj.from_pretrained("ORG/tiny", revision="nope")


def test_error_no_network_nothing_cached(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    port = _closed_port()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    # huggingface_hub retries a refused connection 5 times with 1-8 s pauses: skip the pauses.
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    with pytest.raises(hub.HubError) as e:
        fj.from_pretrained("ORG/tiny")
    msg = str(e.value)
    assert f"ORG/tiny is not in the cache at {tmp_path / 'cache'}" in msg, msg
    assert f"the Hub (http://127.0.0.1:{port}) cannot be reached" in msg, msg
    assert "hf download ORG/tiny" in msg, msg


# --- save_pretrained -----------------------------------------------------------------------


def test_save_pretrained_writes_what_transformers_loads(offline, tmp_path):
    module, params = fj.from_pretrained("ORG/tiny-bin")
    fj.save_pretrained(module, params, tmp_path / "out", push_to_hub=False)
    reloaded = transformers.AutoModelForPreTraining.from_pretrained(tmp_path / "out").eval()
    err = max_abs(_reference(reloaded, INPUTS), _reference(offline["models"]["bin"], INPUTS))
    assert err < ATOL, err
    with pytest.raises(NotImplementedError, match="upload_folder"):
        fj.save_pretrained(module, params, tmp_path / "out2", push_to_hub=True)


# --- pytorch_model.bin without torch -------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_bin_reader_matches_torch(tmp_path, legacy):
    from funnel_jax.torch_bin import TorchBinError, read_torch_bin

    g = torch.Generator().manual_seed(0)
    state = {
        "dense": torch.randn(3, 4, generator=g),
        "transposed": torch.randn(4, 3, generator=g).t(),  # strides (1, 3)
        "slice": torch.randn(8, generator=g)[2:7],  # storage offset 2
        "scalar": torch.tensor(1.5),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "half": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(2, 2, generator=g).bfloat16(),
        "mask": torch.tensor([True, False]),
    }
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    got = read_torch_bin(path)
    assert list(got) == list(state)
    for key, ref in state.items():
        want = ref.float().numpy() if ref.dtype == torch.bfloat16 else ref.numpy()
        have = got[key].astype(np.float32) if ref.dtype == torch.bfloat16 else got[key]
        assert have.dtype == want.dtype and have.shape == want.shape, key
        np.testing.assert_array_equal(have, want, err_msg=key)

    torch.save({"layer": torch.nn.Linear(2, 2)}, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(TorchBinError, match=r"torch\.nn\.modules\.linear\.Linear is not part"):
        read_torch_bin(path)
    path.write_bytes(b"not a torch file" * 4)
    with pytest.raises(TorchBinError, match="pytorch_model.bin: cannot read PyTorch file"):
        read_torch_bin(path)


def test_finetune_init_and_tokenizer_take_hub_ids(offline, tmp_path, monkeypatch):
    """`finetune --init ORG/NAME` / `--tokenizer ORG/NAME`: the snapshot is used as the model
    directory and as the tokenizer; a missing local path that is no id is still named."""
    from funnel_jax.training.config import FinetuneModelConfig
    from funnel_jax.training.finetuning import load_tokenizer, resolve_init

    monkeypatch.chdir(tmp_path)  # "ORG/tiny-bin" is no local path here
    snapshot = hub.resolve_model_dir("ORG/tiny-bin", tokenizer=True)
    model_dir, candidates = resolve_init("ORG/tiny-bin")
    assert model_dir == snapshot and (model_dir / "pytorch_model.bin").is_file()
    tok, how = load_tokenizer(FinetuneModelConfig(init="ORG/tiny-bin"), candidates, None, 0)
    assert str(snapshot) in how
    reference = transformers.FunnelTokenizerFast.from_pretrained(str(offline["dirs"]["bin"]))
    text = "The funnel pools hidden states."
    assert np.ravel(tok(text)["input_ids"]).tolist() == list(reference(text)["input_ids"])
    tok2, how2 = load_tokenizer(FinetuneModelConfig(tokenizer="ORG/tiny"), [], None, 0)
    assert how2.startswith("ORG/tiny (")
    assert np.ravel(tok2(text)["input_ids"]).tolist() == np.ravel(tok(text)["input_ids"]).tolist()
    with pytest.raises(FileNotFoundError, match="no such directory: ../nowhere"):
        resolve_init("../nowhere")
