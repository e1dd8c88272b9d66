"""The tiny byte-level CLIP tokenizer of `sid_jax.data.byte_tokenizer`, under its test name."""

from sid_jax.data.byte_tokenizer import (BOS, BOS_ID, EOS, EOS_ID, VOCAB_SIZE,  # noqa: F401
                                         byte_symbols, write_tiny_clip_tokenizer)
