"""Tests for tinystories.py: download (against a local HTTP server), synth, train_vocab, pretokenize, BatchLoader."""

import glob
import gzip
import io
import json
import os
import shutil
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

import tinystories as ts
from tests.common import LLAMA2_TOKENIZER_MODEL, need
from tokenizer import Tokenizer

# ----------------------------------------------------------------------------- a local server for download tests


def make_archive(n_shards=2, stories=20, members=None) -> bytes:
    """A tar.gz in TinyStories' layout: data00.json ... at the top level, each a json list of stories."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        if members is None:
            members = {f"data{i:02d}.json": json.dumps([{"story": f"Story {i}-{j}. Tom had a ball.", "source": "x"}
                                                        for j in range(stories)]).encode()
                       for i in range(n_shards)}
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class Server:
    """Serves one file at /TinyStories_all_data.tar.gz with Range support, and can misbehave on request:
    cut_first: on the first request send only this many bytes, then close the connection;
    fail_first: answer the first this-many requests with 500; ignore_range: always answer 200 with everything."""

    def __init__(self, payload: bytes, cut_first=None, fail_first=0, ignore_range=False):
        self.payload, self.cut_first, self.fail_first, self.ignore_range = payload, cut_first, fail_first, ignore_range
        self.requests = []  # the headers of each GET
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                n = len(server.requests)
                server.requests.append(dict(self.headers))
                if self.path != "/" + ts.ARCHIVE:
                    self.send_error(404)
                    return
                if n < server.fail_first:
                    self.send_error(500)
                    return
                data, start = server.payload, 0
                rng = self.headers.get("Range")
                if rng and not server.ignore_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if n == 0 and server.cut_first is not None:
                    body = body[: server.cut_first]  # then hang up, short of Content-Length
                    self.close_connection = True
                self.wfile.write(body)
                self.wfile.flush()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    servers = []

    def start(payload, **kw):
        servers.append(Server(payload, **kw))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def leftovers(data_dir):
    return glob.glob(os.path.join(data_dir, ".TinyStories_all_data.*"))


# ----------------------------------------------------------------------------- download


def test_download_and_extract(tmp_path, serve):
    payload = make_archive()
    srv = serve(payload)
    ts.download(str(tmp_path), base_url=srv.url, backoff=0.01)
    assert (tmp_path / ts.ARCHIVE).read_bytes() == payload
    assert not (tmp_path / (ts.ARCHIVE + ".part")).exists()
    shards = ts.json_shards(str(tmp_path))
    assert [os.path.basename(p) for p in shards] == ["data00.json", "data01.json"]
    assert json.load(open(shards[1]))[3]["story"] == "Story 1-3. Tom had a ball."
    assert leftovers(tmp_path) == []
    ts.download(str(tmp_path), base_url=srv.url)  # all done already: no second request
    assert len(srv.requests) == 1


def test_download_sha256(tmp_path, serve):
    payload = make_archive()
    srv = serve(payload)
    with pytest.raises(ts.DataError, match="sha256"):
        ts.download(str(tmp_path), base_url=srv.url, sha256="0" * 64, backoff=0.01)
    assert not (tmp_path / ts.ARCHIVE).exists() and not (tmp_path / "TinyStories_all_data").exists()
    import hashlib
    ts.download(str(tmp_path), base_url=srv.url, sha256=hashlib.sha256(payload).hexdigest(), backoff=0.01)
    assert (tmp_path / ts.ARCHIVE).read_bytes() == payload


def test_cut_transfer_is_resumed_by_the_retry(tmp_path, serve):
    payload = make_archive(stories=2000)  # a few tens of KB
    half = len(payload) // 2
    srv = serve(payload, cut_first=half)
    ts.download(str(tmp_path), base_url=srv.url, retries=3, backoff=0.01)
    assert len(srv.requests) == 2
    assert "Range" not in srv.requests[0]
    assert srv.requests[1]["Range"] == f"bytes={half}-"
    assert (tmp_path / ts.ARCHIVE).read_bytes() == payload
    assert len(ts.json_shards(str(tmp_path))) == 2


def test_cut_transfer_is_resumed_by_the_next_run(tmp_path, serve):
    payload = make_archive(stories=2000)
    half = len(payload) // 2
    srv = serve(payload, cut_first=half)
    with pytest.raises(ts.DataError, match="failed after 1 tries"):
        ts.download(str(tmp_path), base_url=srv.url, retries=0, backoff=0.01)
    assert (tmp_path / (ts.ARCHIVE + ".part")).stat().st_size == half
    assert not (tmp_path / ts.ARCHIVE).exists() and not (tmp_path / "TinyStories_all_data").exists()
    ts.download(str(tmp_path), base_url=srv.url, retries=0)
    assert srv.requests[1]["Range"] == f"bytes={half}-"
    assert (tmp_path / ts.ARCHIVE).read_bytes() == payload


def test_server_ignoring_range_restarts_from_zero(tmp_path, serve):
    payload = make_archive()
    (tmp_path / (ts.ARCHIVE + ".part")).write_bytes(b"stale bytes that are not a prefix")
    srv = serve(payload, ignore_range=True)
    ts.download(str(tmp_path), base_url=srv.url, backoff=0.01)
    assert srv.requests[0]["Range"] == "bytes=33-"
    assert (tmp_path / ts.ARCHIVE).read_bytes() == payload


@pytest.mark.parametrize("extra", [0, 10])
def test_part_that_is_complete_or_too_long(tmp_path, serve, extra):
    """A .part holding the whole file (a crash before its rename) is kept: the server answers 416 for the
    range after its end. One longer than the file is downloaded again from zero."""
    payload = make_archive()
    (tmp_path / (ts.ARCHIVE + ".part")).write_bytes(payload + b"x" * extra)
    srv = serve(payload)
    ts.download(str(tmp_path), base_url=srv.url, backoff=0.01)
    assert [r.get("Range") for r in srv.requests] == [f"bytes={len(payload) + extra}-"] + [None] * (extra > 0)
    assert (tmp_path / ts.ARCHIVE).read_bytes() == payload


def test_server_error_is_retried(tmp_path, serve, capsys):
    payload = make_archive()
    srv = serve(payload, fail_first=2)
    ts.download(str(tmp_path), base_url=srv.url, retries=3, backoff=0.01)
    assert len(srv.requests) == 3
    assert (tmp_path / ts.ARCHIVE).read_bytes() == payload
    assert "HTTP 500" in capsys.readouterr().err


def test_not_found_is_not_retried(tmp_path, serve):
    srv = serve(make_archive())
    with pytest.raises(ts.DataError, match="HTTP 404"):
        ts.download(str(tmp_path), base_url=srv.url + "/elsewhere", retries=3, backoff=0.01)
    assert len(srv.requests) == 1


@pytest.mark.parametrize("damage", ["garbled", "truncated"])
def test_corrupt_archive_fails_cleanly(tmp_path, serve, capsys, damage):
    payload = make_archive(stories=500)
    if damage == "garbled":
        mid = len(payload) // 2
        payload = payload[:mid] + bytes(b ^ 0x5A for b in payload[mid:mid + 64]) + payload[mid + 64:]
    else:
        payload = payload[: len(payload) * 2 // 3]
    srv = serve(payload)
    rc = ts.main(["download", "--base_url", srv.url, "--data_dir", str(tmp_path), "--backoff", "0.01"])
    err = capsys.readouterr().err.strip().splitlines()  # tqdm's progress bars, then the error on one line
    assert rc == 1
    assert err[-1].startswith("error: ") and sum(line.startswith("error") for line in err) == 1
    assert ts.ARCHIVE in err[-1] and "corrupt" in err[-1] and "delete it" in err[-1]
    assert not (tmp_path / "TinyStories_all_data").exists()
    assert leftovers(tmp_path) == []


def test_corrupt_archive_leaves_an_existing_corpus_intact(tmp_path, serve):
    ts.synth(str(tmp_path), n_shards=2, stories_per_shard=10, seed=1)  # a synthetic corpus is replaceable...
    before = {p: open(p, "rb").read() for p in ts.json_shards(str(tmp_path))}
    srv = serve(make_archive()[:-40])
    with pytest.raises(ts.DataError, match="corrupt"):  # ...so download tries to replace it, and fails
        ts.download(str(tmp_path), base_url=srv.url, backoff=0.01)
    assert {p: open(p, "rb").read() for p in ts.json_shards(str(tmp_path))} == before
    assert ts.is_synthetic(str(tmp_path / "TinyStories_all_data"))
    assert leftovers(tmp_path) == []


def test_good_archive_replaces_a_synthetic_corpus(tmp_path, serve):
    ts.synth(str(tmp_path), n_shards=3, stories_per_shard=10, seed=1)
    srv = serve(make_archive())
    ts.download(str(tmp_path), base_url=srv.url, backoff=0.01)
    assert len(ts.json_shards(str(tmp_path))) == 2
    assert not ts.is_synthetic(str(tmp_path / "TinyStories_all_data"))
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("name", ["../evil.json", "/tmp/evil.json", "data00.json"])
def test_unsafe_or_invalid_members_are_rejected(tmp_path, name):
    data = b"not json" if name == "data00.json" else b"[]"
    archive = tmp_path / ts.ARCHIVE
    archive.write_bytes(make_archive(members={name: data}))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with pytest.raises(ts.DataError, match="unsafe|corrupt"):
        ts.extract(str(archive), str(data_dir))
    assert os.listdir(data_dir) == [] and not (tmp_path / "evil.json").exists()


def test_not_a_gzip_at_all(tmp_path):
    archive = tmp_path / ts.ARCHIVE
    archive.write_bytes(gzip.compress(b"plain text, not a tar"))
    with pytest.raises(ts.DataError, match="corrupt"):
        ts.extract(str(archive), str(tmp_path))
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- synth


def test_synth_layout_and_determinism(tmp_path, capsys):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert ts.main(["synth", "--data_dir", str(a), "--n_shards", "2", "--stories_per_shard", "300", "--seed", "7"]) == 0
    assert "synthetic" in capsys.readouterr().out.lower()
    ts.synth(str(b), n_shards=2, stories_per_shard=300, seed=7)
    ts.synth(str(c), n_shards=2, stories_per_shard=300, seed=8)
    files = sorted(os.listdir(a / "TinyStories_all_data"))
    assert files == ["SYNTHETIC.txt", "data00.json", "data01.json"]
    for f in ("data00.json", "data01.json"):
        assert (a / "TinyStories_all_data" / f).read_bytes() == (b / "TinyStories_all_data" / f).read_bytes()
        assert (a / "TinyStories_all_data" / f).read_bytes() != (c / "TinyStories_all_data" / f).read_bytes()
    stories = json.load(open(a / "TinyStories_all_data" / "data00.json"))
    assert len(stories) == 300 and all(s["source"] == "synthetic" for s in stories)
    texts = [s["story"] for s in stories]
    assert len(set(texts)) == 300
    assert len({t.split(". ")[0] for t in texts}) > 150  # many distinct first sentences
    assert len({t.split(". ")[1] for t in texts}) > 100
    assert all('"' in t and t.endswith((".", "!", '"')) and 200 < len(t) < 1500 for t in texts)


def test_synth_pronouns_are_consistent(tmp_path):
    ts.synth(str(tmp_path), n_shards=1, stories_per_shard=200, seed=3)
    for s in json.load(open(tmp_path / "TinyStories_all_data" / "data00.json")):
        first, second = s["story"].split(". ")[:2]
        if " girl named " in first and second.startswith(("He ", "She ")):
            assert second.startswith("She ")
        if " boy named " in first and second.startswith(("He ", "She ")):
            assert second.startswith("He ")


def test_synth_refuses_to_overwrite_a_real_corpus(tmp_path, capsys):
    real = tmp_path / "TinyStories_all_data"
    real.mkdir()
    (real / "data00.json").write_text('[{"story": "real"}]')
    with pytest.raises(ts.DataError, match="not synthetic"):
        ts.synth(str(tmp_path), n_shards=1, stories_per_shard=5)
    assert ts.main(["synth", "--data_dir", str(tmp_path), "--n_shards", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not synthetic" in err and "--force" in err
    assert (real / "data00.json").read_text() == '[{"story": "real"}]'
    ts.synth(str(tmp_path), n_shards=1, stories_per_shard=5, force=True)
    assert ts.is_synthetic(str(real))
    ts.synth(str(tmp_path), n_shards=2, stories_per_shard=5)  # a synthetic corpus may be regenerated
    assert len(ts.json_shards(str(tmp_path))) == 2


# ----------------------------------------------------------------------------- train_vocab + pretokenize


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small synthetic corpus with a 512-piece vocabulary, pretokenized."""
    d = str(tmp_path_factory.mktemp("data"))
    ts.synth(d, n_shards=3, stories_per_shard=400, seed=5)
    ts.train_vocab(512, d)
    stats = ts.pretokenize(512, d, workers=2)
    return d, stats


