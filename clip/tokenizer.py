"""CLIP's byte-level byte-pair tokenizer and `tokenize(texts) -> LongTensor [N, context_length]`.

The vocabulary (bpe_simple_vocab_16e6.txt.gz, published with OpenAI's CLIP under the MIT licence)
lies beside this file. Text is cleaned with ftfy, lower-cased, split by CLIP's regular expression,
mapped byte-wise onto printable unicode characters and merged by rank. 49406 is <|startoftext|>,
49407 is <|endoftext|>.
"""
import gzip
import html
import os
from functools import lru_cache

import ftfy
import regex as re
import torch

VOCAB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
N_MERGES = 49152 - 256 - 2  # the merges CLIP uses, taken from the top of the vocabulary file


@lru_cache()
def byte_to_char() -> dict:
    """Maps the 256 byte values to printable unicode characters (a bijection), printable bytes first.

    The dict's order is the vocabulary's order: printable bytes map to themselves, then the others
    map, in byte order, to the code points from 256 on.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def pairs_of(word: tuple) -> set:
    """The set of adjacent symbol pairs in a word."""
    return set(zip(word[:-1], word[1:]))


def clean(text: str) -> str:
    """ftfy repair, html unescaping, whitespace folding, lower case."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


class SimpleTokenizer:
    """Byte-pair encoder over CLIP's 49408-entry vocabulary."""

    def __init__(self, bpe_path: str = VOCAB_PATH):
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]
        chars = list(byte_to_char().values())
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.byte_encoder = byte_to_char()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {SOT: SOT, EOT: EOT}
        self.pattern = re.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            re.IGNORECASE)

    def bpe(self, token: str) -> str:
        """Merges the characters of one pre-token by rank; returns its symbols joined by spaces."""
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            best = min(pairs_of(word), key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        self.cache[token] = " ".join(word)
        return self.cache[token]

    def encode(self, text: str) -> list:
        """Text -> token ids, without start and end tokens."""
        ids = []
        for token in re.findall(self.pattern, clean(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[sym] for sym in self.bpe(token).split(" "))
        return ids

    def decode(self, ids) -> str:
        """Token ids -> text (word ends become spaces)."""
        text = "".join(self.decoder[int(i)] for i in ids)
        raw = bytearray(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")


_tokenizer = None


def get_tokenizer() -> SimpleTokenizer:
    """The shared tokenizer, built on first use (reading the vocabulary takes ~0.5 s)."""
    global _tokenizer
    if _tokenizer is None:
        _tokenizer = SimpleTokenizer()
    return _tokenizer


def tokenize(texts, context_length: int = 77, truncate: bool = False) -> torch.LongTensor:
    """str or list[str] -> token ids [N, context_length], zero-padded, SOT ... EOT."""
    if isinstance(texts, str):
        texts = [texts]
    tok = get_tokenizer()
    sot, eot = tok.encoder[SOT], tok.encoder[EOT]
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [sot] + tok.encode(text) + [eot]
        if len(ids) > context_length:
            if not truncate:
                raise RuntimeError(
                    f"Input {text!r} is {len(ids)} tokens long, more than the context length "
                    f"{context_length}; shorten it or pass truncate=True")
            ids = ids[:context_length - 1] + [eot]
        result[i, :len(ids)] = torch.tensor(ids)
    return result
