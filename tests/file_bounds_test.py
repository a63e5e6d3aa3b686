"""Files from strangers stay bounded: malformed safetensors and GGUF headers are refused with a
one-line InputError, reading little, calling little and without allocating what the header claims."""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
import tracemalloc
import types

import gguf
import numpy as np
import pytest

import codi_jax
from codi_jax.errors import InputError
from codi_jax.models import gguf_io, weights_io

# Work is counted, not timed (a loaded machine slows a refusal, it does not make it do more).
MAX_READ_BYTES = 2**20  # the largest header refused here is 400 KB (deep JSON); claims reach 2**62
MAX_CALLS = 1_000  # Python calls in codi_jax and gguf (70 at most here); claimed counts reach 2**60
MAX_PEAK_BYTES = 50 * 2**20


class _TooMuchWork(BaseException):
  """Stops a reader past MAX_CALLS (a BaseException: no `except Exception` turns it into a
  refusal)."""


class _Work:
  """Counts what a reader does with a file: the bytes it reads (file reads, memory-map slices and
  struct unpacks; a file handed to GGUFReader counts whole) and its Python calls."""

  def __init__(self):
    self.bytes_read, self.calls = 0, 0
    self._roots = tuple(os.path.dirname(m.__file__) + os.sep for m in (codi_jax, gguf))
    work = self

    class CountingFile:
      def __init__(self, f):
        self._f = f

      def read(self, *args):
        out = self._f.read(*args)
        work.bytes_read += len(out)
        return out

      def readinto(self, b):
        n = self._f.readinto(b)
        work.bytes_read += n or 0
        return n

      def __getattr__(self, name):  # fileno, seek, close...: not reads
        if name in ("readline", "readlines", "readinto1", "read1", "__iter__", "__next__"):
          raise AssertionError(f"uncounted read: {name}")
        return getattr(self._f, name)

      def __enter__(self):
        return self

      def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    class CountingMap(mmap.mmap):
      def __getitem__(self, key):
        out = super().__getitem__(key)
        work.bytes_read += len(out) if isinstance(out, bytes) else 1
        return out

    def unpack_from(fmt, buffer, offset=0):
      work.bytes_read += struct.calcsize(fmt)
      return struct.unpack_from(fmt, buffer, offset)

    def reader(path, *args, **kwargs):
      work.bytes_read += os.path.getsize(path)  # it maps the file and may touch any of it
      return gguf.GGUFReader(path, *args, **kwargs)

    self.open = lambda *args, **kwargs: CountingFile(open(*args, **kwargs))
    self.mmap_module = types.SimpleNamespace(**{**vars(mmap), "mmap": CountingMap})
    self.struct_module = types.SimpleNamespace(**{**vars(struct), "unpack_from": unpack_from})
    self.reader = reader

  def profile(self, frame, event, arg):
    del arg
    if event == "call" and frame.f_code.co_filename.startswith(self._roots):
      self.calls += 1
      if self.calls > MAX_CALLS:
        raise _TooMuchWork(f"over {MAX_CALLS} calls, in {frame.f_code.co_name}")


def _refused(fn, path, *needles) -> str:
  """Asserts fn(path) raises a one-line InputError naming the file and every needle, reading at
  most 1 MiB of files in at most 1000 calls, with a Python-heap peak under 50 MB."""
  work = _Work()
  with pytest.MonkeyPatch.context() as mp:
    for module in (weights_io, gguf_io):
      mp.setattr(module, "open", work.open, raising=False)
    mp.setattr(gguf_io, "mmap", work.mmap_module)
    mp.setattr(gguf_io, "struct", work.struct_module)
    mp.setattr(gguf, "GGUFReader", work.reader)
    tracemalloc.start()
    old_profile = sys.getprofile()
    try:
      with pytest.raises(InputError) as info:
        sys.setprofile(work.profile)
        try:
          fn(str(path))
        finally:
          sys.setprofile(old_profile)
      _, peak = tracemalloc.get_traced_memory()
    finally:
      tracemalloc.stop()
  msg = str(info.value)
  assert "\n" not in msg, msg
  for needle in (str(path), *needles):
    assert needle in msg, msg
  assert work.bytes_read <= MAX_READ_BYTES, f"{work.bytes_read} bytes read: {msg}"
  assert work.calls <= MAX_CALLS, f"{work.calls} calls: {msg}"
  assert peak < MAX_PEAK_BYTES, f"peak {peak / 2**20:.1f} MB: {msg}"
  return msg