def stories_of(path):
    return [s["story"].strip() for s in json.load(open(path))]


def split_on_bos(tokens, bos=1):
    starts = np.flatnonzero(tokens == bos)
    return [tokens[a + 1:b].tolist() for a, b in zip(starts, list(starts[1:]) + [len(tokens)], strict=True)]


def test_train_vocab_writes_model_and_bin(corpus):
    d, _ = corpus
    tok = Tokenizer(os.path.join(d, "tok512.model"))
    assert tok.n_words == 512 and tok.bos_id == 1 and tok.eos_id == 2
    assert os.path.getsize(os.path.join(d, "tok512.bin")) > 512 * 9
    assert tok.sp.piece_to_id("<0x0A>") == 3 + 0x0A  # byte fallback pieces
    assert tok.sp.id_to_piece(tok.encode("Tom had a ball.")[1]).startswith("▁")  # dummy prefix, as the C encoder


@pytest.mark.parametrize("size", [100, 32000, 70000])
def test_train_vocab_rejects_bad_sizes(tmp_path, size):
    with pytest.raises(ts.DataError, match="vocab_size"):
        ts.train_vocab(size, str(tmp_path))


def test_pretokenized_shards_decode_to_the_stories(corpus):
    d, stats = corpus
    tok = Tokenizer(os.path.join(d, "tok512.model"))
    assert stats["stories"] == 1200 and stats["seconds"] > 0
    meta = json.load(open(os.path.join(d, "tok512", "meta.json")))
    assert meta["vocab_size"] == 512 and meta["synthetic"] is True
    total = 0
    for json_path in ts.json_shards(d):
        name = os.path.basename(json_path)[:-5] + ".bin"
        tokens = np.fromfile(os.path.join(d, "tok512", name), dtype=np.uint16)
        assert tokens[0] == 1 and (tokens != 2).all()  # BOS first, no EOS
        assert meta["shards"][name]["n_tokens"] == len(tokens) and tokens.max() == meta["shards"][name]["max_id"]
        decoded = [tok.decode(ids) for ids in split_on_bos(tokens)]
        assert decoded == stories_of(json_path)
        total += len(tokens)
    assert total == stats["tokens"]


