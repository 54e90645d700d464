#!/usr/bin/env python3
"""Module dependency graph of a Rust crate, from its `crate::` paths; exits 1 on a cycle.

Usage: scripts/modgraph.py SRC_DIR [DEPTH]

Every `.rs` file under SRC_DIR is a module (`lib.rs`/`main.rs` are the crate root,
`foo/mod.rs` is `foo`, `foo/bar.rs` is `foo::bar`). A reference is any `crate::a::b` path
outside comments and string literals, including `use crate::{a, b::c}` groups. Modules
are grouped to their first DEPTH path segments (default 1: `link::machine` counts as
`link`), references inside a group are dropped, and the rest are printed as edges
`from -> to   (file:line, ...)`. `#[cfg(test)]` code counts like any other: a test
that needs a module is a dependency too.

Exit status: 0 without cycles, 1 with (each cycle printed), 2 on bad usage.
Standard library only.
"""

import os
import re
import sys
from collections import defaultdict

ROOT = "crate"
# `crate::` followed by a path or a `{...}` group (nested groups allowed).
CRATE_PATH = re.compile(r"\bcrate\s*::\s*")
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def module_of(src_dir, path):
    """The module path (list of segments) a file defines."""
    rel = os.path.relpath(path, src_dir)
    parts = rel[: -len(".rs")].split(os.sep)
    if parts[-1] in ("lib", "main") and len(parts) == 1:
        return []
    if parts[-1] == "mod":
        parts = parts[:-1]
    return parts


def strip_comments_and_strings(text):
    """Blanks out comments, string and char literals, keeping line numbers."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append("\n" * text.count("\n", i, j))
            i = j
        elif c == "r" and re.match(r'r#*"', text[i:]) and (i == 0 or not text[i - 1].isalnum()):
            hashes = re.match(r"r(#*)\"", text[i:]).group(1)
            end = text.find('"' + hashes, i + 2 + len(hashes))
            end = n if end < 0 else end + 1 + len(hashes)
            out.append("\n" * text.count("\n", i, end))
            i = end
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append("\n" * text.count("\n", i, j + 1))
            i = j + 1
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", text[i:]):
            i += len(re.match(r"'(\\[^']*|[^\\'])'", text[i:]).group(0))
        else:
            out.append(c)
            i += 1
    return "".join(out)


def parse_tree(text, i):
    """Parses the path tree after `crate::` at text[i:]; returns (paths, end)."""
    text_len = len(text)

    def skip_ws(j):
        while j < text_len and text[j].isspace():
            j += 1
        return j

    i = skip_ws(i)
    if i < text_len and text[i] == "{":
        paths, i = [], i + 1
        while True:
            i = skip_ws(i)
            if i >= text_len or text[i] == "}":
                return paths, i + 1
            sub, i = parse_tree(text, i)
            paths.extend(sub)
            i = skip_ws(i)
            if i < text_len and text[i] == ",":
                i += 1
    m = IDENT.match(text, i)
    if not m:
        return [[]], i
    name, i = m.group(0), m.end()
    j = skip_ws(i)
    if text.startswith("::", j):
        rest, i = parse_tree(text, j + 2)
        return [[name] + r for r in rest], i
    return [[name]], i


def references(text):
    """(line, path) for every `crate::` path in the (stripped) text."""
    for m in CRATE_PATH.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        paths, _ = parse_tree(text, m.end())
        for path in paths:
            if path and path[0] != "self":
                yield line, path


def resolve(path, modules):
    """The longest known module that is a prefix of `path`."""
    for k in range(len(path), 0, -1):
        if tuple(path[:k]) in modules:
            return list(path[:k])
    return None


def find_cycles(graph):
    """Every elementary cycle through strongly connected components (Tarjan, then a
    DFS per component), each as a list of nodes."""
    index, low, on_stack, stack, sccs = {}, {}, set(), [], []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            sccs.append(comp)

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    cycles = []
    for comp in sccs:
        members = set(comp)
        if len(comp) == 1 and comp[0] not in graph[comp[0]]:
            continue
        # One shortest cycle through each member, deduplicated by rotation.
        seen = set()
        for start in sorted(members):
            path = shortest_cycle(graph, start, members)
            if path:
                k = min(range(len(path)), key=lambda x: path[x])
                key = tuple(path[k:] + path[:k])
                if key not in seen:
                    seen.add(key)
                    cycles.append(list(key))
    return cycles


def shortest_cycle(graph, start, members):
    """Breadth-first: the shortest path start -> ... -> start inside `members`."""
    frontier, parent = [start], {start: None}
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w not in members:
                    continue
                if w == start:
                    path = [v]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return list(reversed(path))
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    return None


def main(argv):
    if len(argv) not in (2, 3) or not os.path.isdir(argv[1]):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    src_dir = argv[1]
    try:
        depth = int(argv[2]) if len(argv) == 3 else 1
    except ValueError:
        print("DEPTH must be a positive integer", file=sys.stderr)
        return 2
    if depth < 1:
        print("DEPTH must be a positive integer", file=sys.stderr)
        return 2

    files = {}
    for dirpath, _, names in os.walk(src_dir):
        for name in sorted(names):
            if name.endswith(".rs"):
                path = os.path.join(dirpath, name)
                files[path] = module_of(src_dir, path)
    modules = {tuple(m) for m in files.values()}

    def group(mod):
        return "::".join(mod[:depth]) if mod else ROOT

    graph = defaultdict(set)
    sites = defaultdict(list)
    for path, mod in sorted(files.items()):
        with open(path, encoding="utf-8") as f:
            text = strip_comments_and_strings(f.read())
        here = group(mod)
        graph[here]
        for line, ref in references(text):
            target = resolve(ref, modules)
            if target is None:
                continue  # an item of the crate root (a re-export), not a module
            there = group(target)
            if there == here or there == ROOT:
                continue
            graph[here].add(there)
            graph[there]
            sites[(here, there)].append(f"{os.path.relpath(path, src_dir)}:{line}")

    for (a, b) in sorted(sites):
        where = sorted(set(sites[(a, b)]))
        shown = ", ".join(where[:3]) + (f", +{len(where) - 3}" if len(where) > 3 else "")
        print(f"{a} -> {b}   ({shown})")
    cycles = find_cycles(graph)
    if cycles:
        for cycle in cycles:
            print("cycle: " + " -> ".join(cycle + [cycle[0]]))
        return 1
    print(f"no cycles ({len(graph)} modules, {len(sites)} edges, depth {depth})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
