"""The GPU serving benchmark's rehearsal: the same script with tiny shapes, on whatever device
the test machine has. It builds both sides on shared modules and their greedy tokens agree."""

from __future__ import annotations

import json

from benchmarks import bench_gpu_serving
from benchmarks.bench_gpu_serving import COMPILED, WHOLE_SLOT, main


def test_tiny_rehearsal_runs_and_both_sides_agree(tmp_path):
    out = tmp_path / "res.json"
    args = ["--tiny", "--new-tokens", "8", "--repeats", "1", "--concurrency", "1", "3", "--json", str(out)]
    args += ["--profile", "--compile", "--whole-slot", "--generic"]
    assert main(args) == 0
    res = json.loads(out.read_text())
    assert res["decode_paths"]["seechat"].startswith("static")
    assert res["greedy_tokens_shared"] == {name: [8, 8] for name in res["decode_paths"]}
    assert set(res["table"]) == {
        "seechat",
        "seechat, no static decode",
        "seechat, compiled static step",
        "seechat, attention over the whole slot",
        "transformers",
    }
    assert "compiled" in res["decode_paths"]["seechat, compiled static step"]  # compiling worked
    for row in res["table"].values():
        assert row["decode_tok_s_b1"]["median"] > 0 and row["ttft_ms"]["median"] > 0
        assert set(row["agg_tok_s"]) == {"1", "3"}
    assert res["decode_weight_bytes"] > 0 and res["prompt_tokens"] > 16 and res["kv_slot_tokens"] > 0
    prof = res["profile"]
    assert prof["engine"] == "seechat" and prof["tokens"] == 8 and prof["wall_s"] > 0
    assert prof["top"] and all(r["seconds"] > 0 and r["calls"] > 0 for r in prof["top"])
    assert prof["launches"] >= sum(r["calls"] for r in prof["top"]) and prof["launches_per_token"] > 0
    assert res["profile_compiled"]["engine"] == "seechat, compiled static step"


def test_a_failing_row_is_reported_and_the_other_rows_still_run(tmp_path, monkeypatch):
    """Device time is scarce: one lever that breaks on the card (here the compiled step's requests
    raise) costs its own row, not the run. The rows before and after it are timed, printed and in
    the JSON, the failure is named, and the exit status says a row failed."""
    real = bench_gpu_serving.GpuBench.engine_run

    def engine_run(self, name, concurrency):
        if name == COMPILED:
            raise RuntimeError("inductor failed")
        return real(self, name, concurrency)

    monkeypatch.setattr(bench_gpu_serving.GpuBench, "engine_run", engine_run)
    out = tmp_path / "res.json"
    args = ["--tiny", "--new-tokens", "6", "--repeats", "1", "--concurrency", "1", "--json", str(out)]
    assert main([*args, "--compile", "--whole-slot"]) == 1
    res = json.loads(out.read_text())
    assert set(res["table"]) == {"seechat", "transformers", WHOLE_SLOT}  # the row after the failure ran
    assert res["errors"] == {COMPILED: "RuntimeError: inductor failed"}
    assert COMPILED not in res["decode_paths"] and res["greedy_tokens_shared"]["seechat"] == [6, 6]
    assert "FAILED, RuntimeError: inductor failed" in bench_gpu_serving.report(res)


def test_full_size_tokenizer_streams_every_id_the_lm_can_sample():
    """At full size the benchmark's character tokenizer has one character per LM token id, so a
    random LM's tokens always stream as text (the per-token clock needs every token to stream)."""
    from benchmarks.bench_gpu_serving import QUESTION, filler_chars

    chars = filler_chars(5000)
    assert len(set(chars)) == 5000 and not set(chars) & set(QUESTION)
    assert all(len(c) == 1 and not 0xD800 <= ord(c) <= 0xDFFF and not c.isspace() for c in chars)


def test_the_profile_counts_each_kernel_once():
    """torch credits the op that launched a kernel with the kernel's time (`aten::mm`'s
    `self_device_time_total` is its gemm's), beside the kernel's own device event. Counting every
    event with device time would count such kernels twice and overstate how busy the GPU was; a
    kernel replayed from a CUDA graph has no launching op and was counted once, so the error would
    not even be a constant factor."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    def event(i, name, start, end, device_type=DeviceType.CPU):
        return FunctionEvent(i, name, 1, start, end, use_device="cuda", device_type=device_type)

    mm = event(1, "aten::mm", 0, 30)
    mm.append_kernel("gemm", 0, 100)  # what the profiler does for a kernel launched by an op
    gemm = event(2, "gemm", 40, 140, DeviceType.CUDA)
    replayed = event(3, "rms_norm_kernel", 150, 155, DeviceType.CUDA)  # from a graph replay: no op
    empty = event(4, "aten::empty", 31, 33)
    events = [mm, gemm, replayed, empty]
    assert mm.self_device_time_total == 100  # the accounting the rows must not add twice
    rows = bench_gpu_serving.busy_rows
    assert rows(events, cuda=True) == [("gemm", 1, 100e-6), ("rms_norm_kernel", 1, 5e-6)]
    assert rows(events, cuda=False) == [("aten::mm", 1, 30e-6), ("aten::empty", 1, 2e-6)]


def test_the_full_width_rehearsal_is_the_reference_one_layer_deep():
    vision, lm = bench_gpu_serving.reference_configs(layers=1)
    assert (vision.num_hidden_layers, lm.num_hidden_layers) == (1, 1)
    assert (lm.vocab_size, lm.hidden_size, lm.num_key_value_heads, vision.image_size) == (
        152064,
        3584,
        4,
        336,
    )
    assert [c.num_hidden_layers for c in bench_gpu_serving.reference_configs()] == [24, 28]
