"""KV-cache keys: stable across processes, chained for prefixes, sensitive to every layout field."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

from tierstore import InvalidArgument, InvalidType
from tierstore.store.kvcache.keys import KVLayout, check_tokens, chunk_spans, content_key, prefix_keys

LAYOUT = KVLayout(model="bytelm-man", revision="r1", dtype="float16", layers=8, kv_heads=2, head_dim=64,
                  codec="kv1:fp16")
TOKENS = np.arange(1000) % 251


def test_prefix_keys_chain():
    keys = prefix_keys(LAYOUT, TOKENS, 256)
    assert len(keys) == 4 and len(set(keys)) == 4
    assert prefix_keys(LAYOUT, TOKENS[:600], 256)[:2] == keys[:2]  # a shared prefix shares its keys
    changed = TOKENS.copy()
    changed[10] += 1
    assert not set(prefix_keys(LAYOUT, changed, 256)) & set(keys)  # an early change moves every later key
    assert prefix_keys(LAYOUT, TOKENS.tolist(), 256) == keys  # lists and arrays agree


def test_content_keys_ignore_position():
    chunk = TOKENS[256:512]
    assert content_key(LAYOUT, chunk) == content_key(LAYOUT, np.array(chunk, dtype=np.int32))
    assert content_key(LAYOUT, chunk) not in prefix_keys(LAYOUT, TOKENS, 256)
    assert content_key(LAYOUT, chunk) != content_key(LAYOUT, chunk[:-1])


@pytest.mark.parametrize("field, value", [("model", "other"), ("revision", "r2"), ("dtype", "bfloat16"),
                                          ("layers", 9), ("kv_heads", 4), ("head_dim", 32), ("codec", "kv1:int8")])
def test_every_layout_field_changes_every_key(field, value):
    other = dataclasses.replace(LAYOUT, **{field: value})
    assert not set(prefix_keys(other, TOKENS, 256)) & set(prefix_keys(LAYOUT, TOKENS, 256))
    assert content_key(other, TOKENS[:256]) != content_key(LAYOUT, TOKENS[:256])


def test_keys_are_stable_across_processes():
    code = ("import numpy as np; from tierstore.store.kvcache.keys import KVLayout, prefix_keys; "
            "L = KVLayout(model='bytelm-man', revision='r1', dtype='float16', layers=8, kv_heads=2, head_dim=64, "
            "codec='kv1:fp16'); print(prefix_keys(L, np.arange(1000) % 251, 256)[-1])")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.strip() == prefix_keys(LAYOUT, TOKENS, 256)[-1], out.stderr
    # Pinned: a change to the encoding is a format change (bump KEY_FORMAT), never silent.
    assert prefix_keys(LAYOUT, TOKENS, 256)[0].startswith("kv/" + LAYOUT.fingerprint()[:16] + "/p/")


@pytest.mark.parametrize("tokens, error", [
    ([], InvalidArgument), ([1.5, 2.0], InvalidType), ("abc", InvalidType), ([-1, 2], InvalidArgument),
    (np.zeros((2, 3), np.int64), InvalidArgument), ([[1, 2, 3]], None),
])
def test_token_validation(tokens, error):
    if error is None:
        assert check_tokens(tokens).tolist() == [1, 2, 3]
    else:
        with pytest.raises(error):
            check_tokens(tokens)


def test_chunk_spans_and_layout_validation():
    assert chunk_spans(10, 4) == [(0, 4), (4, 8), (8, 10)]
    with pytest.raises(InvalidArgument):
        chunk_spans(10, 0)
    with pytest.raises(InvalidArgument):
        dataclasses.replace(LAYOUT, layers=0)
    with pytest.raises(InvalidType):
        dataclasses.replace(LAYOUT, revision="")
