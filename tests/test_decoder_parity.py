"""The exported decoder graph (paged KV pool, fp-KV and INT8) against transformers' Qwen3-VL.

The graphs are exported once per source version and cached under build/cache/ (exporting with
torch.export is the slow part); a small pool driver below plays the scheduler's role: it allocates
blocks per sequence and feeds block tables and slot mappings, over the runtime's own device pool
and I/O binding (the graph writes the new tokens' K/V into the pool in place).
"""
from __future__ import annotations

import hashlib
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from exporter import decoder as decoder_module
from exporter.decoder import export_decoder, quantize_kv, quantize_kv_numpy
from runtime import manifest as mf
from runtime.kv_cache import KVPool, KVShape
from runtime.runner import DecoderBinding

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "build" / "cache"
BLOCK = 4                      # pool block size used by the driver (the graph's BS is dynamic)
GRAPHS = {"float": ("float", "float32"), "int8": ("int8", "float32"), "int8_fp16": ("int8", "float16"),
          # the keys-as-[T, D]-rows attention layout real checkpoints (head_dim 128) get, forced on
          # the seed model's narrow heads
          "float_rows": ("float", "float32"), "int8_rows": ("int8", "float32"),
          "int8_fp16_rows": ("int8", "float16")}


@pytest.fixture(scope="module")
def hf_model(seed_model_dir):
    from transformers import Qwen3VLForConditionalGeneration
    torch.set_num_threads(1)
    return Qwen3VLForConditionalGeneration.from_pretrained(seed_model_dir, torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def graphs(hf_model, seed_model_dir) -> dict[str, Path]:
    """Exported decoder graphs, cached by the hash of the exporter sources and the seed model."""
    h = hashlib.sha256(torch.__version__.encode())
    h.update(repr(sorted(GRAPHS.items())).encode())        # a graph added here is exported too
    for f in ("exporter/decoder.py", "exporter/rope.py", "exporter/seed_model.py"):
        h.update((ROOT / f).read_bytes())
    target = CACHE / f"decoder-graphs-{h.hexdigest()[:12]}"
    if not (target / ".complete").exists():
        tmp = CACHE / f".decoder-graphs-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        for name, (mode, dtype) in GRAPHS.items():
            with pytest.MonkeyPatch.context() as mp:
                if name.endswith("_rows"):
                    mp.setattr(decoder_module, "KEYS_AS_ROWS_MIN_HEAD_DIM", 0)
                export_decoder(hf_model, tmp / f"{name}.onnx", kv_mode=mode, dtype=dtype)
        (tmp / ".complete").write_text("ok")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return {name: target / f"{name}.onnx" for name in GRAPHS}


def session(path: Path):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class PoolDriver:
    """The runtime's KV pool + I/O binding, with a toy allocator. Block 0 is never allocated: it
    pads block tables."""

    def __init__(self, sess, num_blocks: int = 32):
        self.sess = sess
        ins = {i.name: i for i in sess.get_inputs()}
        kv0 = ins[mf.pool_name(mf.KV, 0)]                      # [NB, BS, 2*KVH, D]
        layers = sum(1 for n in ins if mf.pool_kind(n) == mf.KV)
        self.int8 = mf.has_int8_pool(ins)
        mode = "int8" if self.int8 else ("float16" if "float16" in kv0.type else "float32")
        self.pool = KVPool(KVShape(layers, kv0.shape[2] // 2, kv0.shape[3], BLOCK), num_blocks, mode)
        self.binding = DecoderBinding(sess, self.pool)
        self.dtype = np.float16 if "float16" in ins[mf.INPUTS_EMBEDS].type else np.float32
        self.free = list(range(1, num_blocks))
        self.tables: dict[str, list[int]] = {}
        self.lens: dict[str, int] = {}
        self.nds = ins[mf.DEEPSTACK_EMBEDS].shape[0]

    def slots(self, sid: str, positions) -> np.ndarray:
        """Flat pool slots of a sequence's token positions."""
        positions = np.asarray(positions)
        return np.asarray(self.tables[sid])[positions // BLOCK] * BLOCK + positions % BLOCK

    def step(self, batch: list[dict]) -> list[np.ndarray]:
        """batch: dicts with id, embeds [s,H], positions [3,s], optional deepstack [NDS,s,H] and
        logits_at (indices into the s new tokens). Returns logits [k_b, V] per sequence."""
        b, s = len(batch), max(len(x["embeds"]) for x in batch)
        hidden = batch[0]["embeds"].shape[1]
        embeds = np.zeros((b, s, hidden), self.dtype)
        pos = np.zeros((3, b, s), np.int64)
        ds = np.zeros((self.nds, b, s, hidden), self.dtype)
        past = np.zeros(b, np.int64)
        slot_mapping = np.full((b, s), self.pool.scratch_slot, np.int64)
        k = max(len(x["logits_at"]) for x in batch)
        logit_pos = np.zeros((b, k), np.int64)
        for i, x in enumerate(batch):
            n = len(x["embeds"])
            embeds[i, :n], pos[:, i, :n] = x["embeds"], x["positions"]
            if x.get("deepstack") is not None:
                ds[:, i, :n] = x["deepstack"]
            past[i] = self.lens.get(x["id"], 0)
            at = list(x["logits_at"])
            logit_pos[i] = at + [at[-1]] * (k - len(at))
            table = self.tables.setdefault(x["id"], [])
            while len(table) * BLOCK < past[i] + n:
                table.append(self.free.pop(0))
            slot_mapping[i, :n] = self.slots(x["id"], past[i] + np.arange(n))
        m = max(1, max(len(self.tables[x["id"]]) for x in batch))
        tables = np.zeros((b, m), np.int64)
        for i, x in enumerate(batch):
            t = self.tables[x["id"]]
            tables[i, :len(t)] = t
        feeds = {mf.INPUTS_EMBEDS: embeds, mf.POSITION_IDS: pos, mf.DEEPSTACK_EMBEDS: ds,
                 mf.PAST_LENS: past, mf.BLOCK_TABLES: tables, mf.SLOT_MAPPING: slot_mapping,
                 mf.LOGIT_POSITIONS: logit_pos}
        logits = self.binding.run(feeds, k)
        for i, x in enumerate(batch):
            self.lens[x["id"]] = int(past[i]) + len(x["embeds"])
        return [logits[i, :len(x["logits_at"])] for i, x in enumerate(batch)]


def embed(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model.model.language_model.embed_tokens(torch.as_tensor(ids)).numpy()


def text_item(model, sid: str, ids, start: int, logits_at=None) -> dict:
    n = len(ids)
    return dict(id=sid, embeds=embed(model, ids), positions=np.tile(np.arange(start, start + n), (3, 1)),
                logits_at=list(range(n)) if logits_at is None else logits_at)


PROMPT = [17, 250, 3, 999, 41, 88, 512, 7, 300, 64, 12]


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


def test_text_prompt_all_positions_match_hf(hf_model, graphs):
    ref = hf_logits(hf_model, PROMPT)
    pool = PoolDriver(session(graphs["float"]))
    got = pool.step([text_item(hf_model, "a", PROMPT, 0)])[0]
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def greedy(model, pool: PoolDriver, ids, chunks, steps: int, eos) -> list[int]:
    """Chunked prefill then greedy decode through the graph; returns the generated ids."""
    pos = 0
    for chunk in np.split(np.asarray(ids), np.cumsum(chunks)[:-1]):
        logits = pool.step([text_item(model, "g", chunk, pos, [len(chunk) - 1])])[0]
        pos += len(chunk)
    out = []
    for _ in range(steps):
        tok = int(logits[-1].argmax())
        out.append(tok)
        if tok in eos:
            break
        logits = pool.step([text_item(model, "g", [tok], pos, [0])])[0]
        pos += 1
    return out


def test_chunked_prefill_then_greedy_decode_matches_generate(hf_model, graphs):
    eos = set(np.atleast_1d(hf_model.generation_config.eos_token_id).tolist())
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([PROMPT]), max_new_tokens=5, do_sample=False)[0, len(PROMPT):]
    got = greedy(hf_model, PoolDriver(session(graphs["float"])), PROMPT, [6, 5], 5, eos)
    assert got == ref.tolist()


def test_batch_of_two_right_padded_matches_each_alone(hf_model, graphs):
    sess = session(graphs["float"])
    a, b = PROMPT[:9], [5, 600, 77, 2, 901]
    batched = PoolDriver(sess)
    la, lb = batched.step([text_item(hf_model, "a", a, 0), text_item(hf_model, "b", b, 0)])
    # second step mixes a decode (S=1) with a 3-token chunk on a different past length
    la2, lb2 = batched.step([text_item(hf_model, "a", [42], 9), text_item(hf_model, "b", [8, 9, 10], 5)])
    for sid, ids, follow, got in (("a", a, [42], (la, la2)), ("b", b, [8, 9, 10], (lb, lb2))):
        alone = PoolDriver(sess)
        ref1 = alone.step([text_item(hf_model, sid, ids, 0)])[0]
        ref2 = alone.step([text_item(hf_model, sid, follow, len(ids))])[0]
        assert np.isfinite(got[0]).all() and np.isfinite(got[1]).all()
        np.testing.assert_allclose(got[0], ref1, atol=1e-4, rtol=0)
        np.testing.assert_allclose(got[1], ref2, atol=1e-4, rtol=0)
    # and against HF on the concatenated sequence
    np.testing.assert_allclose(lb2, hf_logits(hf_model, b + [8, 9, 10])[5:], atol=1e-3, rtol=0)


def test_empty_past_masks_a_garbage_block_and_padding_writes_go_to_scratch(hf_model, graphs):
    """Two rows with no past: row 0 has four tokens in a fresh block; row 1 has one token and
    three padding rows sent to the scratch slot, and its table's second block is full of another
    sequence's keys. The new tokens read each other back from their own slots, the garbage beyond
    them is masked, the padding writes are harmless, and no slot but the five new tokens' changes."""
    sess = session(graphs["float"])
    pool = PoolDriver(sess)
    pool.step([text_item(hf_model, "junk", [900, 901, 902, 903], 0)])       # fills block 1
    slots = np.arange(pool.pool.scratch_slot)
    before = pool.pool.read_slots(slots)
    item = text_item(hf_model, "x", PROMPT[:4], 0)
    embeds = item["embeds"][None].astype(np.float32)
    nds = pool.nds
    scratch = pool.pool.scratch_slot
    new_slots = np.array([[2 * BLOCK + i for i in range(4)], [3 * BLOCK, scratch, scratch, scratch]])
    feeds = {mf.INPUTS_EMBEDS: np.repeat(embeds, 2, 0), mf.POSITION_IDS: np.tile(np.arange(4), (3, 2, 1)),
             mf.DEEPSTACK_EMBEDS: np.zeros((nds, 2, 4, embeds.shape[-1]), np.float32),
             mf.PAST_LENS: np.zeros(2, np.int64), mf.BLOCK_TABLES: np.array([[2, 0], [3, 1]]),
             mf.SLOT_MAPPING: new_slots, mf.LOGIT_POSITIONS: np.array([[3], [0]])}
    logits = pool.binding.run(feeds, 1)
    assert logits.shape == (2, 1, logits.shape[-1])
    ref = hf_logits(hf_model, PROMPT[:4])
    np.testing.assert_allclose(logits[0, 0], ref[3], atol=1e-3, rtol=0)
    np.testing.assert_allclose(logits[1, 0], ref[0], atol=1e-3, rtol=0)
    after = pool.pool.read_slots(slots)
    untouched = np.setdiff1d(slots, new_slots)
    for key in before:                                              # slot is the first axis
        np.testing.assert_array_equal(after[key][untouched], before[key][untouched])


def hf_cache(model, ids) -> list[tuple[np.ndarray, np.ndarray]]:
    """transformers' cached (key, value) per layer for a prompt: [T, KVH, D] after norm and RoPE."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
    cache = out.past_key_values
    return [(layer.keys[0].permute(1, 0, 2).numpy(), layer.values[0].permute(1, 0, 2).numpy())
            for layer in cache.layers]


def test_the_graph_writes_new_tokens_in_place_as_transformers_caches_them(hf_model, graphs):
    """The pool's device values keep their buffers across steps, and the slots the graph wrote
    hold transformers' keys/values for those positions (fp-KV graph: within float error at every
    layer; INT8 graph: layer 0, before any attention to quantised keys, is exactly
    quantize_kv_numpy of transformers' values up to a rounding flip)."""
    ref = hf_cache(hf_model, PROMPT)
    for name in ("float", "int8"):
        drv = PoolDriver(session(graphs[name]))
        ptrs = drv.pool.data_ptrs()
        drv.step([text_item(hf_model, "p", PROMPT[:7], 0)])
        drv.step([text_item(hf_model, "p", PROMPT[7:], 7)])
        assert drv.pool.data_ptrs() == ptrs
        got = drv.pool.read_slots(drv.slots("p", np.arange(len(PROMPT))))   # [T, L, KVH, D]
        if name == "float":
            for layer, (k, v) in enumerate(ref):
                np.testing.assert_allclose(got["k"][:, layer], k, atol=1e-4, rtol=1e-4)
                np.testing.assert_allclose(got["v"][:, layer], v, atol=1e-4, rtol=1e-4)
            continue
        for key, scale, ref_x in (("k", "k_scale", ref[0][0]), ("v", "v_scale", ref[0][1])):
            q_ref, s_ref = quantize_kv_numpy(ref_x)
            assert got[key].dtype == np.int8
            assert np.abs(got[key][:, 0].astype(int) - q_ref).max() <= 1
            assert (got[key][:, 0] == q_ref).mean() > 0.99
            np.testing.assert_allclose(got[scale][:, 0], s_ref, rtol=1e-4, atol=0)


def test_same_shape_steps_reuse_the_bound_input_buffers_and_logits_stay_the_callers(hf_model, graphs):
    """Decode steps of unchanged shapes copy their inputs into the buffers bound before (no new
    binding), still compute the right thing, and each step's logits are an array of the
    caller's own: the next step does not overwrite them."""
    drv = PoolDriver(session(graphs["float"]))
    ref = hf_logits(hf_model, PROMPT[:3])
    first = drv.step([text_item(hf_model, "a", PROMPT[:1], 0)])[0]
    kept = first.copy()
    buffers = {name: a.ctypes.data for name, a in drv.binding._inputs.items()}
    second = drv.step([text_item(hf_model, "a", PROMPT[1:2], 1)])[0]
    third = drv.step([text_item(hf_model, "a", PROMPT[2:3], 2)])[0]
    assert {name: a.ctypes.data for name, a in drv.binding._inputs.items()} == buffers
    np.testing.assert_array_equal(first, kept)
    for got, want in ((first, ref[0]), (second, ref[1]), (third, ref[2])):
        np.testing.assert_allclose(got[0], want, atol=1e-3, rtol=0)


def test_host_traffic_per_step_is_independent_of_the_pool_and_linear_in_new_tokens(hf_model, graphs):
    """The I/O ledger: the same steps over a small pool and a >= 1 GiB pool bind the same host
    bytes and read the same bytes back; a chunk of n new tokens moves a + b*n bytes."""
    sess = session(graphs["int8"])
    small = PoolDriver(sess, num_blocks=64)
    per_block = small.pool.shape.bytes_per_block("int8")
    big = PoolDriver(sess, num_blocks=(1 << 30) // per_block + 1)
    assert big.pool.nbytes() >= 1 << 30 and small.pool.nbytes() < 1 << 20
    ledgers = []
    for drv in (small, big):
        moved = []
        drv.step([text_item(hf_model, "a", PROMPT, 0)])
        moved.append(drv.binding.last_io)
        for i, tok in enumerate((5, 6, 7)):
            drv.step([text_item(hf_model, "a", [tok], len(PROMPT) + i, [0])])
            moved.append(drv.binding.last_io)
        ledgers.append(moved)
    assert ledgers[0] == ledgers[1]
    assert ledgers[0][-1].host_out_bytes == 4 * small.binding.vocab          # one row of logits
    fresh = PoolDriver(sess)
    sizes = []
    for n, sid in ((1, "n1"), (2, "n2"), (3, "n3")):                          # all within one block
        fresh.step([text_item(hf_model, sid, PROMPT[:n], 0, [n - 1])])
        sizes.append(fresh.binding.last_io.host_in_bytes)
    assert sizes[2] - sizes[1] == sizes[1] - sizes[0] > 0


def image_prompt(model):
    """input_ids with one image (grid 1x4x8 -> 8 merged tokens) and HF's own embeddings,
    DeepStack features and MRoPE positions for it."""
    cfg = model.config
    grid = torch.tensor([[1, 4, 8]])
    ids = [17, 250, 3, cfg.vision_start_token_id] + [cfg.image_token_id] * 8 + [cfg.vision_end_token_id, 41, 88, 512]
    ids_t = torch.tensor([ids])
    mm = (ids_t == cfg.image_token_id).int()
    gen = torch.Generator().manual_seed(1)
    vc = cfg.vision_config
    pixels = torch.randn(32, vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2, generator=gen)
    with torch.no_grad():
        feats = model.model.get_image_features(pixels, grid, return_dict=True)
        mask = (ids_t == cfg.image_token_id)[0]
        embeds = model.model.language_model.embed_tokens(ids_t)[0]
        embeds[mask] = torch.cat(feats.pooler_output, 0)
        ds = torch.zeros(len(feats.deepstack_features), len(ids), embeds.shape[-1])
        for i, f in enumerate(feats.deepstack_features):
            ds[i, mask] = torch.cat(f, 0)
        positions = model.model.get_rope_index(ids_t, mm, image_grid_thw=grid)[0][:, 0]
        ref = model(input_ids=ids_t, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=mm).logits[0]
    return embeds.numpy(), ds.numpy(), positions.numpy(), ref.numpy()


@pytest.mark.parametrize("chunks", [[16], [6, 10]], ids=["one-step", "split-inside-image"])
def test_image_prompt_matches_hf(hf_model, graphs, chunks):
    embeds, ds, positions, ref = image_prompt(hf_model)
    assert positions[0, -1] == positions[0, 12] + 3 and positions[0, 12] == 4 + 4   # jump max(h,w)/merge
    pool = PoolDriver(session(graphs["float"]))
    got, start = [], 0
    for n in chunks:
        sl = slice(start, start + n)
        got.append(pool.step([dict(id="img", embeds=embeds[sl], positions=positions[:, sl],
                                   deepstack=ds[:, sl], logits_at=list(range(n)))])[0])
        start += n
    got = np.concatenate(got)
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_quantize_kv_torch_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 2, 32)).astype(np.float32)
    x[0, 0, 0] = 0.0                                   # all-zero head: scale clamps to 1e-8
    x[1, 1, 1, :2] = [127.0, 0.5]                      # exact half: round half to even
    q_ref, s_ref = quantize_kv_numpy(x)
    q, s = quantize_kv(torch.from_numpy(x))
    assert q.dtype == torch.int8 and np.array_equal(q.numpy(), q_ref)
    np.testing.assert_allclose(s.numpy(), s_ref, rtol=1e-6, atol=0)
    assert s_ref.shape == (3, 5, 2, 1) and s.shape == (3, 5, 2, 1)    # broadcasts over D, as stored
    assert s_ref[0, 0, 0, 0] == np.float32(1e-8) and q_ref[1, 1, 1, 1] == 0


def test_int8_graph_tracks_fp_kv(hf_model, graphs):
    fp, q8 = PoolDriver(session(graphs["float"])), PoolDriver(session(graphs["int8"]))
    item = text_item(hf_model, "q", PROMPT, 0)
    fp.step([item])
    q8.step([item])
    # empty past: layer 0's K/V come before any attention, so there the int8 graph stores exactly
    # quantize_kv_numpy of what the fp-KV graph stores (later layers attend to quantised K/V)
    slots = fp.slots("q", np.arange(len(PROMPT)))
    got_fp, got_q8 = fp.pool.read_slots(slots), q8.pool.read_slots(q8.slots("q", np.arange(len(PROMPT))))
    for key, scale in (("k", "k_scale"), ("v", "v_scale")):
        q_ref, s_ref = quantize_kv_numpy(got_fp[key][:, 0])
        assert got_q8[key].dtype == np.int8 and np.array_equal(got_q8[key][:, 0], q_ref)
        np.testing.assert_allclose(got_q8[scale][:, 0], s_ref, rtol=1e-6, atol=0)
    # decode over an INT8 past: finite, same shapes; report the drift from the fp-KV graph
    diffs, agree, pos, tok = [], 0, len(PROMPT), PROMPT[-1]
    for _ in range(5):
        a = fp.step([text_item(hf_model, "q", [tok], pos, [0])])[0]
        b = q8.step([text_item(hf_model, "q", [tok], pos, [0])])[0]
        assert a.shape == b.shape and np.isfinite(b).all()
        diffs.append(float(np.abs(a - b).max()))
        agree += int(a.argmax() == b.argmax())
        tok, pos = int(a.argmax()), pos + 1
    print(f"\nINT8 vs fp-KV decode: max |logit diff| {max(diffs):.4g}, argmax agreement {agree}/5")


def test_int8_graph_does_not_depend_on_chunk_boundaries(hf_model, graphs):
    """New tokens attend to each other's keys quantised as the pool stores them, so a prompt in
    one chunk, in two, or token by token gives the same logits (prefix reuse gives the same too)."""
    whole = PoolDriver(session(graphs["int8"]))
    one = whole.step([text_item(hf_model, "w", PROMPT, 0)])[0]
    split = PoolDriver(session(graphs["int8"]))
    first = split.step([text_item(hf_model, "s", PROMPT[:5], 0)])[0]
    second = split.step([text_item(hf_model, "s", PROMPT[5:], 5)])[0]
    np.testing.assert_allclose(np.concatenate([first, second]), one, atol=1e-5)
    steps = PoolDriver(session(graphs["int8"]))
    singles = [steps.step([text_item(hf_model, "t", [tok], i)])[0] for i, tok in enumerate(PROMPT)]
    np.testing.assert_allclose(np.concatenate(singles), one, atol=1e-5)


def test_float16_graph_loads_and_runs(hf_model, graphs):
    sess = session(graphs["int8_fp16"])
    assert sess.get_inputs()[0].type == "tensor(float16)"
    pool = PoolDriver(sess)
    got = pool.step([text_item(hf_model, "h", PROMPT[:6], 0)])[0]
    got2 = pool.step([text_item(hf_model, "h", PROMPT[6:], 6)])[0]
    ref = hf_logits(hf_model, PROMPT)
    assert got.dtype == np.float32 and np.isfinite(got).all() and np.isfinite(got2).all()
    print(f"\nfp16 graph vs HF fp32: max |logit diff| {np.abs(np.concatenate([got, got2]) - ref).max():.4g}")


def _kv_transposes(path: Path) -> Counter:
    """How many 5-D Transposes of each permutation the graph has."""
    import onnx
    from onnx import helper
    g = onnx.load(str(path), load_external_data=False).graph
    return Counter(tuple(helper.get_attribute_value(a)) for n in g.node if n.op_type == "Transpose"
                   for a in n.attribute if a.name == "perm" and len(a.ints) == 5)


def test_keys_as_rows_layout_computes_the_same_function(hf_model, graphs):
    """The layout wide heads get (keys and values moved as whole D-rows, both transposes folded
    into the MatMuls) is the same attention: float against transformers, INT8 against the
    [D, T] layout's INT8 graph, over a chunked prompt and greedy decode steps."""
    # per layer: the K/V read moves rows (0, 3, 1, 2, 4) instead of going to [D, T] (0, 3, 4, 1, 2);
    # the scales' read and the output's transpose are the same in both
    rows, cols = _kv_transposes(graphs["int8_rows"]), _kv_transposes(graphs["int8"])
    layers = hf_model.config.text_config.num_hidden_layers
    assert rows[(0, 3, 1, 2, 4)] == cols[(0, 3, 1, 2, 4)] + layers
    assert rows[(0, 3, 4, 1, 2)] == cols[(0, 3, 4, 1, 2)] - layers
    ref = hf_logits(hf_model, PROMPT)
    got = PoolDriver(session(graphs["float_rows"])).step([text_item(hf_model, "a", PROMPT, 0)])[0]
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)
    cols, rows = PoolDriver(session(graphs["int8"])), PoolDriver(session(graphs["int8_rows"]))
    pos = 0
    for chunk in (PROMPT[:6], PROMPT[6:]):
        item = text_item(hf_model, "r", chunk, pos)
        np.testing.assert_allclose(rows.step([item])[0], cols.step([item])[0], atol=1e-4, rtol=0)
        pos += len(chunk)
    tok = PROMPT[-1]
    for _ in range(4):
        item = text_item(hf_model, "r", [tok], pos, [0])
        a, b = cols.step([item])[0], rows.step([item])[0]
        np.testing.assert_allclose(b, a, atol=1e-4, rtol=0)
        tok, pos = int(a.argmax()), pos + 1


def test_keys_as_rows_layout_in_float16(hf_model, graphs):
    """The CUDA profiles' float16 graphs of real checkpoints take the rows layout too: it runs and
    agrees with the [D, T] float16 graph."""
    cols, rows = PoolDriver(session(graphs["int8_fp16"])), PoolDriver(session(graphs["int8_fp16_rows"]))
    for start, chunk in ((0, PROMPT[:6]), (6, PROMPT[6:])):
        item = text_item(hf_model, "h", chunk, start)
        a, b = cols.step([item])[0], rows.step([item])[0]
        assert np.isfinite(b).all()
        np.testing.assert_allclose(b, a, atol=2e-2, rtol=0)
