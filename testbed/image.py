"""The guest image: kernel + tiny initramfs + ext4 root disk + keys, cached by recipe hash.

The recipe is everything under images/ (build.sh, initramfs-init, rootfs/). Its hash names the
cache directory, so a changed recipe builds a new image and an unchanged one is reused. A build
goes to a temporary sibling directory and is renamed into place only when complete.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

RECIPE_DIR = Path(__file__).resolve().parent.parent / "images"
HOST_KEY_ALIAS = "testbed-guest"


class ImageError(Exception):
    """The image could not be built or is incomplete."""


@dataclass(frozen=True)
class Image:
    """A built guest image in the cache."""

    dir: Path

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @property
    def root_disk(self) -> Path:
        """Never written by a VM: each VM boots from its own qcow2 overlay."""
        return self.dir / "root.img"

    @property
    def client_key(self) -> Path:
        """Private ed25519 key authorized for root in the guest."""
        return self.dir / "keys" / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        """The guest's pinned host key, under the name HOST_KEY_ALIAS."""
        return self.dir / "keys" / "known_hosts"

    @property
    def recipe_hash(self) -> str:
        return self.dir.name

    def manifest(self) -> dict:
        return json.loads((self.dir / "manifest.json").read_text())

    def complete(self) -> bool:
        return all(
            p.is_file()
            for p in (self.kernel, self.initrd, self.root_disk, self.client_key, self.known_hosts,
                      self.dir / "manifest.json")
        )


def cache_root() -> Path:
    """$TESTBED_IMAGE_CACHE, else $XDG_CACHE_HOME/testbed/images (shared by all checkouts)."""
    env = os.environ.get("TESTBED_IMAGE_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "testbed" / "images"


def recipe_hash(recipe: Path = RECIPE_DIR) -> str:
    """Hash of every recipe file's relative path, mode and content (docs excluded)."""
    h = hashlib.sha256()
    for p in sorted(recipe.rglob("*")):
        if p.is_file() and p.suffix != ".md" and "cache" not in p.relative_to(recipe).parts:
            h.update(str(p.relative_to(recipe)).encode() + b"\0")
            h.update(b"x" if os.access(p, os.X_OK) else b"-")
            h.update(p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def current(recipe: Path = RECIPE_DIR) -> Image:
    """The image the current recipe describes (may not be built yet)."""
    return Image(cache_root() / recipe_hash(recipe))


def write_keys(keydir: Path) -> None:
    """Guest host key + client key, generated on the host so the host can pin the host key."""
    keydir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in ("ssh_host_ed25519_key", "id_ed25519"):
        key = Ed25519PrivateKey.generate()
        priv = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        pub = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        path = keydir / name
        path.write_bytes(priv)
        path.chmod(0o600)
        (keydir / f"{name}.pub").write_bytes(pub + f" testbed-{name}\n".encode())
        if name == "ssh_host_ed25519_key":
            (keydir / "known_hosts").write_bytes(f"{HOST_KEY_ALIAS} ".encode() + pub + b"\n")


def build(
    recipe: Path = RECIPE_DIR,
    *,
    force: bool = False,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> Image:
    """Build the image for `recipe` unless the cache already holds it; return it."""
    image = current(recipe)
    if image.complete() and not force:
        return image
    image.dir.parent.mkdir(parents=True, exist_ok=True)
    # One build at a time per recipe: a second run waits and then uses the first one's image,
    # so an image (and the keys a running guest is pinned to) is never replaced under it.
    with open(image.dir.with_name(f"{image.dir.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if image.complete() and not force:
            return image
        return _build_locked(image, recipe, log)


def _build_locked(image: Image, recipe: Path, log: Callable[[str], None]) -> Image:
    if os.geteuid() != 0:
        raise ImageError("building the guest image needs root (mmdebstrap --mode=root)")
    for tool in ("mmdebstrap", "mkfs.ext4", "cpio", "depmod"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            raise ImageError(f"building the guest image needs {tool} (run bin/bootstrap)")
    tmp = image.dir.with_name(f"{image.dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_keys(tmp / "keys")
        start = time.monotonic()
        log(f"image {image.recipe_hash}: building in {tmp}")
        proc = subprocess.Popen(
            [str(recipe / "build.sh"), str(tmp)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"},
        )
        assert proc.stdout is not None
        tail: list[str] = []
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail = (tail + [line])[-40:]
            if line.startswith("==>") or line.startswith("I:") or line.startswith("E:"):
                log(f"[{time.monotonic() - start:6.1f}s] {line}")
        if proc.wait() != 0:
            raise ImageError(f"images/build.sh failed (rc {proc.returncode}):\n" + "\n".join(tail))
        seconds = round(time.monotonic() - start, 1)
        manifest = {
            "recipe_hash": image.recipe_hash,
            "kernel_version": (tmp / "kernel-version").read_text().strip(),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "build_seconds": seconds,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if image.dir.exists():
            shutil.rmtree(image.dir)
        tmp.rename(image.dir)
        log(f"image {image.recipe_hash}: built in {seconds} s -> {image.dir}")
        return image
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def info(image: Image) -> dict:
    """What `testbed image info` shows."""
    out: dict = {"recipe_hash": image.recipe_hash, "dir": str(image.dir), "built": image.complete()}
    if image.complete():
        out.update(image.manifest())
        for name, p in (("kernel", image.kernel), ("initrd", image.initrd),
                        ("root_disk", image.root_disk)):
            out[name] = {"path": str(p), "bytes": p.stat().st_size}
    return out
