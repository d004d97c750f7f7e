"""The installable package (pyproject.toml): console scripts for every command, dependencies in
step with requirements.txt, and installs into a fresh virtual environment, editable and not,
without network (the dependencies come from the running interpreter's site-packages)."""
import ast
import os
import re
import shutil
import site
import subprocess
import sys
import tomllib

import pytest

from tests.conftest import REPO

TOOLS = os.path.join(REPO, "eercl_jax", "tools")
# What a build reads: the package's folders and the files pyproject.toml names.
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "eercl_jax", "configs")


def _pyproject() -> dict:
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def _commands() -> dict[str, str]:
  """{expected console script: entry point}: eercl-train for eercl_jax/main.py, eercl-<tool>
  (underscores as dashes) for each eercl_jax/tools/<tool>.py."""
  out = {"eercl-train": "eercl_jax.main:run"}
  for f in sorted(os.listdir(TOOLS)):
    if f.endswith(".py") and f not in ("__init__.py", "cli.py"):
      out["eercl-" + f[:-3].replace("_", "-")] = f"eercl_jax.tools.{f[:-3]}:run"
  return out


def _normal(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def test_every_command_has_a_console_script():
  scripts = _pyproject()["project"]["scripts"]
  assert scripts == _commands()
  for target in scripts.values():
    module = target.split(":")[0].replace(".", os.sep) + ".py"
    with open(os.path.join(REPO, module), encoding="utf-8") as f:
      tree = ast.parse(f.read())
    assert any(isinstance(n, ast.FunctionDef) and n.name == "run" for n in tree.body), target


def test_dependencies_are_requirements_txt_with_its_pins_as_lower_bounds():
  pins = {}
  with open(os.path.join(REPO, "requirements.txt"), encoding="utf-8") as f:
    for line in f:
      line = line.split("#", 1)[0].strip()
      if line:
        name, version = line.split("==")
        pins[_normal(name)] = version
  bounds = {}
  for dep in _pyproject()["project"]["dependencies"]:
    name, version = dep.split(">=")
    bounds[_normal(name)] = version
  assert bounds == pins


def test_every_package_folder_is_a_package():
  """setuptools' find includes only folders with an __init__.py: a module folder without one
  would be missing from `pip install .` (and only there)."""
  missing = [root for root, dirs, files in os.walk(os.path.join(REPO, "eercl_jax"))
             if "__pycache__" not in root and any(f.endswith(".py") for f in files)
             and "__init__.py" not in files]
  assert not missing


# ------------------------------------------------------------------------------ installs

def _copy_sources(dest) -> str:
  """The files a build reads, copied: a build writes build/ and *.egg-info into its source
  folder, which must not be the clone the tests run from."""
  os.makedirs(dest)
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
  for name in SOURCES:
    src = os.path.join(REPO, name)
    if os.path.isdir(src):
      shutil.copytree(src, os.path.join(dest, name), ignore=ignore)
    else:
      shutil.copy2(src, dest)
  return str(dest)


def _env() -> dict:
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("PIP_")}
  env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_CACHE_DIR="1",
             PIP_NO_INPUT="1")
  return env


def _venv(folder, source: str, editable: bool) -> str:
  """A fresh virtual environment with `source` installed (offline: --no-index, --no-deps,
  --no-build-isolation); returns its bin/ folder. Its site-packages reach the running
  interpreter's (jax, setuptools, pip, ...) through a .pth file, first its own: this works
  whether the tests run in the system's Python or in a venv (where --system-site-packages
  would give the base interpreter's packages, not this one's)."""
  folder = str(folder)
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", folder], check=True,
                 timeout=120)
  bin_dir = os.path.join(folder, "bin")
  python = os.path.join(bin_dir, "python")
  own = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"],
                       check=True, capture_output=True, text=True, env=_env()).stdout.strip()
  parents = [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]
  with open(os.path.join(own, "_eercl_parent_site.pth"), "w", encoding="utf-8") as f:
    f.writelines(f"import site; site.addsitedir({p!r})\n" for p in parents)
  proc = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                         *(["-e"] if editable else []), source],
                        capture_output=True, text=True, env=_env(), timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return bin_dir


