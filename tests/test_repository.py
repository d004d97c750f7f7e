"""The repository explains itself: nothing points at documents outside it, and every docs anchor
(docs/<file>.md#<heading>) cited in code, configs, tests and the README names a real heading."""
import os
import re

import pytest

from tests.conftest import REPO

SCANNED = ("eercl_jax", "configs", "tests", "benchmarks", "launch", "docs", "data")
TEXT = (".py", ".md", ".sh", ".sbatch", ".txt")


def _files():
  out = [os.path.join(REPO, "README.md")]
  for top in SCANNED:
    for root, dirs, files in os.walk(os.path.join(REPO, top)):
      dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
      out += [os.path.join(root, f) for f in files if f.endswith(TEXT)]
  return [f for f in out if os.path.isfile(f)]


def _slug(heading: str) -> str:
  """GitHub's anchor of a markdown heading."""
  s = heading.strip().lower()
  s = re.sub(r"[^\w\- ]", "", s)
  return s.replace(" ", "-")


def _anchors(path):
  with open(path, encoding="utf-8") as f:
    return {_slug(line.lstrip("#")) for line in f if line.startswith("#")}


def test_nothing_points_outside_the_repository():
  # The names of documents that exist only outside the repository (the method note and the
  # toolchain notes this port was written from, their folder, and the quirk labels of that
  # note), assembled from parts so this checker does not itself contain what it looks for.
  names = ["algorithm" + r"\.md", "perf" + "-notes", "shared" + "/docs", r"\.\./" + "shared",
           r"\(" + "Q" + r"\d+", r"\b" + "Q" + r"\d{1,2}\b"]
  outside = re.compile("|".join(names))
  hits = []
  for path in _files():
    with open(path, encoding="utf-8", errors="replace") as f:
      for n, line in enumerate(f, 1):
        if outside.search(line):
          hits.append(f"{os.path.relpath(path, REPO)}:{n}: {line.strip()}")
  assert not hits, "\n".join(hits)


def test_cited_doc_anchors_exist():
  cite = re.compile(r"docs/([\w-]+\.md)#([\w-]+)")
  link = re.compile(r"\]\(([\w-]+\.md)#([\w-]+)\)")   # links between the docs
  missing, count = [], 0
  for path in _files():
    with open(path, encoding="utf-8", errors="replace") as f:
      text = f.read()
    pairs = cite.findall(text)
    if path.startswith(os.path.join(REPO, "docs")):
      pairs += link.findall(text)
    for name, anchor in pairs:
      count += 1
      target = os.path.join(REPO, "docs", name)
      if not os.path.isfile(target) or anchor not in _anchors(target):
        missing.append(f"{os.path.relpath(path, REPO)} cites docs/{name}#{anchor}")
  assert count > 10 and not missing, "\n".join(missing)


@pytest.mark.parametrize("name", ["method.md", "deviations.md", "config-keys.md", "toolchain.md",
                                  "datasets.md"])
def test_docs_exist(name):
  assert os.path.getsize(os.path.join(REPO, "docs", name)) > 1000
