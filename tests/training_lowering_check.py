"""The pretraining step as the library runs it on a data=2,fsdp=2,tensor=2 mesh of 8 simulated
CPU devices (a subprocess of tests/test_training.py): the lowered program must hold the model's
activation sharding constraints; the same step traced outside the logical-axis rules (the bug
of issue 15) must hold none. Prints one JSON line "RESULT {...}".
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from funnel_jax import data as data_lib  # noqa: E402
from funnel_jax.tokenizer import FunnelTokenizer  # noqa: E402
from funnel_jax.training import load_pretrain_config, loop, pretrain  # noqa: E402

# A sharding constraint in the lowered program: Shardy's op, or GSPMD's custom call.
SHARDY = re.compile(r"sdy\.sharding_constraint %\S+ (<[^>]*>)")
GSPMD = re.compile(r"@Sharding\(.*?mhlo\.sharding = \"([^\"]*)\"")


def constraints(text: str) -> list[str]:
    """The shardings of the program's sharding constraints, e.g. '<@mesh, [{"data", "fsdp"},
    {}, {}]>' for a [batch, length, embed] activation split over data x fsdp."""
    return [m.group(1) for m in SHARDY.finditer(text)] + [m.group(1) for m in GSPMD.finditer(text)]


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    docs = data_lib.stdlib_corpus()[:60]
    tok = FunnelTokenizer.train(iter(docs), vocab_size=300)
    tok.save_pretrained(tmp / "tok")
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    cfg = load_pretrain_config(
        "tiny",
        [
            "model.block_sizes=[1,1]",
            "model.num_decoder_layers=1",
            "model.d_model=32",
            "model.n_head=4",
            "model.d_head=8",
            "model.d_inner=64",
            "data.seq_len=32",
            "data.batch_size=8",
            "data.eval_batches=1",
            "data.eval_fraction=0.2",
            "train.steps=2",
            "optimizer.warmup_steps=1",
            "train.log_every=1",
        ],
    ).replace(corpus=(str(corpus),), tokenizer=str(tmp / "tok"), mesh="data=2,fsdp=2,tensor=2")

    seen = []
    lower = loop.lower_step

    def recording_lower(step_fn, state, batch, mesh=None):
        lowered = lower(step_fn, state, batch, mesh)
        seen.append((step_fn, state, batch, lowered.as_text()))
        return lowered

    loop.lower_step = recording_lower
    summary = pretrain(cfg, tmp / "run", stop_after=1, progress=False)
    step_fn, state, batch, text = seen[0]
    # The broken variant: the same jitted step traced without the mesh and the rules.
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), (state, batch)
    )
    broken = step_fn.lower(*abstract).as_text()
    print(
        "RESULT "
        + json.dumps(
            {
                "stopped_at": summary.get("stopped_at"),
                "mesh_constraints": constraints(text),
                "broken_constraints": constraints(broken),
                "batch_sharding": str(batch["input_ids"].sharding.spec),
            }
        )
    )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
