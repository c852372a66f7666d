"""
The TinyStories data pipeline, as in llama2.c's tinystories.py:

    python tinystories.py download                      # fetch + extract data/TinyStories_all_data/
    python tinystories.py synth                         # OR: an offline synthetic corpus (synth.py), same layout
    python tinystories.py train_vocab --vocab_size=512  # data/tok512.model + data/tok512.bin
    python tinystories.py pretokenize                   # data/tok512/data00.bin ... (trains tok512 if missing)
    python tinystories.py pretokenize --vocab_size=0    # Llama 2 vocab: data/TinyStories_all_data/data00.bin ...

and the batch loader that train.py uses (BatchLoader). Layout under the data dir (default `data/`, or
$LLAMA2_DATA_DIR, or --data_dir):

    TinyStories_all_data.tar.gz          the downloaded archive (.part while downloading)
    TinyStories_all_data/data00.json     json shards: a list of {"story": ..., ...} objects
    TinyStories_all_data/data00.bin      shards pretokenized with the Llama 2 vocab (vocab_size 0 / 32000)
    tok512.model, tok512.bin             a custom vocabulary (SentencePiece model, llama2.c tokenizer.bin)
    tok512/data00.bin                    shards pretokenized with it
    */meta.json                          what the shards were made with (vocab_size, tokenizer, token counts)

A shard .bin is a flat array of uint16 token ids: each story is BOS + its tokens, no EOS.
The first shard is the validation split, the rest are the training split.
"""

import argparse
import contextlib
import glob
import hashlib
import itertools
import json
import os
import shutil
import socket
import sys
import tarfile
import tempfile
import threading
import time
import urllib.parse
import zlib
from multiprocessing import Pool

import numpy as np
import requests
import urllib3
from tqdm import tqdm

import cmdline
from atomicfile import WriteError, atomic_write, remove_leftovers
from synth import is_synthetic, write_corpus
from tokenizer import Tokenizer, TokenizerError

DATA_DIR = os.environ.get("LLAMA2_DATA_DIR", "data")
BASE_URL = os.environ.get(
    "TINYSTORIES_BASE_URL", "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main"
)
ARCHIVE = "TinyStories_all_data.tar.gz"
CORPUS = "TinyStories_all_data"  # the directory the archive extracts to
LLAMA2_VOCAB_SIZE = 32000  # vocab_size 32000 (or 0 on the command line) = the Llama 2 tokenizer
LLAMA2_TOKENIZER = "tokenizer.model"
DEFAULT_VOCAB_SIZE = 512  # the custom vocabulary train_vocab and pretokenize make unless told otherwise
MIN_VOCAB_SIZE = 260  # 256 byte-fallback pieces + <unk>, <s>, </s> + at least one merge
MAX_VOCAB_SIZE = 65535  # ids are stored as uint16


class DataError(Exception):
    """A problem with the data the user can fix; the message is one line, shown as is."""


def corpus_dir(data_dir: str = DATA_DIR) -> str:
    return os.path.join(data_dir, CORPUS)


def json_shards(data_dir: str = DATA_DIR) -> list[str]:
    return sorted(glob.glob(os.path.join(corpus_dir(data_dir), "data*.json")))


def shard_dir(vocab_size: int, data_dir: str = DATA_DIR) -> str:
    """Where the pretokenized shards for this vocab live: beside the json for the Llama 2 vocab
    (vocab_size 32000, or 0), in data/tok{N}/ for a custom vocab of N pieces."""
    if vocab_size in (0, LLAMA2_VOCAB_SIZE):
        return corpus_dir(data_dir)
    return os.path.join(data_dir, f"tok{vocab_size}")


def shard_meta(vocab_size: int, data_dir: str = DATA_DIR) -> dict | None:
    """The meta.json pretokenize wrote for this vocab's shards, or None where there is none (or a broken one)."""
    meta, _ = read_meta(os.path.join(shard_dir(vocab_size, data_dir), "meta.json"))
    return meta


SHARD_INFO_KEYS = ("stories", "n_tokens", "max_id", "json_bytes")  # per shard in meta.json, each a count


def read_meta(path: str) -> tuple[dict | None, str | None]:
    """(meta.json's content, None), or (None, what is wrong with it). Never blocks on a FIFO."""
    if not os.path.isfile(path):
        return None, "not a regular file" if os.path.exists(path) else "missing"
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        return None, f"unreadable ({e})"
    shards = meta.get("shards") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or not _is_count(meta.get("vocab_size")) or not isinstance(shards, dict):
        return None, "not what pretokenize writes (vocab_size and shards)"
    for name, info in shards.items():
        if not isinstance(info, dict) or not all(_is_count(info.get(k)) for k in SHARD_INFO_KEYS):
            return None, f"its entry for {name} is not what pretokenize writes ({', '.join(SHARD_INFO_KEYS)})"
    return meta, None


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def prepared_vocab_sizes(data_dir: str = DATA_DIR) -> list[int]:
    """The vocab sizes pretokenize has made shards for in data_dir, the most recent first."""
    metas = glob.glob(os.path.join(data_dir, "tok*", "meta.json")) + [os.path.join(corpus_dir(data_dir), "meta.json")]
    found = []
    for path in metas:
        meta, _ = read_meta(path)
        if meta is not None:
            found.append((os.path.getmtime(path), meta["vocab_size"]))
    return [size for _, size in sorted(found, reverse=True)]


