"""The compress filter's encoders alone: MB/s of CPU and the size they reach, per coding.

    python bench/codings.py [--size MiB] [--chunk KiB ...]

Runs the very encoders the proxy runs (`dualproxy.filters.codings.encoder`, at its
`LEVELS`, flushed after every chunk as for a streamed response) over a JSON document
(bench/run.py's, the compress rows') and an HTML table of the same records, fed in
chunks of each size given (64 KiB: what a proxy reads from a fast upstream; 4 KiB: a
trickling one). MB/s is of the identity bytes per second of this process's CPU time
(steadier than the wall clock on a shared machine); ratio is identity / encoded bytes.
Prints a markdown table (docs/compression.md quotes one).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/codings.py` puts bench/ first, not the root
    sys.path.insert(0, str(ROOT))

from bench.run import json_document  # noqa: E402
from dualproxy.filters.codings import LEVELS, encodable, encoder  # noqa: E402

CODINGS = (b"zstd", b"br", b"gzip")


def corpora(size: int) -> dict[str, bytes]:
    """The JSON document, and the same records as an HTML table (no repeated block: a
    page repeated would compress to almost nothing and flatter every coding)."""
    import json

    records = json.loads(json_document(size))
    rows = "".join(f'<tr class="{"on" if r["active"] else "off"}"><td>{r["id"]}</td>'
                   f'<td><a href="/items/{r["id"]}">{r["name"]}</a></td><td>{r["score"]}</td>'
                   f'<td>{", ".join(r["tags"])}</td></tr>\n' for r in records)
    html = f"<!doctype html><html><body><table>\n{rows}</table></body></html>\n".encode()
    return {"JSON": json_document(size), "HTML": html[:size]}


def measure(coding: bytes, data: bytes, chunk: int, min_seconds: float = 0.5) -> tuple[float,
                                                                                          float]:
    """(MB/s of CPU time, ratio) for one coding over `data` fed in `chunk`-byte pieces."""
    pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)]
    rounds, spent, out = 0, 0.0, 0
    while spent < min_seconds:
        transform = encoder(coding)
        assert transform is not None
        started = time.process_time()
        out = sum(len(transform.feed(piece)) for piece in pieces) + len(transform.finish())
        spent += time.process_time() - started
        rounds += 1
    return len(data) * rounds / spent / 1e6, len(data) / out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=float, default=4, help="MiB of each corpus (default 4)")
    parser.add_argument("--chunk", type=int, nargs="+", default=[64, 4], metavar="KiB",
                        help="chunk sizes fed to the encoders (default: 64 4)")
    opts = parser.parse_args()
    data = corpora(int(opts.size * 1024 * 1024))
    missing = [c.decode() for c in CODINGS if c not in encodable()]
    if missing:
        print(f"not installed: {', '.join(missing)} (pip install 'dualproxy[compress]')")
    print(f"{opts.size:g} MiB of each corpus; MB/s of CPU time (one core), identity bytes in\n")
    print("| coding (level) | chunk | " + " | ".join(f"{name} MB/s | {name} ratio"
                                                   for name in data) + " |")
    print("|---|---|" + "---|---|" * len(data))
    for coding in (c for c in CODINGS if c in encodable()):
        for chunk in opts.chunk:
            cells = []
            for corpus in data.values():
                speed, ratio = measure(coding, corpus, chunk * 1024)
                cells += [f"{speed:,.0f}", f"{ratio:.1f}"]
            print(f"| {coding.decode()} ({LEVELS[coding]}) | {chunk} KiB | "
                  + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
