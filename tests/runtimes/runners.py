"""Every build of the runtime the conformance suite runs, and how to run it: the RUNTIMES table.

A runtime takes a case's command line, run.c's (model, -z tokenizer, -n, -t, -p, -s, -i, -m, -y),
with paths relative to a working directory, and returns what it printed as a Result. Adding a
runtime is adding an entry to RUNTIMES. Where a runtime cannot take a case at all its entry says
so, with the reason (`not_applicable`, by test name); the browser's adapter also refuses, with
the reason, a command line that the page has no inputs for.
"""

import contextlib
import fcntl
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.common import ROOT

SAN_ENV = {"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0", "UBSAN_OPTIONS": "halt_on_error=1"}


@dataclass
class Result:
    returncode: int
    stdout: bytes
    stderr: bytes


class NotApplicable(Exception):
    """A case this runtime cannot express (the message says why)."""


# ------------------------------------------------------------------ builds

# Files that FileBuilds write, named by a hash of the command and its sources: a later session
# (or another checkout) with the same sources and command reuses them.
FILE_BUILDS = Path(tempfile.gettempdir()) / "llama2-runtime-builds"
_made: set[str] = set()
_failed: dict[str, str] = {}  # make target, or FileBuild output -> the build's output
_lock = threading.Lock()
_background: threading.Thread | None = None


def make(*targets):
    """Build make targets, once per session (after the background builds, if any): make skips
    what is up to date; the first Zig build installs requirements-web.txt into .venv."""
    if _background and _background is not threading.current_thread():
        _background.join()
    with _lock, _locked(set(targets) - _made - set(_failed)):
        todo = sorted(set(targets) - _made - set(_failed))
        if todo and _make(todo, "-j2") is None:
            _made.update(todo)
        else:  # one at a time, so that a broken build fails only the tests that need it
            for target in todo:
                error = _make([target])
                if error is None:
                    _made.add(target)
                else:
                    _failed[target] = error
    for target in targets:
        if target in _failed:
            pytest.fail(f"make {target} failed:\n{_failed[target]}")


def _make(targets, *flags):
    """None, or make's output when it fails."""
    cmd = ["make", "-s", *flags, "-C", str(ROOT), *targets]
    p = subprocess.run(_niced(cmd), capture_output=True, text=True, timeout=900)
    return None if p.returncode == 0 else p.stdout + p.stderr


@contextlib.contextmanager
def _locked(names):
    """Hold a lock per name across processes too: pytest-xdist's workers build the same things."""
    FILE_BUILDS.mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack:
        for name in sorted(names):
            lock = stack.enter_context(open(FILE_BUILDS / f"{name.replace('/', '_')}.lock", "w"))
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _niced(cmd):
    """Builds in the background thread give way to the tests running meanwhile."""
    return ["nice", "-n", "10", *cmd] if threading.current_thread() is _background else cmd


_file_locks: dict[str, threading.Lock] = {}


@dataclass(frozen=True)
class FileBuild:
    """A command that writes one file ("{out}" in cmd), run in the project root at most once
    per session, after the make targets it needs; in the background when a test module lists
    it in its BUILDS."""

    name: str
    cmd: tuple[str, ...]
    sources: tuple[Path, ...]  # the files it reads
    needs: tuple[str, ...] = ()  # make targets (a compiler)

    def out(self) -> Path:
        digest = hashlib.sha256(repr(self.cmd).encode())
        for source in self.sources:
            digest.update(source.read_bytes())
        return FILE_BUILDS / f"{self.name}-{digest.hexdigest()[:16]}"

    def path(self) -> Path:
        """The built file (building it now, or waiting for the background build)."""
        make(*self.needs)
        out = self.out()
        with _file_locks.setdefault(out.name, threading.Lock()), _locked([out.name]):
            if out.name not in _failed and not out.exists():
                FILE_BUILDS.mkdir(exist_ok=True)
                tmp = f"{out}.{os.getpid()}.tmp"
                p = subprocess.run(_niced([a.replace("{out}", tmp) for a in self.cmd]), cwd=ROOT,
                                   capture_output=True, text=True, timeout=1200)
                if p.returncode == 0:
                    os.replace(tmp, out)
                else:
                    _failed[out.name] = p.stdout + p.stderr
        if out.name in _failed:
            pytest.fail(f"{' '.join(self.cmd)} failed:\n{_failed[out.name]}")
        return out


