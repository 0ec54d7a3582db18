"""Loading YAML (job files and config files) safely: no object tags, and a cap on what
aliases can expand to.

Imported only when a run reads YAML, so a JSONL run without a config file never pays for PyYAML.
"""

from __future__ import annotations

from typing import IO, Any

import orjson
import yaml
from yaml import YAMLError

__all__ = ["MAX_YAML_ALIASES", "MAX_YAML_NODES", "YAMLError", "describe", "load"]

#  YAML aliases let a few lines describe billions of nodes; a job file needs few of them.
MAX_YAML_ALIASES = 1000
#  ... and even a few aliases nest into billions ("billion laughs"): cap the document's size
#  counted as if every alias were a copy.
MAX_YAML_NODES = 1_000_000


def load(stream: IO[bytes]) -> Any:
    """The document in ``stream``, built only of plain data; raises YAMLError.

    A document written as JSON (which is YAML) is parsed by orjson: PyYAML's pure-Python loader
    takes seconds and tens of MB for a generated config that pins 50,000 host names.
    """
    data = stream.read()
    if data.lstrip()[:1] in (b"{", b"["):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass  # YAML's flow style, not JSON: the YAML parser reads it
    return yaml.load(data, Loader=_BoundedSafeLoader)


def describe(exc: YAMLError) -> tuple[str, str | None]:
    """Where a YAML error is (" line N", or "" when the parser does not say) and the parser's
    own words for it (None when it has none)."""
    mark = getattr(exc, "problem_mark", None)
    at = f" line {mark.line + 1}" if mark is not None else ""
    return at, getattr(exc, "problem", None)


class _BoundedSafeLoader(yaml.SafeLoader):
    """SafeLoader that refuses documents using more than MAX_YAML_ALIASES aliases."""

    _aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                event = self.peek_event()  # type: ignore[no-untyped-call]
                raise yaml.composer.ComposerError(
                    None, None, f"more than {MAX_YAML_ALIASES} aliases", event.start_mark
                )
        return super().compose_node(parent, index)

    def compose_document(self) -> Any:
        node = super().compose_document()
        problem = None if node is None else _expansion_problem(node)
        if problem is not None:
            raise yaml.composer.ComposerError(None, None, problem, None)
        return node


def _expansion_problem(root: yaml.Node) -> str | None:
    """Why the node graph is too big once aliases are expanded, or recursive; else None.

    Sizes are memoised per node, so this is linear in the nodes the parser actually built.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # on the current path: meeting one again means a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        if finished:
            open_nodes.discard(key)
            size = 1 + sum(sizes[id(child)] for child in children)
            if size > MAX_YAML_NODES:
                return f"more than {MAX_YAML_NODES} values once aliases are expanded"
            sizes[key] = size
        elif key in open_nodes:
            return "an alias refers to a node that contains it"
        elif key not in sizes:
            open_nodes.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in sizes)
    return None
