"""modelbin.py, byte by byte: headers at their offsets, tensor order, Q8_0, tokenizer.bin, bad files.

Expected bytes and sizes are written out by hand from docs/formats.md, not computed by modelbin.
"""

import subprocess
import sys

import numpy as np
import pytest

import modelbin
from modelbin import FormatError, Header
from tests.common import ROOT

# dim 4, hidden_dim 8, 2 layers, 2 heads of size 2, 1 kv head (kv_dim 2), vocab 3, seq_len 2
SHAPE = dict(dim=4, hidden_dim=8, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=3, seq_len=2)
# per layer: wq 4x4, wk 2x4, wv 2x4, wo 4x4, w1 8x4, w2 4x8, w3 8x4
SIZES = {"emb": 12, "norm": 4, "wq": 16, "wk": 8, "wv": 8, "wo": 16, "w1": 32, "w2": 32, "w3": 32, "rope": 2}
NAMES = {"emb": "tok_embeddings.weight", "final": "norm.weight", "out": "output.weight",
         "att": "layers.{}.attention_norm.weight", "ffn": "layers.{}.ffn_norm.weight",
         "wq": "layers.{}.attention.wq.weight", "wk": "layers.{}.attention.wk.weight",
         "wv": "layers.{}.attention.wv.weight", "wo": "layers.{}.attention.wo.weight",
         "w1": "layers.{}.feed_forward.w1.weight", "w2": "layers.{}.feed_forward.w2.weight",
         "w3": "layers.{}.feed_forward.w3.weight", "cos": "rope.cos", "sin": "rope.sin"}
# (name, number of floats) in file order, as docs/formats.md lists them; "*" marks all layers of a kind in a row
V0_ORDER = ["emb", "att*", "wq*", "wk*", "wv*", "wo*", "ffn*", "w1*", "w2*", "w3*", "final", "cos", "sin", "out"]
V1_ORDER = ["att*", "ffn*", "final", "emb", "wq*", "wk*", "wv*", "wo*", "w1*", "w2*", "w3*", "out"]
V2_FP32, V2_Q80 = ["att*", "ffn*", "final"], ["emb", "wq*", "wk*", "wv*", "wo*", "w1*", "w2*", "w3*", "out"]

EPS_1E5, THETA_1E4 = bytes.fromhex("f168e388b5f8e43e"), bytes.fromhex("000000000088c340")  # f64 1e-5, 10000.0
EPS_1E6, THETA_5E5 = bytes.fromhex("8dedb5a0f7c6b03e"), bytes.fromhex("0000000080841e41")  # f64 1e-6, 500000.0


def expand(order, shared):
    """[(state-dict name, float count)] for an order like V0_ORDER, two layers."""
    out = []
    for item in order:
        key = item.rstrip("*")
        if key == "out" and shared:
            continue
        count = {"att": 4, "ffn": 4, "final": 4, "cos": 2, "sin": 2, "out": 12}.get(key) or SIZES[key]
        names = [NAMES[key].format(i) for i in range(2)] if item.endswith("*") else [NAMES[key]]
        out += [(name, count) for name in names]
    return out


def constant_tensors(shared=False):
    """Every tensor filled with its own value 1, 2, 3, ... (in v1 file order), so a file shows its order."""
    shapes = modelbin.tensor_shapes(Header(1, **SHAPE))
    return {name: np.full(shapes[name], float(i + 1), np.float32)
            for i, (name, _) in enumerate(expand(V1_ORDER, shared) + expand(["cos", "sin"], True))}


def floats(data: bytes, offset: int) -> np.ndarray:
    return np.frombuffer(data, "<f4", offset=offset)


# -----------------------------------------------------------------------------
# headers