def build_in_background(runtimes, builds):
    """Start the builds these runtimes and FileBuilds need, niced: the make targets in one `make -j2`
    (make runs independent builds side by side), then the FileBuilds, while the tests that need
    none of them run on; make() and FileBuild.path() wait for them. librun.so is left to make():
    other tests load it, and runtime.py builds it when missing."""
    global _background
    builds = [*builds, *(r.file_build() for r in runtimes if isinstance(r, Cli) and r.own_file)]
    targets = sorted(({t for r in runtimes for t in r.targets} | {t for b in builds for t in b.needs}) - {"lib"})

    def work():
        with _lock, _locked(targets):
            if targets and _make(targets, "-j2") is None:
                _made.update(targets)
        for build in builds:
            try:
                build.path()
            except BaseException:  # noqa: BLE001 (recorded in _failed: the test that needs it fails)
                pass

    _background = threading.Thread(target=work, daemon=True)
    _background.start()


# ------------------------------------------------------------------ runtimes


@dataclass
class Runtime:
    """One build of the runtime. Subclasses say how to run it."""

    name: str
    about: str
    targets: tuple[str, ...] = ()  # make targets it needs
    threads: int = 2  # the most threads a test asks of it (1: single-threaded build)
    slow: bool = False  # in `make test` only, not `make test-fast`
    not_applicable: dict[str, str] = field(default_factory=dict)  # test name -> why it cannot take it
    error_prefix: bytes = b""  # how its one-line errors begin
    speed_line: bool = True  # a successful run ends with "achieved tok/s: ..." on stderr
    shows_text: bool = False  # prints text, not bytes: invalid UTF-8 comes out as U+FFFD

    def build(self):
        make(*self.targets)

    def start(self):
        """Set up what runs need (a browser); the conformance suite calls it once per session."""

    def stop(self):
        pass

    def run(self, args, cwd, stdin=b"", threads=1) -> Result:
        raise NotImplementedError

    def file_name(self, arg, role):
        """How its messages name a file given on the command line as `arg` ("model" or "tokenizer")."""
        return str(arg)

    def flag_name(self, flag):
        """How its messages name the setting of a flag."""
        return flag


@dataclass
class Cli(Runtime):
    """A native executable with run.c's command line; threads through OMP_NUM_THREADS."""

    exe: str = ""  # a make target's output, relative to the project root
    own_file: str = ""  # or: a make target whose recipe writes ./run, built into a file of its own
    march: str = ""  # builds own_file's recipe for this CPU instead of -march=native
    cpu_flag: str = ""  # a /proc/cpuinfo flag the build needs to run here (else its cases skip)
    env: dict[str, str] = field(default_factory=dict)
    _path: Path | None = None  # own_file's build

    def build(self):
        if self.cpu_flag and self.cpu_flag not in Path("/proc/cpuinfo").read_text().split():
            pytest.skip(f"{self.name}: this CPU has no {self.cpu_flag}")
        super().build()
        if self.own_file:
            self._path = self.file_build().path()

    def file_build(self) -> FileBuild:
        """own_file's recipe (as `make -n` prints it) with `-o run` pointed at a file of its own."""
        recipe = subprocess.run(["make", "-s", "-n", "-B", "-C", str(ROOT), self.own_file], capture_output=True,
                                text=True, check=True).stdout.splitlines()
        assert len(recipe) == 1, recipe
        cmd = shlex.split(recipe[0])
        cmd[cmd.index("-o") + 1] = "{out}"
        if self.march:
            cmd[cmd.index("-march=native")] = f"-march={self.march}"
        return FileBuild(f"run-{self.name}", tuple(cmd), (ROOT / "runtimes" / "c" / "run.c",))

    @property
    def path(self):
        return self._path if self.own_file else ROOT / self.exe

    def run(self, args, cwd, stdin=b"", threads=1) -> Result:
        env = {**os.environ, **self.env, "OMP_NUM_THREADS": str(threads)}
        p = subprocess.run([str(self.path), *map(str, args)], cwd=cwd, input=stdin, capture_output=True,
                           env=env, timeout=120)
        return Result(p.returncode, p.stdout, p.stderr)


