"""Import cycles among ``echo`` modules, counting function-level imports too.

``python benchmarks/import_cycles.py [PACKAGE_ROOT_PARENT]`` prints the cyclic groups (strongly
connected components of the module import graph, built by grimp from every ``import`` statement
in the source, at any depth) and the number of elementary cycles. Imports under
``if TYPE_CHECKING:`` are reported separately: they never run.
"""

from __future__ import annotations

import sys

import grimp
import networkx as nx

__all__ = ["import_graph", "cycles"]


def import_graph(package: str = "echo", type_checking: bool = False) -> nx.DiGraph:
    """Module -> module edges of ``package`` (internal imports only)."""
    graph = grimp.build_graph(package, cache_dir=None, exclude_type_checking_imports=not type_checking)
    g = nx.DiGraph()
    for module in graph.modules:
        g.add_node(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported != module:
                g.add_edge(module, imported)
    return g


def cycles(g: nx.DiGraph) -> tuple[list[list[str]], int]:
    """(cyclic groups, number of elementary cycles)."""
    groups = [sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1]
    return sorted(groups), sum(1 for _ in nx.simple_cycles(g))


def main() -> int:
    if len(sys.argv) > 1:
        sys.path.insert(0, sys.argv[1])
    for label, tc in (("runtime imports (module- and function-level)", False), ("plus TYPE_CHECKING imports", True)):
        groups, n = cycles(import_graph("echo", type_checking=tc))
        print(f"{label}: {len(groups)} cyclic group(s), {n} elementary cycle(s)")
        for group in groups:
            print("   ", " <-> ".join(group))
    return 0


if __name__ == "__main__":
    sys.exit(main())
