"""Does a tokenizer restart cleanly at its split tokens? The start-up check behind `ChatPromptCache`.

The rule: for a text and any split token k of its tokenization (an added token matched before the
normalizer, not `single_word`), `encode(text)` equals `encode(text)[:k] + encode(text[start of k:])`.
`split_rule_failure` names why a tokenizer may not rely on it, or returns None:

    structure   a Rust tokenizer behind the wrapper, whose encode the wrapper does not override;
                special tokens split out (not split_special_tokens); no truncation or padding set;
                no added token containing another (a longer match could run past a shared prefix)
    samples     texts made of the split tokens around whitespace, accents and newlines, and a
                conversation rendered with the tokenizer's own chat template: the wrapper's ids,
                the backend's ids and every split's ids must all agree
"""

from __future__ import annotations

from typing import Any

_PIECES = ("user\n", "Hello", " world", "\n\n", "  ", " \u00e9t\u00e9", "e\u0301", "\t x", "42.", "")
_SAMPLE_MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi  there\n\n"},
    {"role": "assistant", "content": " Hello! \u00e9t\u00e9"},
    {"role": "user", "content": "\tand  then?"},
]
_MAX_SAMPLE_TOKENS = 16


def split_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of the added tokens matched in the raw text, before normalizing (turn and role markers)."""
    return frozenset(i for i, t in _added_tokens(tokenizer).items() if not t.normalized and not t.single_word)


def split_rule_failure(tokenizer: Any) -> str | None:
    """Why the split rule cannot be relied on for `tokenizer`, or None when it holds."""
    problem = _structure_failure(tokenizer)
    if problem is not None:
        return problem
    split_ids = split_token_ids(tokenizer)
    for text in _sample_texts(tokenizer, split_ids):
        problem = _sample_failure(tokenizer, split_ids, text)
        if problem is not None:
            return problem
    return None


def _structure_failure(tokenizer: Any) -> str | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "no Rust tokenizer behind it"
    if not _encodes_as_base(type(tokenizer)):
        return f"{type(tokenizer).__name__} overrides encode"
    if getattr(tokenizer, "split_special_tokens", False) or getattr(backend, "encode_special_tokens", False):
        return "split_special_tokens is set: special tokens are tokenized as text"
    if backend.truncation is not None or backend.padding is not None:
        return "the backend truncates or pads"
    if not split_token_ids(tokenizer):
        return "no added token is split out before normalizing"
    return _containment_failure([t.content for t in _added_tokens(tokenizer).values()])


def _encodes_as_base(cls: type) -> bool:
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend as base
    except ImportError:  # transformers 4
        from transformers import PreTrainedTokenizerFast as base
    return issubclass(cls, base) and all(getattr(cls, name) is getattr(base, name)
                                         for name in ("encode", "_encode_plus"))


def _containment_failure(contents: list[str]) -> str | None:
    """An added token's text inside another's (each token's substrings looked up: tokens are short)."""
    known = set(contents)
    for content in contents:
        inner = {content[i:j] for i in range(len(content)) for j in range(i + 1, len(content) + 1)} - {content}
        if inner & known:
            return f"added token {content!r} contains another added token ({sorted(inner & known)[0]!r})"
    return None


def _added_tokens(tokenizer: Any) -> dict[int, Any]:
    return tokenizer.backend_tokenizer.get_added_tokens_decoder()


def _sample_texts(tokenizer: Any, split_ids: frozenset[int]) -> list[str]:
    """Each split token (the first _MAX_SAMPLE_TOKENS) between and after every piece, and a rendered chat."""
    tokens = [tokenizer.convert_ids_to_tokens(i) for i in sorted(split_ids)[:_MAX_SAMPLE_TOKENS]]
    texts = ["".join(f"{p}{t}{p}" for p in _PIECES) for t in tokens]
    texts.append("".join(f"{t}{p}" for p, t in zip(_PIECES * len(tokens), tokens * len(_PIECES))))
    if getattr(tokenizer, "chat_template", None):
        try:
            texts.append(tokenizer.apply_chat_template(_SAMPLE_MESSAGES, tokenize=False, add_generation_prompt=True))
        except Exception:  # a template that rejects these messages: the generic samples still apply
            pass
    return texts


def _sample_failure(tokenizer: Any, split_ids: frozenset[int], text: str) -> str | None:
    full = list(tokenizer.encode(text, add_special_tokens=False))
    encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    if encoding.ids != full:
        return f"the backend's ids differ from the wrapper's for {text!r}"
    if not split_ids.intersection(full):
        return f"no split token is split out of {text!r}"
    for index, token_id in enumerate(full):
        if token_id in split_ids:
            start = encoding.offsets[index][0]
            tail = tokenizer.backend_tokenizer.encode(text[start:], add_special_tokens=False).ids
            if full[:index] + tail != full:
                return f"tokenizing from split token {index} of {text!r} changes the ids"
    return None