# ----------------------------------------------------------------------------------- safetensors


def _safetensors(path, header, data=b"", length=None):
  raw = header if isinstance(header, bytes) else json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
  return path


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
  return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def test_safetensors_huge_header_length(tmp_path):
  path = _safetensors(tmp_path / "x.safetensors", {}, length=2**62)
  _refused(weights_io.read_safetensors, path, "header length 4611686018427387904")


def test_safetensors_header_length_past_the_file(tmp_path):
  path = _safetensors(tmp_path / "x.safetensors", {}, length=5000)
  _refused(weights_io.read_safetensors, path, "header length 5000", "exceeds")


def test_safetensors_header_over_the_limit_in_a_large_file(tmp_path):
  path = tmp_path / "x.safetensors"
  with open(path, "wb") as f:  # sparse: 200 MiB on paper, a few bytes on disk
    f.write(struct.pack("<Q", 150 * 2**20) + b"{")
    f.truncate(200 * 2**20)
  _refused(weights_io.read_safetensors, path, "100 MiB")


def test_safetensors_short_file(tmp_path):
  path = tmp_path / "x.safetensors"
  path.write_bytes(b"\x01\x02")
  _refused(weights_io.read_safetensors, path, "2 bytes")


@pytest.mark.parametrize(
  "raw,needle",
  [
    (b"{not json at all}", "not JSON"),
    (b"\xff\xfe\x00garbage", "not JSON"),
    (b"[" * 200_000 + b"]" * 200_000, "not JSON"),  # nesting deep enough to blow the stack
    (b"[1, 2, 3]", "not a JSON object"),
  ],
  ids=["text", "not-utf8", "deep", "list"],
)
def test_safetensors_header_not_a_json_object(tmp_path, raw, needle):
  path = _safetensors(tmp_path / "x.safetensors", raw)
  _refused(weights_io.read_safetensors, path, needle)


@pytest.mark.parametrize(
  "entry,needles",
  [
    (_entry(dtype="F8_E9M9"), ("dtype 'F8_E9M9'",)),
    (_entry(shape=(-1, 2)), ("shape [-1, 2]",)),
    (_entry(shape=(2.0,)), ("shape [2.0]",)),
    (_entry(shape=(True,)), ("shape [True]",)),
    (_entry(shape=[1] * 100), ("at most 32",)),
    (_entry(shape=(2**40, 2**40), offsets=(0, 0)), ("[1099511627776, 1099511627776]", "larger")),
    (_entry(shape=(2**62, 4, 0), offsets=(0, 8)), ("do not match",)),
    (_entry(shape=(3,), offsets=(0, 8)), ("offsets 0..8 do not match shape [3] F32",)),
    (_entry(offsets=(8, 0)), ("offsets 8..0",)),
    (_entry(offsets=(-8, 0)), ("offsets -8..0",)),
    (_entry(offsets=(0,)), ("data_offsets [0]",)),
    (_entry(shape=(4,), offsets=(8, 24)), ("truncated", "ends at byte 24")),
    ("not a dict", ("not a JSON object",)),
  ],
)
def test_safetensors_bad_entry(tmp_path, entry, needles):
  path = _safetensors(tmp_path / "x.safetensors", {"w": entry}, data=bytes(16))
  _refused(weights_io.read_safetensors, path, "'w'", *needles)


def test_safetensors_offsets_beyond_eof(tmp_path):
  header = {"w": _entry(shape=(2**20,), offsets=(0, 2**22))}
  path = _safetensors(tmp_path / "x.safetensors", header, data=bytes(64))
  _refused(weights_io.read_safetensors, path, "'w'", "larger than the file")


