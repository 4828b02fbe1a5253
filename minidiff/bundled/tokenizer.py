"""The miniature's tokenizer: a CLIP BPE (vocab.json + merges.txt, read by transformers' CLIPTokenizerFast) built so
that every word of its world's captions is ONE token, with CLIP's byte table and merge rule (Radford et al. 2021;
GPT-2's byte-level BPE, Sennrich et al. 2016).
"""

import json
from pathlib import Path


def _bytes_to_unicode() -> dict:
    """CLIP's (GPT-2's) reversible byte -> printable unicode character table: the 256 base symbols of the BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe(word: str, ranks: dict) -> list[str]:
    """CLIP's BPE of one word: start from characters (the last one marked '</w>'), then repeatedly merge the
    adjacent pair of lowest rank until none of the pairs is a merge."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1e9), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == 1e9:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def bpe_tables(words) -> tuple[dict, list]:
    """(vocab, merges) of a CLIP BPE in which every word of `words` is one token.

    Vocab = the 256 byte symbols, the same with '</w>' (CLIP's layout), then one token per merge result, then
    <|startoftext|>, <|endoftext|>. Merges are found greedily: while some word still splits into several parts,
    append the merge of its first adjacent pair (appended merges have the lowest priority, so they cannot undo
    a word already made whole; the loop ends because each new merge shortens some word).
    """
    base = list(_bytes_to_unicode().values())
    merges, ranks = [], {}
    while True:
        split = [p for p in (_bpe(w, ranks) for w in sorted(words)) if len(p) > 1]
        if not split:
            break
        pair = (split[0][0], split[0][1])
        ranks[pair] = len(merges)
        merges.append(pair)
    tokens = base + [b + "</w>" for b in base]
    for a, b in merges:
        if a + b not in tokens:
            tokens.append(a + b)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_tokenizer(folder, words, pad_token="<|endoftext|>"):
    """Write vocab.json + merges.txt in which every word of `words` is one token (for the miniature:
    tiny.all_words(), the world's words and "sks") and return the CLIPTokenizerFast read back from them. SDXL pads
    tokenizer/ with <|endoftext|> and tokenizer_2/ with "!" (id 0)."""
    from transformers import CLIPTokenizerFast

    vocab, merges = bpe_tables(words)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizerFast(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77)
