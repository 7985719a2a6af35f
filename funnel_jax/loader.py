"""The pretraining input pipeline over prepared ArrayRecord shards (funnel_jax/prepare.py): a
grain pipeline with a global shuffle by index, each process reading only its rows, and an exact,
process-count-independent position.

    train = PreparedBatches("data/wiki-128", split="train", global_batch=256, seed=0,
                            process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(train)      # int32 input_ids, token_type_ids, attention_mask [local_batch, L]
                             # and random_next [local_batch]; local_batch = global_batch / count
    extra = {"data": train.state()}         # JSON: into the training checkpoint
    train.restore(extra["data"])            # batches from there on are the same, bit for bit

Order. The split's N records form one endless stream of positions p = 0, 1, 2, ...; position p
reads record `perm_e(p mod N)` of epoch e = p // N, where `perm_e` is a keyed Feistel permutation
of [0, N) (cycle walking; keys from (seed, e)): each epoch is a fresh global shuffle computed
from the index alone, with no permutation array in memory and no pause between epochs (a batch
may hold the end of one epoch and the start of the next). Global batch t is the positions
[t * B, (t + 1) * B); process i of P reads the rows [i * B/P, (i + 1) * B/P) of it. The global
batches therefore do not depend on P, and the whole position is the step t: a run restored on
another number of processes continues with the same examples. `shuffle=False` reads the records
in order (the eval split).

Prefetch: the batches are read and decoded ahead by grain (`num_threads` threads over a buffer
of `prefetch` batches). The reading releases the GIL (ArrayRecord's C++ reader, numpy); grain's
multiprocess prefetch (`mp_prefetch`) is not offered: it needs absl flags parsed, which the
training entry points do not do.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from funnel_jax.prepare import MANIFEST, decode_records, read_manifest

__all__ = ["FeistelPermutation", "PreparedBatches", "read_manifest", "tokenizer_dir"]

BATCH_KEYS = ("input_ids", "token_type_ids", "attention_mask", "random_next")
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def tokenizer_dir(data_dir: str | os.PathLike) -> Path:
    """The tokenizer directory (`FunnelTokenizer.from_pretrained` reads it) of prepared data."""
    manifest = read_manifest(data_dir)
    return Path(data_dir) / manifest["tokenizer"]["path"]


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class FeistelPermutation:
    """A seeded permutation of [0, n) evaluated at any index: `perm(indices, epoch)`.

    A balanced Feistel network on the smallest even number of bits covering n (so its domain is
    below 4n) with 6 rounds keyed by (seed, epoch), and cycle walking: an output >= n is fed
    through again until it lands in [0, n). Memory is that of the index array asked for."""

    ROUNDS = 6

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self.n, self.seed = int(n), int(seed)
        bits = max(2, (self.n - 1).bit_length())
        bits += bits % 2
        self.half = np.uint64(bits // 2)
        self.low = np.uint64((1 << (bits // 2)) - 1)

    def _keys(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, int(epoch), 0xFE15])
        return rng.integers(0, 2**63, size=self.ROUNDS, dtype=np.uint64)

    def _network(self, x: np.ndarray, keys: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.low
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & self.low)
        return (left << self.half) | right

    def __call__(self, indices: np.ndarray, epoch: int) -> np.ndarray:
        idx = np.asarray(indices, np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"indices outside [0, {self.n})")
        keys = self._keys(epoch)
        with np.errstate(over="ignore"):
            y = self._network(idx.astype(np.uint64), keys)
            out = y >= np.uint64(self.n)
            while out.any():
                y[out] = self._network(y[out], keys)
                out = y >= np.uint64(self.n)
        return y.astype(np.int64)


class _ReadBatch:
    """grain map function: step t -> this process's decoded rows of global batch t."""

    def __init__(self, paths, shard_records, *, num_records, global_batch, row_offset,
                 local_batch, seq_len, dtype, pad_id, perm):  # fmt: skip
        self.paths = paths
        self.shard_records = list(shard_records)
        self.shard_starts = np.concatenate([[0], np.cumsum(shard_records)[:-1]]).astype(np.int64)
        self.num_records = num_records
        self.global_batch = global_batch
        self.row_offset = row_offset
        self.local_batch = local_batch
        self.seq_len = seq_len
        self.dtype = dtype
        self.pad_id = pad_id
        self.perm = perm
        self._readers = None
        self._lock = threading.Lock()

    def record_indices(self, step: int) -> np.ndarray:
        pos = step * self.global_batch + self.row_offset + np.arange(self.local_batch)
        epoch, within = np.divmod(pos, self.num_records)
        if self.perm is None:
            return within
        out = np.empty_like(within)
        for e in np.unique(epoch):
            sel = epoch == e
            out[sel] = self.perm(within[sel], int(e))
        return out

    def _open(self) -> None:
        """Open the shards (lazily: in the process that reads)."""
        from array_record.python.array_record_module import ArrayRecordReader

        with self._lock:
            if self._readers is not None:
                return
            # One reader a shard, no read-ahead (the access is random). grain's
            # ArrayRecordDataSource is not used: its resident memory grew by ~4 KB per record
            # read (273 MB after 60,000 reads here), a plain reader's stays flat.
            readers = [ArrayRecordReader(p, "readahead_buffer_size:0") for p in self.paths]
            for p, r, n in zip(self.paths, readers, self.shard_records, strict=True):
                if r.num_records() != n:
                    raise ValueError(f"{p}: holds {r.num_records()} records, the manifest says {n}")
            self._readers = readers

    def _read_records(self, indices: np.ndarray) -> list[bytes]:
        if self._readers is None:
            self._open()
        shard = np.searchsorted(self.shard_starts, indices, side="right") - 1
        out: list[bytes] = [b""] * len(indices)
        for k in np.unique(shard):
            at = np.flatnonzero(shard == k)
            recs = self._readers[k].read((indices[at] - self.shard_starts[k]).tolist())
            for i, rec in zip(at.tolist(), recs, strict=True):
                out[i] = rec
        return out

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        records = self._read_records(self.record_indices(int(step)))
        return decode_records(records, self.seq_len, self.dtype, self.pad_id)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_readers", "_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state, _readers=None, _lock=threading.Lock())