def describe_shards(vocab_size: int, data_dir: str = DATA_DIR) -> str:
    """One phrase for a log line: which shards, of which corpus, how many tokens."""
    d, meta = shard_dir(vocab_size, data_dir), shard_meta(vocab_size, data_dir)
    if meta is None:
        return f"{d} (not pretokenized yet)"
    corpus = "the synthetic corpus" if meta.get("synthetic") else "TinyStories"
    tokens = sum(info["n_tokens"] for info in meta.get("shards", {}).values())
    return f"{d} ({corpus}, {meta['vocab_size']}-piece vocabulary, {tokens / 1e6:.1f}M tokens)"


# -----------------------------------------------------------------------------
# download: stream the archive with resume + retries, then extract it safely


class RetryableError(Exception):
    pass


OFFLINE_HINT = ("offline? `python tinystories.py synth` writes the synthetic corpus instead, or point --base_url "
                "(or $TINYSTORIES_BASE_URL) at a mirror")
NETWORK_TIMEOUT = 15.0  # seconds a request may wait for a connection, or for the next bytes, before it fails


def check_reachable(url: str, deadline: float = 8.0) -> None:
    """Fail fast when the server cannot be reached at all (offline, a wrong --base_url): name resolution and
    a TCP connection, tried for at most `deadline` seconds. Transfers cut later are download_file's to retry."""
    parts = urllib.parse.urlsplit(url)
    proxy = requests.utils.get_environ_proxies(url).get(parts.scheme)
    if proxy:  # requests connects to the proxy, not to the server
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    address = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    end = time.monotonic() + deadline
    while True:
        problem = _connect_problem(address, end - time.monotonic())
        if problem is None:
            return
        if time.monotonic() + 1.0 >= end:
            raise DataError(f"cannot reach {address[0]}:{address[1]} ({problem}); {OFFLINE_HINT}")
        time.sleep(1.0)


def _connect_problem(address: tuple[str, int], timeout: float) -> str | None:
    """Why a TCP connection to address fails within timeout seconds (None: it works). In a thread, since
    name resolution ignores socket timeouts and can hang on a machine without a network."""
    result = ["timed out"]

    def connect():
        try:
            socket.create_connection(address, timeout=max(timeout, 0.1)).close()
            result[0] = None
        except OSError as e:
            result[0] = (e.strerror or str(e) or type(e).__name__) if not isinstance(e, TimeoutError) else "timed out"

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(max(timeout, 0.1))
    return result[0]


def download_file(url: str, dest: str, sha256: str | None = None, retries: int = 5, backoff: float = 2.0,
                  chunk_size: int = 1 << 20, timeout: float = NETWORK_TIMEOUT) -> str:
    """Download url to dest through dest.part, resuming a partial .part with an HTTP Range request.
    Connection errors, cut-off transfers and 5xx answers are retried `retries` times, waiting
    backoff, 2*backoff, 4*backoff... seconds. dest appears (atomic rename) only once complete."""
    part = dest + ".part"
    for attempt in range(retries + 1):
        try:
            _download_once(url, part, chunk_size, timeout)
            break
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                urllib3.exceptions.HTTPError, RetryableError) as e:
            if attempt == retries:
                raise DataError(f"download of {url} failed after {retries + 1} tries: {e}; {OFFLINE_HINT}") from None
            wait = backoff * 2 ** attempt
            print(f"download interrupted ({e}); retrying in {wait:.1f}s", file=sys.stderr)
            time.sleep(wait)
        except requests.RequestException as e:  # what retrying cannot fix: a redirect loop, a malformed URL...
            raise DataError(f"download of {url} failed: {' '.join(str(e).split())}; {OFFLINE_HINT}") from None
    if sha256 is not None:
        got = file_sha256(part)
        if got != sha256.lower():
            os.remove(part)  # the bytes are wrong; resuming from them would never help
            raise DataError(f"{url}: sha256 {got} does not match the expected {sha256}; removed the download")
    os.replace(part, dest)
    return dest


