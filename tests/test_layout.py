"""The package's layout rules, checked on its source: no module reaches into another's private
names, the import graph of eercl_jax has no circle (imports inside functions included: they hide
circles, they do not remove them), and only the commands parse a command line."""
import ast
import os
import re

from tests.conftest import REPO

PACKAGE = os.path.join(REPO, "eercl_jax")
# The documented short names of commands (each only forwards to its tool in eercl_jax/tools/).
ALIASES = {"eercl_jax.bench", "eercl_jax.predict", "eercl_jax.summarize", "eercl_jax.sweep",
           "eercl_jax.data.pack", "eercl_jax.data.make_lists", "eercl_jax.data.synthetic"}


def _modules() -> dict[str, str]:
  """{dotted module name: path} of every module of the package."""
  out = {}
  for root, dirs, files in os.walk(PACKAGE):
    dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(root, f), REPO)[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = \
            os.path.join(root, f)
  return out


def _imports(tree: ast.AST, module: str, modules) -> set[str]:
  """Package modules `module` imports, anywhere in its body."""
  found = set()
  package = module if module.endswith("__init__") else module.rsplit(".", 1)[0]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                        + ([base] if base else []))
      names = [base] + [f"{base}.{a.name}" for a in node.names]
    else:
      continue
    for name in names:
      while name and name not in modules:
        name = name.rsplit(".", 1)[0] if "." in name else ""
      if name and name != module:
        found.add(name)
  return found


def _graph():
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    with open(path, encoding="utf-8") as f:
      graph[name] = _imports(ast.parse(f.read()), name, modules)
  return graph


def _cycle(graph):
  """One import circle of the graph (a list of modules), or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      # A package's __init__ importing its own modules is not a circle of theirs.
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_the_import_graph_has_no_circle():
  graph = _graph()
  assert len(graph) > 40 and sum(map(len, graph.values())) > 100   # the scan sees the package
  assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_circle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_uses_another_modules_private_names():
  private = re.compile(r"\b(?:from\s+[\w.]+\s+import\s+(?:[\w, ]*,\s*)?_[a-z]\w*"
                       r"|[a-z]\w*\._[a-z]\w*\()")
  hits = []
  for name, path in _modules().items():
    with open(path, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        code = line.split("#", 1)[0]
        for m in private.finditer(code):
          # self._x( / cls._x( / a module's own alias are the module's own names
          if re.match(r"(self|cls|super\(\))\._", m.group(0)):
            continue
          hits.append(f"{os.path.relpath(path, REPO)}:{n}: {line.strip()}")
  assert not hits, "\n".join(hits)


def test_only_commands_parse_a_command_line():
  """Commands are eercl_jax/main.py and eercl_jax/tools/*; the documented short names only
  forward to their tool; no library module has a __main__ block or defines flags."""
  parsers = re.compile(r"argparse\.ArgumentParser|flags\.DEFINE_|config_flags\.DEFINE_|"
                       r"__name__ == .__main__.")
  offenders = []
  for name, path in _modules().items():
    if name == "eercl_jax.main" or name.startswith("eercl_jax.tools"):
      continue
    with open(path, encoding="utf-8") as f:
      text = f.read()
    if name in ALIASES:
      code = [l for l in text.split('"""')[-1].splitlines() if l.strip()]
      assert len(code) <= 3 and "eercl_jax.tools" in text, f"{name} is more than an alias"
      continue
    if parsers.search(text):
      offenders.append(name)
  assert not offenders, offenders
