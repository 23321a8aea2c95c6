"""Run llama.cpp's ``convert_hf_to_gguf.py`` with one change: a DeciLM checkpoint with a byte-level BPE
tokenizer gets the converter's own byte-level BPE vocabulary writer (``_set_vocab_gpt2``, which its
DeciLM class uses for LLaMA-3's 128,256 tokens only; for every other size it asks for a byte-fallback
tokenizer). The architecture and the tensors are the converter's; llama.cpp reads the vocabulary
independently of the architecture.

    python -m spap.io.llamacpp_shim CONVERTER [converter arguments...]
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    script = Path(argv[0])
    sys.path.insert(0, str(script.parent))
    sys.path.insert(1, str(script.parent / "gguf-py"))
    from conversion.deci import DeciModel  # the converter's package, from its directory

    DeciModel.set_vocab = DeciModel._set_vocab_gpt2
    sys.argv = [str(script), *argv[1:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