@dataclass
class Wasi(Runtime):
    """A wasm32-wasi module under wasmtime (the PyPI package, in this process): the working
    directory is preopened as "." (the module sees nothing else), stdin is a file."""

    module_file: str = ""
    _engine: object = None
    _module: object = None

    def start(self):
        wasmtime = pytest.importorskip("wasmtime")
        self._engine = wasmtime.Engine()
        self._module = wasmtime.Module.from_file(self._engine, str(ROOT / self.module_file))

    def run(self, args, cwd, stdin=b"", threads=1) -> Result:
        import wasmtime

        assert threads == 1, "single-threaded"
        args = [str(a) for a in args]
        if not all(is_utf8(a) for a in args):
            raise NotApplicable("wasmtime takes command-line arguments only as UTF-8 text")
        with tempfile.TemporaryDirectory() as io:
            out, err, inp = Path(io, "stdout"), Path(io, "stderr"), Path(io, "stdin")
            inp.write_bytes(stdin)
            store = wasmtime.Store(self._engine)
            linker = wasmtime.Linker(self._engine)
            linker.define_wasi()
            cfg = wasmtime.WasiConfig()
            cfg.argv = ["runzig", *map(str, args)]
            cfg.preopen_dir(str(cwd), ".")
            cfg.stdout_file, cfg.stderr_file, cfg.stdin_file = str(out), str(err), str(inp)
            store.set_wasi(cfg)
            code = 0
            try:
                linker.instantiate(store, self._module).exports(store)["_start"](store)
            except wasmtime.ExitTrap as e:
                code = e.code
            except wasmtime.Trap as e:  # a crash: report it as one (expect_one_line_error looks for -6)
                return Result(-6, out.read_bytes(), err.read_bytes() + str(e).encode())
            return Result(code, out.read_bytes(), err.read_bytes())


def is_utf8(arg: str) -> bool:
    """False for an argument holding bytes that are not UTF-8 (os.fsdecode's surrogate escapes)."""
    try:
        arg.encode()
    except UnicodeEncodeError:
        return False
    return True


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?")


def chromium():
    """/usr/bin/chromium; without it, try `make web-deps` once (Debian's package: needs root and apt)."""
    if not CHROMIUM.exists():
        subprocess.run(["make", "-s", "-C", str(ROOT), "web-deps"], capture_output=True, timeout=600)
    if not CHROMIUM.exists():
        pytest.skip("Chromium is not installed and `make web-deps` could not install it (needs root and apt-get)")
    return str(CHROMIUM)


