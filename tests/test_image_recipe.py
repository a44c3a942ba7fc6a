"""Image cache key and keys (host only; building is covered by the VM tests)."""

import shutil

import paramiko

from testbed import image
from testbed.ssh import pinned_key


def test_recipe_hash_follows_content_and_mode(tmp_path):
    recipe = tmp_path / "images"
    shutil.copytree(image.RECIPE_DIR, recipe, ignore=shutil.ignore_patterns("cache"))
    h0 = image.recipe_hash(recipe)
    assert h0 == image.recipe_hash(image.RECIPE_DIR)
    (recipe / "rootfs" / "etc" / "inittab").write_text("changed\n")
    h1 = image.recipe_hash(recipe)
    assert h1 != h0
    (recipe / "rootfs" / "etc" / "inittab").chmod(0o755)
    assert image.recipe_hash(recipe) != h1


def test_cache_location_is_overridable(monkeypatch, tmp_path):
    monkeypatch.setenv("TESTBED_IMAGE_CACHE", str(tmp_path))
    assert image.current().dir.parent == tmp_path


def test_keys_pin_the_host_key_under_the_alias(tmp_path):
    image.write_keys(tmp_path)
    host = paramiko.Ed25519Key.from_private_key_file(str(tmp_path / "ssh_host_ed25519_key"))
    assert pinned_key(tmp_path / "known_hosts") == host
    paramiko.Ed25519Key.from_private_key_file(str(tmp_path / "id_ed25519"))
    assert (tmp_path / "id_ed25519").stat().st_mode & 0o077 == 0
    assert (tmp_path / "id_ed25519.pub").read_text().startswith("ssh-ed25519 ")