def _run(argv, cwd, timeout=300):
  return subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True,
                        timeout=timeout)


def _where(bin_dir, cwd) -> list[str]:
  """The files eercl_jax and configs import from in the venv (cwd outside any clone)."""
  proc = _run([os.path.join(bin_dir, "python"), "-c",
               "import eercl_jax, configs; print(eercl_jax.__file__); print(configs.__file__)"],
              cwd)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout.split()


def test_editable_install_runs_the_demo_eval_as_a_console_script(tmp_path, source_run,
                                                                 data_dir):
  clone = _copy_sources(tmp_path / "clone")
  bin_dir = _venv(tmp_path / "venv", clone, editable=True)
  for script in _commands():
    assert os.access(os.path.join(bin_dir, script), os.X_OK), script
  # The editable install imports the clone's files, wherever the command runs.
  assert _where(bin_dir, str(tmp_path)) == [os.path.join(clone, "eercl_jax", "__init__.py"),
                                            os.path.join(clone, "configs", "__init__.py")]
  run = shutil.copytree(source_run, tmp_path / "run")   # eval writes into the workdir
  proc = _run([os.path.join(bin_dir, "eercl-train"),
               f"--config={clone}/configs/demo_source.py", f"--workdir={run}",
               "--config.mode=eval"], cwd=data_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert re.search(r"^target: acc=\d+\.\d\d mean_class_acc=", proc.stdout, re.M), proc.stdout
  assert re.search(r"^source: acc=\d+\.\d\d mean_class_acc=", proc.stdout, re.M), proc.stdout
  assert os.path.isfile(os.path.join(run, "eval", "best_step4.json"))
  # `python -m` keeps working in the venv, from any folder (absl's --help exits with 1).
  proc = _run([os.path.join(bin_dir, "python"), "-m", "eercl_jax.main", "--help"], tmp_path)
  assert proc.returncode == 1 and "--workdir" in proc.stdout, proc.stderr[-3000:]
  assert not proc.stderr.strip(), proc.stderr[-3000:]


@pytest.mark.slow
def test_installed_copy_runs_and_reads_configs_beside_the_given_file(tmp_path):
  clone = _copy_sources(tmp_path / "clone")
  bin_dir = _venv(tmp_path / "venv", clone, editable=False)
  # A copy in the venv's site-packages, not the clone's files.
  site_dir = os.path.join(str(tmp_path / "venv"), "lib")
  where = _where(bin_dir, str(tmp_path))
  assert all(w.startswith(site_dir) and "site-packages" in w for w in where), where
  proc = _run([os.path.join(bin_dir, "eercl-summarize"), "--help"], tmp_path)
  assert proc.returncode == 0 and "usage" in proc.stdout.lower(), proc.stderr[-3000:]
  proc = _run([os.path.join(bin_dir, "python"), "-c",
               "from eercl_jax import records; print(records.versions()['eercl_jax'])"],
              tmp_path)
  assert proc.stdout.strip() == "0.1.0 (installed)", proc.stdout + proc.stderr[-3000:]
  # A configs/ package of one's own (an edited clone): `from configs import base` in the file
  # given by path reads its sibling, not the installed configs (which has no `base`).
  mine = tmp_path / "mine" / "configs"
  mine.mkdir(parents=True)
  (mine / "__init__.py").write_text("")
  (mine / "base.py").write_text("import ml_collections\n\n"
                                "def get_config():\n"
                                "  return ml_collections.ConfigDict(dict(marker=1))\n")
  (mine / "child.py").write_text("from configs import base\n\n"
                                 "def get_config():\n  return base.get_config()\n")
  proc = _run([os.path.join(bin_dir, "eercl-train"), f"--config={mine}/child.py",
               f"--workdir={tmp_path}/w", "--config.markr=2"], cwd=tmp_path)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "unknown config key 'markr': did you mean 'marker'?" in proc.stderr, proc.stderr
