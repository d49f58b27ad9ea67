"""Builds the API reference from the docstrings and fails on broken
cross-references.

  .venv/bin/python scripts/build_api_docs.py [--out docs/api]

Every ``:func:`` / ``:class:`` / ``:mod:`` / ``:meth:`` / ``:attr:`` /
``:data:`` reference and every backticked ``jirm.<name>`` in a docstring of
the ``jirm`` package must resolve to an importable object (relative names
resolve in the module of the docstring); the HTML is written with pdoc.
Exit status 1 lists the broken references.
"""

import argparse
import importlib
import inspect
import os
import pkgutil
import re
import sys

ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj):`~?([\w.]+)`")
DOTTED = re.compile(r"`(jirm(?:\.\w+)+)`")


def modules(package="jirm"):
  pkg = importlib.import_module(package)
  yield pkg
  for info in pkgutil.walk_packages(pkg.__path__, package + "."):
    yield importlib.import_module(info.name)


def _resolve(name, module):
  parts = name.split(".")
  # Absolute: the longest importable module prefix, then attributes.
  for i in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:i]))
    except ImportError:
      continue
    try:
      for p in parts[i:]:
        obj = getattr(obj, p)
      return True
    except AttributeError:
      break
  # Relative to the docstring's module.
  obj = module
  try:
    for p in parts:
      obj = getattr(obj, p)
    return True
  except AttributeError:
    return False


def docstrings(module):
  yield module.__name__, module.__doc__ or ""
  for name, obj in vars(module).items():
    if getattr(obj, "__module__", None) != module.__name__:
      continue
    if inspect.isfunction(obj) or inspect.isclass(obj):
      yield f"{module.__name__}.{name}", obj.__doc__ or ""  # Own, not inherited.
      if inspect.isclass(obj):
        for mname, m in vars(obj).items():
          if inspect.isfunction(m) and m.__doc__:
            yield f"{module.__name__}.{name}.{mname}", m.__doc__


def broken_references():
  bad, total = [], 0
  for mod in modules():
    for where, doc in docstrings(mod):
      for ref in ROLE.findall(doc) + DOTTED.findall(doc):
        total += 1
        if not _resolve(ref, mod):
          bad.append(f"{where}: {ref}")
  return sorted(set(bad)), total


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default="docs/api")
  args = parser.parse_args()
  bad, total = broken_references()
  if bad:
    print(f"{len(bad)} broken reference(s) of {total}:\n  " +
          "\n  ".join(bad), file=sys.stderr)
    sys.exit(1)
  import pdoc  # pylint: disable=g-import-not-at-top
  import warnings  # pylint: disable=g-import-not-at-top
  # pdoc cannot evaluate NamedTuple fields' string annotations (PEP 563);
  # the pages still show them as written.
  warnings.filterwarnings("ignore", message="Error parsing type annotation")
  pdoc.render.configure(docformat="google")
  pdoc.pdoc("jirm", output_directory=__import__("pathlib").Path(args.out))
  pages = sum(len(f) for _, _, f in os.walk(args.out))
  print(f"API reference: {pages} files in {args.out}; {total} "
        f"cross-references checked, none broken.")


if __name__ == "__main__":
  main()