def test_pretokenize_with_the_llama2_vocab(tmp_path):
    model = str(need(LLAMA2_TOKENIZER_MODEL))
    ts.synth(str(tmp_path), n_shards=3, stories_per_shard=50, seed=2)
    ts.pretokenize(0, str(tmp_path), tokenizer=model, workers=2)
    ts.synth(str(tmp_path), n_shards=2, stories_per_shard=50, seed=2)  # fewer shards: data02.bin goes away
    (tmp_path / "TinyStories_all_data" / "data02.bin").write_bytes(b"\0\0")
    ts.pretokenize(0, str(tmp_path), tokenizer=model, workers=2)
    assert not (tmp_path / "TinyStories_all_data" / "data02.bin").exists()
    out = tmp_path / "TinyStories_all_data"
    assert ts.shard_dir(32000, str(tmp_path)) == ts.shard_dir(0, str(tmp_path)) == str(out)
    tokens = np.fromfile(out / "data01.bin", dtype=np.uint16)
    tok = Tokenizer(model)
    assert [tok.decode(ids) for ids in split_on_bos(tokens)] == stories_of(out / "data01.json")
    assert json.load(open(out / "meta.json"))["vocab_size"] == 32000
    x, y = ts.BatchLoader("train", 2, 16, 32000, data_dir=str(tmp_path)).next_batch()
    assert x.shape == (2, 16)


