"""job: fine-tune a causal code language model on your own repository with LoRA, LoRA+ or QLoRA."""

__version__ = "0.1.0"
