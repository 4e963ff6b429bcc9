"""nodes/registry.py's registrable_nodes, the filter the extension registers through: a node
whose id drifted from NODE_DISPLAY_NAMES, or whose schema raises, is logged and skipped, and every
other node of the pack still registers."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from nodes import registry
from nodes.registry import NODE_DISPLAY_NAMES, registrable_nodes


def _node_class(node_id: str) -> type:
    """A stand-in for a pack node: define_schema looks its display name up in the registry table
    the way the node modules' _schema helpers do (a KeyError when the id is missing)."""
    def define_schema(cls):
        return SimpleNamespace(node_id=node_id, display_name=registry.NODE_DISPLAY_NAMES[node_id])
    return type(node_id.removeprefix("MPOD3D_"), (), {"define_schema": classmethod(define_schema)})


@pytest.fixture
def pack_nodes():
    return [_node_class(node_id) for node_id in NODE_DISPLAY_NAMES]


def test_in_sync_registers_every_node_without_warnings(pack_nodes, caplog):
    with caplog.at_level(logging.WARNING, logger=registry.__name__):
        assert registrable_nodes(pack_nodes, NODE_DISPLAY_NAMES) == pack_nodes
    assert not caplog.records


def test_an_id_missing_from_the_registry_skips_that_node_only(pack_nodes, monkeypatch, caplog):
    monkeypatch.delitem(registry.NODE_DISPLAY_NAMES, "MPOD3D_OpacityMask")
    with caplog.at_level(logging.WARNING, logger=registry.__name__):
        kept = registrable_nodes(pack_nodes, registry.NODE_DISPLAY_NAMES)
    assert [n.__name__ for n in kept] == [n.__name__ for n in pack_nodes if n.__name__ != "OpacityMask"]
    assert len(kept) == len(pack_nodes) - 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "MPOD3D_OpacityMask" in warnings[0], warnings


def test_a_class_whose_id_is_not_in_the_table_is_skipped(pack_nodes, caplog):
    stray = type("Stray", (), {"define_schema": classmethod(lambda cls: SimpleNamespace(node_id="MPOD3D_Stray"))})
    with caplog.at_level(logging.WARNING, logger=registry.__name__):
        kept = registrable_nodes([*pack_nodes, stray], NODE_DISPLAY_NAMES)
    assert kept == pack_nodes
    assert any("MPOD3D_Stray" in r.getMessage() and "Stray" in r.getMessage() for r in caplog.records)


def test_a_raising_schema_and_a_duplicate_id_are_skipped(pack_nodes, caplog):
    def boom(cls):
        raise RuntimeError("boom")
    broken = type("Broken", (), {"define_schema": classmethod(boom)})
    duplicate = _node_class("MPOD3D_LoadMesh")
    with caplog.at_level(logging.WARNING, logger=registry.__name__):
        kept = registrable_nodes([broken, *pack_nodes, duplicate], NODE_DISPLAY_NAMES)
    assert kept == pack_nodes
    messages = [r.getMessage() for r in caplog.records]
    assert any("Broken" in m and "RuntimeError: boom" in m for m in messages), messages
    assert any("MPOD3D_LoadMesh" in m and "another class" in m for m in messages), messages


def test_a_table_id_without_a_class_is_logged(pack_nodes, caplog):
    without_save = [n for n in pack_nodes if n.__name__ != "SaveMesh"]
    with caplog.at_level(logging.WARNING, logger=registry.__name__):
        assert registrable_nodes(without_save, NODE_DISPLAY_NAMES) == without_save
    assert any("MPOD3D_SaveMesh" in r.getMessage() for r in caplog.records)


def test_a_schema_that_fails_validation_is_skipped_alone(pack_nodes, caplog):
    """ComfyUI's own schema check (ids unique between inputs and outputs) runs here, so such a node is left out
    instead of aborting the extension's load (which drops every node of the pack)."""
    def define_schema(cls):
        def validate():
            raise ValueError("Ids must be unique between inputs and outputs, but {'mesh'} are not.")
        return SimpleNamespace(node_id="MPOD3D_LoadMesh", validate=validate)
    broken = type("BrokenLoadMesh", (), {"define_schema": classmethod(define_schema)})
    nodes = [n for n in pack_nodes if n.__name__ != "LoadMesh"] + [broken]
    with caplog.at_level(logging.WARNING, logger=registry.__name__):
        kept = registrable_nodes(nodes, NODE_DISPLAY_NAMES)
    assert broken not in kept and len(kept) == len(pack_nodes) - 1
    assert "Ids must be unique" in caplog.text