def test_pretokenize_refuses_vocab_over_uint16(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # a bad value: a usage error
        ts.main(["pretokenize", "--vocab_size=70000", "--data_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "65535" in err


def test_pretokenize_without_corpus_or_vocab(tmp_path):
    with pytest.raises(ts.DataError, match="synth"):  # it would train tok512.model first, but has no stories
        ts.pretokenize(512, str(tmp_path))
    shutil.copy(need(LLAMA2_TOKENIZER_MODEL), tmp_path / "tokenizer.model")
    with pytest.raises(ts.DataError, match="synth"):
        ts.pretokenize(0, str(tmp_path), tokenizer=str(tmp_path / "tokenizer.model"))


# ----------------------------------------------------------------------------- BatchLoader


def contains(shard, window):
    view = np.lib.stride_tricks.sliding_window_view(np.asarray(shard), len(window))
    return bool((view == window).all(axis=1).any())


def test_batches_are_windows_of_the_shards(corpus):
    d, _ = corpus
    shards = [np.fromfile(p, dtype=np.uint16) for p in sorted(glob.glob(os.path.join(d, "tok512", "data*.bin")))]
    for split, allowed in (("train", shards[1:]), ("val", shards[:1])):
        loader = ts.BatchLoader(split, 4, 32, 512, data_dir=d)
        for _ in range(2):
            x, y = loader.next_batch()
            assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
            assert torch.equal(x[:, 1:], y[:, :-1])
            for row in torch.cat([x, y[:, -1:]], dim=1).numpy():
                assert any(contains(s, row) for s in allowed)


def test_batches_are_deterministic_per_seed_and_rank(corpus):
    d, _ = corpus

    def batches(**kw):
        loader = ts.BatchLoader("train", 4, 32, 512, data_dir=d, **kw)
        return [loader.next_batch()[0] for _ in range(3)]

    a, b = batches(seed=1), batches(seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not torch.equal(a[0], batches(seed=2)[0])
    assert not torch.equal(a[0], batches(seed=1, rank=1)[0])
    assert not torch.equal(a[1], a[0])


def test_state_dict_resumes_the_exact_sequence(corpus, tmp_path):
    d, _ = corpus
    loader = ts.BatchLoader("train", 4, 32, 512, data_dir=d, seed=9)
    for _ in range(3):
        loader.next_batch()
    torch.save({"loader": loader.state_dict()}, tmp_path / "ckpt.pt")
    expected = [loader.next_batch() for _ in range(2)]
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["loader"]
    assert state["batch_index"] == 3
    resumed = ts.BatchLoader("train", 4, 32, 512, data_dir=d)  # default seed: the state brings seed 9
    resumed.load_state_dict(state)
    for (x, y), (x2, y2) in zip(expected, [resumed.next_batch() for _ in range(2)], strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_loader_errors(corpus, tmp_path):
    d, _ = corpus
    with pytest.raises(ts.DataError, match=r"pretokenize --vocab_size=512"):
        ts.BatchLoader("train", 2, 8, 512, data_dir=str(tmp_path))
    with pytest.raises(ts.DataError, match=r"pretokenize --vocab_size=0"):
        ts.BatchLoader("train", 2, 8, 32000, data_dir=str(tmp_path))
    # shards made with the 512 vocab, found where a 1024 vocab's shards should be
    shutil.copytree(os.path.join(d, "tok512"), tmp_path / "tok1024")
    with pytest.raises(ts.DataError, match="512-piece vocabulary but vocab_size is 1024"):
        ts.BatchLoader("train", 2, 8, 1024, data_dir=str(tmp_path))
    # without meta.json (as llama2.c writes them) the ids themselves are checked
    shutil.copytree(os.path.join(d, "tok512"), tmp_path / "tok300")
    os.remove(tmp_path / "tok300" / "meta.json")
    with pytest.raises(ts.DataError, match="token ids >= vocab_size 300"):
        ts.BatchLoader("train", 2, 8, 300, data_dir=str(tmp_path))
    with pytest.raises(ts.DataError, match="too short"):
        ts.BatchLoader("val", 2, 10_000_000, 512, data_dir=d)
    one = tmp_path / "one" / "tok512"
    one.mkdir(parents=True)
    shutil.copy(os.path.join(d, "tok512", "data00.bin"), one)
    with pytest.raises(ts.DataError, match="at least two"):
        ts.BatchLoader("train", 2, 8, 512, data_dir=str(tmp_path / "one"))


def test_loader_detects_stale_shards(corpus, tmp_path):
    d, _ = corpus
    shutil.copytree(d, tmp_path / "d")
    with open(tmp_path / "d" / "TinyStories_all_data" / "data01.json", "a") as f:
        f.write(" ")  # the corpus changed after pretokenize
    with pytest.raises(ts.DataError, match="stale"):
        ts.BatchLoader("train", 2, 8, 512, data_dir=str(tmp_path / "d"))
