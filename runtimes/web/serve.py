"""Serve runtimes/web/ on 127.0.0.1 (make web). With --models DIR, DIR is also served
under /models/, so the page can fetch model.bin and tokenizer.bin from it.

Sends the cross-origin isolation headers (COOP/COEP), without which the page
cannot share memory between threads (SharedArrayBuffer) and runs one, and the
wasm MIME type that instantiateStreaming needs."""

import argparse
import functools
import http.server
import os
from pathlib import Path

WEB = Path(__file__).resolve().parent


class Handler(http.server.SimpleHTTPRequestHandler):
    models: Path | None = None
    isolated = True
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".wasm": "application/wasm",
                      ".js": "text/javascript"}

    def translate_path(self, path):
        clean = path.split("?", 1)[0].split("#", 1)[0]
        if self.models is not None and clean.startswith("/models/"):
            name = os.path.basename(clean[len("/models/"):])
            return str(self.models / name)
        return super().translate_path(path)

    def end_headers(self):
        if self.isolated:
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, fmt, *args):
        if not self.server.quiet:
            super().log_message(fmt, *args)


def make_server(port=8000, models=None, quiet=False, isolated=True):
    """isolated=False leaves out COOP/COEP (tests check that the page then runs one thread)."""
    attrs = {"models": Path(models).resolve() if models else None, "isolated": isolated}
    handler = functools.partial(type("H", (Handler,), attrs), directory=str(WEB))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.quiet = quiet
    return server


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--models", help="directory served as /models/ (model.bin, tokenizer.bin)")
    a = ap.parse_args()
    for module in ("llama.wasm", "llama-threads.wasm"):
        if not (WEB / module).exists():
            raise SystemExit(f"{WEB / module} is missing: run `make web-build`")
    server = make_server(a.port, a.models)
    print(f"serving {WEB} on http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
