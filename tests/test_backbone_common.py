"""The helpers the adapters share (``backbones/common.py``) and the routing processors' base class
(``backbones/processors.py``): what each one promises, on small tensors (no model runs)."""

from __future__ import annotations

import re

import pytest
import torch

from retouch.backbones import common
from retouch.backbones.base import LayerInfo
from retouch.backbones.flux import FluxProcessor
from retouch.backbones.flux2 import Flux2Processor
from retouch.backbones.processors import JointProcessor, RoutingProcessor, StandardProcessor, unmerge_after_text
from retouch.backbones.qwen_image import QwenImageProcessor
from retouch.backbones.sana import SanaCrossProcessor, SanaLinearProcessor
from retouch.backbones.zimage import ZImageProcessor

LAYER = LayerInfo(name="blocks.0.attn", kind="single", depth=0, place="single", downsample=1, text_first=True)


def test_parse_layer_names_names_the_model_on_an_unexpected_path():
    pattern = re.compile(r"^blocks\.(\d+)\.attn$")
    parsed = common.parse_layer_names(["blocks.1.attn.processor", "blocks.0.attn.processor"], pattern, "Toy model")
    assert [(m.group(1), name) for m, name in parsed] == [("1", "blocks.1.attn"), ("0", "blocks.0.attn")]
    with pytest.raises(RuntimeError, match="unexpected attention module path in the Toy model: head.attn"):
        common.parse_layer_names(["head.attn.processor"], pattern, "Toy model")


def test_numbered_blocks_count_depth_from_the_first():
    blocks = common.numbered_blocks("layers", 3, kind="sequence", place="single", downsample=2, first_depth=5)
    assert list(blocks) == ["layers.0", "layers.1", "layers.2"]
    assert [b.depth for b in blocks.values()] == [5, 6, 7]
    assert all(b.name == k and b.kind == "sequence" and b.downsample == 2 for k, b in blocks.items())


def test_stream_attention_layers_put_double_blocks_before_single_blocks():
    keys = ["single_transformer_blocks.0.attn.processor", "transformer_blocks.1.attn.processor",
            "transformer_blocks.0.attn.processor", "single_transformer_blocks.10.attn.processor",
            "single_transformer_blocks.2.attn.processor"]  # fmt: skip
    table = common.stream_attention_layers(keys, "toy transformer", downsample=2)
    assert list(table) == ["transformer_blocks.0.attn", "transformer_blocks.1.attn", "single_transformer_blocks.0.attn",
                           "single_transformer_blocks.2.attn", "single_transformer_blocks.10.attn"]  # fmt: skip
    assert [i.kind for i in table.values()] == ["joint", "joint", "single", "single", "single"]
    assert [i.depth for i in table.values()] == [0, 1, 2, 3, 4]
    assert all(i.text_first and i.downsample == 2 for i in table.values())


def test_grid_position_ids_are_row_major_rows_and_columns():
    ids = common.grid_position_ids(2, 3, 4, torch.long)
    assert ids.shape == (6, 4) and ids.dtype == torch.long
    assert ids[:, 1].tolist() == [0, 0, 0, 1, 1, 1]
    assert ids[:, 2].tolist() == [0, 1, 2, 0, 1, 2]
    assert not ids[:, [0, 3]].any()


def test_pad_tokens_pads_with_zeros_and_refuses_a_longer_sequence():
    x = torch.arange(1, 7, dtype=torch.float32).view(1, 3, 2)
    padded = common.pad_tokens(x, 5)
    assert padded.shape == (1, 5, 2)
    assert torch.equal(padded[:, :3], x) and not padded[:, 3:].any()
    mask = common.pad_tokens(torch.ones(2, 3, dtype=torch.long), 4)
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 0]]
    with pytest.raises(ValueError, match="4 tokens do not fit in a sequence of 3"):
        common.pad_tokens(torch.zeros(1, 4, 2), 3)


def test_flow_timestep_and_guidance_tensor():
    t = common.flow_timestep(torch.tensor(250.0), 3, torch.device("cpu"), torch.float16)
    assert t.tolist() == [0.25, 0.25, 0.25] and t.dtype == torch.float16
    g = common.guidance_tensor(None, 3.5, 2, torch.device("cpu"))
    assert g.tolist() == [3.5, 3.5] and g.dtype == torch.float32
    assert common.guidance_tensor(1.0, 3.5, 1, torch.device("cpu")).tolist() == [1.0]


class _KeepEven:
    """A merge plan that keeps the even image tokens and copies each back over its odd neighbour."""

    def __init__(self, n: int) -> None:
        self.kept_index = torch.arange(0, n, 2)[None]

    def unmerge(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(2, dim=1)


def test_routing_processor_merges_only_the_image_tokens_and_its_rotary_rows():
    def merge(image, layer):
        assert layer is LAYER
        return image[:, ::2], _KeepEven(image.shape[1])

    proc = RoutingProcessor(LAYER, attend=lambda *a, **k: None, merge=merge)
    hidden = torch.arange(2 * 7, dtype=torch.float32).view(1, 7, 2)  # 3 text tokens, 4 image tokens
    rotary = (torch.arange(7.0), -torch.arange(7.0))
    merged, plan, rot = proc.merge_after_text(hidden, 3, rotary, 3)
    assert torch.equal(merged, hidden[:, [0, 1, 2, 3, 5]])
    assert rot[0].tolist() == [0, 1, 2, 3, 5] and rot[1].tolist() == [0, -1, -2, -3, -5]
    restored = unmerge_after_text(merged, plan, 3)
    assert torch.equal(restored, hidden[:, [0, 1, 2, 3, 3, 5, 5]])
    # a single-stream block whose text is not in the hidden states: the rotary tables still start with the text
    _, _, rot = proc.merge_after_text(hidden[:, 3:], 0, rotary, 3)
    assert rot[0].tolist() == [0, 1, 2, 3, 5]


def test_routing_processor_without_merge_leaves_tokens_alone():
    seen = {}

    def attend(q, k, v, layer, **kwargs):
        seen.update(shape=tuple(q.shape), layer=layer, **kwargs)
        return q * 2

    proc = RoutingProcessor(LAYER, attend)
    hidden = torch.randn(1, 5, 4)
    same, plan, rot = proc.merge_after_text(hidden, 2, None, 2)
    assert same is hidden and plan is None and rot is None
    assert unmerge_after_text(hidden, None, 2) is hidden
    q = torch.randn(1, 5, 2, 3)  # [B, S, heads, d]
    out = proc.attend_tokens(q, q, q, num_text=2)
    assert seen == {"shape": (1, 2, 5, 3), "layer": LAYER, "num_text": 2}  # attend sees [B, heads, S, d]
    assert torch.equal(out, q * 2)


@pytest.mark.parametrize(
    "cls",
    [StandardProcessor, JointProcessor, FluxProcessor, Flux2Processor, QwenImageProcessor, SanaLinearProcessor,
     SanaCrossProcessor],
)  # fmt: skip
def test_every_routing_processor_takes_the_shared_arguments(cls):
    attend = object()
    plain, merging = cls(LAYER, attend), cls(LAYER, attend, merge=len)
    assert isinstance(plain, RoutingProcessor)
    assert plain.layer is LAYER and plain.attend is attend and merging.merge is len
    hidden = torch.zeros(1, 2, 3)
    assert plain.merge(hidden, LAYER) == (hidden, None)  # no merge given: tokens pass unchanged
    z = ZImageProcessor(LAYER, attend, lambda: (4, 32))
    assert isinstance(z, RoutingProcessor) and z.image_tokens() == (4, 32) and z.merge(hidden, LAYER)[1] is None