def test_safetensors_overlapping_tensors(tmp_path):
  header = {"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(4, 12))}
  path = _safetensors(tmp_path / "x.safetensors", header, data=bytes(16))
  _refused(weights_io.read_safetensors, path, "'a' and 'b' overlap")


def test_safetensors_valid_edge_cases_still_read(tmp_path):
  empty = _safetensors(tmp_path / "empty.safetensors", {"__metadata__": {"format": "pt"}})
  assert weights_io.read_safetensors(str(empty)) == {}
  header = {"z": _entry(shape=(0, 3), offsets=(0, 0)), "w": _entry(offsets=(0, 8))}
  path = _safetensors(tmp_path / "x.safetensors", header, data=np.arange(2, dtype="<f4").tobytes())
  out = weights_io.read_safetensors(str(path))
  assert list(out) == ["z", "w"] and out["z"].shape == (0, 3)
  np.testing.assert_array_equal(out["w"], [0.0, 1.0])


def _index(directory, weight_map):
  (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_shard_index_outside_the_directory(tmp_path):
  _index(tmp_path, {"w": "../elsewhere.safetensors"})
  _refused(weights_io.read_hf_weights, tmp_path, "'../elsewhere.safetensors'", "model directory")
  _index(tmp_path, {"w": "/etc/passwd"})
  _refused(weights_io.read_hf_weights, tmp_path, "'/etc/passwd'")
  _index(tmp_path, {"w": 3})
  _refused(weights_io.read_hf_weights, tmp_path, "weight_map")


def test_shard_index_tensor_in_two_shards(tmp_path):
  for name in ("a.safetensors", "b.safetensors"):
    weights_io.write_safetensors(str(tmp_path / name), {"w": np.zeros(2, np.float32)})
  _index(tmp_path, {"w": "a.safetensors", "v": "b.safetensors"})
  _refused(weights_io.read_hf_weights, tmp_path, "'w' is in both a.safetensors and b.safetensors")


# ------------------------------------------------------------------------------------------ GGUF

F32, Q4_0 = 0, 2


def _str(s: str | bytes) -> bytes:
  b = s.encode() if isinstance(s, str) else s
  return struct.pack("<Q", len(b)) + b


def _gguf(path, *, kvs=(), tensors=(), n_tensors=None, n_kv=None, data=b"", version=3):
  """A GGUF file from raw parts: kvs [(key, value type, payload)], tensors [(name, dims, type,
  offset)]; counts default to the lengths."""
  out = b"GGUF" + struct.pack("<I", version)
  out += struct.pack(
    "<QQ", len(tensors) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv
  )
  for key, vtype, payload in kvs:
    out += _str(key) + struct.pack("<I", vtype) + payload
  for name, dims, ttype, offset in tensors:
    out += _str(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ttype, offset)
  out += bytes(-len(out) % 32) + data
  path.write_bytes(out)
  return path


ARCH = ("general.architecture", 8, _str("llama"))


def test_gguf_tensor_count_2_pow_60(tmp_path):
  path = _gguf(tmp_path / "x.gguf", kvs=[ARCH], n_tensors=2**60)
  _refused(gguf_io.open_reader, path, "GGUF", "tensor count 1152921504606846976")


def test_gguf_metadata_count_2_pow_60(tmp_path):
  path = _gguf(tmp_path / "x.gguf", kvs=[ARCH], n_kv=2**60)
  _refused(gguf_io.open_reader, path, "GGUF", "metadata key count 1152921504606846976")


@pytest.mark.parametrize(
  "kv,needle",
  [
    (("k", 8, struct.pack("<Q", 2**63)), "metadata k"),  # a string longer than the file
    (("k", 9, struct.pack("<IQ", 8, 2**40)), "arrays hold over 2000000 items"),  # 2**40 strings
    (("k", 9, struct.pack("<IQ", 8, 10**6)), "1000000 items cannot fit"),
    (("k", 9, struct.pack("<IQ", 4, 2**61)), "metadata k"),  # 2**61 uint32s
    (("k", 9, struct.pack("<IQ", 0, 3 * 10**6) + bytes(3 * 10**6)), "2000000 items"),
    (("k", 9, struct.pack("<IQ", 99, 1)), "unknown array item type 99"),
    (("k", 99, b""), "unknown or too deeply nested value type 99"),
    (("k", 9, struct.pack("<IQ", 9, 1) * 6 + bytes(64)), "too deeply nested"),
    (("general.alignment", 4, struct.pack("<I", 3)), "general.alignment"),
  ],
)
def test_gguf_bad_metadata(tmp_path, kv, needle):
  path = _gguf(tmp_path / "x.gguf", kvs=[ARCH, kv])
  _refused(gguf_io.open_reader, path, "not a valid GGUF file", needle)


def test_gguf_key_longer_than_the_file(tmp_path):
  path = tmp_path / "x.gguf"
  path.write_bytes(b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 2**63) + b"key")
  _refused(gguf_io.open_reader, path, "metadata key")


@pytest.mark.parametrize(
  "tensor,data,needles",
  [
    (("w", [2**40, 2**40], F32, 0), b"", ("'w'", "[1099511627776, 1099511627776]", "larger")),
    (("w", [2**32, 2**32, 2**32, 2**32], Q4_0, 0), b"", ("larger than the file",)),
    (("w", [4], F32, 2**62), bytes(16), ("truncated", "'w'")),
    (("w", [4], F32, 8), bytes(16), ("truncated", "ends at byte")),
    (("w", [1] * 100, F32, 0), bytes(16), ("100 dimensions",)),
    (("w", [2], 999, 0), bytes(16), ("unknown type 999",)),
    (("w", [7], Q4_0, 0), bytes(16), ("whole blocks of 32",)),
    (("w" * 1000, [2], F32, 0), bytes(16), ("at most 256",)),
  ],
  ids=["overflow", "overflow-q4", "offset", "past-eof", "rank", "type", "blocks", "name"],
)
def test_gguf_bad_tensor(tmp_path, tensor, data, needles):
  path = _gguf(tmp_path / "x.gguf", kvs=[ARCH], tensors=[tensor], data=data)
  _refused(gguf_io.open_reader, path, *needles)


def test_gguf_overlapping_tensors(tmp_path):
  tensors = [("a", [4], F32, 0), ("b", [4], F32, 8)]
  path = _gguf(tmp_path / "x.gguf", kvs=[ARCH], tensors=tensors, data=bytes(32))
  _refused(gguf_io.open_reader, path, "'a' and 'b' overlap")


@pytest.mark.parametrize(
  "raw,needle",
  [
    (b"", "0 bytes"),
    (b"GGML" + bytes(60), "no GGUF magic"),
    (b"GGUF" + struct.pack("<IQQ", 99, 0, 0) + bytes(40), "version 99"),
    (b"GGUF" + struct.pack("<IQQ", 1, 0, 0) + bytes(40), "version 1"),
  ],
)
def test_gguf_not_gguf(tmp_path, raw, needle):
  path = tmp_path / "x.gguf"
  path.write_bytes(raw)
  _refused(gguf_io.open_reader, path, "not a valid GGUF file", needle)


def test_gguf_well_formed_files_still_open(tmp_path):
  gguf = pytest.importorskip("gguf")
  raw = _gguf(
    tmp_path / "raw.gguf",
    kvs=[ARCH, ("general.alignment", 4, struct.pack("<I", 64))],
    tensors=[("a", [4], F32, 0), ("b", [2, 2], F32, 64)],
    data=bytes(80),
  )
  reader = gguf_io.open_reader(str(raw))
  assert [t.name for t in reader.tensors] == ["a", "b"]
  path = str(tmp_path / "w.gguf")
  w = gguf.GGUFWriter(path, "llama")
  w.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
  w.add_array("nested", [[1, 2], [3]])
  w.add_tensor("x", np.arange(64, dtype=np.float32).reshape(2, 32))
  w.add_tensor("q", np.zeros((2, 36), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q4_0)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  reader = gguf_io.open_reader(path)
  assert gguf_io.field(reader, "tokenizer.ggml.tokens") == ["a", "bb", "ccc"]
  np.testing.assert_array_equal(reader.tensors[0].data, np.arange(64).reshape(2, 32))