def _download_once(url: str, part: str, chunk_size: int, timeout: float) -> None:
    """One request: continue part from where it stops (or start it). Raises RetryableError if the
    transfer stops short, DataError for answers retrying cannot fix (404...)."""
    offset = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"Accept-Encoding": "identity"}  # the raw bytes, so offsets mean what they say
    if offset > 0:
        headers["Range"] = f"bytes={offset}-"
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
        if r.status_code == 416:  # nothing left at that offset: "Content-Range: bytes */total"
            if r.headers.get("Content-Range", "").rpartition("/")[2] == str(offset):
                return  # the .part was complete already (stopped before its rename)
            os.remove(part)  # our .part is longer than the file: start again
            raise RetryableError(f"server refused resuming at byte {offset}; restarting from zero")
        if r.status_code >= 500 or r.status_code in (408, 429):
            raise RetryableError(f"HTTP {r.status_code} from {url}")
        if r.status_code not in (200, 206):
            raise DataError(f"HTTP {r.status_code} from {url}: is --base_url right? {OFFLINE_HINT}")
        if r.status_code == 206:  # a resumed transfer: "Content-Range: bytes start-end/total"
            start, total = _parse_content_range(r.headers.get("Content-Range", ""))
            if start != offset:
                os.remove(part)
                raise RetryableError(f"server resumed at byte {start}, not {offset}; restarting from zero")
            mode = "ab"
        else:  # 200: the whole file, whether we asked for a range or not
            if offset > 0:
                print(f"server ignored the Range request; downloading {url} from the start", file=sys.stderr)
            offset = 0
            length = r.headers.get("Content-Length")
            total = int(length) if length is not None and length.strip().isdigit() else None
            mode = "wb"
        with open(part, mode) as f, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                         unit_divisor=1024, desc=os.path.basename(url)) as bar:
            # read1: whatever has arrived (up to chunk_size), so a cut connection loses no received bytes
            read = getattr(r.raw, "read1", r.raw.read)  # (read1 is urllib3 >= 2.2)
            for chunk in iter(lambda: read(chunk_size), b""):
                f.write(chunk)
                bar.update(len(chunk))
    size = os.path.getsize(part)
    if total is not None and size < total:
        raise RetryableError(f"connection closed at byte {size} of {total}")
    if total is not None and size > total:
        os.remove(part)
        raise RetryableError(f"got {size} bytes but the server announced {total}; restarting from zero")


def _parse_content_range(value: str) -> tuple[int, int | None]:
    try:  # "bytes 100-999/1000" (total may be "*")
        unit, spec = value.split(" ", 1)
        span, total = spec.split("/")
        assert unit == "bytes"
        return int(span.split("-")[0]), None if total == "*" else int(total)
    except (ValueError, AssertionError):
        raise RetryableError(f"bad Content-Range header {value!r}") from None


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def extract(archive: str, data_dir: str = DATA_DIR) -> str:
    """Extract the archive to data_dir/TinyStories_all_data/ via a temporary directory beside it, which
    is checked (no member outside it, every json shard a json list) and then renamed into place. On any
    problem the temporary directory is removed and an existing corpus directory is left untouched."""
    target = corpus_dir(data_dir)
    tmp = tempfile.mkdtemp(prefix=f".{CORPUS}.tmp-", dir=data_dir)
    bad = f"{archive}: corrupt or incomplete archive"
    hint = "delete it and run `python tinystories.py download` again"
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for m in tqdm(tar, desc="extracting", unit=" files"):  # one pass; a damaged gzip fails on the way
                    name = m.name.replace("\\", "/")
                    if name.startswith("/") or ".." in name.split("/") or not (m.isfile() or m.isdir()):
                        raise DataError(f"{archive}: unsafe archive member {m.name!r}; {hint}")
                    tar.extract(m, tmp, filter="data")
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise DataError(f"{bad} ({str(e) or type(e).__name__}); {hint}") from None
        src = tmp
        if not glob.glob(os.path.join(tmp, "data*.json")):  # the shards may sit in one folder in the archive
            subdirs = [d for d in glob.glob(os.path.join(tmp, "*")) if os.path.isdir(d)]
            if len(subdirs) == 1:
                src = subdirs[0]
        shards = sorted(glob.glob(os.path.join(src, "data*.json")))
        if not shards:
            raise DataError(f"{bad} (no data*.json inside); {hint}")
        for path in tqdm(shards, desc="checking the json shards"):
            try:
                with open(path, encoding="utf-8") as f:
                    stories = json.load(f)
            except (ValueError, UnicodeDecodeError) as e:
                raise DataError(f"{bad} ({os.path.basename(path)}: {e}); {hint}") from None
            if not isinstance(stories, list):
                raise DataError(f"{bad} ({os.path.basename(path)} is not a json list); {hint}")
        old = None
        if os.path.exists(target):  # only reached with force, or to replace a synthetic corpus
            old = tempfile.mkdtemp(prefix=f".{CORPUS}.old-", dir=data_dir)
            os.rename(target, os.path.join(old, CORPUS))
        try:
            os.rename(src, target)
        except OSError:
            if old is not None:
                os.rename(os.path.join(old, CORPUS), target)
            raise
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def download(data_dir: str = DATA_DIR, base_url: str = BASE_URL, sha256: str | None = None, retries: int = 5,
             backoff: float = 2.0, force: bool = False) -> str:
    """Download and extract TinyStories, skipping what is already done."""
    os.makedirs(data_dir, exist_ok=True)
    archive = os.path.join(data_dir, ARCHIVE)
    if os.path.exists(archive):
        print(f"{archive} already downloaded")
        if sha256 is not None and file_sha256(archive) != sha256.lower():
            raise DataError(f"{archive}: sha256 does not match {sha256}; delete it to download it again")
    else:
        url = base_url.rstrip("/") + "/" + ARCHIVE
        check_reachable(url)
        print(f"downloading {url} to {archive}")
        download_file(url, archive, sha256=sha256, retries=retries, backoff=backoff)
    target = corpus_dir(data_dir)
    if os.path.isdir(target) and json_shards(data_dir) and not force:
        if not is_synthetic(target):
            print(f"{target} already extracted")
            return target
        print(f"{target} holds a synthetic corpus; replacing it with the downloaded one")
    print(f"extracting {archive} to {target}")
    extract(archive, data_dir)
    print(f"{len(json_shards(data_dir))} shards in {target}")
    return target


