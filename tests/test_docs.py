"""The repo reads on its own: every `FILE.md §N` that code, tests or docs cite names a section that exists in
docs/ (or beside the citing file), nothing points outside the repository, and the README's line count is true."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CITE = re.compile(r"([\w/.-]+\.md) §(\d+)((?:,? (?:and )?§\d+)*)")


def repo_files():
    for dirpath, dirnames, names in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in ("__pycache__", "out", "data")]
        for name in names:
            if name.endswith((".py", ".md", ".sh", ".txt", ".toml")) or name == "run":
                yield os.path.join(dirpath, name)


def sections(path):
    with open(path, encoding="utf-8") as f:
        return {int(m.group(1)) for m in re.finditer(r"^## (\d+)\.", f.read(), re.M)}


def test_every_section_cited_exists():
    cited = 0
    for path in repo_files():
        text = open(path, encoding="utf-8", errors="replace").read()
        for m in CITE.finditer(text):
            name = os.path.basename(m.group(1))
            target = next((p for p in (os.path.join(ROOT, "docs", name), os.path.join(os.path.dirname(path), name))
                           if os.path.isfile(p)), None)
            assert target, f"{os.path.relpath(path, ROOT)} cites {m.group(0)!r}: no such document in the repo"
            numbers = [int(m.group(2))] + [int(n) for n in re.findall(r"\d+", m.group(3))]
            for n in numbers:
                assert n in sections(target), f"{os.path.relpath(path, ROOT)} cites {name} §{n}, which has no section {n}"
                cited += 1
    assert cited > 30  # the code does cite its maths


def test_nothing_points_outside_the_repo():
    for path in repo_files():
        text = open(path, encoding="utf-8", errors="replace").read()
        outside, old_name = "../" + "shared", "math" + ".md"  # (spelled apart, so this file does not match itself)
        assert outside not in text and old_name not in text.replace("maths.md", ""), os.path.relpath(path, ROOT)


def test_readme_states_the_line_count():
    """The README's count of the training path is the files' count today."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    m = re.search(r"The training path \(([\w, ]+)\) is ([\d,]+) lines and `demo.py` adds ([\d,]+)",
                  readme.replace("\n", " "))
    assert m, "README: no training-path line count"
    count = lambda names: sum(len(open(os.path.join(ROOT, f"{n}.py"), encoding="utf-8").read().splitlines())
                              for n in names)
    names = [n.strip() for n in m.group(1).split(",")]
    assert len(names) >= 10 and "train" in names
    assert (count(names), count(["demo"])) == (int(m.group(2).replace(",", "")), int(m.group(3).replace(",", "")))
