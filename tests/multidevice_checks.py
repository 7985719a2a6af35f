"""Mesh checks run in a subprocess with 8 simulated CPU devices (see tests/test_mesh.py).

For each mesh, one training step must give the loss and updated parameters of a single device,
and the parameters must be sharded as the logical-axis rules say. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import funnel_jax as fj  # noqa: E402
from funnel_jax import losses, sharding  # noqa: E402
from funnel_jax.dropout import dropout_key  # noqa: E402
from funnel_jax.optim import OptimizerConfig, make_optimizer  # noqa: E402
from funnel_jax.train_state import TrainState, jit_train_step, make_train_step  # noqa: E402

MESHES = {
    "data": "data=8",
    "fsdp": "fsdp=8",
    "tensor": "data=4,tensor=2",
    "mixed": "data=2,fsdp=2,tensor=2",
}


def setup(dropout_rng: str = "threefry"):
    config = fj.FunnelConfig(
        vocab_size=64,
        block_sizes=[1, 1, 1],
        d_model=32,
        n_head=4,
        d_head=8,
        d_inner=64,
        hidden_dropout=0.1,
        attention_dropout=0.1,
        dropout_rng=dropout_rng,
    )
    module = fj.FunnelForPreTraining(config=config)
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-3, total_steps=10, weight_decay=0.01))

    def loss_fn(params, batch, rng):
        out = module.apply(
            {"params": params},
            batch["input_ids"],
            batch["attention_mask"],
            batch["token_type_ids"],
            deterministic=False,
            rngs={"dropout": dropout_key(rng, dropout_rng)},
        )
        loss = losses.discriminator_loss(out.logits, batch["labels"], batch["attention_mask"])
        return loss, {}

    def init():
        return TrainState.create(fj.init_params(module, jax.random.PRNGKey(0)), tx, 1)

    rng = np.random.RandomState(0)
    batch = {
        "input_ids": rng.randint(0, 64, (8, 16)).astype(np.int32),
        "attention_mask": np.ones((8, 16), np.int32),
        "token_type_ids": np.zeros((8, 16), np.int32),
        "labels": rng.randint(0, 2, (8, 16)).astype(np.int32),
    }
    batch["attention_mask"][3, 12:] = 0
    return module, init, make_train_step(loss_fn, tx), batch


def main():
    assert jax.device_count() == 8, jax.devices()
    module, init, train_step, batch = setup()
    single_state, single_metrics = jax.jit(train_step)(init(), batch)
    single_params = jax.tree.map(np.asarray, single_state.params)
    report = {"devices": jax.device_count()}
    for name, spec in MESHES.items():
        mesh = sharding.make_mesh(spec)
        state, state_sh = sharding.create_sharded_state(init, module, mesh)
        with sharding.use_mesh(mesh):
            step = jit_train_step(train_step, shardings=(state_sh, sharding.batch_sharding(mesh)))
            new_state, metrics = step(state, sharding.shard_batch(batch, mesh))
        diff = max(
            float(np.max(np.abs(np.asarray(a) - b)))
            for a, b in zip(
                jax.tree.leaves(new_state.params), jax.tree.leaves(single_params), strict=True
            )
        )
        emb = new_state.params["funnel"]["embeddings"]["word_embeddings"]["embedding"]
        ffn = new_state.params["funnel"]["encoder"]["blocks_0_0"]["ffn"]["linear_1"]["kernel"]
        q = new_state.params["funnel"]["encoder"]["blocks_0_0"]["attention"]["q_head"]["kernel"]
        mu = jax.tree.leaves(new_state.opt_state)
        emb_mu = [x for x in mu if getattr(x, "shape", None) == emb.shape]
        report[name] = {
            "mesh": dict(mesh.shape),
            "loss": float(metrics["loss"]),
            "single_loss": float(single_metrics["loss"]),
            "max_param_diff": diff,
            "embedding_spec": str(emb.sharding.spec),
            "ffn_spec": str(ffn.sharding.spec),
            "q_spec": str(q.sharding.spec),
            "embedding_shard_shape": list(emb.addressable_shards[0].data.shape),
            "opt_state_embedding_specs": sorted({str(x.sharding.spec) for x in emb_mu}),
            "expected": {
                "embedding_spec": str(P("tensor", "fsdp")),
                "ffn_spec": str(P("fsdp", "tensor")),
                "q_spec": str(P("fsdp", "tensor", None)),
            },
        }
        if name == "mixed":
            report["restore"] = restore_elsewhere(new_state, module, init)
    report["hash_dropout"] = hash_dropout_on_meshes()
    report["finetune"] = finetune_on_mesh()
    report["finetune_init"] = finetune_from_file_on_mesh()
    print("RESULT " + json.dumps(report))


def hash_dropout_on_meshes():
    """The step with hashed dropout masks (dropout_rng="hash") on the mixed mesh (batch split 4
    ways, heads and FFN 2 ways) against one device, and its masks alone under several output
    shardings. (One mesh: the hashed step compiles slowly on CPU.)"""
    module, init, train_step, batch = setup("hash")
    single_state, single_metrics = jax.jit(train_step)(init(), batch)
    out = {}
    for name in ("mixed",):
        mesh = sharding.make_mesh(MESHES[name])
        state, state_sh = sharding.create_sharded_state(init, module, mesh)
        with sharding.use_mesh(mesh):
            step = jit_train_step(train_step, shardings=(state_sh, sharding.batch_sharding(mesh)))
            new_state, metrics = step(state, sharding.shard_batch(batch, mesh))
        out[name] = {
            "loss": float(metrics["loss"]),
            "single_loss": float(single_metrics["loss"]),
            "max_param_diff": max(
                float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(
                    jax.tree.leaves(new_state.params),
                    jax.tree.leaves(single_state.params),
                    strict=True,
                )
            ),
        }
    from jax.sharding import NamedSharding

    from funnel_jax.dropout import hash_keep_mask

    key = dropout_key(jax.random.key(7))
    draw = lambda k: hash_keep_mask(k, 0.9, (8, 4, 16, 32))  # noqa: E731
    ref = np.asarray(jax.jit(draw)(key))
    mesh = sharding.make_mesh("data=2,fsdp=4")
    specs = [P("data", "fsdp"), P(None, None, "data", "fsdp"), P(("data", "fsdp")), P(None, "fsdp")]
    out["mask_equal"] = {
        str(spec): bool(
            np.array_equal(
                np.asarray(jax.jit(draw, out_shardings=NamedSharding(mesh, spec))(key)), ref
            )
        )
        for spec in specs
    }
    return out


def finetune_on_mesh():
    """experiments.finetune on a mixed mesh: a learnable 2-class task (keyword present)."""
    import random
    import tempfile
    from pathlib import Path

    from experiments import finetune

    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega rho".split()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for name, n in (("train.jsonl", 192), ("dev.jsonl", 64)):
            with open(d / name, "w") as f:
                for i in range(n):
                    ws = [rng.choice(words) for _ in range(rng.randint(4, 8))]
                    if i % 2:
                        ws.insert(rng.randint(0, len(ws)), "great")
                    f.write(json.dumps({"text": " ".join(ws), "label": str(i % 2)}) + "\n")
        cfg = d / "tiny.json"
        cfg.write_text(
            json.dumps(
                dict(block_sizes=[1, 1], num_decoder_layers=1, d_model=32, n_head=2, d_head=16,
                     d_inner=64, hidden_dropout=0.0, attention_dropout=0.0)
            )
        )  # fmt: skip
        argv = [
            "--task", "classification", "--data-dir", str(d), "--model-config", str(cfg),
            "--output-dir", str(d / "out"), "--epochs", "4", "--max-seq-length", "32",
            "--learning-rate", "1e-3", "--batch-size", "16", "--no-progress", "--seed", "0",
            "--mesh", "data=2,fsdp=2,tensor=2",
        ]  # fmt: skip
        from funnel_jax.training import finetuning

        created = {}
        create_state = finetuning._create_state

        def recording_create_state(*a, **k):
            # Read the layout now: the train step donates (deletes) these buffers later.
            state, state_sh, put = create_state(*a, **k)
            # The FFN input kernel [d_model 32, d_inner 64] divides by every mesh axis (the
            # trained vocabulary, 83 rows, does not divide by tensor=2 and is replicated).
            ffn = state.params["funnel"]["encoder"]["blocks_0_0"]["ffn"]["linear_1"]["kernel"]
            mu = [
                x
                for p, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
                if "blocks_0_0" in jax.tree_util.keystr(p)
                and "linear_1" in jax.tree_util.keystr(p)
                and "kernel" in jax.tree_util.keystr(p)
            ]
            created.update(
                {
                    "created_ffn_spec": str(ffn.sharding.spec),
                    "created_ffn_shape": list(ffn.shape),
                    "created_ffn_shard_shape": list(ffn.addressable_shards[0].data.shape),
                    "created_opt_state_ffn_specs": sorted({str(x.sharding.spec) for x in mu}),
                    "created_devices_per_leaf": sorted(
                        {len(x.sharding.device_set) for x in jax.tree.leaves(state)}
                    ),
                }
            )
            return state, state_sh, put

        finetuning._create_state = recording_create_state
        try:
            result = finetune.run(argv)
        finally:
            finetuning._create_state = create_state
        return {**result, **created}


def finetune_from_file_on_mesh():
    """experiments.finetune --init DIR --mesh data=2,fsdp=2,tensor=2, one step: the TrainState
    as created (recorded in finetuning._create_state, before the step donates it) must hold
    every sharded leaf as shards of the shard shape on the 8 devices, the backbone's values
    equal to the weights written into DIR, the fresh head sharded as its rules say."""
    import random
    import tempfile
    from pathlib import Path

    from flax.traverse_util import flatten_dict

    from experiments import finetune
    from funnel_jax.checkpoint import save_model_dir
    from funnel_jax.models import FunnelForPreTraining, init_params
    from funnel_jax.tokenizer import FunnelTokenizer
    from funnel_jax.training import finetuning

    rng = random.Random(1)
    words = "alpha beta gamma delta epsilon zeta theta kappa great".split()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        with open(d / "train.jsonl", "w") as f:
            for i in range(32):
                ws = [rng.choice(words) for _ in range(6)]
                f.write(json.dumps({"text": " ".join(ws), "label": str(i % 2)}) + "\n")
        (d / "dev.jsonl").write_text((d / "train.jsonl").read_text())
        tok = FunnelTokenizer.train(iter([" ".join(words)] * 20), vocab_size=64, min_frequency=1)
        tok.save_pretrained(d / "tok")
        config = fj.FunnelConfig(
            vocab_size=64, block_sizes=[1, 1], num_decoder_layers=1, d_model=32, n_head=2,
            d_head=16, d_inner=64, hidden_dropout=0.0, attention_dropout=0.0,
        )  # fmt: skip
        module = FunnelForPreTraining(config=config)
        written = jax.tree.map(np.asarray, init_params(module, jax.random.PRNGKey(3)))
        save_model_dir(d / "init", module, written, extra_files=sorted((d / "tok").iterdir()))
        argv = [
            "--task", "classification", "--data-dir", str(d), "--init", str(d / "init"),
            "--output-dir", str(d / "out"), "--max-steps", "1", "--max-seq-length", "16",
            "--batch-size", "8", "--no-progress", "--mesh", "data=2,fsdp=2,tensor=2",
        ]  # fmt: skip
        seen = {}
        create_state = finetuning._create_state

        def layout(params):
            """(leaves not as 8 shards of their shard shape, leaves whose shards are smaller)."""
            bad, smaller = [], []
            for path, x in flatten_dict(params).items():
                want = x.sharding.shard_shape(x.shape)
                shapes = {tuple(s.data.shape) for s in x.addressable_shards}
                if shapes != {want} or len(x.addressable_shards) != 8:
                    bad.append(f"{'/'.join(path)} {x.shape}: {shapes} != {want}")
                if want != x.shape:
                    smaller.append("/".join(path))
            return bad, smaller

        def recording_create_state(module, params, *a, **k):
            # The parameters as placed (loaded from DIR, head initialised), before the state.
            seen["placed_bad_shards"], seen["placed_sharded"] = layout(params)
            state, state_sh, put = create_state(module, params, *a, **k)
            leaves = flatten_dict(state.params)
            bad_shards, sharded = layout(state.params)
            equal, compared = True, 0
            for path, x in leaves.items():
                if path[0] == "funnel":  # the backbone: the values written into DIR
                    ref = flatten_dict(written)[path]
                    equal = equal and bool(np.array_equal(np.asarray(x), ref))
                    compared += 1
            head = state.params["classifier"]
            seen.update(
                bad_shards=bad_shards,
                sharded=sharded,
                backbone_equal=equal,
                backbone_compared=compared,
                num_params=len(leaves),
                head_specs={
                    "/".join(p): str(v.sharding.spec) for p, v in flatten_dict(head).items()
                },
            )
            return state, state_sh, put

        finetuning._create_state = recording_create_state
        try:
            finetune.run(argv)
        finally:
            finetuning._create_state = create_state
        return seen


def restore_elsewhere(saved_state, module, init):
    """Save the 8-device state, restore it onto a 4-device and a 1-device mesh."""
    import tempfile

    from funnel_jax.checkpoint import TrainCheckpointer

    out = {}
    expected = jax.tree.map(np.asarray, saved_state)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = TrainCheckpointer(tmp, keep=2)
        ckpt.save(1, saved_state, extra={"data_position": 5})
        ckpt.wait()
        for label, devices in (("4 devices", jax.devices()[:4]), ("1 device", jax.devices()[:1])):
            mesh = sharding.make_mesh("fsdp=-1", devices=devices)
            abstract = jax.eval_shape(init)
            shardings = sharding.tree_shardings_like_params(
                abstract, sharding.param_shardings(module, mesh), mesh
            )
            target = jax.tree.map(
                lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                abstract,
                shardings,
            )
            state, extra = ckpt.restore(None, target)
            same = all(
                np.array_equal(np.asarray(a), b)
                for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(expected), strict=True)
            )
            emb = state.params["funnel"]["embeddings"]["word_embeddings"]["embedding"]
            out[label] = {
                "equal": bool(same),
                "extra": extra,
                "devices": len(emb.sharding.device_set),
            }
        ckpt.close()
    return out


if __name__ == "__main__":
    sys.exit(main())