# -----------------------------------------------------------------------------
# synth: synth.py's offline, seeded, TinyStories-like corpus, in the corpus directory


def synth(data_dir: str = DATA_DIR, n_shards: int = 4, stories_per_shard: int = 2500, seed: int = 42,
          force: bool = False) -> str:
    """Write a synthetic corpus to data_dir/TinyStories_all_data/. Refuses to replace a corpus that is
    not synthetic (a real download) unless force."""
    target = corpus_dir(data_dir)
    if os.path.exists(target) and not is_synthetic(target) and not force:
        raise DataError(f"{target} exists and is not synthetic (a downloaded corpus?); "
                        "refusing to overwrite it (use --force to replace it)")
    os.makedirs(data_dir, exist_ok=True)
    return write_corpus(target, n_shards, stories_per_shard, seed)


# -----------------------------------------------------------------------------
# train_vocab: a custom SentencePiece BPE vocabulary, trained as llama2.c trains it


@contextlib.contextmanager
def _elapsed_bar(desc: str):
    """A bar that shows the time spent on a step that reports no progress (on a terminal only)."""
    bar = tqdm(desc=desc, bar_format="{desc}: {elapsed}", disable=None)
    done = threading.Event()

    def tick():
        while not done.wait(0.5):
            bar.refresh()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()
        bar.close()


def check_vocab_size(vocab_size: int) -> None:
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"vocab_size {vocab_size} is too small: byte fallback needs 256 byte pieces + "
                        f"<unk>, <s>, </s>, so use at least {MIN_VOCAB_SIZE}")
    if vocab_size > MAX_VOCAB_SIZE:
        raise DataError(f"vocab_size {vocab_size} does not fit the uint16 shards (max {MAX_VOCAB_SIZE})")


def train_vocab(vocab_size: int, data_dir: str = DATA_DIR, num_shards: int = 10, input_sentence_size: int = 0) -> str:
    """Train data_dir/tok{N}.model on the stories of the first num_shards shards; export tok{N}.bin."""
    import sentencepiece as spm

    check_vocab_size(vocab_size)
    if vocab_size == LLAMA2_VOCAB_SIZE:
        raise DataError(f"vocab_size {LLAMA2_VOCAB_SIZE} is reserved for the Llama 2 tokenizer; pick another size")
    shards = json_shards(data_dir)
    if not shards:
        raise DataError(f"no data*.json in {corpus_dir(data_dir)}; run `python tinystories.py download` "
                        "(or `synth`) first")
    prefix = os.path.join(data_dir, f"tok{vocab_size}")
    with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
        text_file = os.path.join(tmp, "stories.txt")
        with open(text_file, "w", encoding="utf-8") as f:
            for path in tqdm(shards[:num_shards], desc="writing training text"):
                for story in read_stories(path):
                    f.write(story + "\n")
        print(f"training a {vocab_size}-piece BPE vocabulary on {os.path.getsize(text_file) / 1e6:.1f} MB of text")
        try:
            with _elapsed_bar(f"training tok{vocab_size} (sentencepiece)"):
                spm.SentencePieceTrainer.train(
                    input=text_file, model_prefix=os.path.join(tmp, "tok"), model_type="bpe", vocab_size=vocab_size,
                    self_test_sample_size=0, input_format="text", character_coverage=1.0,
                    num_threads=os.cpu_count(), split_digits=True, allow_whitespace_only_pieces=True,
                    byte_fallback=True, unk_surface=r" \342\201\207 ",
                    # the text as it is, as Llama 2's tokenizer takes it: the C and Zig encoders normalise nothing,
                    # so no NFKC and no collapsing or trimming of spaces; only the dummy-prefix space they prepend
                    normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
                    input_sentence_size=input_sentence_size, shuffle_input_sentence=True, minloglevel=2)
        except RuntimeError as e:
            raise DataError(f"sentencepiece could not train a {vocab_size}-piece vocabulary: "
                            f"{str(e).strip().splitlines()[-1]}") from None
        with open(os.path.join(tmp, "tok.model"), "rb") as src, atomic_write(prefix + ".model") as f:
            shutil.copyfileobj(src, f)
    out = Tokenizer(prefix + ".model").export_bin()
    print(f"wrote {prefix}.model and {out}")
    return prefix + ".model"


