"""The decoding batch's KV cache (serving/ragged_cache.py): rows of different lengths joined into
one left-padded batch, a row leaving mid-way, and more steps than the buffers' spare room, each
row's logits equal to the same row decoded alone without any cache."""

import torch

from hybridtune.core.base_models import load_base
from hybridtune.core.kv_cache import cache_keyword, returned_cache
from hybridtune.serving import ragged_cache
from hybridtune.serving.ragged_cache import RaggedCache, SpareLayer

TOL = {"rtol": 1e-4, "atol": 1e-4}  # fp32, padded batch against one row alone


def test_joined_rows_that_leave_and_outgrow_the_spare_room_equal_each_row_alone(tiny_lm_dir, monkeypatch):
    monkeypatch.setattr(ragged_cache, "SPARE", 4)  # steps below run past the room several times
    model, _ = load_base(str(tiny_lm_dir))
    model.eval()
    keyword = cache_keyword(model)
    prompts = [[5, 9, 11, 40, 41, 7, 8], [12, 13], [60, 61, 62, 63]]
    rows = [list(p) for p in prompts]
    with torch.inference_mode():

        def prefill(prompt_rows):
            width = max(map(len, prompt_rows))
            ids = torch.tensor([[0] * (width - len(r)) + r for r in prompt_rows])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in prompt_rows])
            out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                        use_cache=True)  # fmt: skip
            return RaggedCache(returned_cache(out), mask), out.logits[:, -1]

        batch, logits = prefill(rows[:1])
        later, later_logits = prefill(rows[1:])
        batch.join(later)
        assert all(type(layer) is SpareLayer for layer in batch.cache.layers)
        last = torch.cat([logits, later_logits])
        live = [0, 1, 2]
        for step in range(12):
            if step == 5:  # the longest row leaves: its padding columns are trimmed
                batch.keep([1, 2])
                live, last = live[1:], last[1:]
            for i, row in enumerate(live):
                alone = model(input_ids=torch.tensor([rows[row]])).logits[0, -1]
                assert torch.allclose(last[i], alone, **TOL), (step, row, (last[i] - alone).abs().max())
            tokens = last.argmax(-1)
            for i, row in enumerate(live):
                rows[row].append(int(tokens[i]))
            positions = batch.positions()
            mask = batch.grow()
            out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions, use_cache=True,
                        **{keyword: batch.cache})  # fmt: skip
            last = out.logits[:, -1]
    assert batch.cache.layers[0].keys.shape[2] == batch.mask.shape[1]
