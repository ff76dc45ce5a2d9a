"""How the three scripts read, in numbers: lines per file (and lines of code: not blank, not a comment, not a
docstring), the longest function, main() and the line it ends on, the longest line, lines over 110 characters,
semicolons; and README.md's lines. The targets of the minimal reference (issues #18, #24) are printed beside them.

    python bench/code_stats.py
"""
import ast
import io
import os
import sys
import tokenize

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TARGETS = {"minimal_vit_inet.py": 750, "linear_probe.py": 350, "sigreg.py": 100}  # issues #18, #24: lines per file


def stats(path: str) -> dict:
    with open(path) as f:
        source = f.read()
    lines, tree = source.splitlines(), ast.parse(source)
    functions = [(node.end_lineno - node.lineno + 1, node.name, node.end_lineno) for node in ast.walk(tree)
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    main = next(((n, end) for n, name, end in functions if name == "main"), (0, 0))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node):
            docstrings.update(range(node.body[0].lineno, node.body[0].end_lineno + 1))
    code = sum(1 for i, line in enumerate(lines, 1)
               if line.strip() and not line.strip().startswith("#") and i not in docstrings)
    return dict(lines=len(lines), code=code, longest_function=max((n, name) for n, name, _ in functions),
                main=main[0], main_ends=main[1], longest_line=max(len(line) for line in lines),
                over_110=sum(len(line) > 110 for line in lines),
                semicolons=sum(t.type == tokenize.OP and t.string == ";"
                               for t in tokenize.generate_tokens(io.StringIO(source).readline)))


if __name__ == "__main__":
    print(f"{'file':20s} {'lines':>6s} {'target':>6s} {'code':>5s} {'main()':>6s} {'ends':>5s} "
          f"{'longest function':>26s} {'longest line':>12s} {'> 110':>6s} {'; ':>3s}")
    for name, target in TARGETS.items():
        s = stats(os.path.join(ROOT, name))
        n, fn = s["longest_function"]
        print(f"{name:20s} {s['lines']:6d} {target:6d} {s['code']:5d} {s['main']:6d} {s['main_ends']:5d} "
              f"{f'{fn} ({n})':>26s} {s['longest_line']:12d} {s['over_110']:6d} {s['semicolons']:3d}")
    with open(os.path.join(ROOT, "README.md")) as f:
        print(f"{'README.md':20s} {len(f.read().splitlines()):6d} {150:6d}")
    sys.exit(0)