# -----------------------------------------------------------------------------
# pretokenize: every json shard to a flat uint16 .bin, one shard per worker process


def tokenizer_path(vocab_size: int, data_dir: str = DATA_DIR, tokenizer: str = LLAMA2_TOKENIZER) -> str:
    return tokenizer if vocab_size in (0, LLAMA2_VOCAB_SIZE) else os.path.join(data_dir, f"tok{vocab_size}.model")


def read_stories(path: str) -> list[str]:
    """The stories of a json shard (a list of {"story": text, ...}), stripped; DataError for anything else."""
    bad = f"{path}: not a TinyStories shard"
    if not os.path.isfile(path):  # never block on a FIFO
        raise DataError(f"{bad} (not a regular file)")
    try:
        with open(path, encoding="utf-8") as f:
            examples = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        detail = " ".join(str(e).split())
        raise DataError(f"{bad} ({detail}); download it again, or `python tinystories.py synth`") from None
    if not isinstance(examples, list):
        raise DataError(f"{bad} (a JSON list of {{\"story\": ...}} objects expected)")
    for i, example in enumerate(examples):
        if not isinstance(example, dict) or not isinstance(example.get("story"), str):
            raise DataError(f"{bad} (entry {i} is not an object with a \"story\" string)")
    return [example["story"].strip() for example in examples]


def shard_name(json_path: str) -> str:
    """data07.json -> data07.bin"""
    return os.path.basename(json_path)[: -len(".json")] + ".bin"


def _tokenize_shard(job: tuple[str, str, str]) -> dict:
    json_path, model_path, out_dir = job
    enc = Tokenizer(model_path)
    stories = read_stories(json_path)
    ids = enc.sp.encode(stories, add_bos=True)  # batched in C++: each story BOS + tokens, no EOS
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=sum(map(len, ids)))
    max_id = int(tokens.max()) if tokens.size else 0
    assert max_id <= MAX_VOCAB_SIZE, f"token id {max_id} does not fit uint16"
    out = os.path.join(out_dir, shard_name(json_path))
    with atomic_write(out) as f:
        f.write(tokens.astype(np.uint16).tobytes())
    return {"shard": os.path.basename(out), "stories": len(stories), "n_tokens": int(tokens.size),
            "max_id": max_id, "json_bytes": os.path.getsize(json_path)}


