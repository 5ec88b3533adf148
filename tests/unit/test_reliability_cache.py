"""Activation cache reliability: malformed tokens refused before anything is written,
interrupted set-ups finished, damaged tokens/headers/shards found on open and redone on
rerun, no temporary files left behind."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers.tiny import HOOKS, tiny_model, tiny_tokens
from workbench.cache import ActivationCache, CacheError, cache_activations
from workbench.cache import writer

TOKENS = tiny_tokens(n_seq=16)  # 4 shards of 4 sequences
HEADER_VICTIM = "shard_00002__blocks.1.mlp.hook_post.npy"  # float16 [64, 64]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _cache(model, path: Path, tokens=TOKENS, **kwargs) -> Path:
    return cache_activations(model, tokens, HOOKS, path, batch_size=4, shard_tokens=64, progress=False, **kwargs)


def _snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory) -> Path:
    return _cache(model, tmp_path_factory.mktemp("reference"))


@pytest.fixture
def copy(reference, tmp_path) -> Path:
    """A private copy of the reference cache (mtimes kept), to damage."""
    return Path(shutil.copytree(reference, tmp_path / "cache"))


def _edit(path: Path, edit) -> None:
    path.write_bytes(bytes(edit(bytearray(path.read_bytes()))))


def _flip(offset_from_end: int):
    def edit(raw: bytearray) -> bytearray:
        raw[-offset_from_end] ^= 0x01
        return raw
    return edit


def _replace(old: bytes, new: bytes):
    def edit(raw: bytearray) -> bytearray:
        assert raw.count(old) == 1 and len(old) == len(new)
        return raw.replace(old, new)
    return edit


# --- 11: malformed tokens ---------------------------------------------------------------
BAD_TOKENS = [
    # id, tokens, exception, fragment of the message
    ("seq_len > n_ctx", lambda: torch.randint(0, 64, (4, 33)), ValueError, "got seq_len 33. Cut the sequences to at most 32"),
    ("id >= vocab", lambda: torch.full((4, 16), 64), ValueError, "integer ids in [0, 64)"),
    ("negative id", lambda: torch.full((4, 16), -1), ValueError, "got ids from -1 to -1"),
    ("no sequences", lambda: torch.zeros(0, 16, dtype=torch.long), ValueError, "shape (0, 16), which holds no tokens"),
    ("empty sequences", lambda: torch.zeros(4, 0, dtype=torch.long), ValueError, "shape (4, 0), which holds no tokens"),
    ("float", lambda: TOKENS.float(), TypeError, "dtype torch.float32"),
    ("bool", lambda: TOKENS > 30, TypeError, "dtype torch.bool"),
    ("int16", lambda: TOKENS.short(), TypeError, "tokens.long()"),
    ("1-D", lambda: TOKENS[0], ValueError, "shape (16,). A single sequence is tokens[None]"),
    ("3-D", lambda: TOKENS.view(2, 8, 16), ValueError, "shape (2, 8, 16). Reshape them to [n_sequences, seq_len]"),
    ("list", lambda: TOKENS.tolist(), TypeError, "got a list"),
    ("numpy", lambda: TOKENS.numpy(), TypeError, "got a ndarray. Pass a tensor: torch.as_tensor(ids)"),
]


@pytest.mark.parametrize("make, error, fragment", [case[1:] for case in BAD_TOKENS], ids=[case[0] for case in BAD_TOKENS])
def test_bad_tokens_are_refused_before_anything_is_written(model, tmp_path, make, error, fragment):
    folder = tmp_path / "cache"
    with pytest.raises(error, match=re.escape(fragment)) as caught:
        _cache(model, folder, tokens=make())
    assert "tokens must be [n_sequences, seq_len] integer ids in [0, 64)" in str(caught.value)
    assert not folder.exists()  # nothing written...
    _cache(model, folder, tokens=TOKENS[:4])  # ...so the corrected call in the same folder just works
    ActivationCache.open(folder).verify()


def test_first_shard_failing_does_not_block_the_corrected_arguments(tmp_path):
    """A run that completed no shard (here: float16 overflow) left only set-up files; the
    dtype its error message recommends must then be accepted in the same folder."""
    loud = tiny_model()
    with torch.no_grad():
        loud.embed.W_E.mul_(1e6)
    with pytest.raises(CacheError, match="float16"):
        _cache(loud, tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    _cache(loud, tmp_path, dtype="float32")
    ActivationCache.open(tmp_path).verify()
    assert (tmp_path / "notes.txt").read_text() == "mine"


# --- 7: set-up killed midway --------------------------------------------------------------
def test_setup_killed_after_tokens_is_finished_by_the_rerun(model, reference, tmp_path, monkeypatch):
    def killed(*args, **kwargs):
        raise SystemExit("killed")  # stands in for a kill: the config never arrives

    monkeypatch.setattr(writer, "write_json", killed)
    with pytest.raises(SystemExit):
        _cache(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens.npy"]
    (tmp_path / ".cache_config.json.k1l2m3.tmp").write_text("{")  # what a kill in the config's write leaves
    monkeypatch.undo()
    _cache(model, tmp_path)
    assert _snapshot(tmp_path) == _snapshot(reference)


def test_half_made_folder_with_foreign_files_is_refused_and_left_alone(model, tmp_path):
    (tmp_path / "tokens.npy").write_bytes(b"not ours after all")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match=r"not empty and holds no activation cache \(it has notes.txt\)"):
        _cache(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "tokens.npy"]


# --- 8: tokens.npy verified -----------------------------------------------------------------
def test_damaged_tokens_are_caught_on_open_verify_and_every_read(model, copy):
    cache = ActivationCache.open(copy)
    _edit(copy / "tokens.npy", _flip(7))  # one token id changes; the header is intact
    for read in (lambda: cache.tokens, lambda: cache.context(5), cache.verify, lambda: ActivationCache.open(copy)):
        with pytest.raises(CacheError, match=r"tokens.npy: the token ids differ .*SHA-256.*Rerun the same cache_activations"):
            read()
    _cache(model, copy)  # the rerun rewrites it from the tokens passed
    assert torch.equal(ActivationCache.open(copy).tokens, TOKENS)


# --- 9: .npy headers checked --------------------------------------------------------------
HEADER_DAMAGE = {
    "byte order": _replace(b"'descr': '<f2'", b"'descr': '>f2'"),
    "shape": _replace(b"'shape': (64, 64)", b"'shape': (32, 64)"),
    "memory order": _replace(b"'fortran_order': False", b"'fortran_order': True "),
    "unreadable": _replace(b"'descr'", b"'descr\""),
}


@pytest.mark.parametrize("damage", HEADER_DAMAGE.values(), ids=HEADER_DAMAGE.keys())
def test_damaged_npy_header_is_caught_on_open_and_by_verify(copy, damage):
    cache = ActivationCache.open(copy)
    _edit(copy / HEADER_VICTIM, damage)
    message = rf"{HEADER_VICTIM}: its .npy header .*Delete shard_00002.json .* rerun the same cache_activations call"
    with pytest.raises(CacheError, match=message):
        ActivationCache.open(copy)
    with pytest.raises(CacheError, match=message):
        cache.verify()


# --- 10: a rerun checks and redoes --------------------------------------------------------
DAMAGE = {
    "data byte": ("shard_00001__blocks.0.hook_resid_post.npy", _flip(100)),
    "header": (HEADER_VICTIM, HEADER_DAMAGE["byte order"]),
    "truncated": ("shard_00003__blocks.0.attn.hook_z.npy", lambda raw: raw[:-64]),
    "data file deleted": ("shard_00000__blocks.0.attn.hook_z.npy", None),
    "record garbage": ("shard_00002.json", lambda raw: raw[: len(raw) // 2]),
    "record of another shard": ("shard_00001.json", _replace(b'"first_seq": 4', b'"first_seq": 8')),
    "tokens byte": ("tokens.npy", _flip(3)),
    "config garbage": ("cache_config.json", lambda raw: b"\0" * len(raw)),
    "manifest garbage": ("manifest.json", lambda raw: raw[:10]),
}


@pytest.mark.parametrize("name, damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_rerun_on_a_damaged_cache_redoes_the_damage(model, copy, name, damage):
    before = _snapshot(copy)
    mtimes = {p.name: p.stat().st_mtime_ns for p in copy.iterdir()}
    if damage is None:
        (copy / name).unlink()
    else:
        _edit(copy / name, damage)
    _cache(model, copy)
    assert _snapshot(copy) == before
    ActivationCache.open(copy).verify()
    # Only the damaged shard was redone: the other shards' files were not rewritten.
    shard = re.match(r"shard_\d+", name)
    untouched = [n for n in mtimes if n.startswith("shard_") and not (shard and n.startswith(shard.group()))]
    assert {n: (copy / n).stat().st_mtime_ns for n in untouched} == {n: mtimes[n] for n in untouched}


def test_manifest_disagreeing_with_the_config_is_refused_on_open(model, copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["dtype"] = "float32"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="manifest.json does not match cache_config.json.*Rerun the same"):
        ActivationCache.open(copy)
    _cache(model, copy)
    ActivationCache.open(copy).verify()


# --- 16: no temporary files left ----------------------------------------------------------
def test_a_finished_cache_holds_none_of_our_temporary_files(model, copy):
    ours = [".manifest.json.k3j2l1.tmp", ".tokens.npy.a_b9.tmp", ".cache_config.json.x.tmp",
            ".shard_00001.json.qq.tmp", ".shard_00000__blocks.0.hook_resid_post.npy.tmp999"]
    users = ["notes.tmp", ".notebook.tmp", "manifest.json.tmp", ".manifest.json.bak"]
    for name in ours + users:
        (copy / name).write_text("x")
    _cache(model, copy)
    left = {p.name for p in copy.iterdir()}
    assert not left & set(ours) and set(users) <= left
