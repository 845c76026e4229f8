"""job: fine-tune a causal code language model on your own repository with LoRA, LoRA+ or QLoRA."""

__version__ = "0.1.0"

# The process exit codes: the contract with supervisors (README, "Exit codes").
EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_BUDGET, EXIT_STOPPED = 0, 1, 2, 3, 75