def pretokenize(vocab_size: int = 0, data_dir: str = DATA_DIR, tokenizer: str = LLAMA2_TOKENIZER,
                workers: int | None = None) -> dict:
    """Tokenize every json shard (vocab_size 0 or 32000: the Llama 2 tokenizer at `tokenizer`; else
    data_dir/tok{N}.model). Writes the .bin shards and meta.json; returns {stories, tokens, seconds}."""
    model_path = tokenizer_path(vocab_size, data_dir, tokenizer)
    if vocab_size not in (0, LLAMA2_VOCAB_SIZE) and not os.path.exists(model_path):
        print(f"no {model_path} yet: training it first (as `python tinystories.py train_vocab "
              f"--vocab_size={vocab_size}` does)")
        train_vocab(vocab_size, data_dir)
    elif not os.path.exists(model_path):
        raise DataError(f"{model_path}: no such file: --vocab_size=0 needs the Llama 2 tokenizer.model (not "
                        f"shipped; --tokenizer PATH), or use a custom vocabulary (the default, "
                        f"--vocab_size={DEFAULT_VOCAB_SIZE})")
    enc = Tokenizer(model_path)
    if enc.n_words > MAX_VOCAB_SIZE + 1:
        raise DataError(f"{model_path} has {enc.n_words} pieces: ids above {MAX_VOCAB_SIZE} do not fit uint16 shards")
    if vocab_size not in (0, LLAMA2_VOCAB_SIZE) and enc.n_words != vocab_size:
        raise DataError(f"{model_path} has {enc.n_words} pieces, not {vocab_size}")
    shards = json_shards(data_dir)
    if not shards:
        raise DataError(f"no data*.json in {corpus_dir(data_dir)}; run `python tinystories.py download` "
                        "(or `synth`) first")
    out_dir = shard_dir(vocab_size, data_dir)
    os.makedirs(out_dir, exist_ok=True)
    workers = min(workers or os.cpu_count() or 1, len(shards))
    t0 = time.time()
    jobs = [(path, model_path, out_dir) for path in shards]
    try:
        with Pool(workers) as pool:
            results = list(tqdm(pool.imap_unordered(_tokenize_shard, jobs), total=len(jobs), desc="pretokenize"))
    except BaseException:  # the pool was terminated: a worker may have died inside a write
        for path in shards:
            remove_leftovers(os.path.join(out_dir, shard_name(path)))
        raise
    seconds = time.time() - t0
    results.sort(key=lambda r: r["shard"])
    for path in glob.glob(os.path.join(out_dir, "data*.bin")):  # shards of json files that are gone
        if os.path.basename(path) not in {r["shard"] for r in results}:
            os.remove(path)
    meta = {"vocab_size": enc.n_words, "tokenizer": os.path.abspath(model_path),
            "tokenizer_sha256": file_sha256(model_path), "synthetic": is_synthetic(corpus_dir(data_dir)),
            "shards": {r["shard"]: {k: r[k] for k in ("stories", "n_tokens", "max_id", "json_bytes")}
                       for r in results}}
    with atomic_write(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    stats = {"stories": sum(r["stories"] for r in results), "tokens": sum(r["n_tokens"] for r in results),
             "seconds": seconds, "stories_per_s": sum(r["stories"] for r in results) / max(seconds, 1e-9)}
    print(f"pretokenized {stats['stories']} stories ({stats['tokens']} tokens) into {out_dir} in {seconds:.1f}s: "
          f"{stats['stories_per_s']:.0f} stories/s, {workers} workers")
    return stats


# -----------------------------------------------------------------------------
# the batch loader for train.py


_checked_shards: set = set()  # shard sets already checked against a vocab_size


class BatchLoader:
    """Random (max_seq_len+1)-token windows from memory-mapped uint16 shards.

    vocab_size picks the shards (see shard_dir): 32000 means the Llama 2 vocab shards beside the json
    (data/TinyStories_all_data/data*.bin), any other N the custom tok{N} shards (data/tok{N}/data*.bin).
    split "val" is the first shard, "train" the others; at least two shards are needed.
    Batch k is a pure function of (seed, rank, split, k): a shard (weighted by length) and B window starts
    drawn by np.random.default_rng([seed, rank, split, k]), so state_dict() (the next k) resumes exactly.
    """

    def __init__(self, split: str, batch_size: int, max_seq_len: int, vocab_size: int,
                 data_dir: str = DATA_DIR, seed: int = 1337, rank: int = 0, device: str = "cpu"):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        self.split, self.batch_size, self.max_seq_len, self.vocab_size = split, batch_size, max_seq_len, vocab_size
        self.seed, self.rank, self.device, self.data_dir, self.batch_index = seed, rank, device, data_dir, 0
        import torch  # here, not at the top: the data commands (download, pretokenize...) start without it

        self.pin = str(device).startswith("cuda") and torch.cuda.is_available()
        d = shard_dir(vocab_size, data_dir)
        cli_vocab = 0 if vocab_size == LLAMA2_VOCAB_SIZE else vocab_size
        remedy = f"run `python tinystories.py pretokenize --vocab_size={cli_vocab}` first"
        paths = sorted(glob.glob(os.path.join(d, "data*.bin")))
        if not paths:
            raise DataError(f"no pretokenized shards (data*.bin) in {d}; {remedy}")
        if len(paths) < 2:
            raise DataError(f"only one shard in {d}: the first shard is the val split, so training needs at least "
                            "two (make more shards, e.g. `python tinystories.py synth --n_shards 4`, and pretokenize)")
        for p in paths:  # memmap would fail on these with a traceback, or block on a FIFO
            if not os.path.isfile(p):
                raise DataError(f"{p}: not a regular file; {remedy}")
            if os.path.getsize(p) == 0 or os.path.getsize(p) % 2:
                raise DataError(f"{p}: {os.path.getsize(p)} bytes, not a shard of uint16 token ids; {remedy}")
        key = (d, vocab_size, tuple((p, os.path.getsize(p), os.path.getmtime(p)) for p in paths))
        if key not in _checked_shards:  # once per process: train.py makes a fresh loader for every eval
            self._check_meta(d, paths, remedy)
            _checked_shards.add(key)
        paths = paths[:1] if split == "val" else paths[1:]
        shards = [np.memmap(p, dtype=np.uint16, mode="r") for p in paths]  # opened once, kept open
        keep = [i for i, s in enumerate(shards) if len(s) >= max_seq_len + 1]
        if not keep:
            longest = max(len(s) for s in shards)
            raise DataError(f"the {split} shards in {d} are too short for max_seq_len {max_seq_len} (need "
                            f"{max_seq_len + 1} tokens, the longest has {longest}); lower max_seq_len or add data")
        self.paths = [paths[i] for i in keep]
        self.shards = [shards[i] for i in keep]
        n_windows = np.array([len(s) - max_seq_len for s in self.shards], dtype=np.float64)
        self.weights = n_windows / n_windows.sum()
        self.offsets = np.arange(max_seq_len + 1)

    def _check_meta(self, d: str, paths: list[str], remedy: str) -> None:
        meta_path = os.path.join(d, "meta.json")
        if not os.path.lexists(meta_path):  # shards made by other tools (llama2.c): check the ids themselves
            print(f"warning: no meta.json in {d}; checking token ids against vocab_size {self.vocab_size}",
                  file=sys.stderr)
            for p in paths:
                if os.path.getsize(p) >= 2 and int(np.memmap(p, dtype=np.uint16, mode="r").max()) >= self.vocab_size:
                    raise DataError(f"{p} holds token ids >= vocab_size {self.vocab_size}: it was made with another "
                                    f"vocabulary; {remedy}")
            return
        meta, problem = read_meta(meta_path)
        if problem is not None:
            raise DataError(f"{meta_path}: {problem}; {remedy}")
        if meta["vocab_size"] != self.vocab_size:
            raise DataError(f"the shards in {d} were tokenized with a {meta['vocab_size']}-piece vocabulary but "
                            f"vocab_size is {self.vocab_size}; fix vocab_size or {remedy}")
        corpus = corpus_dir(self.data_dir)
        for p in paths:
            info = meta["shards"].get(os.path.basename(p))
            if info is None or os.path.getsize(p) != 2 * info["n_tokens"]:
                raise DataError(f"{p} does not match {meta_path} (an interrupted or older pretokenize); {remedy}")
            if info["max_id"] >= self.vocab_size:
                raise DataError(f"{p} holds token id {info['max_id']} >= vocab_size {self.vocab_size}; {remedy}")
            json_path = os.path.join(corpus, os.path.basename(p)[: -len(".bin")] + ".json")
            if os.path.exists(json_path) and os.path.getsize(json_path) != info["json_bytes"]:
                raise DataError(f"{p} is stale: {json_path} changed since it was pretokenized; {remedy}")

    def next_batch(self):
        """(x, y): two (batch_size, max_seq_len) int64 tensors, y being x shifted by one token."""
        import torch

        split_id = 0 if self.split == "train" else 1
        rng = np.random.default_rng([self.seed, self.rank, split_id, self.batch_index])
        self.batch_index += 1
        shard = self.shards[rng.choice(len(self.shards), p=self.weights)]
        starts = rng.integers(0, len(shard) - self.max_seq_len, size=self.batch_size)
        windows = torch.from_numpy(shard[starts[:, None] + self.offsets].astype(np.int64))  # (B, T+1)
        if self.pin:
            windows = windows.pin_memory().to(self.device, non_blocking=True)
        elif self.device != "cpu":
            windows = windows.to(self.device)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def state_dict(self) -> dict:
        return {"batch_index": self.batch_index, "seed": self.seed, "rank": self.rank, "split": self.split}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved state: the next batch is batch number state["batch_index"] of state["seed"].
        The rank stays this loader's own, so every DDP rank can load rank 0's checkpoint."""
        self.batch_index = int(state["batch_index"])
        self.seed = int(state["seed"])


# -----------------------------------------------------------------------------
# command line


def _url(text: str) -> str:
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// URL")
    return text


def _sha256(text: str) -> str:
    if len(text) != 64 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a sha256 (64 hexadecimal digits)")
    return text


_CUSTOM_VOCAB = f"between {MIN_VOCAB_SIZE} and {MAX_VOCAB_SIZE}, not {LLAMA2_VOCAB_SIZE} (the Llama 2 vocabulary)"
VOCAB_SIZE = cmdline.number(int, _CUSTOM_VOCAB,
                            lambda v: MIN_VOCAB_SIZE <= v <= MAX_VOCAB_SIZE and v != LLAMA2_VOCAB_SIZE)
SHARD_VOCAB_SIZE = cmdline.number(int, f"0 or {LLAMA2_VOCAB_SIZE} (the Llama 2 tokenizer), or a custom size between "
                                  f"{MIN_VOCAB_SIZE} and {MAX_VOCAB_SIZE}",
                                  lambda v: v in (0, LLAMA2_VOCAB_SIZE) or MIN_VOCAB_SIZE <= v <= MAX_VOCAB_SIZE)


def _check_data_dir(data_dir: str) -> None:
    if not data_dir.strip():
        raise DataError("--data_dir is empty; give a directory")
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise DataError(f"--data_dir {data_dir}: exists and is not a directory")


def main(argv: list[str] | None = None) -> int:
    common = cmdline.ArgumentParser(add_help=False)
    common.add_argument("--data_dir", default=DATA_DIR, help="data directory (default: $LLAMA2_DATA_DIR or data/)")
    parser = cmdline.ArgumentParser(description="TinyStories data: download, synth, train_vocab, pretokenize")
    sub = parser.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("download", parents=[common], help="download and extract TinyStories")
    p.add_argument("--base_url", type=_url, default=BASE_URL, help="where TinyStories_all_data.tar.gz lives "
                   "(default: $TINYSTORIES_BASE_URL or Hugging Face)")
    p.add_argument("--sha256", type=_sha256, default=None, help="expected sha256 of the archive")
    p.add_argument("--retries", type=cmdline.number(int, "0..100", lambda v: 0 <= v <= 100), default=5,
                   help="retries on connection errors and 5xx answers")
    p.add_argument("--backoff", type=cmdline.number(float, "0..3600 seconds", lambda v: 0 <= v <= 3600), default=2.0,
                   help="first retry wait in seconds (doubles each time)")
    p.add_argument("--force", action="store_true", help="extract again even if the corpus directory exists")
    p = sub.add_parser("synth", parents=[common], help="write an offline synthetic TinyStories-like corpus")
    p.add_argument("--n_shards", type=cmdline.number(int, "1..1000", lambda v: 1 <= v <= 1000), default=4)
    p.add_argument("--stories_per_shard", type=cmdline.number(int, "1..1000000", lambda v: 1 <= v <= 10**6),
                   default=2500)
    p.add_argument("--seed", type=cmdline.at_least(0), default=42)
    p.add_argument("--force", action="store_true", help="replace a corpus that is not synthetic")
    p = sub.add_parser("train_vocab", parents=[common], help="train a custom SentencePiece BPE vocabulary")
    p.add_argument("--vocab_size", type=VOCAB_SIZE, default=DEFAULT_VOCAB_SIZE, help=f"default {DEFAULT_VOCAB_SIZE}")
    p.add_argument("--num_shards", type=cmdline.at_least(1), default=10, help="train on the text of the first N shards")
    p.add_argument("--input_sentence_size", type=cmdline.at_least(0), default=0,
                   help="sample this many stories (0: all)")
    p = sub.add_parser("pretokenize", parents=[common], help="tokenize the json shards into uint16 .bin shards")
    p.add_argument("--vocab_size", type=SHARD_VOCAB_SIZE, default=DEFAULT_VOCAB_SIZE,
                   help=f"N: data/tok{{N}}.model, trained first if missing (default {DEFAULT_VOCAB_SIZE}); "
                   "0: the Llama 2 tokenizer (--tokenizer)")
    p.add_argument("--tokenizer", default=LLAMA2_TOKENIZER, help="the Llama 2 tokenizer.model (for vocab_size 0)")
    p.add_argument("--workers", type=cmdline.number(int, "1..1024", lambda v: 1 <= v <= 1024), default=None,
                   help="processes (default: all cores)")
    args = parser.parse_args(argv)
    try:
        _check_data_dir(args.data_dir)
        if args.stage == "download":
            download(args.data_dir, args.base_url, args.sha256, args.retries, args.backoff, args.force)
        elif args.stage == "synth":
            t0 = time.time()
            target = synth(args.data_dir, args.n_shards, args.stories_per_shard, args.seed, args.force)
            size = sum(os.path.getsize(p) for p in json_shards(args.data_dir))
            print(f"wrote a synthetic corpus (NOT TinyStories): {args.n_shards} shards x {args.stories_per_shard} "
                  f"stories, {size / 1e6:.1f} MB, in {target} ({time.time() - t0:.1f}s)")
        elif args.stage == "train_vocab":
            train_vocab(args.vocab_size, args.data_dir, args.num_shards, args.input_sentence_size)
        elif args.stage == "pretokenize":
            if args.vocab_size not in (0, LLAMA2_VOCAB_SIZE):
                check_vocab_size(args.vocab_size)
            pretokenize(args.vocab_size, args.data_dir, args.tokenizer, args.workers)
    except (DataError, TokenizerError, WriteError, OSError) as e:  # OSError: a full disk, a file in the way...
        if isinstance(e, OSError) and not isinstance(e, WriteError) and e.strerror:
            e = f"{e.filename or args.data_dir}: {e.strerror}"  # not "[Errno 28] ...", and with the path
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