class PreparedBatches:
    """Endless, deterministic, resumable batches of a prepared split (see the module docstring).

    `global_batch` must be a multiple of `process_count`. `seq_len` / `truncate_stride` /
    `vocab_size`, when given, are checked against the manifest (a ValueError names the field and
    both values). `state()` is a small JSON dict; `restore(state)` continues from it on any
    number of processes (the global batch, seed, shuffle and data must be the same)."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        split: str = "train",
        global_batch: int,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        shuffle: bool = True,
        seq_len: int | None = None,
        truncate_stride: int | None = None,
        vocab_size: int | None = None,
        num_threads: int = 2,
        prefetch: int = 4,
    ):
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(self.data_dir)
        where = self.data_dir / MANIFEST
        if split not in self.manifest["splits"]:
            raise ValueError(f"{where}: no split {split!r} (has {sorted(self.manifest['splits'])})")
        info = self.manifest["splits"][split]
        checks = {
            "seq_len": (seq_len, self.manifest["seq_len"]),
            "truncate_stride": (truncate_stride, self.manifest["packing"]["truncate_stride"]),
        }
        for name, (want, have) in checks.items():
            if want is not None and int(want) != int(have):
                raise ValueError(
                    f"{where}: the data was prepared with {name}={have}, the model needs {want}; "
                    "prepare it again with that setting"
                )
        vocab = int(self.manifest["tokenizer"]["vocab_size"])
        if vocab_size is not None and vocab > int(vocab_size):
            raise ValueError(
                f"{where}: the data's tokenizer has {vocab} tokens, more than the model's "
                f"vocab_size={vocab_size}"
            )
        if global_batch < 1 or global_batch % process_count:
            raise ValueError(
                f"global_batch={global_batch} must be a positive multiple of process_count="
                f"{process_count}"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(
                f"process_index={process_index} must be in [0, process_count={process_count})"
            )
        self.num_records = int(info["records"])
        if self.num_records < global_batch:
            raise ValueError(
                f"{where}: the {split} split holds {self.num_records} examples, fewer than the "
                f"global batch {global_batch}; use more text or a smaller batch"
            )
        self.split = split
        self.global_batch = int(global_batch)
        self.local_batch = self.global_batch // int(process_count)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.seq_len = int(self.manifest["seq_len"])
        self.num_tokens = int(info["tokens"])
        self.tokenizer_dir = self.data_dir / self.manifest["tokenizer"]["path"]
        shards = [s for s in info["shards"] if s["records"] > 0]
        paths = [str((self.data_dir / s["path"]).resolve()) for s in shards]
        for p in paths:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{where}: shard {p} is missing")
        self._read = _ReadBatch(
            paths,
            [int(s["records"]) for s in shards],
            num_records=self.num_records,
            global_batch=self.global_batch,
            row_offset=self.process_index * self.local_batch,
            local_batch=self.local_batch,
            seq_len=self.seq_len,
            dtype=self.manifest["dtype"],
            pad_id=int(self.manifest["tokenizer"]["pad_id"]),
            perm=FeistelPermutation(self.num_records, self.seed) if self.shuffle else None,
        )
        self.num_threads, self.prefetch = num_threads, prefetch
        self._step = 0
        self._iter = None

    # ------------------------------------------------------------------ iteration

    def steps_per_epoch(self) -> float:
        return self.num_records / self.global_batch

    def _start(self) -> None:
        import grain

        ds = grain.MapDataset.range(self._step, 2**62).map(self._read)
        opts = grain.ReadOptions(num_threads=self.num_threads, prefetch_buffer_size=self.prefetch)
        self._iter = iter(ds.to_iter_dataset(opts))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iter is None:
            self._start()
        batch = next(self._iter)
        self._step += 1
        return batch

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch `step`, read directly (no prefetch, no state)."""
        return self._read(step)

    def take(self, n: int) -> list[dict[str, np.ndarray]]:
        return [next(self) for _ in range(n)]

    # ------------------------------------------------------------------ position

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "num_records": self.num_records,
            "tokenizer_sha256": self.manifest["tokenizer"]["sha256"],
            "global_batch": self.global_batch,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def state(self) -> dict[str, Any]:
        """The position after the batches returned so far (not those prefetched)."""
        return {"step": self._step, **self._fingerprint()}

    def restore(self, state: dict[str, Any]) -> None:
        expected = self._fingerprint()
        diff = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if diff or not isinstance(state.get("step"), int) or state["step"] < 0:
            details = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                "the saved data position belongs to another data setup "
                f"({details or 'step: ' + repr(state.get('step'))})"
            )
        self._step = int(state["step"])
        self.close()

    def close(self) -> None:
        """Stop the prefetch (a later `next` starts it again from the current position)."""
        it, self._iter = self._iter, None
        if it is not None and hasattr(it, "close"):
            it.close()
