"""llama.cpp's convert_hf_to_gguf.py, run in a process of its own: python -m job.llama_cpp CONVERTER_DIR ARGS...

Its own gguf-py must come before the gguf package the job reads GGUF base models with (an older one), hence the
process. One thing is answered for it: a tokenizer a run trained itself (the built-in model's) has a pre-tokenizer
hash no model on the Hub has, which the converter refuses; where that tokenizer splits text as GPT-2 does (byte-level
with GPT-2's pattern), llama.cpp's "gpt-2" pre-tokenizer is the same split.
"""

import json
import sys
from pathlib import Path


def splits_as_gpt2(model_dir: Path) -> bool:
    """Whether the tokenizer's pre-tokenizer is byte-level with GPT-2's pattern, and nothing else."""
    try:
        described = json.loads((model_dir / "tokenizer.json").read_text())
    except (OSError, ValueError):
        return False
    pre = described.get("pre_tokenizer") or {}
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True)


def main() -> None:
    converter, arguments = Path(sys.argv[1]), sys.argv[2:]
    sys.path.insert(0, str(converter))
    import convert_hf_to_gguf  # puts the converter's gguf-py first on the import path
    from conversion import base

    recognized = base.TextModel.get_vocab_base_pre

    def pre_tokenizer(self, tokenizer) -> str:
        try:
            return recognized(self, tokenizer)
        except NotImplementedError:
            if splits_as_gpt2(Path(self.dir_model)):
                return "gpt-2"
            raise

    base.TextModel.get_vocab_base_pre = pre_tokenizer
    sys.argv = [str(converter / "convert_hf_to_gguf.py"), *arguments]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
