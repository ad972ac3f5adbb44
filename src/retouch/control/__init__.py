"""Attention control: editor policies, the context they see, and the reversible installer."""

from retouch.control.context import AttentionEditor, AttnContext, BatchLayout, IdentityEditor
from retouch.control.installer import EditState, all_layers, attention_editing, attention_probs

__all__ = [
    "AttentionEditor",
    "AttnContext",
    "BatchLayout",
    "EditState",
    "IdentityEditor",
    "all_layers",
    "attention_editing",
    "attention_probs",
]
