"""Helpers shared by the entry points; they live in funnel_jax.training.files (the library)."""

from funnel_jax.training.files import (  # noqa: F401 (re-exported for the commands and tests)
    ConfigError,
    load_json_object,
    save_tokenizer_atomic,
    write_json_atomic,
)
