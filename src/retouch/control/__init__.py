"""Attention control: editor policies, the context they see, and the reversible installer."""

from retouch.control.context import AttnContext, BatchLayout
from retouch.control.contract import AttentionEditor, Editor, IdentityEditor, StepContext
from retouch.control.installer import EditState, all_layers, attention_editing, attention_probs

__all__ = [
    "AttentionEditor",
    "AttnContext",
    "BatchLayout",
    "EditState",
    "Editor",
    "IdentityEditor",
    "StepContext",
    "all_layers",
    "attention_editing",
    "attention_probs",
]
