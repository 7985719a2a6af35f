"""Convert an Orbax model directory back into a directory `transformers` loads directly.

    python -m convert.orbax_to_torch SRC DST [--dtype float32] [--model-class NAME] [--overwrite]

DST gets config.json (with `model_type` and `architectures`), model.safetensors (the
`transformers` state-dict layout; the tied `lm_head.weight` of FunnelForMaskedLM is left out as
`transformers` itself does) and the tokenizer files of SRC. `FunnelModel.from_pretrained(DST)` /
`AutoModel.from_pretrained(DST)` load it. DST is written atomically.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from convert import torch_to_orbax
from funnel_jax import checkpoint, weights
from funnel_jax.weights import WeightsError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def write_transformers_dir(directory: Path, module, params, dtype=None) -> None:
    """config.json + model.safetensors into an existing directory (numpy only, no torch)."""
    from safetensors.numpy import save_file

    state = weights.params_to_state_dict(params, module)
    if dtype is not None:
        state = {k: np.ascontiguousarray(v.astype(np.dtype(dtype))) for k, v in state.items()}
    floats = {str(v.dtype) for v in state.values() if np.issubdtype(v.dtype, np.floating)}
    config = module.config.replace(architectures=(type(module).__name__,)).to_dict()
    if len(floats) == 1:
        config["dtype"] = floats.pop()
    with open(directory / weights.CONFIG_NAME, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    save_file(state, str(directory / weights.SAFETENSORS_NAME), metadata={"format": "pt"})


def convert(src, dst, model_class=None, dtype=None, overwrite: bool = False, **hub_options) -> Path:
    """Write the Orbax model directory SRC (a path, or a Hub id holding config.json and
    params/; `hub_options`: revision, cache_dir, local_files_only, token) as a transformers
    directory DST. Returns DST."""
    from funnel_jax import hub

    src = hub.resolve_orbax_model_dir(src, **hub_options)
    dst = Path(dst)
    if not checkpoint.is_orbax_model_dir(src):
        raise FileNotFoundError(
            f"{src}: not an Orbax model directory (needs {weights.CONFIG_NAME} and "
            f"{checkpoint.PARAMS_DIR}/ written by convert.torch_to_orbax)"
        )
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass --overwrite to replace it)")
    module, params = checkpoint.load_model_dir(src, model_class=model_class)
    extra = [src / n for n in checkpoint.TOKENIZER_FILES if (src / n).is_file()]
    with checkpoint.atomic_directory(dst, overwrite=overwrite) as tmp:
        write_transformers_dir(tmp, module, params, dtype)
        for path in extra:
            shutil.copy2(path, tmp / path.name)
    return dst


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m convert.orbax_to_torch",
        description="Convert an Orbax model directory into a transformers directory.",
    )
    p.add_argument(
        "src", help="Orbax model directory (from convert.torch_to_orbax), or a Hub id of one"
    )
    p.add_argument("dst", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--model-class", help="class to write (default: the stored one)")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="cast (default: as stored)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    torch_to_orbax.add_hub_arguments(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        dst = convert(
            args.src,
            args.dst,
            model_class=args.model_class,
            dtype=None if args.dtype is None else DTYPES[args.dtype],
            overwrite=args.overwrite,
            **torch_to_orbax.hub_options(args),
        )
    except (WeightsError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {dst}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
