"""Helpers shared by the entry points; the library parts live in funnel_jax.training.files."""

import argparse

from funnel_jax.training.files import (  # noqa: F401 (re-exported for the commands and tests)
    ConfigError,
    load_json_object,
    save_tokenizer_atomic,
    write_json_atomic,
)


def add_mesh_arguments(p: argparse.ArgumentParser) -> None:
    """--mesh and the jax.distributed flags (the same for both commands)."""
    p.add_argument(
        "--mesh",
        default=None,
        help="device mesh, e.g. data=2,fsdp=2,tensor=2 (-1: the rest of the devices); default: "
        "data parallel over every device when there are several, none on one device",
    )
    p.add_argument("--coordinator-address", default=None, help="jax.distributed coordinator")
    p.add_argument("--num-processes", type=int, default=None, help="jax.distributed processes")
    p.add_argument("--process-id", type=int, default=None, help="this process's index")


def initialize_distributed(args: argparse.Namespace) -> None:
    """jax.distributed from the flags of add_mesh_arguments (or the environment)."""
    from funnel_jax import sharding

    sharding.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
