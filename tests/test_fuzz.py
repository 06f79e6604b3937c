"""Bounded, derandomized fuzzing of the input parsers: every input either parses correctly or raises the
library's own error (DataError, ConfigError); no other exception may escape."""

from __future__ import annotations

import gzip
import math
import os

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvae.config import Config, ConfigError, all_keys, apply, from_dict, load_yaml, parse_set, to_dict
from hvae.data import IDX_DTYPES, DataError, read_idx

# 150 examples per test keeps this file near 10 s on one core; HVAE_FUZZ_EXAMPLES=5000 for a deeper local run.
EXAMPLES = int(os.environ.get("HVAE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(derandomize=True, deadline=None, max_examples=EXAMPLES, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def decode_or_error(path, raw: bytes | None) -> None:
    """read_idx(path) must return exactly the array the (decompressed) bytes `raw` describe, or raise
    DataError (and must raise it when raw is None: the file is not even readable)."""
    try:
        got = read_idx(path)
    except DataError as e:
        assert str(path) in str(e) and "\n" not in str(e)
        return
    assert raw is not None
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    assert got.shape == dims and got.dtype == np.dtype(IDX_DTYPES[raw[2]])
    assert got.tobytes() == raw[4 + 4 * ndim:]


# --- IDX ----------------------------------------------------------------------------------------------

@FUZZ
@given(blob=st.binary(max_size=300), gz=st.sampled_from(["plain", "gz-named", "gzipped"]))
def test_random_bytes(scratch, blob, gz):
    path = scratch / ("random-idx" if gz == "plain" else "random-idx.gz")
    path.write_bytes(gzip.compress(blob) if gz == "gzipped" else blob)
    raw = blob
    if gz == "gz-named":  # random bytes under a .gz name: only a real gzip stream may decode
        try:
            raw = gzip.decompress(blob)
        except (OSError, EOFError, ValueError):
            raw = None
    decode_or_error(path, raw)


@st.composite
def valid_idx(draw) -> tuple[bytes, np.ndarray]:
    code = draw(st.sampled_from(sorted(IDX_DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=1, max_size=4)))
    dtype = np.dtype(IDX_DTYPES[code])
    array = np.frombuffer(draw(st.binary(min_size=math.prod(shape) * dtype.itemsize,
                                         max_size=math.prod(shape) * dtype.itemsize)), dtype=dtype).reshape(shape)
    header = bytes([0, 0, code, len(shape)]) + b"".join(n.to_bytes(4, "big") for n in shape)
    return header + array.tobytes(), array


MUTATIONS = st.lists(st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 400)),
    st.tuples(st.just("flip"), st.integers(0, 400), st.integers(1, 255)),
    st.tuples(st.just("dim"), st.integers(0, 3), st.sampled_from([0, 1, 2, 5, 255, 2 ** 16, 2 ** 31, 2 ** 32 - 1])),
    st.tuples(st.just("ndim"), st.integers(0, 255)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=16)),
), max_size=3)


def mutate(raw: bytes, mutations) -> bytes:
    raw = bytearray(raw)
    for m in mutations:
        if m[0] == "truncate":
            del raw[m[1] % (len(raw) + 1):]
        elif m[0] == "flip" and raw:
            raw[m[1] % len(raw)] ^= m[2]
        elif m[0] == "dim" and len(raw) >= 8 + 4 * m[1]:
            raw[4 + 4 * m[1]: 8 + 4 * m[1]] = m[2].to_bytes(4, "big")
        elif m[0] == "ndim" and len(raw) >= 4:
            raw[3] = m[1]
        elif m[0] == "append":
            raw += m[1]
    return bytes(raw)


@FUZZ
@given(idx=valid_idx(), mutations=MUTATIONS, gz=st.booleans(), cut_gz=st.integers(0, 30))
def test_mutated_idx(scratch, idx, mutations, gz, cut_gz):
    raw, array = idx
    raw = mutate(raw, mutations)
    path = scratch / ("mutated-idx.gz" if gz else "mutated-idx")
    blob = gzip.compress(raw) if gz else raw
    if gz and cut_gz:
        blob = blob[:-cut_gz]  # a truncated gzip stream must never pass for a whole one
    path.write_bytes(blob)
    if gz and cut_gz:
        with pytest.raises(DataError):
            read_idx(path)
        return
    decode_or_error(path, raw)
    if not mutations:
        np.testing.assert_array_equal(read_idx(path), array)


# --- config -------------------------------------------------------------------------------------------

KEYS = all_keys()
SECTIONS = ["model", "data", "train"]
json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)


@st.composite
def dotted_key(draw) -> str:
    kind = draw(st.sampled_from(["valid", "edited", "section", "random"]))
    if kind == "valid":
        return draw(st.sampled_from(KEYS))
    if kind == "edited":
        key = draw(st.sampled_from(KEYS))
        i = draw(st.integers(0, len(key)))
        return key[:i] + draw(st.text("abcxyz._-", max_size=2)) + key[i + draw(st.integers(0, 2)):]
    if kind == "section":
        return draw(st.sampled_from(SECTIONS))
    return ".".join(draw(st.lists(st.text(max_size=8), min_size=1, max_size=4)))


def apply_or_error(updates) -> None:
    try:
        cfg = apply(Config(), updates)
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    assert set(updates) <= set(KEYS)
    assert from_dict(to_dict(cfg)) == cfg  # whatever was accepted is well typed and round-trips


@FUZZ
@given(updates=st.dictionaries(dotted_key(), json_like, max_size=4))
def test_apply_random_dotted_keys_and_values(updates):
    apply_or_error(updates)


SET_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)
YAML_BITS = st.sampled_from(["[", "]", "{", "}", ":", ",", "'", '"', "!!", "&a", "*a", "-", "#", "\n", " ", "1e3",
                             "3e-4", ".nan", "-.inf", "2020-13-45", "null", "true", "0x1F", "0o17", "~", "|", ">"])


@FUZZ
@given(key=dotted_key(), raw=st.one_of(YAML_BITS, SET_TEXT, st.lists(YAML_BITS | SET_TEXT, max_size=6).map("".join)),
       sep=st.sampled_from(["=", "", " = "]))
def test_parse_set_random_items(key, raw, sep):
    try:
        updates = parse_set([f"{key}{sep}{raw}"])
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    apply_or_error(updates)


LEAVES = st.sampled_from([k.split(".")[1] for k in KEYS]) | st.text(max_size=10)
YAML_TREES = st.dictionaries(st.sampled_from(SECTIONS) | st.text(max_size=5),
                             st.dictionaries(LEAVES, json_like, max_size=3) | json_like, max_size=3)


@FUZZ
@given(text=st.one_of(st.lists(YAML_BITS | st.sampled_from(SECTIONS + KEYS) | SET_TEXT, max_size=10).map("".join),
                      YAML_TREES.map(yaml.safe_dump)),
       as_bytes=st.booleans())
def test_load_yaml_random_files(scratch, text, as_bytes):
    path = scratch / "fuzz.yaml"
    if as_bytes:
        path.write_bytes(text.encode()[::-1])  # reversed bytes: often not UTF-8 at all
    else:
        path.write_text(text, encoding="utf-8")
    try:
        updates = load_yaml(path)
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    apply_or_error(updates)
