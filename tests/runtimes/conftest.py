"""Fixtures of the runtime tests: each runtime build started once per session (`rt`, parametrised
over runners.RUNTIMES by test_conformance.py), and one working directory of model and tokenizer
files that every runtime reads (`work`)."""

import shutil

import pytest

from tests.common import SHARED, STORIES260K
from tests.runtimes import models
from tests.runtimes.runners import BY_NAME, build_in_background

SAMPLED_DIR = SHARED / "llama2c-sampled"


def pytest_collection_finish(session):
    """Start building, in the background, the runtimes the selected tests use and the BUILDS
    (runners.FileBuild) their modules list (runners.build_in_background)."""
    names = {item.callspec.params["rt"] for item in session.items
             if hasattr(item, "callspec") and "rt" in item.callspec.params}
    builds = {b for module in {getattr(item, "module", None) for item in session.items} - {None}
              for b in getattr(module, "BUILDS", ())}
    if (names or builds) and not session.config.option.collectonly:
        build_in_background([BY_NAME[name] for name in sorted(names)], sorted(builds, key=lambda b: b.name))


@pytest.fixture(scope="session")
def rt(request):
    """A runtime from runners.RUNTIMES (by name, the test's parameter), built and started."""
    runtime = BY_NAME[request.param]
    runtime.build()
    runtime.start()
    yield runtime
    runtime.stop()


class Work:
    """The working directory every runtime runs in (WASI sees only it). Paths in a command
    line are relative to it. Files made on first use are kept for the session."""

    def __init__(self, path, request):
        self.path = path
        self._request = request  # for session fixtures needed on first use
        self._ids = {}

    def c_ids(self, name, steps, **kw):
        """models.c_ids of a file here, computed once per session for the same arguments."""
        key = (name, steps, tuple(sorted(kw.items())))
        if key not in self._ids:
            self._ids[key] = models.c_ids(self.path / name, steps, **kw)
        return self._ids[key]

    def __truediv__(self, name):
        return self.path / name

    def fixture(self, src, name=None):
        """A copy of a ../shared fixture (skips the test when ../shared is absent)."""
        name = name or src.name
        if not (self.path / name).exists():
            shutil.copy(models.need(src), self.path / name)
        return name

    def stories260k(self):
        return self.fixture(STORIES260K)

    def trained(self, name):
        """stories260K or the session's trained_model (the demo preset), as is (fp32) or
        converted to int8 (name ending _v2)."""
        base = name.removesuffix("_v2")
        src = STORIES260K if base == "stories260k" else self._request.getfixturevalue("trained_model")
        path = self.path / f"{name}.bin"
        if path.exists():
            return path.name
        if name.endswith("_v2"):
            import export

            export.write_v2(export.load_model_bin(models.need(src)), path)
        else:
            shutil.copy(models.need(src), path)
        return path.name

    def random_model(self, name, version, gs, args):
        """A random_model and its id tokenizer (file names)."""
        path, tok = self.path / f"{name}.bin", f"ids{args['vocab_size']}.bin"
        if not path.exists():
            models.random_model(path, version, group_size=gs, **args)
        if not (self.path / tok).exists():
            models.write_id_tokenizer(self.path / tok, args["vocab_size"])
        return path.name, tok


@pytest.fixture(scope="session")
def work(tmp_path_factory, request):
    """TINY models (v0 with and without a shared classifier, v1, v2 with group size 64: w2
    straddles in halves), word tokenizers of 512 and 600 pieces, a 512-id tokenizer."""
    w = Work(tmp_path_factory.mktemp("work"), request)
    models.write_model(w / "v0.bin", models.TINY, version=0)
    models.write_model(w / "v0u.bin", models.TINY, version=0, shared=False)
    models.write_model(w / "v1.bin", models.TINY, version=1)
    models.write_model(w / "v2.bin", models.TINY, version=2, gs=64)
    models.write_word_tokenizer(w / "tok.bin", models.TINY[5])
    models.write_word_tokenizer(w / "tok600.bin", 600)
    models.write_id_tokenizer(w / "ids512.bin", 512)
    (w / "adir").mkdir()
    return w
