"""Execute a notebook's code cells in order, in one namespace, and write them back with their
outputs (printed text and matplotlib figures), for a machine with Python but no Jupyter kernel:
what the site then shows as the notebook's committed outputs.

Each code cell runs as a kernel would run it: ``exec`` in the notebook's namespace, stdout and
stderr captured as stream outputs, the value of a last expression shown as its ``repr``, and every
``plt.show()`` saved as a PNG display output. A cell that raises stops the run with the error.

    python benchmarks/execute_notebook.py notebooks/grokking_optimizers.ipynb --out OUT.ipynb
"""

from __future__ import annotations

import argparse
import ast
import base64
import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def _stream(name: str, text: str) -> dict[str, Any]:
    return {"output_type": "stream", "name": name, "text": text.splitlines(keepends=True)}


def _figures(outputs: list[dict[str, Any]]) -> Any:
    """A replacement for ``plt.show``: each open figure as a PNG display output, then closed."""
    import matplotlib.pyplot as plt

    def show(*args: Any, **kwargs: Any) -> None:
        del args, kwargs
        for num in plt.get_fignums():
            fig = plt.figure(num)
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
            outputs.append({"output_type": "display_data", "metadata": {},
                            "data": {"image/png": base64.b64encode(buf.getvalue()).decode(),
                                     "text/plain": [repr(fig)]}})
            plt.close(fig)

    return show


def run_cell(source: str, namespace: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """The outputs of one cell run in ``namespace``."""
    import matplotlib.pyplot as plt

    outputs: list[dict[str, Any]] = []
    plt.show = _figures(outputs)
    tree = ast.parse(source)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    out, err = io.StringIO(), io.StringIO()
    value = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        exec(compile(tree, f"<cell {count}>", "exec"), namespace)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), f"<cell {count}>", "eval"), namespace)
    streams = [_stream(n, s.getvalue()) for n, s in (("stdout", out), ("stderr", err)) if s.getvalue()]
    outputs[:0] = streams
    if value is not None:
        outputs.append({"output_type": "execute_result", "execution_count": count, "metadata": {},
                        "data": {"text/plain": repr(value).splitlines(keepends=True)}})
    return outputs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("notebook", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")
    nb = json.loads(args.notebook.read_text())
    namespace: dict[str, Any] = {"__name__": "__main__"}
    sys.path.insert(0, str(Path.cwd()))
    count = 0
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        count += 1
        t0 = time.perf_counter()
        cell["outputs"] = run_cell("".join(cell["source"]), namespace, count)
        cell["execution_count"] = count
        print(f"cell {count}: {time.perf_counter() - t0:.1f} s", file=sys.__stderr__, flush=True)
    args.out.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