def test_v1_header_bytes(tmp_path):
    path = tmp_path / "m.bin"
    modelbin.write_model(path, Header(1, **SHAPE), constant_tensors(shared=True))
    data = path.read_bytes()
    assert data[0:4] == b"24ka"  # magic 0x616b3432, little endian
    assert data[4:8] == bytes([1, 0, 0, 0])
    assert data[8:36] == bytes.fromhex("04000000" "08000000" "02000000" "02000000" "01000000" "03000000" "02000000")
    assert data[36] == 1  # shared classifier
    assert data[37:64] == bytes(27)  # no group size in v1
    assert data[64:72] == EPS_1E5 and data[72:80] == THETA_1E4  # writers always fill them
    assert data[80:256] == bytes(176)
    assert len(data) == 1536  # 256 + 4 * (20 norms + 12 embedding + 2 * 144 per layer)


def test_v2_header_bytes_and_size(tmp_path):
    path = tmp_path / "m.bin"
    h = Header(2, **SHAPE, shared_classifier=False, group_size=4, norm_eps=1e-6, rope_theta=500000.0)
    modelbin.write_model(path, h, constant_tensors())
    data = path.read_bytes()
    assert data[0:8] == b"24ka" + bytes([2, 0, 0, 0])
    assert data[36] == 0  # unshared classifier
    assert data[37:41] == bytes([4, 0, 0, 0])  # group size, unaligned right after the flag
    assert data[41:64] == bytes(23)
    assert data[64:72] == EPS_1E6 and data[72:80] == THETA_5E5
    # 256 + 4 * 20 norms + (300 + 12 classifier) int8 + (312 / 4) fp32 scales
    assert len(data) == 256 + 80 + 312 + 4 * 78 == 960
    assert modelbin.read_header(path) == h


def test_v0_header_is_seven_ints_and_negative_vocab_means_unshared(tmp_path):
    path = tmp_path / "m.bin"
    modelbin.write_model(path, Header(0, **SHAPE, shared_classifier=False), constant_tensors())
    data = path.read_bytes()
    assert data[:28] == bytes.fromhex("04000000" "08000000" "02000000" "02000000" "01000000" "fdffffff" "02000000")
    assert len(data) == 28 + 4 * (320 + 2 + 2 + 12) == 1372  # weights, the two RoPE tables, the classifier
    h = modelbin.read_header(path)
    assert (h.version, h.vocab_size, h.shared_classifier, h.group_size) == (0, 3, False, 0)
    assert (h.norm_eps, h.rope_theta) == (1e-5, 10000.0)


def test_zero_eps_and_theta_mean_the_defaults(tmp_path):
    # llama2.c's exporter leaves bytes 64..80 zero
    path = tmp_path / "m.bin"
    modelbin.write_model(path, Header(1, **SHAPE, norm_eps=1e-6, rope_theta=500000.0), constant_tensors(True))
    data = bytearray(path.read_bytes())
    assert data[64:80] == EPS_1E6 + THETA_5E5
    data[64:80] = bytes(16)
    path.write_bytes(data)
    h = modelbin.read_header(path)
    assert h.norm_eps == 1e-5 and h.rope_theta == 10000.0


def test_v0_refuses_other_eps_or_theta(tmp_path):
    path = tmp_path / "m.bin"
    for fields in (dict(norm_eps=1e-6), dict(rope_theta=500000.0)):
        with pytest.raises(FormatError, match="--version 1") as info:
            modelbin.write_model(path, Header(0, **SHAPE, **fields), constant_tensors())
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not path.exists()


# -----------------------------------------------------------------------------
# tensor order


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "unshared"])
@pytest.mark.parametrize("version, order, header_bytes", [(0, V0_ORDER, 28), (1, V1_ORDER, 256)])
def test_fp32_tensor_order(tmp_path, version, order, header_bytes, shared):
    tensors = constant_tensors(shared=False)
    path = tmp_path / "m.bin"
    modelbin.write_model(path, Header(version, **SHAPE, shared_classifier=shared), tensors)
    expected = np.concatenate([np.full(count, tensors[name][(0,) * tensors[name].ndim])
                               for name, count in expand(order, shared)])
    assert np.array_equal(floats(path.read_bytes(), header_bytes), expected)
    header, back = modelbin.read_model(path)
    assert header.version == version and header.shared_classifier == shared
    assert ("output.weight" in back) == (not shared) and ("rope.cos" in back) == (version == 0)
    for name, t in back.items():
        assert t.dtype == np.float32 and np.array_equal(t, tensors[name])


