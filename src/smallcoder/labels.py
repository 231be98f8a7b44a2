"""The label conventions that data code writes and the loss reads (no imports: both sides use it)."""

IGNORE_INDEX = -100  # a label position that trains nothing (prompt, padding); PyTorch's cross-entropy default