def load_serve():
    """runtimes/web/serve.py as a module (it is a script, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve", ROOT / "runtimes" / "web" / "serve.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    return serve


@dataclass
class Browser(Runtime):
    """The page (runtimes/web/, served with COOP/COEP by serve.py) in headless Chromium, through
    Playwright. The adapter picks the model and tokenizer with the file inputs, fills the fields
    that the flags set (-n steps, -t temperature, -p top-p, -s seed, -i prompt; run.c's defaults
    otherwise) and the thread count, presses Load then Generate, and returns the story the page
    shows as stdout, or the error it shows as one line of stderr (exit 1). It refuses command
    lines the page has no inputs for: other flags, a flag without its value, a value a number
    field does not take, a file that does not exist (a file picker offers only files), stdin."""

    FIELDS = {"-n": "#steps", "-t": "#temperature", "-p": "#topp", "-s": "#seed", "-i": "#prompt"}
    SETTINGS = {"-n": "steps", "-t": "temperature", "-p": "top-p", "-s": "seed", "-i": "prompt"}
    DEFAULTS = {"-n": "256", "-t": "1.0", "-p": "0.9", "-s": "42", "-i": ""}
    _playwright: object = None
    _browser: object = None
    _server: object = None
    page: object = None
    url: str = ""
    models: Path | None = None  # served as /models/ (for the page's Fetch button)
    errors: list = field(default_factory=list)

    def start(self):
        sync_api = pytest.importorskip("playwright.sync_api")
        exe = chromium()
        self.models = Path(tempfile.mkdtemp(prefix="models-"))
        self._server = load_serve().make_server(0, self.models, quiet=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"
        self._playwright = sync_api.sync_playwright().start()
        self._browser = self._playwright.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)
        self.page = self._browser.new_page(viewport={"width": 1000, "height": 820})
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(self.url)

    def stop(self):
        if self._browser:
            self._browser.close()
            self._playwright.stop()
            self._server.shutdown()
            shutil.rmtree(self.models)
        self._browser = None

    def file_name(self, arg, role):
        return f"{role}.bin"  # the page names a file by what it is for

    def flag_name(self, flag):
        return self.SETTINGS[flag]

    def inputs(self, args, cwd, stdin):
        """(model path, tokenizer path, {field: value}) for a command line, or NotApplicable."""
        if stdin:
            raise NotApplicable("the page reads no stdin")
        if not args or str(args[0]).startswith("-"):
            raise NotApplicable("the page has no command line: the model is a file input")
        values, tok = dict(self.DEFAULTS), "tokenizer.bin"
        rest = [str(a) for a in args[1:]]
        for flag, value in zip(rest[::2], rest[1::2], strict=False):
            if flag == "-z":
                tok = value
            elif flag not in self.FIELDS:
                raise NotApplicable(f"the page has no input for {flag}")
            elif flag != "-i" and not NUMBER.fullmatch(value):
                raise NotApplicable(f"the page's {self.SETTINGS[flag]} field takes only numbers, not {value!r}")
            else:
                values[flag] = value
        if len(rest) % 2:
            raise NotApplicable(f"the page has no way to leave out {rest[-1]}'s value")
        model, tok = Path(cwd, args[0]), Path(cwd, tok)
        for f in (model, tok):
            if not f.is_file():
                raise NotApplicable(f"a file picker offers only files that exist ({f.name})")
        return model, tok, values

    def run(self, args, cwd, stdin=b"", threads=1) -> Result:
        model, tok, values = self.inputs(args, cwd, stdin)
        pg = self.page
        self.errors.clear()
        pg.fill("#threads", str(threads))
        pg.set_input_files("#modelFile", str(model))
        pg.set_input_files("#tokFile", str(tok))
        pg.click("#loadFiles")
        pg.wait_for_function("document.getElementById('modelInfo').textContent.startsWith('Loaded') || "
                             "!document.getElementById('error').hidden", timeout=30000)
        if not pg.is_hidden("#error"):
            return self._error()
        info = pg.inner_text("#modelInfo")
        assert f"; {threads} thread{'s' if threads > 1 else ''}." in info, info  # not a silent fallback to 1
        for flag, value in values.items():
            pg.fill(self.FIELDS[flag], value)
        pg.click("#generate")
        pg.wait_for_function("document.body.dataset.done", timeout=120000)
        assert not self.errors, self.errors
        if pg.get_attribute("body", "data-done") != "1":
            return self._error()
        return Result(0, pg.inner_text("#story").encode(), b"")

    def _error(self):
        assert not self.errors, self.errors
        return Result(1, b"", pg_text(self.page, "#error").encode() + b"\n")


def pg_text(pg, selector):
    return pg.eval_on_selector(selector, "e => e.textContent")


CLI_ONLY = {
    "test_help": "the page has no command line or usage text",
    "test_steps_out_of_range_are_clamped_with_a_note": "the note goes to stderr; the page runs seq_len steps "
                                                       "for steps outside 1..seq_len without one",
    "test_non_utf8_prompt_uses_byte_fallback": "the page's prompt is JavaScript text, always valid UTF-8",
    "test_chat_mode_matches_c": "the page has no chat mode (it reads no stdin)",
    "test_flag_before_model": "the page has no command line",
    "test_pieces_print_as_llama2c": "the page shows text, not the bytes llama2.c prints to a terminal",
    "test_context_shift_past_seq_len_matches_plain_runs": "the page has no input for the context shift (-k)",
}

RUNTIMES = [
    Cli("c", "run.c, gcc -O3 (make run's recipe: llama2.c's default build)", own_file="run", error_prefix=b"run: "),
    Cli("c-san", "run.c with ASan + UBSan, -march=native, OpenMP (make run_san): any error aborts",
        targets=("run_san",), exe="run_san", env=SAN_ENV, slow=True, error_prefix=b"run: "),
    Cli("c-fast", "run.c, gcc -Ofast -march=native -fopenmp (make runomp's recipe)", own_file="runomp", slow=True,
        error_prefix=b"run: "),
    Cli("c-ofast", "run.c, gcc -Ofast, portable x86-64 (make runfast's recipe)", own_file="runfast", slow=True,
        error_prefix=b"run: "),
    Cli("c-avx2", "run.c, make runomp's recipe for AVX2 CPUs (-march=haswell): 256-bit kernels, no VNNI",
        own_file="runomp", march="haswell", cpu_flag="avx2", slow=True, error_prefix=b"run: "),
    Cli("zig", "run.zig, ReleaseFast, native (make runzig)", targets=("runzig",), exe="runzig", slow=True,
        error_prefix=b"runzig: "),
    Wasi("wasi", "run.zig for wasm32-wasi with SIMD128 (make wasm), under wasmtime", targets=("run.wasm",),
         module_file="run.wasm", threads=1, slow=True, error_prefix=b"runzig: "),
    Browser("browser", "the page (make web-build) in headless Chromium", targets=("web-build",), slow=True,
            speed_line=False, shows_text=True, not_applicable=CLI_ONLY),
]
BY_NAME = {r.name: r for r in RUNTIMES}