def test_v2_layout_each_matrix_then_its_scales(tmp_path):
    tensors = constant_tensors()
    path = tmp_path / "m.bin"
    modelbin.write_model(path, Header(2, **SHAPE, shared_classifier=False, group_size=4), tensors)
    data = path.read_bytes()
    norms = expand(V2_FP32, False)
    assert np.array_equal(floats(data[:256 + 80], 256), np.concatenate([np.full(n, tensors[k][0]) for k, n in norms]))
    offset = 256 + 80
    for name, count in expand(V2_Q80, False):
        value = tensors[name].flat[0]
        assert data[offset : offset + count] == b"\x7f" * count  # a constant quantizes to 127 everywhere
        scales = floats(data[offset + count : offset + count + count], 0)  # count / 4 scales, 4 bytes each
        assert len(scales) == count // 4 and np.all(scales == scales[0])
        assert abs(scales[0] * 127 - value) <= value * 1e-6
        offset += count + count
    assert offset == len(data)


def test_rope_tables_when_not_given(tmp_path):
    cos, sin = modelbin.rope_tables_np(head_dim=2, seq_len=2)  # one frequency, 1.0, at positions 0 and 1
    assert np.allclose(cos, [[1.0], [0.5403023]]) and np.allclose(sin, [[0.0], [0.84147098]])
    tensors = constant_tensors()
    del tensors["rope.cos"], tensors["rope.sin"]
    path = tmp_path / "m.bin"
    modelbin.write_model(path, Header(0, **SHAPE), tensors)
    tail = floats(path.read_bytes(), len(path.read_bytes()) - 16)
    assert np.allclose(tail, [1.0, 0.5403023, 0.0, 0.84147098])


# -----------------------------------------------------------------------------
# Q8_0


def test_quantize_q80_by_hand():
    w = np.array([0.0, 0.5, -1.0, 0.25, 2.0, 2.0, -2.0, 1.0], np.float32)
    q, scale = modelbin.quantize_q80(w, 4)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and q.shape == (8,) and scale.shape == (2,)
    # group 1: scale 1/127, 0.5 * 127 = 63.5 rounds half to even; group 2: scale 2/127
    assert q.tolist() == [0, 64, -127, 32, 127, 127, -127, 64]
    assert abs(scale[0] - 1 / 127) < 1e-9 and abs(scale[1] - 2 / 127) < 1e-9
    assert np.allclose(modelbin.dequantize_q80(q, scale, 4), [0, 64 / 127, -1, 32 / 127, 2, 2, -2, 128 / 127])
    zero_q, zero_scale = modelbin.quantize_q80(np.zeros(4, np.float32), 4)
    assert zero_q.tolist() == [0, 0, 0, 0] and zero_scale.tolist() == [0.0]  # no division by zero
    with pytest.raises(ValueError, match="groups of 3"):
        modelbin.quantize_q80(w, 3)


def test_v2_reads_back_the_dequantized_weights(tmp_path):
    h = Header(2, **SHAPE, group_size=4)
    tensors = modelbin.random_tensors(h, seed=1)
    path = tmp_path / "m.bin"
    worst = modelbin.write_model(path, h, tensors)
    _, back = modelbin.read_model(path)
    for name, t in back.items():
        if name.endswith("norm.weight"):
            assert np.array_equal(t, tensors[name])
        else:
            assert 0 < np.abs(t - tensors[name]).max() <= worst
            assert np.abs(t - tensors[name]).max() <= np.abs(tensors[name]).max() / 254 * 1.0001


