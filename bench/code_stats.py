"""How the three scripts read, in numbers: lines per file, the longest function (and main()), the longest line,
lines over 110 characters, semicolons. The targets of the minimal reference (issue #13) are printed beside them.

    python bench/code_stats.py
"""
import ast
import io
import os
import sys
import tokenize

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TARGETS = {"minimal_vit_inet.py": 600, "linear_probe.py": 350, "sigreg.py": None}  # lines; sigreg stays as it is


def stats(path: str) -> dict:
    with open(path) as f:
        source = f.read()
    lines = source.splitlines()
    functions = [(node.end_lineno - node.lineno + 1, node.name) for node in ast.walk(ast.parse(source))
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    main = next((n for n, name in functions if name == "main"), 0)
    return dict(lines=len(lines), longest_function=max(functions, default=(0, "-")), main=main,
                longest_line=max((len(line) for line in lines), default=0),
                over_110=sum(len(line) > 110 for line in lines),
                semicolons=sum(t.type == tokenize.OP and t.string == ";"
                               for t in tokenize.generate_tokens(io.StringIO(source).readline)))


if __name__ == "__main__":
    print(f"{'file':20s} {'lines':>6s} {'target':>6s} {'main()':>6s} {'longest function':>26s} {'longest line':>12s} "
          f"{'> 110':>6s} {'; ':>3s}")
    for name, target in TARGETS.items():
        s = stats(os.path.join(ROOT, name))
        n, fn = s["longest_function"]
        print(f"{name:20s} {s['lines']:6d} {str(target or '-'):>6s} {s['main']:6d} {f'{fn} ({n})':>26s} "
              f"{s['longest_line']:12d} {s['over_110']:6d} {s['semicolons']:3d}")
    sys.exit(0)
