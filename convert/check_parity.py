"""Check that a `transformers` checkpoint gives the same outputs in PyTorch and in funnel-jax.

    python -m convert.check_parity SRC [--text "..." [--text-pair "..."]] [--atol 1e-5]
                                       [--model-class NAME] [--seq-len 32]

SRC is a `transformers` directory (or anything `convert.torch_to_orbax` reads, with --config).
Both sides run on the same inputs: random ids (two rows, the second padded, two segments with
`<cls>` as type 2) or the given text through the tokenizer stored beside the weights. Prints the
max-abs difference of every output (logits / last_hidden_state, each hidden state, each
attention map) and exits with status 1 when any exceeds --atol.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np

from convert import torch_to_orbax
from funnel_jax.models import FunnelForMultipleChoice
from funnel_jax.weights import WeightsError


def sample_inputs(config, seq_len: int | None = None, batch: int = 2, seed: int = 0):
    """Random ids [batch, L]: row 1 padded (last third masked), segments <cls>=2, A=0, B=1."""
    length = max(seq_len or 0, config.min_seq_len(), 12)
    rs = np.random.RandomState(seed)
    ids = rs.randint(0, config.vocab_size, size=(batch, length)).astype(np.int64)
    mask = np.ones((batch, length), np.int64)
    if batch > 1:
        mask[1, length - length // 3 :] = 0
        if config.pad_token_id is not None:
            ids[1, length - length // 3 :] = config.pad_token_id
    types = np.zeros((batch, length), np.int64)
    types[:, length // 2 :] = 1
    types[:, 0] = 2
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def text_inputs(folder: Path, text: str, text_pair: str | None = None):
    try:
        from funnel_jax.tokenizer import FunnelTokenizer
    except ImportError as e:  # pragma: no cover
        raise RuntimeError(f"--text needs funnel_jax.tokenizer ({e})") from None
    tok = FunnelTokenizer.from_pretrained(folder)
    enc = tok(text, text_pair, return_tensors="np")
    return {
        k: np.asarray(enc[k]).astype(np.int64)
        for k in ("input_ids", "attention_mask", "token_type_ids")
    }


def _outputs(out, names) -> dict[str, np.ndarray]:
    """Flatten a model output into {name: array} (torch or jax values)."""
    res = {}

    def to_np(x):
        if hasattr(x, "detach"):
            x = x.detach().float().numpy()
        return np.asarray(x, dtype=np.float32)

    for name in names:
        value = getattr(out, name, None)
        if value is not None:
            res[name] = to_np(value)
    for group in ("hidden_states", "attentions"):
        values = getattr(out, group, None)
        for i, value in enumerate(values or ()):
            res[f"{group}[{i}]"] = to_np(value)
    return res


def _torch_model(transformers, torch, cls_name, src, config_path):
    """The reference model in float32: from_pretrained, or built from a bare weights file."""
    cls = getattr(transformers, cls_name)
    if Path(src).is_dir() and config_path is None:
        return cls.from_pretrained(src, dtype=torch.float32)
    files, config_path, _ = torch_to_orbax.find_weights(src, config_path)
    model = cls(transformers.FunnelConfig.from_json_file(str(config_path))).float()
    state = torch_to_orbax.LazyStateDict(files, progress=False)
    sd = {k: torch.from_numpy(np.asarray(state[k], dtype=np.float32)) for k in state}
    if not any(k.startswith("funnel.") for k in sd) and any(
        k.startswith("funnel.") for k in model.state_dict()
    ):
        sd = {f"funnel.{k}": v for k, v in sd.items()}
    model.load_state_dict(sd, strict=False)
    model.tie_weights()
    return model


def compare(src, model_class=None, config_path=None, inputs=None, seq_len=None, **hub_options):
    """{output name: max abs difference} between PyTorch and funnel-jax on `inputs`.

    SRC is a path or a Hub id (`hub_options`: revision, cache_dir, local_files_only, token);
    both sides read the same fetched files.
    """
    import torch
    import transformers

    module, params, folder = torch_to_orbax.load_flax(src, config_path, model_class, **hub_options)
    if not Path(src).exists():  # a Hub id: the reference reads the same snapshot
        src = folder
    cls_name = type(module).__name__
    if inputs is None:
        inputs = sample_inputs(module.config, seq_len)
    if isinstance(module, FunnelForMultipleChoice) and inputs["input_ids"].ndim == 2:
        inputs = {k: np.stack([v, v[::-1]], axis=1) for k, v in inputs.items()}

    ref_model = _torch_model(transformers, torch, cls_name, src, config_path).eval()
    with torch.no_grad():
        ref = ref_model(
            **{k: torch.from_numpy(v) for k, v in inputs.items()},
            output_hidden_states=True,
            output_attentions=True,
        )
    # One compiled forward: faster than op-by-op execution for a single call.
    forward = jax.jit(
        lambda p, ids, mask, types: module.apply(
            {"params": p},
            ids,
            attention_mask=mask,
            token_type_ids=types,
            output_hidden_states=True,
            output_attentions=True,
        )
    )
    out = forward(params, inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"])
    names = ("logits", "start_logits", "end_logits", "last_hidden_state")
    a, b = _outputs(ref, names), _outputs(out, names)
    if set(a) != set(b):
        raise RuntimeError(f"the outputs differ in kind: PyTorch {sorted(a)} vs JAX {sorted(b)}")
    diffs = {}
    for name in a:
        if a[name].shape != b[name].shape:
            raise RuntimeError(
                f"{name}: PyTorch shape {a[name].shape} vs JAX shape {b[name].shape}"
            )
        diffs[name] = float(np.max(np.abs(a[name] - b[name]))) if a[name].size else 0.0
    return cls_name, diffs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m convert.check_parity",
        description="Compare a transformers checkpoint in PyTorch and in funnel-jax.",
    )
    p.add_argument("src", help="transformers directory, Hub id, or a weights file with --config")
    p.add_argument("--config", help="config.json for a bare weights file")
    p.add_argument("--model-class", help="class to compare (default: config architectures)")
    p.add_argument("--text", help="text to encode with the tokenizer stored beside the weights")
    p.add_argument("--text-pair", help="second segment for --text")
    p.add_argument("--seq-len", type=int, default=None, help="length of the random inputs")
    p.add_argument("--atol", type=float, default=1e-5, help="largest allowed max-abs difference")
    torch_to_orbax.add_hub_arguments(p)
    args = p.parse_args(argv)
    hub = torch_to_orbax.hub_options(args)
    try:
        inputs = None
        if args.text is not None:
            _, _, folder = torch_to_orbax.find_weights(args.src, args.config, **hub)
            inputs = text_inputs(folder, args.text, args.text_pair)
        cls_name, diffs = compare(
            args.src, args.model_class, args.config, inputs, args.seq_len, **hub
        )
    except (WeightsError, ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    width = max(len(k) for k in diffs)
    print(f"{cls_name}: max-abs difference PyTorch vs JAX (atol {args.atol:g})")
    worst = 0.0
    for name, d in diffs.items():
        flag = "" if d <= args.atol else "  FAIL"
        print(f"  {name:<{width}}  {d:.3e}{flag}")
        worst = max(worst, d)
    ok = worst <= args.atol
    print(f"{'OK' if ok else 'FAIL'}: worst {worst:.3e}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