def test_pick_group_size():
    assert modelbin.pick_group_size(288, 768) == 32  # 15M: 288 = 9 * 32
    assert modelbin.pick_group_size(512, 1376) == 64  # 42M: w2's groups straddle rows in halves of 32
    assert modelbin.pick_group_size(64, 172) == 4  # stories260K: 172 = 43 * 4
    assert modelbin.pick_group_size(40, 104) == 8
    assert modelbin.pick_group_size(768, 2048) == 64  # 110M


# -----------------------------------------------------------------------------
# random weights


def test_random_tensors():
    h = Header(1, **SHAPE, shared_classifier=False)
    a, b = modelbin.random_tensors(h, seed=7), modelbin.random_tensors(h, seed=7)
    shapes = modelbin.tensor_shapes(h)
    assert set(a) == {name for name, _ in expand(V1_ORDER, shared=False)}
    for name, t in a.items():
        assert t.dtype == np.float32 and t.shape == shapes[name] and np.array_equal(t, b[name])
    assert np.all(a["norm.weight"] == 1.0) and np.all(a["tok_embeddings.weight"][1] == 0.0)
    assert not np.array_equal(a["layers.0.attention.wq.weight"], modelbin.random_tensors(h, seed=8)[
        "layers.0.attention.wq.weight"])
    assert "output.weight" not in modelbin.random_tensors(Header(1, **SHAPE), seed=7)


# -----------------------------------------------------------------------------
# tokenizer.bin


def test_tokenizer_bytes_and_round_trip(tmp_path):
    path = tmp_path / "tok.bin"
    modelbin.write_tokenizer(path, [b"a", b"bc"], [-1.0, 0.5])
    assert path.read_bytes() == bytes.fromhex("02000000" "000080bf" "01000000" "61" "0000003f" "02000000" "6263")
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n", b" the", "é".encode(), b""]
    scores = [0.0, 0.0, 0.0, -1.5, -1e9, 0.1]
    modelbin.write_tokenizer(path, pieces, scores)
    assert path.read_bytes()[:4] == bytes([6, 0, 0, 0])  # longest piece: "\n</s>\n"
    assert modelbin.read_tokenizer(path) == (pieces, [0.0, 0.0, 0.0, -1.5, -1e9, 0.100000001490116119384765625])
    assert modelbin.read_tokenizer(path, vocab_size=6)[0] == pieces


def test_tokenizer_bad_files(tmp_path):
    path = tmp_path / "tok.bin"
    modelbin.write_tokenizer(path, [b"a", b"bc"], [-1.0, 0.5])
    good = path.read_bytes()
    cases = {
        "left over": (good, 1),  # a file of 2 pieces for a vocabulary of 1
        "cut off at piece 2 of 3": (good, 3),
        "cut off inside piece 1": (good[:-1], None),
        "max_token_length 0": (bytes(4) + good[4:], None),
        "piece 1 has length 2, outside 0..max_token_length 1": (bytes([1, 0, 0, 0]) + good[4:], None),
        "4-byte header": (b"\x02", None),
    }
    for expect, (data, vocab_size) in cases.items():
        path.write_bytes(data)
        with pytest.raises(FormatError, match=expect) as info:
            modelbin.read_tokenizer(path, vocab_size)
        assert str(path) in str(info.value)
    with pytest.raises(FormatError, match="no such file"):
        modelbin.read_tokenizer(tmp_path / "missing.bin")


# -----------------------------------------------------------------------------
# bad model files


def _patched(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new) :]


