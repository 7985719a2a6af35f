"""WordPiece tokenizer for the Funnel Transformer, built on the `tokenizers` library.

`FunnelTokenizer` reproduces what `transformers.FunnelTokenizerFast` (in transformers 5.x simply
`FunnelTokenizer`) builds from a WordPiece ``vocab.txt``:

* normalizer: ``BertNormalizer(clean_text, handle_chinese_chars, strip_accents, lowercase)``
  (``strip_accents=None`` follows ``lowercase``),
* pre-tokenizer: ``BertPreTokenizer``,
* model: ``WordPiece`` with the ``##`` prefix, unknown token ``<unk>`` and
  ``max_input_chars_per_word=100``,
* post-processor: ``<cls>:2 $A:0 <sep>:0 $B:1 <sep>:1`` (Funnel gives ``<cls>`` the token type
  id 2),
* decoder: ``WordPiece`` (``##`` prefix, with cleanup),
* the seven special tokens registered as special added tokens (not normalized), so that a
  literal ``"<mask>"`` in the text becomes the mask token.

Only `tokenizers`, numpy and the standard library are used at run time.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

__all__ = ["BatchEncoding", "FunnelTokenizer"]

# Order used by transformers for `all_special_tokens` / `all_special_ids`, and in which special
# tokens missing from a vocabulary get appended to it.
SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
DEFAULT_SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "cls_token": "<cls>",
    "sep_token": "<sep>",
    "mask_token": "<mask>",
    "bos_token": "<s>",
    "eos_token": "</s>",
}
# Order of the special tokens at the start of a freshly trained vocabulary (ids 0..6), the same
# as the reference's default vocabulary.
TRAIN_SPECIAL_ORDER = (
    "pad_token",
    "unk_token",
    "cls_token",
    "sep_token",
    "mask_token",
    "bos_token",
    "eos_token",
)
# Funnel checkpoints have 512 position embeddings (and their tokenizer configs say 512).
DEFAULT_MODEL_MAX_LENGTH = 512
WORDPIECE_PREFIX = "##"
MAX_INPUT_CHARS_PER_WORD = 100
CLS_TOKEN_TYPE_ID = 2
# Like transformers: a model_max_length above this means "no limit".
_LARGE_INTEGER = int(1e20)

TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.txt"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

_TRUNCATION_STRATEGIES = ("longest_first", "only_first", "only_second")
_PADDING_STRATEGIES = ("longest", "max_length")


class BatchEncoding(dict):
    """The output of `FunnelTokenizer.__call__`: a dict of arrays (or lists).

    Keys are also readable as attributes (``enc.input_ids``). ``encodings`` holds the underlying
    `tokenizers.Encoding` objects (one per output row), e.g. for ``word_ids()`` or
    ``char_to_token()`` in question answering.
    """

    def __init__(self, data: dict[str, Any], encodings: list | None = None):
        super().__init__(data)
        self.encodings = encodings

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def word_ids(self, batch_index: int = 0) -> list[int | None]:
        """Word index of each token of row ``batch_index`` (None for special/padding tokens)."""
        if self.encodings is None:
            raise ValueError("word_ids() needs the encodings, which this BatchEncoding lacks")
        return self.encodings[batch_index].word_ids


def _token_str(value: Any, default: str) -> str:
    """A special token as saved by transformers: a string or an AddedToken dict."""
    if value is None:
        return default
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"cannot read a special token from {value!r}")


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def _type_name(x: Any) -> str:
    return type(x).__name__


class FunnelTokenizer:
    """Funnel Transformer WordPiece tokenizer (``<cls> A <sep> B <sep>``).

    Build one with `from_vocab`, `from_pretrained` or `train`. Calling it encodes a string, a pair
    of strings, or a batch of either, and always returns ``input_ids``, ``token_type_ids`` and
    ``attention_mask`` (numpy int32 arrays by default).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        do_lower_case: bool = True,
        strip_accents: bool | None = None,
        tokenize_chinese_chars: bool = True,
        clean_text: bool = True,
        model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
        padding_side: str = "right",
        truncation_side: str = "right",
        **special_tokens: str,
    ):
        """Wrap a `tokenizers.Tokenizer` whose model is a WordPiece vocabulary.

        The normalizer, pre-tokenizer, decoder and post-processor are (re)set to the Funnel ones
        given by the flags; the special tokens are registered. Prefer the ``from_*`` constructors.
        """
        unknown = set(special_tokens) - set(DEFAULT_SPECIAL_TOKENS)
        if unknown:
            raise TypeError(f"unexpected keyword argument(s): {sorted(unknown)}")
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(
                f"tokenizer must be a tokenizers.Tokenizer, got {_type_name(tokenizer)}"
            )
        if not isinstance(tokenizer.model, WordPiece):
            raise ValueError(
                f"FunnelTokenizer needs a WordPiece model, got {_type_name(tokenizer.model)}"
            )
        for side_name, side in (
            ("padding_side", padding_side),
            ("truncation_side", truncation_side),
        ):
            if side not in ("right", "left"):
                raise ValueError(f"{side_name} must be 'right' or 'left', got {side!r}")
        self._special = {
            k: str(special_tokens.get(k) or v) for k, v in DEFAULT_SPECIAL_TOKENS.items()
        }
        self.do_lower_case = bool(do_lower_case)
        self.strip_accents = strip_accents
        self.tokenize_chinese_chars = bool(tokenize_chinese_chars)
        self.clean_text = bool(clean_text)
        self.model_max_length = int(model_max_length)
        self.padding_side = padding_side
        self.truncation_side = truncation_side

        tok = tokenizer
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=self.clean_text,
            handle_chinese_chars=self.tokenize_chinese_chars,
            strip_accents=strip_accents,
            lowercase=self.do_lower_case,
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix=WORDPIECE_PREFIX)
        tok.no_truncation()
        tok.no_padding()
        tok.encode_special_tokens = False
        # Special tokens: matched in the raw text before normalization; ids from the vocabulary,
        # and those missing from it appended in transformers' order.
        tok.add_special_tokens(
            [
                AddedToken(self._special[k], special=True, normalized=False)
                for k in SPECIAL_TOKEN_KEYS
            ]
        )
        self._tok = tok
        self._ids = {k: tok.token_to_id(v) for k, v in self._special.items()}
        cls, sep = self._special["cls_token"], self._special["sep_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls}:{CLS_TOKEN_TYPE_ID} $A:0 {sep}:0",
            pair=f"{cls}:{CLS_TOKEN_TYPE_ID} $A:0 {sep}:0 $B:1 {sep}:1",
            special_tokens=[(cls, self._ids["cls_token"]), (sep, self._ids["sep_token"])],
        )
        self._n_special = (
            tok.num_special_tokens_to_add(False),
            tok.num_special_tokens_to_add(True),
        )
        self._warned_too_long = False

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_vocab(
        cls,
        path: str | os.PathLike,
        lowercase: bool = True,
        *,
        strip_accents: bool | None = None,
        tokenize_chinese_chars: bool = True,
        clean_text: bool = True,
        model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
        **special_tokens: str,
    ) -> FunnelTokenizer:
        """Build from a WordPiece ``vocab.txt`` (one token per line, line number = id)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            raise IsADirectoryError(
                f"vocabulary path {path!r} is a directory; use FunnelTokenizer.from_pretrained"
            )
        if not os.path.isfile(path):
            raise FileNotFoundError(f"WordPiece vocabulary file not found: {path!r}")
        vocab = WordPiece.read_file(path)
        if not vocab:
            raise ValueError(f"WordPiece vocabulary file {path!r} is empty")
        return cls._from_vocab_dict(
            vocab,
            source=path,
            do_lower_case=lowercase,
            strip_accents=strip_accents,
            tokenize_chinese_chars=tokenize_chinese_chars,
            clean_text=clean_text,
            model_max_length=model_max_length,
            **special_tokens,
        )

    @classmethod
    def _from_vocab_dict(cls, vocab: dict[str, int], source: str, **kwargs) -> FunnelTokenizer:
        unk = str(kwargs.get("unk_token") or DEFAULT_SPECIAL_TOKENS["unk_token"])
        if unk not in vocab:
            raise ValueError(
                f"the vocabulary from {source!r} has no entry for the unknown token {unk!r}; "
                "WordPiece needs it for out-of-vocabulary words"
            )
        model = WordPiece(
            vocab,
            unk_token=unk,
            continuing_subword_prefix=WORDPIECE_PREFIX,
            max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD,
        )
        return cls(Tokenizer(model), **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        **overrides: Any,
    ) -> FunnelTokenizer:
        """Load from a directory holding ``tokenizer.json`` or ``vocab.txt``, or a Hub id.

        ``tokenizer_config.json`` (and ``special_tokens_map.json``), when present, give the
        lowercasing / accent / Chinese-character flags, the special tokens and
        ``model_max_length``. Keyword ``overrides`` win over the files. A ``directory`` that
        does not exist locally is taken as a Hugging Face Hub id ("funnel-transformer/small"):
        only the tokenizer files are fetched with huggingface_hub (``revision``,
        ``cache_dir``, ``local_files_only``, ``token``, HF_HUB_OFFLINE / HF_HUB_CACHE; see
        funnel_jax.hub).
        """
        from funnel_jax import hub

        if not hub.is_local(directory) and hub.looks_like_repo_id(os.fspath(directory)):
            directory = hub.resolve_tokenizer_dir(
                directory,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                token=token,
            )
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise FileNotFoundError(
                f"tokenizer directory not found: {directory!r} (from_pretrained reads a local "
                "directory; for a single vocab.txt use FunnelTokenizer.from_vocab)"
            )
        config: dict[str, Any] = {}
        special_map_path = os.path.join(directory, SPECIAL_TOKENS_MAP_FILE)
        if os.path.isfile(special_map_path):
            config.update(_read_json(special_map_path))
        config_path = os.path.join(directory, CONFIG_FILE)
        if os.path.isfile(config_path):
            config.update(_read_json(config_path))
        config.update(overrides)

        kwargs: dict[str, Any] = {
            k: _token_str(config.get(k), v) for k, v in DEFAULT_SPECIAL_TOKENS.items()
        }
        mml = config.get("model_max_length")
        kwargs["model_max_length"] = DEFAULT_MODEL_MAX_LENGTH if mml is None else int(mml)
        for side in ("padding_side", "truncation_side"):
            if config.get(side) in ("left", "right"):
                kwargs[side] = config[side]

        flags = {
            "do_lower_case": config.get("do_lower_case", config.get("lowercase")),
            "strip_accents": config.get("strip_accents"),
            "tokenize_chinese_chars": config.get("tokenize_chinese_chars"),
            "clean_text": config.get("clean_text"),
        }
        json_path = os.path.join(directory, TOKENIZER_FILE)
        vocab_path = os.path.join(directory, VOCAB_FILE)
        if os.path.isfile(json_path):
            tok = Tokenizer.from_file(json_path)
            if not isinstance(tok.model, WordPiece):
                raise ValueError(
                    f"{json_path} holds a {_type_name(tok.model)} model; Funnel uses WordPiece"
                )
            # Flags absent from the config are read from the file's BertNormalizer.
            norm = json.loads(tok.to_str()).get("normalizer") or {}
            if norm.get("type") == "BertNormalizer":
                from_json = {
                    "do_lower_case": norm.get("lowercase"),
                    "strip_accents": norm.get("strip_accents"),
                    "tokenize_chinese_chars": norm.get("handle_chinese_chars"),
                    "clean_text": norm.get("clean_text"),
                }
                for k, v in from_json.items():
                    if k not in config and not (k == "do_lower_case" and "lowercase" in config):
                        flags[k] = v
            defaults = {"do_lower_case": True, "tokenize_chinese_chars": True, "clean_text": True}
            for k, v in defaults.items():
                if flags[k] is None:
                    flags[k] = v
            return cls(tok, **flags, **kwargs)
        if os.path.isfile(vocab_path):
            lowercase = True if flags["do_lower_case"] is None else flags["do_lower_case"]
            return cls.from_vocab(
                vocab_path,
                lowercase=lowercase,
                strip_accents=flags["strip_accents"],
                tokenize_chinese_chars=(
                    True
                    if flags["tokenize_chinese_chars"] is None
                    else flags["tokenize_chinese_chars"]
                ),
                clean_text=True if flags["clean_text"] is None else flags["clean_text"],
                **kwargs,
            )
        raise FileNotFoundError(
            f"neither {TOKENIZER_FILE} nor {VOCAB_FILE} found in tokenizer directory {directory!r}"
        )

    def save_pretrained(self, directory: str | os.PathLike) -> tuple[str, ...]:
        """Write tokenizer.json, vocab.txt, tokenizer_config.json and special_tokens_map.json.

        The directory loads with `FunnelTokenizer.from_pretrained` and with transformers'
        ``AutoTokenizer.from_pretrained`` / ``FunnelTokenizerFast.from_pretrained``.
        """
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        paths = tuple(
            os.path.join(directory, name)
            for name in (CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE, TOKENIZER_FILE, VOCAB_FILE)
        )
        config_path, special_path, json_path, vocab_path = paths

        clean = Tokenizer.from_str(self._tok.to_str())
        clean.no_truncation()
        clean.no_padding()
        clean.save(json_path)

        vocab = self._tok.get_vocab(with_added_tokens=False)
        by_id = sorted(vocab.items(), key=lambda kv: kv[1])
        if [i for _, i in by_id] != list(range(len(by_id))):
            raise ValueError(
                "the WordPiece vocabulary ids are not contiguous; cannot write vocab.txt"
            )
        with open(vocab_path, "w", encoding="utf-8") as f:
            for token, _ in by_id:
                f.write(token + "\n")

        special_map = {k: self._special[k] for k in sorted(self._special)}
        config = {
            "tokenizer_class": "FunnelTokenizer",
            "do_lower_case": self.do_lower_case,
            "strip_accents": self.strip_accents,
            "tokenize_chinese_chars": self.tokenize_chinese_chars,
            "clean_text": self.clean_text,
            "wordpieces_prefix": WORDPIECE_PREFIX,
            "model_max_length": self.model_max_length,
            "padding_side": self.padding_side,
            "truncation_side": self.truncation_side,
            # Our decode already uses the WordPiece decoder's cleanup; don't clean twice.
            "clean_up_tokenization_spaces": False,
            **special_map,
        }
        for path, data in ((config_path, config), (special_path, special_map)):
            with open(path, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, ensure_ascii=False)
                f.write("\n")
        return paths

    @classmethod
    def train(
        cls,
        files_or_iterator: str | os.PathLike | Iterable,
        vocab_size: int,
        lowercase: bool = True,
        min_frequency: int = 2,
        *,
        strip_accents: bool | None = None,
        tokenize_chinese_chars: bool = True,
        clean_text: bool = True,
        limit_alphabet: int | None = None,
        model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
        show_progress: bool = False,
    ) -> FunnelTokenizer:
        """Train a new WordPiece vocabulary, deterministically (funnel_jax/vocab.py: the algorithm
        of tokenizers' WordPieceTrainer with ties broken in a fixed order, so the same texts and
        settings give a byte-identical vocab.txt in every process).

        ``files_or_iterator`` is a text file path, a list of paths, or an iterable of strings
        (or of lists of strings). The Funnel special tokens take ids 0..6: ``<pad> <unk> <cls>
        <sep> <mask> <s> </s>``. Texts are normalized and pre-tokenized exactly as when encoding.
        Files are read as UTF-8, one text a line. ``show_progress`` is accepted and ignored.
        """
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise TypeError(f"vocab_size must be an int, got {_type_name(vocab_size)}")
        specials = [DEFAULT_SPECIAL_TOKENS[k] for k in TRAIN_SPECIAL_ORDER]
        if vocab_size <= len(specials):
            raise ValueError(
                f"vocab_size={vocab_size} must be larger than the {len(specials)} special tokens"
            )
        files = cls._as_files(files_or_iterator)
        normalizer = normalizers.BertNormalizer(
            clean_text=clean_text,
            handle_chinese_chars=tokenize_chinese_chars,
            strip_accents=strip_accents,
            lowercase=lowercase,
        )
        from funnel_jax.vocab import count_words, train_wordpiece_vocab

        def training_texts(source):
            if files is not None:
                for path in source:
                    with open(path, encoding="utf-8") as f:
                        yield from f
                return
            for item in source:
                if isinstance(item, str):
                    yield item
                else:
                    yield from item

        texts = training_texts(files if files is not None else files_or_iterator)
        counts = count_words(texts, normalizer, pre_tokenizers.BertPreTokenizer())
        tokens = train_wordpiece_vocab(
            counts,
            vocab_size,
            special_tokens=specials,
            min_frequency=min_frequency,
            limit_alphabet=limit_alphabet,
            prefix=WORDPIECE_PREFIX,
        )
        vocab = {t: i for i, t in enumerate(tokens)}
        return cls._from_vocab_dict(
            vocab,
            source="training",
            do_lower_case=lowercase,
            strip_accents=strip_accents,
            tokenize_chinese_chars=tokenize_chinese_chars,
            clean_text=clean_text,
            model_max_length=model_max_length,
        )

    @staticmethod
    def _as_files(obj: Any) -> list[str] | None:
        """The file list when ``obj`` names files, None when it is an iterable of texts."""
        if isinstance(obj, (str, os.PathLike)):
            candidates = [obj]
        elif (
            isinstance(obj, (list, tuple))
            and obj
            and all(
                isinstance(p, os.PathLike) or (isinstance(p, str) and os.path.isfile(p))
                for p in obj
            )
        ):
            candidates = list(obj)
        elif isinstance(obj, (bytes, dict)) or not isinstance(obj, Iterable):
            raise TypeError(
                "files_or_iterator must be a path, a list of paths or an iterable of strings, "
                f"got {_type_name(obj)}"
            )
        else:
            return None
        files = [os.fspath(p) for p in candidates]
        for p in files:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"training file not found: {p!r}")
        return files

    # ------------------------------------------------------------------ vocabulary

    @property
    def backend_tokenizer(self) -> Tokenizer:
        """The underlying `tokenizers.Tokenizer` (its truncation/padding are set per call)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Size of the WordPiece vocabulary, without added tokens (like transformers)."""
        return self._tok.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        """Size of the full vocabulary, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {k: self._special[k] for k in SPECIAL_TOKEN_KEYS}

    @property
    def all_special_tokens(self) -> list[str]:
        return [self._special[k] for k in SPECIAL_TOKEN_KEYS]

    @property
    def all_special_ids(self) -> list[int]:
        return [self._ids[k] for k in SPECIAL_TOKEN_KEYS]

    cls_token = property(lambda self: self._special["cls_token"])
    sep_token = property(lambda self: self._special["sep_token"])
    pad_token = property(lambda self: self._special["pad_token"])
    unk_token = property(lambda self: self._special["unk_token"])
    mask_token = property(lambda self: self._special["mask_token"])
    bos_token = property(lambda self: self._special["bos_token"])
    eos_token = property(lambda self: self._special["eos_token"])
    cls_token_id = property(lambda self: self._ids["cls_token"])
    sep_token_id = property(lambda self: self._ids["sep_token"])
    pad_token_id = property(lambda self: self._ids["pad_token"])
    unk_token_id = property(lambda self: self._ids["unk_token"])
    mask_token_id = property(lambda self: self._ids["mask_token"])
    bos_token_id = property(lambda self: self._ids["bos_token"])
    eos_token_id = property(lambda self: self._ids["eos_token"])

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return self._n_special[bool(pair)]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Token(s) to id(s); unknown tokens map to ``unk_token_id``."""
        unk = self._ids["unk_token"]
        if isinstance(tokens, str):
            i = self._tok.token_to_id(tokens)
            return unk if i is None else i
        out = []
        for t in tokens:
            if not isinstance(t, str):
                raise TypeError(f"tokens must be str, got {_type_name(t)}")
            i = self._tok.token_to_id(t)
            out.append(unk if i is None else i)
        return out

    def convert_ids_to_tokens(
        self, ids: int | Sequence[int] | np.ndarray, skip_special_tokens: bool = False
    ) -> str | list[str]:
        if isinstance(ids, (int, np.integer)):
            return self._tok.id_to_token(int(ids))
        ids = self._as_id_list(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else ()
        return [self._tok.id_to_token(i) for i in ids if i not in skip]

    def __repr__(self) -> str:
        return (
            f"FunnelTokenizer(vocab_size={self.vocab_size}, do_lower_case={self.do_lower_case}, "
            f"strip_accents={self.strip_accents}, model_max_length={self.model_max_length})"
        )

    # ------------------------------------------------------------------ encoding

    def tokenize(
        self, text: str, pair: str | None = None, add_special_tokens: bool = False
    ) -> list[str]:
        """The WordPiece tokens of ``text`` (and ``pair``), without special tokens by default."""
        self._check_text(text, "text")
        if pair is not None:
            self._check_text(pair, "pair")
        self._configure(None, None)
        return self._tok.encode(text, pair, add_special_tokens=add_special_tokens).tokens

    def __call__(
        self,
        text: str | Sequence[str] | Sequence[tuple[str, str]],
        text_pair: str | Sequence[str] | None = None,
        *,
        max_length: int | None = None,
        truncation: bool | str | None = None,
        padding: bool | str = False,
        return_tensors: str | None = "np",
        stride: int = 0,
        return_overflowing_tokens: bool = False,
        return_offsets_mapping: bool = False,
        return_special_tokens_mask: bool = False,
        return_length: bool = False,
        add_special_tokens: bool = True,
        pad_to_multiple_of: int | None = None,
    ) -> BatchEncoding:
        """Encode a string, a pair, or a batch of strings / pairs.

        Returns a `BatchEncoding` with ``input_ids``, ``token_type_ids`` and ``attention_mask``
        (plus ``offset_mapping``, ``special_tokens_mask``, ``length`` and
        ``overflow_to_sample_mapping`` on request). ``return_tensors="np"`` gives 2-D int32 arrays
        (a single string gives one row); ``None`` gives python lists (flat for a single string).

        ``truncation``: False/None, True (= "longest_first"), "longest_first", "only_first",
        "only_second". ``padding``: False, True (= "longest"), "longest", "max_length".
        As in transformers, giving only ``max_length`` (no padding, truncation None) truncates
        with "longest_first", and a missing ``max_length`` means ``model_max_length``.
        """
        batched, inputs, has_pair = self._collect_inputs(text, text_pair)
        pad, trunc, max_length = self._strategies(padding, truncation, max_length)
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 0:
            raise ValueError(f"stride must be a non-negative int, got {stride!r}")
        if pad_to_multiple_of is not None and (
            isinstance(pad_to_multiple_of, bool)
            or not isinstance(pad_to_multiple_of, int)
            or pad_to_multiple_of <= 0
        ):
            raise ValueError(
                f"pad_to_multiple_of must be a positive int, got {pad_to_multiple_of!r}"
            )
        if return_tensors not in (None, "np", "jax"):
            raise ValueError(f"return_tensors must be 'np', 'jax' or None, got {return_tensors!r}")

        trunc_cfg = None
        if trunc is not None:
            n_special = self._n_special[has_pair] if add_special_tokens else 0
            if max_length < n_special:
                raise ValueError(
                    f"max_length={max_length} is too small: each "
                    f"{'pair' if has_pair else 'sequence'} needs {n_special} special tokens "
                    f"({self._template_str(has_pair)}), so max_length must be at least {n_special}"
                )
            if stride > 0 and stride >= max_length - n_special:
                raise ValueError(
                    f"stride={stride} must be smaller than max_length minus the {n_special} "
                    f"special tokens ({max_length} - {n_special} = {max_length - n_special})"
                )
            trunc_cfg = {
                "max_length": max_length,
                "stride": stride,
                "strategy": trunc,
                "direction": self.truncation_side,
            }
        pad_cfg = None
        if pad is not None:
            pad_cfg = {
                "length": max_length if pad == "max_length" else None,
                "pad_to_multiple_of": pad_to_multiple_of,
                "pad_id": self._ids["pad_token"],
                "pad_type_id": 0,
                "pad_token": self._special["pad_token"],
                "direction": self.padding_side,
            }
        self._configure(trunc_cfg, pad_cfg)

        try:
            if return_offsets_mapping:
                encodings = self._tok.encode_batch(inputs, add_special_tokens=add_special_tokens)
            else:
                # Same ids as encode_batch; skips computing character offsets.
                encodings = self._tok.encode_batch_fast(
                    inputs, add_special_tokens=add_special_tokens
                )
        except BaseException as e:  # a Rust panic arrives as pyo3's PanicException
            if type(e).__name__ == "PanicException" or "Truncation error" in str(e):
                raise ValueError(
                    f"cannot truncate this input with truncation={trunc!r}, "
                    f"max_length={max_length}, stride={stride}: {e}"
                ) from None
            raise

        if return_overflowing_tokens:
            rows, mapping = [], []
            for i, enc in enumerate(encodings):
                rows.append(enc)
                mapping.append(i)
                for extra in enc.overflowing:
                    rows.append(extra)
                    mapping.append(i)
        else:
            rows, mapping = encodings, None

        if trunc is None and rows and not self._warned_too_long:
            longest = max(len(r) for r in rows)
            if longest > self.model_max_length:
                self._warned_too_long = True
                warnings.warn(
                    f"a sequence has {longest} tokens, more than model_max_length="
                    f"{self.model_max_length}; pass truncation=True to cut it",
                    stacklevel=2,
                )

        data: dict[str, Any] = {}
        fields = [
            ("input_ids", "ids"),
            ("token_type_ids", "type_ids"),
            ("attention_mask", "attention_mask"),
        ]
        if return_special_tokens_mask:
            fields.append(("special_tokens_mask", "special_tokens_mask"))
        if return_offsets_mapping:
            fields.append(("offset_mapping", "offsets"))
        if return_tensors is None:
            for key, attr in fields:
                data[key] = [getattr(r, attr) for r in rows]
            if return_length:
                data["length"] = [len(r) for r in rows]
            if mapping is not None:
                data["overflow_to_sample_mapping"] = mapping
            if not batched and not return_overflowing_tokens:
                data = {k: v[0] for k, v in data.items()}
        else:
            width = len(rows[0]) if rows else 0
            if any(len(r) != width for r in rows):
                raise ValueError(
                    "the encoded sequences have different lengths and cannot form one array; "
                    "pass padding=True (or padding='max_length' with truncation=True), or "
                    "return_tensors=None for lists"
                )
            for key, attr in fields:
                if key == "offset_mapping":
                    arr = np.array([r.offsets for r in rows], dtype=np.int32).reshape(
                        len(rows), width, 2
                    )
                else:
                    arr = np.array([getattr(r, attr) for r in rows], dtype=np.int32).reshape(
                        len(rows), width
                    )
                data[key] = arr
            if return_length:
                data["length"] = np.array([len(r) for r in rows], dtype=np.int32)
            if mapping is not None:
                data["overflow_to_sample_mapping"] = np.array(mapping, dtype=np.int32)
            if return_tensors == "jax":
                import jax.numpy as jnp

                data = {k: jnp.asarray(v) for k, v in data.items()}
        return BatchEncoding(data, rows)

    def _template_str(self, pair: bool) -> str:
        cls, sep = self._special["cls_token"], self._special["sep_token"]
        return f"{cls} A {sep} B {sep}" if pair else f"{cls} A {sep}"

    @staticmethod
    def _check_text(x: Any, name: str) -> None:
        if not isinstance(x, str):
            raise TypeError(f"{name} must be a str, got {_type_name(x)}")

    def _collect_inputs(self, text: Any, text_pair: Any) -> tuple[bool, list, bool]:
        """(batched, inputs for encode_batch, any pair present)."""
        if isinstance(text, str):
            if text_pair is not None and not isinstance(text_pair, str):
                raise TypeError(
                    f"text_pair must be a str when text is a str, got {_type_name(text_pair)}"
                )
            # Like transformers, an empty text_pair for a single string means "no pair".
            if text_pair:
                return False, [(text, text_pair)], True
            return False, [text], False
        if not isinstance(text, (list, tuple)):
            raise TypeError(
                "text must be a str, a list/tuple of str, or a list of (str, str) pairs, "
                f"got {_type_name(text)}"
            )
        if text_pair is not None:
            if not isinstance(text_pair, (list, tuple)):
                raise TypeError(
                    "text_pair must be a list/tuple of str when text is a batch, "
                    f"got {_type_name(text_pair)}"
                )
            if len(text_pair) != len(text):
                raise ValueError(
                    f"text has {len(text)} items but text_pair has {len(text_pair)}; "
                    "they must match"
                )
            for name, seq in (("text", text), ("text_pair", text_pair)):
                for i, t in enumerate(seq):
                    if not isinstance(t, str):
                        raise TypeError(f"{name}[{i}] must be a str, got {_type_name(t)}")
            return True, list(zip(text, text_pair, strict=True)), len(text) > 0
        has_pair = False
        for i, t in enumerate(text):
            if isinstance(t, str):
                continue
            if (
                isinstance(t, tuple)
                and len(t) == 2
                and isinstance(t[0], str)
                and isinstance(t[1], str)
            ):
                has_pair = True
                continue
            raise TypeError(f"text[{i}] must be a str or a (str, str) tuple, got {_type_name(t)}")
        return True, text if isinstance(text, list) else list(text), has_pair

    def _strategies(
        self, padding: Any, truncation: Any, max_length: Any
    ) -> tuple[str | None, str | None, int | None]:
        if max_length is not None and (
            isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer))
        ):
            raise TypeError(f"max_length must be an int or None, got {_type_name(max_length)}")
        if max_length is not None:
            max_length = int(max_length)
            if max_length < 0:
                raise ValueError(f"max_length must be non-negative, got {max_length}")
        if max_length is not None and padding is False and truncation is None:
            truncation = "longest_first"
        if padding is True:
            pad = "longest"
        elif padding is False or padding is None or padding == "do_not_pad":
            pad = None
        elif padding in _PADDING_STRATEGIES:
            pad = padding
        else:
            raise ValueError(
                f"padding must be True, False, 'longest' or 'max_length', got {padding!r}"
            )
        if truncation is True:
            trunc = "longest_first"
        elif truncation is False or truncation is None or truncation == "do_not_truncate":
            trunc = None
        elif truncation in _TRUNCATION_STRATEGIES:
            trunc = truncation
        else:
            raise ValueError(
                "truncation must be True, False, 'longest_first', 'only_first' or 'only_second', "
                f"got {truncation!r}"
            )
        if max_length is None:
            limit = self.model_max_length if self.model_max_length <= _LARGE_INTEGER else None
            if pad == "max_length":
                if limit is None:
                    pad = None
                max_length = limit
            if trunc is not None:
                if limit is None:
                    trunc = None
                max_length = limit
        return pad, trunc, max_length

    def _configure(self, trunc_cfg: dict | None, pad_cfg: dict | None) -> None:
        """Set truncation/padding on the backend, skipping the calls when already set.

        The backend's own settings are compared (not a cached copy), so changes made directly on
        `backend_tokenizer` are seen.
        """
        if self._tok.truncation != trunc_cfg:
            if trunc_cfg is None:
                self._tok.no_truncation()
            else:
                self._tok.enable_truncation(**trunc_cfg)
        if self._tok.padding != pad_cfg:
            if pad_cfg is None:
                self._tok.no_padding()
            else:
                self._tok.enable_padding(**pad_cfg)

    # ------------------------------------------------------------------ decoding

    @staticmethod
    def _as_id_list(ids: Any) -> list[int]:
        if isinstance(ids, np.ndarray):
            if ids.ndim != 1:
                raise ValueError(f"expected a 1-D array of ids, got shape {ids.shape}")
            return ids.tolist()
        if hasattr(ids, "tolist") and not isinstance(ids, (list, tuple)):  # e.g. a jax array
            return FunnelTokenizer._as_id_list(np.asarray(ids))
        if not isinstance(ids, (list, tuple)):
            raise TypeError(f"ids must be a list of int or a 1-D array, got {_type_name(ids)}")
        out = []
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
                raise TypeError(f"ids must be ints, got {_type_name(i)}")
            out.append(int(i))
        return out

    def decode(
        self, ids: int | Sequence[int] | np.ndarray, skip_special_tokens: bool = False
    ) -> str:
        """Ids back to text with the WordPiece decoder (joins ``##`` pieces)."""
        if isinstance(ids, (int, np.integer)) and not isinstance(ids, bool):
            ids = [int(ids)]
        return self._tok.decode(self._as_id_list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(
        self, sequences: Sequence[Sequence[int]] | np.ndarray, skip_special_tokens: bool = False
    ) -> list[str]:
        if isinstance(sequences, np.ndarray) or (
            hasattr(sequences, "tolist") and not isinstance(sequences, (list, tuple))
        ):
            arr = np.asarray(sequences)
            if arr.ndim != 2:
                raise ValueError(f"expected a 2-D array of ids, got shape {arr.shape}")
            seqs = arr.tolist()
        else:
            seqs = [self._as_id_list(s) for s in sequences]
        return self._tok.decode_batch(seqs, skip_special_tokens=skip_special_tokens)