def test_bad_model_files_name_the_file_and_the_problem(tmp_path):
    good = tmp_path / "good.bin"
    modelbin.write_model(good, Header(2, **SHAPE, group_size=4), constant_tensors())
    v2 = good.read_bytes()
    modelbin.write_model(good, Header(0, **SHAPE), constant_tensors())
    v0 = good.read_bytes()
    cases = {
        "empty": (b"", "empty file"),
        "tiny": (b"\x01\x02", "too short"),
        "short_header": (v2[:100], "too short for a 256-byte v2 header"),
        "version": (_patched(v2, 4, bytes([3, 0, 0, 0])), "version 3"),
        "truncated": (v2[:-1], "truncated"),
        "trailing": (v2 + b"\0", "trailing bytes"),
        "zero_dim": (_patched(v2, 8, bytes(4)), "dim = 0 is out of range"),
        "v0_huge_layers": (_patched(v0, 8, bytes([0, 0, 1, 0])), "n_layers = 65536 is out of range"),
        "heads": (_patched(v0, 12, bytes([3, 0, 0, 0])), "dim 4 is not divisible by n_heads 3"),
        "kv_heads": (_patched(v2, 24, bytes([3, 0, 0, 0])), "n_heads 2 is not divisible by n_kv_heads 3"),
        "flag": (_patched(v2, 36, bytes([2])), "flag is 2"),
        "group_size": (_patched(v2, 37, bytes([3, 0, 0, 0])), "group size 3 does not divide dim 4"),
        "eps": (_patched(v2, 64, bytes.fromhex("000000000000f8ff")), "norm_eps = nan"),  # a NaN
        "theta": (_patched(v2, 72, bytes.fromhex("00000000000000c0")), "rope_theta = -2.0"),
        # 2^129, past float32's range
        "theta_huge": (_patched(v2, 72, bytes.fromhex("0000000000000048")), "rope_theta = 6.80564733841877e+38"),
        "text": (b"hello, this is not a model at all\n" * 4, "not a llama2.c model.bin?"),
    }
    for name, (data, expect) in cases.items():
        path = tmp_path / f"{name}.bin"
        path.write_bytes(data)
        with pytest.raises(FormatError) as info:
            modelbin.read_model(path)
        message = str(info.value)
        assert message.startswith(f"{path}: ") and expect in message and "\n" not in message, (name, message)
    with pytest.raises(FormatError, match="no such file"):
        modelbin.read_model(tmp_path / "missing.bin")
    with pytest.raises(FormatError, match="not a regular file"):
        modelbin.read_model(tmp_path)


def test_write_model_checks_its_input(tmp_path):
    path = tmp_path / "m.bin"
    tensors = constant_tensors()
    with pytest.raises(FormatError, match="group size 3"):
        modelbin.write_model(path, Header(2, **SHAPE, group_size=3), tensors)
    with pytest.raises(FormatError, match=r"layers.1.feed_forward.w2.weight has shape \(8, 4\), the header says "
                                          r"\(4, 8\)"):
        modelbin.write_model(path, Header(1, **SHAPE), {**tensors, "layers.1.feed_forward.w2.weight": np.ones((8, 4))})
    del tensors["layers.0.ffn_norm.weight"]
    with pytest.raises(FormatError, match="no tensor layers.0.ffn_norm.weight"):
        modelbin.write_model(path, Header(1, **SHAPE), tensors)
    assert list(tmp_path.iterdir()) == []


def test_write_model_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.bin"
    path.write_bytes(b"old")
    calls = []

    def crashing(w, group_size):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("simulated crash")
        return quantize(w, group_size)

    quantize = modelbin.quantize_q80
    monkeypatch.setattr(modelbin, "quantize_q80", crashing)
    with pytest.raises(RuntimeError, match="simulated"):
        modelbin.write_model(path, Header(2, **SHAPE, group_size=4), constant_tensors())
    assert [p.name for p in tmp_path.iterdir()] == ["m.bin"] and path.read_bytes() == b"old"


def test_expected_size_by_hand():
    sizes = {(0, True): 1324, (0, False): 1372, (1, True): 1536, (1, False): 1584, (2, True): 936, (2, False): 960}
    for (version, shared), size in sizes.items():
        h = Header(version, **SHAPE, shared_classifier=shared, group_size=4 if version == 2 else 0)
        assert modelbin.expected_size(h) == size, (version, shared)


def test_import_does_not_pull_in_torch():
    code = "import sys, modelbin; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
